"""The backend-neutral step: what to run, with what, on how much compute.

A :class:`StepSpec` is plain data. It validates itself at construction (DAG parse time when the values
are literal, before submission when they are templated), and every error names the field and the fix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_remote_ml.core.errors import ConfigError
from airflow_remote_ml.core.validation import (
    MAX_CPU,
    MAX_GPU,
    MAX_INT,
    MAX_MEMORY_BYTES,
    as_float,
    check_backend_key,
    check_json,
    check_range,
    check_uri,
    expect_bool,
    expect_mapping,
    expect_names,
    expect_text,
    json_copy,
    parse_timeout,
    require_text,
    short_repr,
    type_name,
)

_CALLABLE_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_RESERVED_ENV_PREFIX = "REMOTE_ML_"

_MEMORY_UNITS = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
# ASCII digits only: \d would also match '٣' or '²', which no platform's quantity parser takes.
_MEMORY_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]{0,2})\s*$")
_WHOLE_RE = re.compile(r"^\s*[0-9]{1,19}\s*$")


def parse_memory(value: Any, field_name: str = "resources.memory") -> int | None:
    """Return a memory size in bytes from ``'512Mi'``, ``'4Gi'``, ``'2G'`` or a number of bytes."""
    fix = "use e.g. '512Mi' or '4Gi'"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(field_name, f"{short_repr(value)} is not a size", fix)
    if isinstance(value, (int, float)):
        number = as_float(field_name, value, "a size", fix)
    else:
        match = _MEMORY_RE.match(value)
        unit = match.group(2).lower() if match else None
        if not match or unit not in _MEMORY_UNITS:
            raise ConfigError(field_name, f"{short_repr(value)} is not a size", fix)
        number = as_float(field_name, match.group(1), "a size", fix) * _MEMORY_UNITS[unit]
    check_range(field_name, number, maximum=MAX_MEMORY_BYTES, shown=value, fix=fix, unit=" bytes")
    size = int(number)
    if size <= 0:  # a fraction of a byte
        raise ConfigError(field_name, f"{short_repr(value)} must be at least one byte", fix)
    return size


def parse_cpu(value: Any, field_name: str = "resources.cpu") -> float | None:
    """Return a CPU count from ``2``, ``0.5`` or Kubernetes-style ``'500m'``."""
    fix = "use e.g. 2, 0.5 or '500m'"
    if value is None:
        return None
    if isinstance(value, str) and value.strip().endswith("m"):
        cpu = as_float(field_name, value.strip()[:-1], "a CPU count", fix) / 1000
    else:
        cpu = as_float(field_name, value, "a CPU count", fix)
    return check_range(field_name, cpu, maximum=MAX_CPU, shown=value, fix=fix)


def parse_gpu(value: Any, field_name: str = "resources.gpu") -> int:
    """A whole, non-negative GPU count (``None`` is none); ``'2'`` is accepted."""
    fix = f"use a whole number from 0 to {MAX_GPU}, such as 1"
    if value is None:
        return 0
    if isinstance(value, str) and _WHOLE_RE.match(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field_name, f"{short_repr(value)} is not a GPU count", fix)
    if value < 0 or value > MAX_GPU:
        raise ConfigError(field_name, f"{short_repr(value)} is not a GPU count", fix)
    return value


@dataclass(frozen=True)
class Resources:
    """Compute a step asks for. ``profile`` names a deployment-defined shape (node pool, cluster, ...)."""

    cpu: float | None = None
    memory: int | None = None
    gpu: int = 0
    profile: str | None = None

    @classmethod
    def parse(cls, value: Any) -> Resources:
        if value is None:
            return cls()
        if isinstance(value, Resources):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError("resources", f"expected a mapping, got {type_name(value)}",
                              "use e.g. {'cpu': 2, 'memory': '4Gi', 'gpu': 1, 'profile': 'gpu'}")
        value = expect_mapping("resources", value, "{'cpu': 2}")
        _reject_unknown("resources", value, {"cpu", "memory", "gpu", "profile"})
        profile = value.get("profile")
        if profile is not None:  # given, it must name something: a blank name is a mistake, not "none"
            profile = require_text("resources.profile", profile, "a profile name",
                                   "the name of a profile your deployment defines, e.g. 'gpu'")
        return cls(
            cpu=parse_cpu(value.get("cpu")),
            memory=parse_memory(value.get("memory")),
            gpu=parse_gpu(value.get("gpu")),
            profile=profile,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SecretRef:
    """A reference to a secret the backend resolves where the step runs; the value never passes us.

    ``name`` is the secret's name in the backend's secret store (a Kubernetes Secret, an Airflow
    Variable for the local and Docker backends, a Databricks secret scope, ...), ``key`` the key in it.
    """

    name: str
    key: str | None = None

    @classmethod
    def parse(cls, env_name: str, value: Any) -> SecretRef:
        field_name = f"secrets.{env_name}"
        fix = "use 'secret-name' or 'secret-name/key'"
        if isinstance(value, SecretRef):
            name, key = value.name, value.key
        elif isinstance(value, str):
            if value.count("/") > 1:
                # Kubernetes Secret keys and Databricks secret keys cannot contain '/': 'a/b/c' is a typo.
                raise ConfigError(field_name, f"{short_repr(value)} has more than one '/'", fix)
            name, slash, key_text = value.partition("/")
            if slash and not key_text:
                raise ConfigError(field_name, f"{short_repr(value)} ends in '/' but names no key",
                                  f"use {name!r} or '{name}/<key>'")
            key = key_text or None
        elif isinstance(value, Mapping):
            value = expect_mapping(field_name, value, "{'name': 'db-creds', 'key': 'password'}")
            _reject_unknown(field_name, value, {"name", "key"})
            if not value.get("name"):
                raise ConfigError(field_name, "has no 'name'", "use {'name': 'db-creds', 'key': 'password'}")
            name, key = value["name"], value.get("key")
        else:
            raise ConfigError(field_name, f"expected 'name/key' or a mapping, got {type_name(value)}",
                              "use 'secret-name/key'")
        name = require_text(f"{field_name}.name", name, "a secret name", "'db-creds'")
        key = expect_text(f"{field_name}.key", key, "a secret key", "'password'")
        for part, text in (("name", name), ("key", key)):
            if text is not None and (text != text.strip() or "/" in text or any(c.isspace() for c in text)):
                raise ConfigError(f"{field_name}.{part}", f"{short_repr(text)} contains '/' or whitespace", fix)
        return cls(name=name, key=key)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key}


@dataclass(frozen=True)
class StepSpec:
    """One step of a pipeline, independent of where it runs.

    Exactly one of ``command`` (an argv list; a string only with ``shell=True``) and ``callable``
    (``'package.module:function'`` called with ``params`` as keyword arguments) is given.

    Build it with :meth:`build`, which normalises and checks every field; the constructor itself only
    checks how the (already normalised) fields fit together.
    """

    image: str | None = None
    command: tuple[str, ...] | str | None = None
    callable: str | None = None
    shell: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, SecretRef] = field(default_factory=dict)
    inputs: Mapping[str, str] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    resources: Resources = field(default_factory=Resources)
    timeout: float | None = None
    backend_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate()

    @classmethod
    def build(
        cls,
        *,
        image: Any = None,
        command: Any = None,
        callable: Any = None,  # noqa: A002 - the public name of the field
        shell: Any = False,
        params: Any = None,
        env: Any = None,
        secrets: Any = None,
        inputs: Any = None,
        outputs: Any = None,
        resources: Any = None,
        timeout: Any = None,
        backend_options: Any = None,
        known_backends: Sequence[str] | None = None,
    ) -> StepSpec:
        """Build a spec from loosely typed user input, normalising and validating every field.

        Raises:
            ConfigError: for any wrong input, naming the field and the fix; nothing else escapes.
        """
        values = normalise_fields(
            {"image": image, "command": command, "callable": callable, "shell": shell, "params": params,
             "env": env, "secrets": secrets, "inputs": inputs, "outputs": outputs, "resources": resources,
             "timeout": timeout, "backend_options": backend_options},
            known_backends=known_backends,
        )
        return cls(**values)

    # -- validation ---------------------------------------------------------------------------------

    def _validate(self) -> None:
        """How the fields fit together; each field on its own was checked by :func:`normalise_fields`."""
        if (self.command is None) == (self.callable is None):
            raise ConfigError("command", "give exactly one of 'command' and 'callable'",
                              "use command=['python', 'train.py'] or callable='my_pkg.train:main'")
        if isinstance(self.command, str) and not self.shell:
            raise ConfigError("command", f"{short_repr(self.command)} is a shell string",
                              "pass an argv list such as ['python', 'train.py'], or set shell=True")
        if isinstance(self.command, tuple) and self.shell:
            raise ConfigError("shell", "shell=True needs command to be one string",
                              "use command='python train.py && echo done'")
        if self.callable is not None and self.shell:
            raise ConfigError("shell", "shell=True only applies to 'command'", "drop shell=True")
        for name in self.secrets:
            if name in self.env:
                raise ConfigError(f"secrets.{name}", "is also set in env", "set it in one place only")

    # -- serialisation ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "command": list(self.command) if isinstance(self.command, tuple) else self.command,
            "callable": self.callable,
            "shell": self.shell,
            "params": dict(self.params),
            "env": dict(self.env),
            "secrets": {k: v.to_json() for k, v in self.secrets.items()},
            "inputs": dict(self.inputs),
            "outputs": list(self.outputs),
            "resources": self.resources.to_json(),
            "timeout": self.timeout,
            "backend_options": {k: dict(v) for k, v in self.backend_options.items()},
        }

    @classmethod
    def from_json(cls, data: Any) -> StepSpec:
        data = expect_mapping("spec", data, "the output of StepSpec.to_json()")
        _reject_unknown("spec", data, set(SPEC_FIELDS))
        return cls.build(**data)

    def options_for(self, backend: str) -> dict[str, Any]:
        """The escape-hatch options meant for ``backend`` (options for other backends are ignored)."""
        return dict(self.backend_options.get(backend, {}))


#: The fields of a step, in the order :meth:`StepSpec.build` takes them.
SPEC_FIELDS = ("image", "command", "callable", "shell", "params", "env", "secrets", "inputs", "outputs",
               "resources", "timeout", "backend_options")

#: Parameter names the runtime itself passes to a callable step (``runtime._call`` hands the input and
#: output paths under these keyword names, replacing a parameter of the same name).
RESERVED_PARAM_NAMES = frozenset({"inputs", "outputs"})

_JSON_FIX = "pass only strings, numbers, booleans, None, lists and mappings with string keys"


def normalise_fields(values: Mapping[str, Any], *, known_backends: Sequence[str] | None = None) -> dict[str, Any]:
    """Normalise each field present in ``values`` on its own; ``ConfigError`` for the first bad one.

    Missing fields are left out of the result, so the operator can check the fields that are already
    final while others are still templates.
    """
    out: dict[str, Any] = {}
    if "image" in values:
        out["image"] = _image(values["image"])
    if "command" in values:
        out["command"] = _command(values["command"])
    if "callable" in values:
        out["callable"] = _callable(values["callable"])
    if "shell" in values:
        out["shell"] = expect_bool("shell", values["shell"])
    if "params" in values:
        out["params"] = _params(values["params"])
    if "env" in values:
        env = expect_mapping("env", values["env"], "{'NAME': 'value'}")
        for name in env:
            _check_env_name(f"env.{name}", name)
        out["env"] = {name: _env_value(name, value) for name, value in env.items()}
    if "secrets" in values:
        secrets = expect_mapping("secrets", values["secrets"], "{'DB_PASSWORD': 'db-creds/password'}")
        for name in secrets:
            _check_env_name(f"secrets.{name}", name)
        out["secrets"] = {name: SecretRef.parse(name, ref) for name, ref in secrets.items()}
    if "inputs" in values:
        out["inputs"] = _inputs(values["inputs"])
    if "outputs" in values:
        out["outputs"] = _outputs(values["outputs"])
    if "resources" in values:
        out["resources"] = Resources.parse(values["resources"])
    if "timeout" in values:
        out["timeout"] = parse_timeout(values["timeout"])
    if "backend_options" in values:
        out["backend_options"] = _backend_options(values["backend_options"], known_backends)
    return out


def _image(value: Any) -> str | None:
    image = expect_text("image", value, "an image reference", "'python:3.11-slim'")
    if image is not None and any(c.isspace() for c in image):
        raise ConfigError("image", f"{short_repr(image)} contains whitespace",
                          "use an image reference such as 'registry.example.com/team/train:1.4'")
    return image


def _command(value: Any) -> tuple[str, ...] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            raise ConfigError("command", "is empty", "give the program to run")
        if "\x00" in value:
            raise ConfigError("command", "contains a NUL byte, which no process can receive", "remove it")
        return value
    if isinstance(value, (Mapping, bytes, bytearray)) or not isinstance(value, Sequence):
        raise ConfigError("command", f"expected a list of strings, got {type_name(value)}",
                          "use e.g. ['python', 'train.py', '--epochs', '3']")
    command = tuple(value)
    if not command:
        raise ConfigError("command", "is empty", "give the program to run, e.g. ['python', 'train.py']")
    for i, arg in enumerate(command):
        if not isinstance(arg, str):
            raise ConfigError(f"command[{i}]", f"{short_repr(arg)} is not a string",
                              "pass every argument as a string, e.g. str(value)")
        # execve(2) takes NUL-terminated strings: Python refuses such an argument with ValueError.
        if "\x00" in arg:
            raise ConfigError(f"command[{i}]", "contains a NUL byte, which no process can receive", "remove it")
    if not command[0].strip():
        raise ConfigError("command[0]", "is empty", "give the program to run, e.g. 'python'")
    return command


def _callable(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _CALLABLE_RE.match(value):
        raise ConfigError("callable", f"{short_repr(value)} is not 'package.module:function'",
                          "use e.g. 'my_pipeline.steps:train'")
    return value


def _params(value: Any) -> dict[str, Any]:
    params = expect_mapping("params", value, "{'alpha': 0.1}")
    for key, item in params.items():
        if not key.isidentifier():
            raise ConfigError(f"params.{key}", "is not a valid parameter name",
                              "use Python identifiers such as 'learning_rate'")
        if key in RESERVED_PARAM_NAMES:
            raise ConfigError(f"params.{key}", "is reserved: the runtime passes the step's "
                              f"{key} paths to a callable under this name", f"rename it, e.g. '{key}_config'")
        check_json(f"params.{key}", item, _JSON_FIX)
    return {key: json_copy(item) for key, item in params.items()}


def _inputs(value: Any) -> dict[str, str]:
    inputs = expect_mapping("inputs", value, "{'data': 's3://bucket/train.csv'}")
    _check_artifact_names("inputs", list(inputs))
    return {name: check_uri(f"inputs.{name}", uri) for name, uri in inputs.items()}


def _outputs(value: Any) -> tuple[str, ...]:
    outputs = expect_names("outputs", value, "['model', 'metrics']")
    seen: set[str] = set()
    for name in outputs:
        if name in seen:
            raise ConfigError(f"outputs.{name}", "is declared twice", "declare each output once")
        seen.add(name)
    _check_artifact_names("outputs", list(outputs))
    return outputs


def _check_artifact_names(kind: str, names: list[str]) -> None:
    by_env: dict[str, str] = {}
    for name in names:
        _check_artifact_name(f"{kind}.{name}", name)
        # The runtime exports each as REMOTE_ML_INPUT_<NAME.upper()> (REMOTE_ML_OUTPUT_ for outputs):
        # names differing only in case would overwrite each other there.
        env_name = name.upper()
        if env_name in by_env:
            raise ConfigError(f"{kind}.{name}", f"differs from {by_env[env_name]!r} only in case; both would be "
                              f"$REMOTE_ML_{kind[:-1].upper()}_{env_name}", "give them names that differ in letters")
        by_env[env_name] = name


def _backend_options(value: Any, known_backends: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    options = expect_mapping("backend_options", value, "{'kubernetes': {'node_selector': {'pool': 'gpu'}}}")
    if options:
        if known_backends is None:
            from airflow_remote_ml.core.registry import available_backends

            known_backends = available_backends()
        for backend in options:
            check_backend_key("backend_options", backend, known_backends)
    out: dict[str, dict[str, Any]] = {}
    for backend, section in options.items():
        if not isinstance(section, Mapping):
            raise ConfigError(f"backend_options.{backend}", f"expected a mapping, got {type_name(section)}",
                              f"use {{'{backend}': {{'option': value}}}}")
        section = expect_mapping(f"backend_options.{backend}", section, "{'option': value}")
        # Options travel as JSON (StepRequest.to_json, trigger kwargs): they must survive it unchanged.
        check_json(f"backend_options.{backend}", section, _JSON_FIX)
        out[backend] = json_copy(section)
    return out


def _env_value(name: str, value: Any) -> str:
    field_name = f"env.{name}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise ConfigError(field_name, f"{short_repr(value)} does not fit 64 bits", "pass it as a string")
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(field_name, f"{value!r} is not a finite number", "pass a string or a finite number")
        return str(value)
    if isinstance(value, str):
        # The environment is a block of NUL-terminated strings: os.environ/execve refuse an embedded NUL.
        if "\x00" in value:
            raise ConfigError(field_name, "contains a NUL byte, which no environment can hold", "remove it")
        return value
    raise ConfigError(field_name, f"{short_repr(value)} is not a string or number",
                      "environment values are strings; json.dumps() structured values")


def _check_env_name(field_name: str, name: str) -> None:
    if not _ENV_RE.match(name):
        raise ConfigError(field_name, f"{short_repr(name)} is not a valid environment variable name",
                          "use letters, digits and underscores, not starting with a digit")
    if name.startswith(_RESERVED_ENV_PREFIX):
        raise ConfigError(field_name, f"names starting with {_RESERVED_ENV_PREFIX!r} are reserved for the runtime",
                          "choose another name")


def _check_artifact_name(field_name: str, name: Any) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(field_name, f"{short_repr(name)} is not a valid artifact name",
                          "use letters, digits and underscores (at most 63), e.g. 'model' or 'train_data'")


def _reject_unknown(prefix: str, value: Mapping[str, Any], known: set[str]) -> None:
    import difflib

    for key in value:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            fix = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(sorted(known))}"
            raise ConfigError(f"{prefix}.{key}", "is not a known field", fix)


def reject_unknown_options(prefix: str, value: Any, known: set[str]) -> None:
    """Raise a :class:`ConfigError` with a suggestion for the first key of ``value`` not in ``known``.

    ``value`` may be anything a user wrote: a non-mapping is refused the same way.
    """
    _reject_unknown(prefix, expect_mapping(prefix, value, "{'option': value}"), known)
