"""Property: whatever a user passes, validation raises ConfigError or nothing (issue 9).

Each field of ``StepSpec.build`` (and each pure helper) is fed arbitrary values, from plausible
near-misses to huge integers, NaN, deep nesting and arbitrary objects, while the other fields stay
valid, so every field's own checks are reached. Any other exception is a bug. An accepted spec must
also survive the JSON trip it makes to the worker, the triggerer and the remote step.

Bounded (``max_examples``, no deadline) so CI spends seconds here.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_remote_ml.core import ConfigError, Resources, SecretRef, StepSpec
from airflow_remote_ml.core.spec import SPEC_FIELDS, parse_cpu, parse_gpu, parse_memory, reject_unknown_options
from airflow_remote_ml.core.validation import (
    build_operator_spec,
    check_backend_name,
    check_json,
    check_uri,
    expect_mapping,
    expect_names,
    parse_timeout,
    validate_operator_arguments,
)

# 150 examples per test keep CI at a few seconds, and derandomize makes them the same examples on every
# run, so CI cannot flake on a rare draw. REMOTE_ML_FUZZ_EXAMPLES=5000 makes a random soak run; what it
# finds becomes a case in test_validation.py. database=None: nothing is written into the checkout.
SOAK = os.environ.get("REMOTE_ML_FUZZ_EXAMPLES")
SETTINGS = settings(max_examples=int(SOAK or 150), derandomize=SOAK is None, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
BACKENDS = ["databricks", "docker", "kubernetes", "local", "valohai"]


class Opaque:
    """An object of a type no field accepts."""


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def deep(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value} if depth % 2 else [value]
    return value


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(), st.text(max_size=20), st.binary(max_size=8), st.timedeltas(),
    st.sampled_from([10**400, -(10**400), float("nan"), float("inf"), "", " ", "\x00", "1e400", "nan", "-1",
                     timedelta.max, b"", 0, -1, 0.0]),
    st.builds(Opaque), st.builds(BadRepr),
)
anything = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.none()), children, max_size=4),
        st.frozensets(st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
    ),
    max_leaves=12,
) | st.integers(min_value=0, max_value=400).map(deep)

name_text = st.one_of(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True), st.text(max_size=10))
env_names = st.one_of(st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True), st.sampled_from(["REMOTE_ML_X"]),
                      st.text(max_size=6))
schemes = st.sampled_from(["s3", "gs", "s4", "file", "dbfs", "datum", "http", "simplecache::s3", "", "C", "x+y"])
uris = st.one_of(st.builds(lambda s, sep, rest: f"{s}{sep}{rest}", schemes, st.sampled_from(["://", ":/", ":", "/"]),
                           st.text(max_size=15)),
                 st.text(max_size=15), anything)
quantities = st.one_of(st.builds(lambda n, u: f"{n}{u}", st.one_of(st.integers(-5, 10**30), st.floats()),
                                 st.sampled_from(["", "m", "Mi", "Gi", "GG", "k", " Ki"])), anything)
secret_refs = st.one_of(st.builds(lambda a, b: f"{a}{b}", st.text(max_size=6), st.sampled_from(["", "/", "/k", "/a/b"])),
                        st.fixed_dictionaries({}, optional={"name": anything, "key": anything, "extra": anything}),
                        anything)

FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "image": st.one_of(st.text(max_size=20), anything),
    "command": st.one_of(st.lists(st.text(max_size=10), max_size=4), st.lists(anything, max_size=3), anything),
    "callable": st.one_of(st.from_regex(r"[a-z]{1,4}(\.[a-z]{1,4})?:[a-z]{1,4}", fullmatch=True), anything),
    "shell": anything,
    "params": st.one_of(st.dictionaries(name_text, anything, max_size=4), anything),
    "env": st.one_of(st.dictionaries(env_names, anything, max_size=4), anything),
    "secrets": st.one_of(st.dictionaries(env_names, secret_refs, max_size=3), anything),
    "inputs": st.one_of(st.dictionaries(name_text, uris, max_size=4), anything),
    "outputs": st.one_of(st.lists(name_text, max_size=4), st.frozensets(name_text, max_size=3), anything),
    "resources": st.one_of(
        st.fixed_dictionaries({}, optional={"cpu": quantities, "memory": quantities, "gpu": anything,
                                            "profile": anything, "gpus": anything}),
        anything),
    "timeout": st.one_of(st.floats(), st.integers(), st.timedeltas(), st.text(max_size=8), anything),
    "backend_options": st.one_of(
        st.dictionaries(st.sampled_from([*BACKENDS, "kuberntes", "", "Docker"]),
                        st.one_of(st.dictionaries(st.text(max_size=6), anything, max_size=3), anything), max_size=3),
        anything),
}


def valid_base(field: str) -> dict[str, Any]:
    """Valid values for every field but ``field`` (command and callable exclude each other)."""
    if field in ("callable", "params"):
        return {"callable": "pkg.mod:train"}
    if field == "shell":
        return {"command": "echo hi"}
    if field == "command":
        return {}
    return {"command": ["python", "train.py"]}


def assert_config_error_or_valid(build: Any) -> None:
    try:
        spec = build()
    except ConfigError as exc:
        assert isinstance(exc.field, str) and isinstance(exc.problem, str)
        str(exc)  # the message itself must render
        return
    if isinstance(spec, StepSpec):
        text = json.dumps(spec.to_json(), allow_nan=False)
        assert StepSpec.from_json(json.loads(text)) == spec


def test_every_field_is_covered():
    assert set(FIELD_VALUES) == set(SPEC_FIELDS)


@pytest.mark.parametrize("field", SPEC_FIELDS)
@SETTINGS
@given(data=st.data())
def test_one_arbitrary_field_never_escapes_as_another_exception(field, data):
    value = data.draw(FIELD_VALUES[field], label=field)
    assert_config_error_or_valid(lambda: StepSpec.build(**{**valid_base(field), field: value},
                                                        known_backends=BACKENDS))


@SETTINGS
@given(st.fixed_dictionaries({}, optional=FIELD_VALUES))
def test_any_combination_of_fields_never_escapes(kwargs):
    assert_config_error_or_valid(lambda: StepSpec.build(**kwargs, known_backends=BACKENDS))


@SETTINGS
@given(anything)
def test_from_json_of_anything(value):
    assert_config_error_or_valid(lambda: StepSpec.from_json(value))


HELPERS = {
    "parse_cpu": lambda v: parse_cpu(v),
    "parse_memory": lambda v: parse_memory(v),
    "parse_gpu": lambda v: parse_gpu(v),
    "parse_timeout": lambda v: parse_timeout(v),
    "Resources.parse": lambda v: Resources.parse(v),
    "SecretRef.parse": lambda v: SecretRef.parse("X", v),
    "check_uri": lambda v: check_uri("inputs.x", v),
    "check_json": lambda v: check_json("params.x", v, "fix"),
    "expect_mapping": lambda v: expect_mapping("f", v, "{}"),
    "expect_names": lambda v: expect_names("f", v, "[]"),
    "reject_unknown_options": lambda v: reject_unknown_options("backend_options.docker", v, {"shm_size"}),
    "check_backend_name": lambda v: check_backend_name(v, BACKENDS),
}


@pytest.mark.parametrize("helper", sorted(HELPERS))
@SETTINGS
@given(value=st.one_of(anything, quantities, uris, secret_refs))
def test_helpers_raise_only_config_error(helper, value):
    assert_config_error_or_valid(lambda: HELPERS[helper](value))


OPERATOR_VALUES = {
    **{("parameters" if k == "params" else "compute" if k == "resources" else k): v for k, v in FIELD_VALUES.items()},
    "backend": st.one_of(st.sampled_from([*BACKENDS, "", "{{ params.b }}", "kuberntes"]), anything),
    "backend_config": st.one_of(st.dictionaries(st.sampled_from([*BACKENDS, "namespace"]), anything, max_size=3),
                                anything),
    "artifact_root": anything,
    "code_version": anything,
    "deferrable": anything,
}


def templated(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


@SETTINGS
@given(st.fixed_dictionaries({}, optional=OPERATOR_VALUES))
def test_operator_arguments_raise_only_config_error(values):
    assert_config_error_or_valid(lambda: validate_operator_arguments(values, is_templated=templated,
                                                                     known_backends=BACKENDS))
    spec_args = {k: v for k, v in values.items() if k not in ("backend", "backend_config", "artifact_root",
                                                               "code_version", "deferrable")}
    assert_config_error_or_valid(lambda: build_operator_spec(spec_args, known_backends=BACKENDS))


# -- each backend's validate(), and the operator's constructor ------------------------------------------------


def _backends(tmp: str) -> dict[str, Any]:
    """One backend of each kind, built from minimal valid settings, with no client I/O possible."""
    from airflow_remote_ml.backends.databricks import DatabricksBackend, DatabricksConfig
    from airflow_remote_ml.backends.docker import DockerBackend, DockerConfig
    from airflow_remote_ml.backends.kubernetes import KubernetesBackend, KubernetesConfig
    from airflow_remote_ml.backends.local import LocalBackend, LocalConfig
    from airflow_remote_ml.backends.valohai import ValohaiAPI, ValohaiBackend, ValohaiConfig

    return {
        "local": LocalBackend(LocalConfig(state_dir=f"{tmp}/jobs")),
        "docker": DockerBackend(DockerConfig(), api_client=object()),
        "kubernetes": KubernetesBackend(KubernetesConfig.from_mapping({"namespace": "ml"}, "kubernetes"),
                                        core_v1=object()),
        "databricks": DatabricksBackend(DatabricksConfig.from_mapping(
            {"new_cluster": {"spark_version": "15.4.x-scala2.12", "node_type_id": "i3.xlarge", "num_workers": 1}},
            "databricks")),
        "valohai": ValohaiBackend(ValohaiConfig(token="t", project="demo", branch="main"),
                                  api=ValohaiAPI("vh.example", "t")),
    }


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Any:
    made = _backends(str(tmp_path_factory.mktemp("backends")))
    yield made
    for backend in made.values():
        backend.close()


def _option_values(name: str) -> st.SearchStrategy[dict[str, Any]]:
    from airflow_remote_ml.core import get_backend_class

    known = sorted(get_backend_class(name).option_names)
    return st.dictionaries(st.one_of(st.sampled_from(known), st.text(max_size=6)), anything, max_size=4)


PLAUSIBLE_SPEC = st.fixed_dictionaries({}, optional={
    "image": st.sampled_from(["python:3.12", "ghcr.io/acme/train:1", "Upper/Case:1", "busybox@sha256:12"]),
    "inputs": st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True),
                              st.sampled_from(["s3://b/x.csv", "/tmp", "/nonexistent/x.csv", "datum://0d7ae1f2",
                                               "https://h/x", "file:///tmp", "gs://b/k"]), max_size=3),
    "params": st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True),
                              st.one_of(st.integers(-5, 5), st.text(max_size=5), st.lists(st.integers(), max_size=2)),
                              max_size=3),
    "secrets": st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,6}", fullmatch=True),
                               st.sampled_from(["db/pass", "creds", "a}}b/k", "Db_Creds/pass:word"]), max_size=2),
    "resources": st.fixed_dictionaries({}, optional={"cpu": st.sampled_from([1, "500m", 64]),
                                                     "memory": st.sampled_from(["1Gi", "1Ki"]),
                                                     "gpu": st.integers(0, 2)}),
})


@pytest.mark.parametrize("name", BACKENDS)
@SETTINGS
@given(data=st.data())
def test_each_backends_validate_raises_only_config_error(backends, tmp_path_factory, name, data):
    """Whatever reaches a backend's validate() (options of any type, a profile of any shape, odd inputs)
    is a ConfigError or accepted: never a TypeError from a builder that trusted a type."""
    import dataclasses

    from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest

    backend = backends[name]
    options = data.draw(_option_values(name), label="options")
    profile = data.draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=12), anything, max_size=3),
                                  _option_values(name)), label="profile")
    # Mostly specs StepSpec accepts (so validate() is reached), sometimes anything at all.
    spec_fields = data.draw(st.one_of(st.just({}), PLAUSIBLE_SPEC, st.fixed_dictionaries({}, optional={
        "image": FIELD_VALUES["image"], "inputs": FIELD_VALUES["inputs"], "params": FIELD_VALUES["params"],
        "secrets": FIELD_VALUES["secrets"], "resources": FIELD_VALUES["resources"]})), label="spec")
    try:
        spec = StepSpec.build(command=["python3", "-c", "pass"], **spec_fields,
                              backend_options={name: options}, known_backends=BACKENDS)
    except ConfigError:
        return  # refused by the spec itself: not this test's subject
    if profile is not None:
        spec = dataclasses.replace(spec, resources=dataclasses.replace(spec.resources, profile="p"))
    try:
        backend.config = dataclasses.replace(backend.config, profiles={} if profile is None else {"p": profile})
    except ConfigError:
        return  # refused as a setting (a config that checks itself): earlier still than validate()
    if name == "valohai":  # validate reads the settings merged with the connection's
        backend.settings = backend.config
    request = StepRequest.create(spec, StepIdentity("dag", "task", "manual__1"),
                                 ArtifactStore(str(tmp_path_factory.getbasetemp() / "artifacts")))
    assert_config_error_or_valid(lambda: backend.validate(request))


@SETTINGS
@given(st.fixed_dictionaries({}, optional=OPERATOR_VALUES))
def test_the_operator_constructor_raises_only_config_error(values):
    """The constructor runs at parse time and again when a mapped task is unmapped on a worker."""
    from airflow_remote_ml.operators import RemoteExecutionOperator

    def construct() -> None:
        RemoteExecutionOperator(task_id="fuzzed", **values)

    assert_config_error_or_valid(construct)


# What a parsed valohai.yaml and JSON-checked parameters can hold: JSON values (YAML's too).
yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)


@SETTINGS
@given(declaration=st.lists(st.one_of(st.fixed_dictionaries(
           {"name": st.sampled_from(["a", "b"])},
           optional={"type": st.sampled_from(["integer", "float", "string", "flag", "weird"]) | yaml_values,
                     "min": yaml_values, "max": yaml_values, "choices": yaml_values, "multiple": yaml_values}),
           yaml_values), max_size=3) | yaml_values,
       values=st.dictionaries(st.sampled_from(["a", "b", "c"]), yaml_values, max_size=3))
def test_valohai_parameter_declarations_of_any_shape_raise_only_config_error(declaration, values):
    """The declaration comes from a user's valohai.yaml, parsed by the platform: any shape of YAML at all."""
    from airflow_remote_ml.backends.valohai._validation import check_step_parameters, declared_step

    step = declared_step([{"step": {"name": "s", "parameters": declaration}}], "s")
    assert step is not None
    assert_config_error_or_valid(lambda: check_step_parameters(step, values, lambda name: f"parameters.{name}"))
