"""What Valohai's create-execution endpoint would refuse, refused before anything is submitted.

``POST /api/v0/executions/`` is a Django REST framework serializer: a field of the wrong type, an
environment that cannot exist, an input that is not a URL, is a 400 naming the field (the shape
``valohai-cli``'s error formatter reads, see ``tests/fakes/valohai_api.py``). Everything of that which the
spec and the settings let us know is checked here, with the field as the user wrote it
(``backend_options.valohai.environment``, ``inputs.data``, ``backend_config[valohai].tags``).

A parameter's type is declared in the commit's ``valohai.yaml``: :func:`check_step_parameters` checks the
values against it once the backend has read the commit's configuration at submit (as ``valohai-cli`` does).
What only the platform knows (whether an environment slug exists in the organisation, a datum id, a
declaration the backend could not read) still comes back as a 400; the client
(:meth:`._client.ValohaiAPI.error_for`) turns it into an :class:`InvalidRequestError`, a ``ConfigError``
naming Valohai's field, never retried.

Pure functions, no I/O; only :class:`ConfigError` escapes (``tests/unit/test_validation_properties.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from airflow_remote_ml.backends.valohai._execution import (
    RUNTIME_INPUT_SLOTS,
    ValohaiConfig,
    flag,
    input_url_problem,
    input_urls,
    step_mode,
)
from airflow_remote_ml.core.backend import StepRequest
from airflow_remote_ml.core.errors import ConfigError
from airflow_remote_ml.core.spec import reject_unknown_options
from airflow_remote_ml.core.validation import (
    MAX_INT,
    check_numeric_settings,
    expect_mapping,
    expect_text,
    require_text,
    short_repr,
    type_name,
)

CONFIG = "backend_config[valohai]"
OPTIONS = "backend_options.valohai"
#: The step options this backend reads (``backend_options={"valohai": {...}}``).
OPTION_NAMES = frozenset({"step", "commit", "environment", "title", "tags", "inputs", "parameters", "image",
                          "priority", "runtime_config", "export_outputs"})
#: The longest client request timeout this backend accepts: create_settle_seconds must outlast it.
MAX_REQUEST_TIMEOUT = 60.0

# ``environment`` is "an environment identifier (slug or UUID)" (valohai-cli, commands/execution/run:
# RunCommand's docstring; the API resolves it as a slug or a primary key). Environment slugs are Django
# SlugFields, ``[-a-zA-Z0-9_]+``: a value outside that can name no environment, and the API answers
# 400 ``does_not_exist`` on ``environment``.
_SLUG = re.compile(r"^[-A-Za-z0-9_]+$")
_UUID = re.compile(r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$", re.I)
_URL_FIX = ("pass the datum:// URI of a Valohai output (set export_outputs false on an upstream Valohai step), "
            "or keep artifacts where Valohai can fetch them: an s3://, gs:// or azure:// [remote_ml] "
            "artifact_root the project can read")


def check_config(config: ValohaiConfig) -> None:
    """Every setting by type and range, before the client or the request builder computes with it."""
    check_numeric_settings(config, CONFIG)
    require_text(f"{CONFIG}.host", config.host, "the Valohai address", "'https://app.valohai.com'")
    for name in ("token", "conn_id", "project", "commit", "branch", "runtime_step"):
        expect_text(f"{CONFIG}.{name}", getattr(config, name), "a string", _EXAMPLES[name])
    if config.environment is not None:
        check_environment(f"{CONFIG}.environment", config.environment)
    for name in ("fetch", "export_outputs"):
        flag(getattr(config, name), f"{CONFIG}.{name}")
    steps = expect_mapping(f"{CONFIG}.steps", config.steps, "{'pkg.steps:train': 'train'}")
    for key, step in steps.items():
        require_text(f"{CONFIG}.steps.{key}", step, "a step name of valohai.yaml", "'train'")
    for i, entry in enumerate(_list(f"{CONFIG}.python_path", config.python_path, "['src']")):
        require_text(f"{CONFIG}.python_path[{i}]", entry, "a path in the repository", "'src'")
    check_tags(f"{CONFIG}.tags", config.tags)
    if not 0 < config.request_timeout <= MAX_REQUEST_TIMEOUT:
        raise ConfigError(f"{CONFIG}.request_timeout",
                          f"{config.request_timeout!r} is not between 0 and {MAX_REQUEST_TIMEOUT:g} seconds",
                          "a create that outlasts the timeout is looked up for the settle window before a new "
                          f"submit; keep request_timeout at most {MAX_REQUEST_TIMEOUT:g}")


_EXAMPLES = {"token": "a Valohai API token (better: conn_id)", "conn_id": "'valohai_default'",
             "project": "'my-org/my-project'", "commit": "a git SHA Valohai has fetched", "branch": "'main'",
             "runtime_step": "'remote-ml-runtime'"}


def check_environment(field: str, value: Any) -> str:
    """An environment slug or UUID (the API refuses anything else with 400 on ``environment``)."""
    text = require_text(field, value, "an environment slug or UUID", "'aws-eu-west-1-g4dn-xlarge'")
    if not (_SLUG.match(text) or _UUID.match(text)):
        raise ConfigError(field, f"{short_repr(text)} is not an environment slug or UUID",
                          "use a slug from `vh environments` (letters, digits, '-' and '_'), e.g. "
                          "'aws-eu-west-1-g4dn-xlarge'")
    return text


def check_tags(field: str, value: Any) -> None:
    """A list of strings: the serializer answers 400 'Expected a list of items' or 'Each tag must be a string'."""
    for i, tag in enumerate(_list(field, value, "['nightly']")):
        require_text(f"{field}[{i}]", tag, "a tag", "'nightly'")


def check_parameter_value(field: str, value: Any) -> None:
    """A value ``valohai-yaml`` accepts for a parameter: a string, number or flag, or a flat list of them.

    ``valohai_yaml.objs.parameter``: ``ValueAtomType = float | str | int | bool`` and ``ValueType`` is an
    atom or a list of atoms; a nested list raises InvalidType, and ``None`` is "No value supplied".
    """
    atoms = value if isinstance(value, list) else [value]
    for i, atom in enumerate(atoms):
        where = f"{field}[{i}]" if isinstance(value, list) else field
        if atom is None or not isinstance(atom, (str, int, float)):
            raise ConfigError(where, f"{short_repr(atom)} ({type_name(atom)}) is not a Valohai parameter value",
                              "use a string, a number, True/False, or a list of those (for a 'multiple' "
                              "parameter); pass structures in the step's params, which travel as JSON")
        if isinstance(atom, int) and not isinstance(atom, bool) and abs(atom) > MAX_INT:
            raise ConfigError(where, f"{short_repr(atom)} does not fit 64 bits", "pass it as a string")


def check_options(options: Mapping[str, Any]) -> None:
    """The types of ``backend_options["valohai"]``, as the create serializer reads them."""
    reject_unknown_options(OPTIONS, options, set(OPTION_NAMES))
    for key in ("step", "commit", "title", "image"):
        if key in options:
            require_text(f"{OPTIONS}.{key}", options[key], "a string", _OPTION_EXAMPLES[key])
    if "environment" in options:
        check_environment(f"{OPTIONS}.environment", options["environment"])
    if "tags" in options:
        check_tags(f"{OPTIONS}.tags", options["tags"])
    if "priority" in options:
        priority = options["priority"]
        if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > 2**31 - 1:
            raise ConfigError(f"{OPTIONS}.priority", f"{short_repr(priority)} is not a whole number",
                              "give a whole number, e.g. 1")
    if "runtime_config" in options:
        expect_mapping(f"{OPTIONS}.runtime_config", options["runtime_config"], "{}")
    for name, value in expect_mapping(f"{OPTIONS}.parameters", options.get("parameters"), "{'alpha': 0.1}").items():
        check_parameter_value(f"{OPTIONS}.parameters.{name}", value)
    for name, value in expect_mapping(f"{OPTIONS}.inputs", options.get("inputs"),
                                      "{'dataset': 'datum://<id>'}").items():
        urls = value if isinstance(value, list) else [value]
        for i, url in enumerate(urls):
            where = f"{OPTIONS}.inputs.{name}" + (f"[{i}]" if isinstance(value, list) else "")
            if not isinstance(url, str) or not url:
                raise ConfigError(where, f"{short_repr(url)} is not a URL string",
                                  "give a URL or a list of URLs, e.g. 'datum://<id>' or 's3://bucket/key'")
            check_input_url(where, url)
    if "export_outputs" in options:
        flag(options["export_outputs"], f"{OPTIONS}.export_outputs")


_OPTION_EXAMPLES = {"step": "'train'", "commit": "a git SHA", "title": "'nightly training'",
                    "image": "'python:3.12'"}


def check_input_url(field: str, url: str) -> None:
    problem = input_url_problem(url)
    if problem:
        raise ConfigError(field, problem, _URL_FIX)


def _list(field: str, value: Any, example: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(field, f"expected a list, got {type_name(value)} {short_repr(value)}", f"use e.g. {example}")
    return value


def check_request(request: StepRequest, settings: ValohaiConfig) -> None:
    """Everything about one step that the create request would be refused for, and can be known now."""
    spec = request.spec
    options = spec.options_for("valohai")
    check_options(options)
    mode, _ = step_mode(request, settings)
    if not settings.project:
        raise ConfigError(f"{CONFIG}.project", "no Valohai project",
                          "set 'project' (name, 'owner/name' or id) in the config or the connection")
    if not (options.get("commit") or settings.commit or settings.branch):
        raise ConfigError(f"{CONFIG}.branch", "no commit or branch to run",
                          "set 'branch' (e.g. 'main') or 'commit' in the config or the connection")
    profile_name = spec.resources.profile
    profile = settings.profile(profile_name, "valohai")
    unknown = sorted(set(profile) - {"environment"})
    if unknown:
        raise ConfigError(f"profiles.{profile_name}.{unknown[0]}", "is not a Valohai profile setting",
                          "a Valohai profile sets 'environment' (a machine type slug)")
    if "environment" in profile:
        check_environment(f"profiles.{profile_name}.environment", profile["environment"])
    if spec.secrets:
        raise ConfigError("secrets", "the valohai backend does not pass secrets",
                          "define them as secret environment variables of the Valohai project (Valohai "
                          "injects them into every execution) and drop them from 'secrets'")
    if spec.resources.gpu and not (options.get("environment") or profile.get("environment")
                                   or settings.environment):
        raise ConfigError("resources.gpu", "Valohai picks the machine from the environment; none is set",
                          "set resources.profile to a profile whose 'environment' is a GPU machine")
    for name, uri in spec.inputs.items():
        for url in input_urls(uri):
            check_input_url(f"inputs.{name}", url)
    if mode == "runtime" and len(spec.inputs) > len(RUNTIME_INPUT_SLOTS):
        raise ConfigError("inputs", f"the runtime step takes at most {len(RUNTIME_INPUT_SLOTS)} inputs",
                          "pass a directory URI, or run a Valohai step declaring its own inputs")


# -- parameter values against the step's declaration in the commit's valohai.yaml ---------------------------


def declared_step(config: Any, step: str) -> Mapping[str, Any] | None:
    """The ``step`` mapping named ``step`` in a commit's parsed config (a list of ``{"step": {...}}``)."""
    if not isinstance(config, list):
        return None
    for item in config:
        body = item.get("step") if isinstance(item, Mapping) else None
        if isinstance(body, Mapping) and body.get("name") == step:
            return body
    return None


def check_step_parameters(step: Mapping[str, Any], values: Mapping[str, Any], field_of: Any) -> None:
    """Each value against its declaration, as ``valohai_yaml.objs.parameter.Parameter.validate`` checks it
    on the platform: a single value unless ``multiple``; ``integer`` is ``int(str(v), 10)``, ``float`` is
    ``float(str(v))``; then ``min``/``max`` and ``choices``. The platform answers 400 otherwise.

    Names the step does not declare are left to the platform. ``field_of(name)`` is the field to name.
    """
    listed = step.get("parameters")
    declared = {str(p.get("name")): p for p in (listed if isinstance(listed, list) else [])
                if isinstance(p, Mapping)}
    for name, value in values.items():
        spec = declared.get(name)
        if spec is None or value is None:
            continue
        kind = spec.get("type") or "string"
        field = field_of(name)
        fix = f"the Valohai step {step.get('name')!r} declares {name!r} as {_declaration(spec)} in valohai.yaml"
        if isinstance(value, list) and not spec.get("multiple"):
            raise ConfigError(field, f"{short_repr(value)} is a list; the step takes a single value", fix)
        for atom in value if isinstance(value, list) else [value]:
            typed: Any = atom
            try:
                if kind == "integer":
                    typed = int(str(atom), 10)
                elif kind == "float":
                    typed = float(str(atom))
            except ValueError:
                what = "an integer" if kind == "integer" else "a number"
                raise ConfigError(field, f"{short_repr(atom)} is not {what}", fix) from None
            for bound in ("min", "max"):
                limit = spec.get(bound)
                try:
                    out = limit is not None and (typed < limit if bound == "min" else typed > limit)
                except TypeError:  # valohai-yaml skips a bound of another type too
                    out = False
                if out:
                    word = "less than the minimum" if bound == "min" else "greater than the maximum"
                    raise ConfigError(field, f"{short_repr(atom)} is {word} allowed ({limit})", fix)
            choices = spec.get("choices")
            if kind != "flag" and isinstance(choices, list) and typed not in choices:
                raise ConfigError(field, f"{short_repr(atom)} is not among the choices allowed ({choices!r})", fix)


def _declaration(spec: Mapping[str, Any]) -> str:
    parts = [str(spec.get("type") or "string")]
    for key in ("min", "max", "choices"):
        if spec.get(key) is not None:
            parts.append(f"{key} {spec[key]!r}")
    if spec.get("multiple"):
        parts.append(f"multiple: {spec['multiple']}")
    return ", ".join(parts)
