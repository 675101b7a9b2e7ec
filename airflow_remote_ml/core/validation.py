"""Typed checks of loosely typed user input, each failing with one :class:`ConfigError`.

Every function here takes whatever a DAG author may have written (a string where a list belongs, a
number too big for a float, a structure nested a million deep) and either returns the normalised value
or raises ``ConfigError(field, problem, fix)``. No other exception may escape: a property-based test
(``tests/unit/test_validation_properties.py``) feeds them arbitrary values to keep that true.

:class:`~airflow_remote_ml.core.spec.StepSpec` builds on these, and so does
:func:`validate_operator_arguments`, which the operator calls at DAG parse time for the arguments that
are already final. docs/validation.md lists what is checked where.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow_remote_ml.core.errors import ConfigError

if TYPE_CHECKING:
    from airflow_remote_ml.core.spec import StepSpec

#: Longest step timeout accepted. Past it the runtime's timers stop being dependable: Python's
#: ``threading.Timer`` raises OverflowError above ``threading.TIMEOUT_MAX`` (about 49.7 days on
#: Windows, 292 years on Linux) and ``signal.setitimer`` overflows too. A step that should run longer
#: than 30 days is a service, not a pipeline step.
MAX_TIMEOUT_SECONDS = 30 * 24 * 3600.0
#: Deepest nesting of parameter and option values. Deeper structures are refused rather than letting
#: ``json.dumps`` hit Python's recursion limit (RecursionError) on the worker or in the step.
MAX_NESTING = 32
#: Integers in parameters must fit 64 bits: the platforms' JSON readers (Go, Java, Scala) read them as
#: int64, and Python's own int-to-text conversion refuses integers of more than 4300 digits.
MAX_INT = 2**63 - 1
#: More CPUs than any machine has; also keeps Kubernetes millicores (int64) far from overflow.
MAX_CPU = 100_000.0
#: 2**63 - 1 bytes (8 EiB): the largest quantity Kubernetes and the other APIs can represent.
MAX_MEMORY_BYTES = 2**63 - 1
#: No platform gives one step more GPUs than this.
MAX_GPU = 1024

# URI schemes that are not fsspec protocols but that a backend understands natively.
# Valohai's data store: `datum://<id>` inputs (docs.valohai.com, "Inputs": datum:// URLs).
PLATFORM_URI_SCHEMES: dict[str, str] = {"datum": "valohai"}

_SCHEME_FIX = "use a scheme fsspec knows (fsspec.available_protocols()), e.g. 's3', 'gs', 'abfs' or 'file'"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def suggestion(name: str, known: Sequence[str], what: str = "names", otherwise: str | None = None) -> str:
    """``"did you mean 'x'?"`` for the closest of ``known``, else ``otherwise`` or the list of them.

    The cutoff is a little below difflib's default so that two-letter names ('s4' for 's3') match.
    """
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
    if close:
        return f"did you mean {close[0]!r}?"
    return otherwise or f"known {what}: {', '.join(sorted(known)) or 'none'}"


def type_name(value: Any) -> str:
    return type(value).__name__


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr`` that cannot blow up: huge ints, deep structures and broken ``__repr__`` are cut."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except Exception:  # a user object whose __repr__ raises, or a structure too deep to print
        return f"<a {type_name(value)}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- containers -------------------------------------------------------------------------------------


def expect_mapping(field: str, value: Any, example: str) -> dict[str, Any]:
    """A mapping with string keys (``None`` is empty); anything else names the field and an example."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        fix = f"use a mapping such as {example}"
        if isinstance(value, str) and "=" in value:
            fix = f"write it as a mapping, e.g. {example}, not 'name=value' text"
        raise ConfigError(field, f"expected a mapping, got {type_name(value)} {short_repr(value)}", fix)
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{field}.{short_repr(key)}", f"the key {short_repr(key)} is a {type_name(key)}",
                              "use strings as keys")
    return dict(value)


def expect_names(field: str, value: Any, example: str) -> tuple[str, ...]:
    """A list of names. A bare string is refused: ``list("model")`` would be ``m, o, d, e, l``."""
    if value is None:
        return ()
    if isinstance(value, str):
        if value.strip().startswith("[") and value.strip().endswith("]"):
            # A template that rendered a list as its text: Jinja renders to str unless the DAG says otherwise.
            raise ConfigError(field, f"expected a list of names, got the text {short_repr(value)} (a template "
                              "rendered a list as a string?)",
                              "create the DAG with render_template_as_native_obj=True so a rendered list stays a "
                              "list, or template each name: ['{{ params.name }}']")
        raise ConfigError(field, f"expected a list of names, got the string {short_repr(value)}",
                          f"use [{short_repr(value)}]")
    if isinstance(value, Mapping) or not isinstance(value, (Sequence, set, frozenset)) \
            or isinstance(value, (bytes, bytearray)):
        raise ConfigError(field, f"expected a list of names, got {type_name(value)} {short_repr(value)}",
                          f"use a list such as {example}")
    names = tuple(sorted(value) if isinstance(value, (set, frozenset)) and all(isinstance(v, str) for v in value)
                  else value)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise ConfigError(f"{field}[{i}]", f"{short_repr(name)} is not a name", "use strings, e.g. 'model'")
    return names


def expect_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(field, f"expected True or False, got {type_name(value)} {short_repr(value)}",
                          "use True or False")
    return value


def expect_text(field: str, value: Any, what: str, example: str, *, optional: bool = True) -> str | None:
    """A non-empty string without control characters (a NUL byte cannot cross ``execve``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ConfigError(field, f"expected {what} as a string, got {type_name(value)} {short_repr(value)}",
                          f"use e.g. {example}")
    if not value.strip():
        if optional:
            return None
        raise ConfigError(field, "is empty", f"use e.g. {example}")
    if _CONTROL.search(value):
        raise ConfigError(field, f"{short_repr(value)} contains a control character",
                          "remove NUL bytes, newlines and other control characters")
    return value


def require_text(field: str, value: Any, what: str, example: str) -> str:
    """:func:`expect_text` for a value that must be given."""
    text = expect_text(field, value, what, example, optional=False)
    if text is None:  # unreachable: expect_text(optional=False) raises instead
        raise ConfigError(field, "is empty", f"use e.g. {example}")
    return text


# -- numbers ----------------------------------------------------------------------------------------


def as_float(field: str, value: Any, what: str, fix: str) -> float:
    """``float(value)`` for numbers and numeric strings, refusing bools and what does not fit a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(field, f"{short_repr(value)} is not {what}", fix)
    try:
        number = float(value)
    except OverflowError:  # an int beyond 1.8e308
        raise ConfigError(field, f"{short_repr(value)} is too large", fix) from None
    except ValueError:
        raise ConfigError(field, f"{short_repr(value)} is not {what}", fix) from None
    if math.isnan(number):
        raise ConfigError(field, "NaN is not a number here", fix)
    return number


def check_range(field: str, number: float, *, maximum: float, shown: Any, fix: str, unit: str = "") -> float:
    """``0 < number <= maximum`` (infinity included in what is too large)."""
    if number <= 0:
        raise ConfigError(field, f"{short_repr(shown)} must be positive", fix)
    if number > maximum:
        raise ConfigError(field, f"{short_repr(shown)} is more than the maximum of {maximum:g}{unit}", fix)
    return number


def parse_timeout(value: Any, field: str = "timeout") -> float | None:
    """Seconds from a number, a numeric string or a timedelta; at most :data:`MAX_TIMEOUT_SECONDS`."""
    fix = "use seconds (e.g. 3600) or a timedelta, at most 30 days"
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else as_float(field, value, "a duration", fix)
    return check_range(field, seconds, maximum=MAX_TIMEOUT_SECONDS, shown=value, fix=fix, unit=" s")


# -- JSON values ------------------------------------------------------------------------------------


def check_json(field: str, value: Any, fix: str, *, depth: int = 0) -> None:
    """``value`` must survive ``json.dumps``/``json.loads`` unchanged.

    Walks the structure itself (bounded by :data:`MAX_NESTING`) instead of calling ``json.dumps``,
    which raises RecursionError for deep or self-referencing values, accepts NaN, and silently turns
    non-string keys and tuples into something else.
    """
    if depth > MAX_NESTING:
        raise ConfigError(field, f"is nested more than {MAX_NESTING} levels deep (or refers to itself)",
                          "flatten the structure, or pass a URI of a file holding it")
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise ConfigError(field, f"{short_repr(value)} does not fit 64 bits", "pass very large numbers as strings")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(field, f"{value!r} is not a JSON number", fix)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{field}.{short_repr(key)}", f"the key {short_repr(key)} is a {type_name(key)}",
                                  "JSON keys are strings: use str keys")
            check_json(f"{field}.{key}", item, fix, depth=depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_json(f"{field}[{i}]", item, fix, depth=depth + 1)
        return
    raise ConfigError(field, f"{short_repr(value)} ({type_name(value)}) is not JSON-serialisable", fix)


def json_copy(value: Any) -> Any:
    """A plain copy (dicts and lists) of a value :func:`check_json` accepted."""
    if isinstance(value, Mapping):
        return {k: json_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_copy(v) for v in value]
    return value


# -- URIs -------------------------------------------------------------------------------------------


def known_uri_schemes() -> set[str]:
    """The fsspec protocols (installed or not: the step's image may have them) and platform schemes."""
    try:
        import fsspec

        protocols = set(fsspec.available_protocols())
    except Exception:  # fsspec is a dependency; a broken install must not hide the real error
        protocols = set()
    return protocols | {"file", "local"} | set(PLATFORM_URI_SCHEMES)


def check_uri(field: str, value: Any) -> str:
    """An absolute local path or a URI whose scheme fsspec (or a backend) knows.

    A relative path would be resolved against whatever directory the step happens to start in, which
    differs per backend; an unknown scheme would fail only inside the remote step.
    """
    uri = require_text(field, value, "a path or URI", "'s3://bucket/data.csv' or an upstream output")
    if uri != uri.strip():
        raise ConfigError(field, f"{short_repr(uri)} has leading or trailing whitespace", "remove the spaces")
    known = known_uri_schemes()
    # fsspec chains protocols with '::' (e.g. 'simplecache::s3://bucket/key'): each link before the
    # last is a protocol name (optionally 'name://'), the last one the URI itself; each must be known.
    *wrappers, target = uri.split("::")
    for link in wrappers:
        scheme = link.split("://", 1)[0].lower()
        if scheme not in known:
            raise ConfigError(field, f"{short_repr(uri)} chains the unknown protocol {short_repr(scheme)}",
                              suggestion(scheme, sorted(known), otherwise=_SCHEME_FIX))
    match = _SCHEME_RE.match(target)
    if match is None or (len(match.group(1)) == 1 and target[2:3] in ("\\", "/")):
        # No scheme (or a Windows drive letter): a path, which must be absolute.
        if not target.startswith("/"):
            raise ConfigError(field, f"{short_repr(uri)} is a relative path",
                              "use an absolute path such as '/data/train.csv' or a URI such as "
                              "'s3://bucket/train.csv'")
        return uri
    scheme = match.group(1).lower()
    if scheme not in known:
        raise ConfigError(field, f"{short_repr(uri)} uses the unknown scheme {scheme!r}",
                          suggestion(scheme, sorted(known), otherwise=_SCHEME_FIX))
    if not target[match.end():].strip("/"):
        raise ConfigError(field, f"{short_repr(uri)} names no path", f"use e.g. '{scheme}://bucket/key'")
    return uri


# -- backend names ----------------------------------------------------------------------------------


def check_backend_key(field: str, name: Any, known: Sequence[str]) -> str:
    """A key naming a backend (``backend_options``, a keyed ``backend_config``) must name a known one."""
    if not isinstance(name, str) or name not in known:
        shown = name if isinstance(name, str) else short_repr(name)
        raise ConfigError(f"{field}.{shown}", f"{short_repr(name)} is not a known backend",
                          suggestion(str(name), known, "backends"))
    return name


def check_backend_name(value: Any, known: Sequence[str], *, field: str = "backend") -> str | None:
    """The operator's ``backend`` once final (literal, or rendered). ``None`` means the default.

    A template that renders to ``""`` or whitespace is refused: falling back to the default backend
    would run the step somewhere the author did not choose.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(field, f"expected a backend name, got {type_name(value)} {short_repr(value)}",
                          suggestion("", known, "backends"))
    if not value.strip():
        raise ConfigError(field, "is empty (a template rendered to nothing?)",
                          f"render one of: {', '.join(sorted(known))}; or leave backend unset for the default")
    if value not in known:
        from airflow_remote_ml.core.errors import BackendNotFoundError

        raise BackendNotFoundError(value, known)
    return value


# -- the operator's arguments -----------------------------------------------------------------------

#: The operator's argument names that differ from the StepSpec field they fill.
OPERATOR_FIELD_NAMES = {"params": "parameters", "resources": "compute"}
_SPEC_NAME = {op: spec for spec, op in OPERATOR_FIELD_NAMES.items()}
#: The operator's arguments that become StepSpec fields.
_OPERATOR_SPEC_ARGUMENTS = ("image", "command", "callable", "shell", "parameters", "env", "secrets", "inputs",
                            "outputs", "compute", "timeout", "backend_options")


def operator_field(field: str) -> str:
    """Rename a StepSpec field path (``params.x``) to the operator argument the user wrote (``parameters.x``)."""
    for spec_name, op_name in OPERATOR_FIELD_NAMES.items():
        if field == spec_name or field.startswith((f"{spec_name}.", f"{spec_name}[")):
            return op_name + field[len(spec_name):]
    return field


def renamed_for_operator(error: ConfigError) -> ConfigError:
    """The same error with its field named the way the operator's user wrote it."""
    field = operator_field(error.field)
    if field == error.field:
        return error
    return ConfigError(field, error.problem, error.fix)


def validate_operator_arguments(values: Mapping[str, Any], *, is_templated: Callable[[Any], bool],
                                known_backends: Sequence[str] | None = None) -> None:
    """Check each of the operator's arguments that is already final; raise one ``ConfigError``.

    ``values`` are the operator's keyword arguments as the user passed them, *before* the operator
    normalises them (``list(outputs)`` would already have split ``"model"`` into letters). Templated
    values (Jinja strings, XComArgs) are skipped: they are checked again once rendered, by
    :meth:`StepSpec.build` through :func:`build_operator_spec`. Each argument is checked on its own,
    so one templated field does not hide a mistake in another.
    """
    from airflow_remote_ml.core import spec as spec_module
    from airflow_remote_ml.core.registry import available_backends

    backends = list(known_backends) if known_backends is not None else available_backends()

    def final(name: str) -> bool:
        return name in values and values[name] is not None and not is_templated(values[name])

    try:
        if final("backend"):
            check_backend_name(values["backend"], backends)
        if final("backend_config"):
            config = expect_mapping("backend_config", values["backend_config"], "{'namespace': 'ml'}")
            if config and all(key in backends for key in config):
                for key, section in config.items():
                    if section is not None and not is_templated(section):
                        expect_mapping(f"backend_config.{key}", section, "{'namespace': 'ml'}")
        for name in ("artifact_root", "code_version"):
            if final(name):
                expect_text(name, values[name], "a string", "'s3://bucket/ml'" if name == "artifact_root"
                            else "a git SHA")
        if final("deferrable"):
            expect_bool("deferrable", values["deferrable"])
        spec_values = {_SPEC_NAME.get(name, name): values[name] for name in _OPERATOR_SPEC_ARGUMENTS if final(name)}
        spec_module.normalise_fields(spec_values, known_backends=backends)
    except ConfigError as exc:
        raise renamed_for_operator(exc) from None


def build_operator_spec(values: Mapping[str, Any], *,
                        known_backends: Sequence[str] | None = None) -> StepSpec:
    """``StepSpec.build`` from the operator's (rendered) arguments, with errors in the operator's names."""
    from airflow_remote_ml.core.spec import StepSpec

    unknown = [k for k in values if k not in _OPERATOR_SPEC_ARGUMENTS]
    if unknown:
        raise ConfigError(unknown[0], "is not an argument of the step", suggestion(unknown[0], _OPERATOR_SPEC_ARGUMENTS,
                                                                                  "arguments"))
    kwargs = {_SPEC_NAME.get(k, k): v for k, v in values.items()}
    try:
        return StepSpec.build(**kwargs, known_backends=known_backends)
    except ConfigError as exc:
        raise renamed_for_operator(exc) from None



def check_numeric_settings(config: Any, prefix: str) -> None:
    """Every numeric setting of a backend's config (a dataclass field whose default is an int or a float)
    is such a number from 0 to 1e9; ``prefix`` names the config in the error (``backend_config[x]``).

    The client and the poll loop compute with them (timeouts, retries, backoff); a string or an infinity
    there fails far from the setting. Ints stay ints (a count), floats may be ints.
    """
    import dataclasses
    import math

    for item in dataclasses.fields(config):
        default = item.default
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            continue
        value = getattr(config, item.name)
        whole = isinstance(default, int)
        if isinstance(value, bool) or not (isinstance(value, int) or (not whole and isinstance(value, float))) \
                or (isinstance(value, float) and not math.isfinite(value)) or not 0 <= value <= 10**9:
            what = "a whole number" if whole else "a number"
            raise ConfigError(f"{prefix}.{item.name}", f"{short_repr(value)} is not {what} from 0 to 1e9",
                              f"use e.g. {default!r} (the default)")
