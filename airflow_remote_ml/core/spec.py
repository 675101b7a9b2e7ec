"""The backend-neutral step: what to run, with what, on how much compute.

A :class:`StepSpec` is plain data. It validates itself at construction (DAG parse time when the values
are literal, before submission when they are templated), and every error names the field and the fix.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_remote_ml.core.errors import ConfigError

_CALLABLE_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
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
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]{0,2})\s*$")


def parse_memory(value: str | int | float | None, field_name: str = "resources.memory") -> int | None:
    """Return a memory size in bytes from ``'512Mi'``, ``'4Gi'``, ``'2G'`` or a number of bytes."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(field_name, f"{value!r} is not a size", "use e.g. '512Mi' or '4Gi'")
    if isinstance(value, (int, float)):
        if value <= 0 or not math.isfinite(value):
            raise ConfigError(field_name, f"{value!r} must be positive", "use e.g. '512Mi' or '4Gi'")
        return int(value)
    match = _MEMORY_RE.match(str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _MEMORY_UNITS:
        raise ConfigError(field_name, f"{value!r} is not a size", "use e.g. '512Mi' or '4Gi'")
    size = int(float(match.group(1)) * _MEMORY_UNITS[unit])
    if size <= 0:
        raise ConfigError(field_name, f"{value!r} must be positive", "use e.g. '512Mi' or '4Gi'")
    return size


def parse_cpu(value: str | int | float | None, field_name: str = "resources.cpu") -> float | None:
    """Return a CPU count from ``2``, ``0.5`` or Kubernetes-style ``'500m'``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(field_name, f"{value!r} is not a CPU count", "use e.g. 2, 0.5 or '500m'")
    try:
        if isinstance(value, str) and value.strip().endswith("m"):
            cpu = float(value.strip()[:-1]) / 1000
        else:
            cpu = float(value)
    except ValueError:
        raise ConfigError(field_name, f"{value!r} is not a CPU count", "use e.g. 2, 0.5 or '500m'") from None
    if cpu <= 0 or not math.isfinite(cpu):
        raise ConfigError(field_name, f"{value!r} must be positive", "use e.g. 2, 0.5 or '500m'")
    return cpu


@dataclass(frozen=True)
class Resources:
    """Compute a step asks for. ``profile`` names a deployment-defined shape (node pool, cluster, ...)."""

    cpu: float | None = None
    memory: int | None = None
    gpu: int = 0
    profile: str | None = None

    @classmethod
    def parse(cls, value: Resources | Mapping[str, Any] | None) -> Resources:
        if value is None:
            return cls()
        if isinstance(value, Resources):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError("resources", f"expected a mapping, got {type(value).__name__}",
                              "use e.g. {'cpu': 2, 'memory': '4Gi', 'gpu': 1, 'profile': 'gpu'}")
        _reject_unknown("resources", value, {"cpu", "memory", "gpu", "profile"})
        gpu = value.get("gpu") or 0
        if isinstance(gpu, bool) or not isinstance(gpu, int) or gpu < 0:
            try:
                gpu = int(str(gpu))
                if gpu < 0:
                    raise ValueError
            except ValueError:
                raise ConfigError("resources.gpu", f"{value.get('gpu')!r} is not a GPU count",
                                  "use a whole number such as 1") from None
        profile = value.get("profile")
        if profile is not None and (not isinstance(profile, str) or not profile.strip()):
            raise ConfigError("resources.profile", f"{profile!r} is not a profile name",
                              "use the name of a profile your deployment defines, e.g. 'gpu'")
        return cls(
            cpu=parse_cpu(value.get("cpu")),
            memory=parse_memory(value.get("memory")),
            gpu=gpu,
            profile=profile or None,
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
    def parse(cls, env_name: str, value: SecretRef | str | Mapping[str, Any]) -> SecretRef:
        field_name = f"secrets.{env_name}"
        if isinstance(value, SecretRef):
            return value
        if isinstance(value, str):
            name, _, key = value.partition("/")
            if not name:
                raise ConfigError(field_name, f"{value!r} names no secret", "use 'secret-name' or 'secret-name/key'")
            return cls(name=name, key=key or None)
        if isinstance(value, Mapping):
            _reject_unknown(field_name, value, {"name", "key"})
            if not value.get("name"):
                raise ConfigError(field_name, "has no 'name'", "use {'name': 'db-creds', 'key': 'password'}")
            return cls(name=str(value["name"]), key=(str(value["key"]) if value.get("key") else None))
        raise ConfigError(field_name, f"expected 'name/key' or a mapping, got {type(value).__name__}",
                          "use 'secret-name/key'")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key}


@dataclass(frozen=True)
class StepSpec:
    """One step of a pipeline, independent of where it runs.

    Exactly one of ``command`` (an argv list; a string only with ``shell=True``) and ``callable``
    (``'package.module:function'`` called with ``params`` as keyword arguments) is given.
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
        image: str | None = None,
        command: Sequence[str] | str | None = None,
        callable: str | None = None,  # noqa: A002 - the public name of the field
        shell: bool = False,
        params: Mapping[str, Any] | None = None,
        env: Mapping[str, Any] | None = None,
        secrets: Mapping[str, Any] | None = None,
        inputs: Mapping[str, Any] | None = None,
        outputs: Sequence[str] | None = None,
        resources: Resources | Mapping[str, Any] | None = None,
        timeout: float | int | str | None = None,
        backend_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> StepSpec:
        """Build a spec from loosely typed user input, normalising and validating every field."""
        if command is not None and not isinstance(command, str):
            if not isinstance(command, Sequence):
                raise ConfigError("command", f"expected a list of strings, got {type(command).__name__}",
                                  "use e.g. ['python', 'train.py', '--epochs', '3']")
            command = tuple(command)
        if isinstance(outputs, str):
            raise ConfigError("outputs", f"expected a list of names, got the string {outputs!r}",
                              f"use [{outputs!r}]")
        if env is not None and not isinstance(env, Mapping):
            raise ConfigError("env", f"expected a mapping, got {type(env).__name__}", "use {'NAME': 'value'}")
        if secrets is not None and not isinstance(secrets, Mapping):
            raise ConfigError("secrets", f"expected a mapping, got {type(secrets).__name__}",
                              "use {'DB_PASSWORD': 'db-creds/password'}")
        return cls(
            image=image or None,
            command=command,
            callable=callable,
            shell=shell,
            params=dict(params or {}),
            env={str(k): _env_value(k, v) for k, v in (env or {}).items()},
            secrets={str(k): SecretRef.parse(str(k), v) for k, v in (secrets or {}).items()},
            inputs=dict(inputs or {}),
            outputs=tuple(outputs or ()),
            resources=Resources.parse(resources),
            timeout=_parse_timeout(timeout),
            backend_options={str(k): dict(v) if isinstance(v, Mapping) else v  # type: ignore[misc]
                             for k, v in (backend_options or {}).items()},
        )

    # -- validation ---------------------------------------------------------------------------------

    def _validate(self) -> None:
        if (self.command is None) == (self.callable is None):
            raise ConfigError("command", "give exactly one of 'command' and 'callable'",
                              "use command=['python', 'train.py'] or callable='my_pkg.train:main'")
        if self.command is not None:
            if isinstance(self.command, str):
                if not self.shell:
                    raise ConfigError("command", f"{self.command!r} is a shell string",
                                      "pass an argv list such as ['python', 'train.py'], or set shell=True")
                if not self.command.strip():
                    raise ConfigError("command", "is empty", "give the program to run")
            else:
                if not self.command:
                    raise ConfigError("command", "is empty", "give the program to run, e.g. ['python', 'train.py']")
                for i, arg in enumerate(self.command):
                    if not isinstance(arg, str):
                        raise ConfigError(f"command[{i}]", f"{arg!r} is not a string",
                                          "pass every argument as a string, e.g. str(value)")
                if self.shell:
                    raise ConfigError("shell", "shell=True needs command to be one string",
                                      "use command='python train.py && echo done'")
        if self.callable is not None:
            if not isinstance(self.callable, str) or not _CALLABLE_RE.match(self.callable):
                raise ConfigError("callable", f"{self.callable!r} is not 'package.module:function'",
                                  "use e.g. 'my_pipeline.steps:train'")
            if self.shell:
                raise ConfigError("shell", "shell=True only applies to 'command'", "drop shell=True")
        if not isinstance(self.params, Mapping):
            raise ConfigError("params", f"expected a mapping, got {type(self.params).__name__}",
                              "use {'alpha': 0.1}")
        for key in self.params:
            if not isinstance(key, str) or not key.isidentifier():
                raise ConfigError(f"params.{key}", "is not a valid parameter name",
                                  "use Python identifiers such as 'learning_rate'")
        try:
            json.dumps(dict(self.params), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError("params", f"is not JSON-serialisable ({exc})",
                              "pass only strings, numbers, booleans, lists and mappings") from None
        for name in self.env:
            _check_env_name(f"env.{name}", name)
        for name in self.secrets:
            _check_env_name(f"secrets.{name}", name)
            if name in self.env:
                raise ConfigError(f"secrets.{name}", "is also set in env", "set it in one place only")
        for name, uri in self.inputs.items():
            _check_artifact_name(f"inputs.{name}", name)
            if not isinstance(uri, str) or not uri.strip():
                raise ConfigError(f"inputs.{name}", f"{uri!r} is not a URI",
                                  "pass a path or URI such as 's3://bucket/data.csv' or an upstream output")
        seen: set[str] = set()
        for name in self.outputs:
            _check_artifact_name(f"outputs.{name}", name)
            if name in seen:
                raise ConfigError(f"outputs.{name}", "is declared twice", "declare each output once")
            seen.add(name)
        if self.timeout is not None and (self.timeout <= 0 or not math.isfinite(self.timeout)):
            raise ConfigError("timeout", f"{self.timeout!r} must be a positive number of seconds",
                              "use e.g. 3600 or timedelta(hours=1)")
        for backend, options in self.backend_options.items():
            if not isinstance(options, Mapping):
                raise ConfigError(f"backend_options.{backend}", f"expected a mapping, got {type(options).__name__}",
                                  f"use {{'{backend}': {{'option': value}}}}")

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
    def from_json(cls, data: Mapping[str, Any]) -> StepSpec:
        return cls.build(**data)

    def options_for(self, backend: str) -> dict[str, Any]:
        """The escape-hatch options meant for ``backend`` (options for other backends are ignored)."""
        return dict(self.backend_options.get(backend, {}))


def _env_value(name: Any, value: Any) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    raise ConfigError(f"env.{name}", f"{value!r} is not a string or number",
                      "environment values are strings; json.dumps() structured values")


def _check_env_name(field_name: str, name: str) -> None:
    if not _ENV_RE.match(name):
        raise ConfigError(field_name, f"{name!r} is not a valid environment variable name",
                          "use letters, digits and underscores, not starting with a digit")
    if name.startswith(_RESERVED_ENV_PREFIX):
        raise ConfigError(field_name, f"names starting with {_RESERVED_ENV_PREFIX!r} are reserved for the runtime",
                          "choose another name")


def _check_artifact_name(field_name: str, name: Any) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(field_name, f"{name!r} is not a valid artifact name",
                          "use letters, digits and underscores (at most 63), e.g. 'model' or 'train_data'")


def _parse_timeout(value: Any) -> float | None:
    if value is None:
        return None
    from datetime import timedelta

    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool):
        raise ConfigError("timeout", f"{value!r} is not a duration", "use seconds (e.g. 3600) or a timedelta")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError("timeout", f"{value!r} is not a duration", "use seconds (e.g. 3600) or a timedelta") from None


def _reject_unknown(prefix: str, value: Mapping[str, Any], known: set[str]) -> None:
    import difflib

    for key in value:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            fix = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(sorted(known))}"
            raise ConfigError(f"{prefix}.{key}", "is not a known field", fix)


def reject_unknown_options(prefix: str, value: Mapping[str, Any], known: set[str]) -> None:
    """Raise a :class:`ConfigError` with a suggestion for the first key of ``value`` not in ``known``."""
    _reject_unknown(prefix, value, known)
