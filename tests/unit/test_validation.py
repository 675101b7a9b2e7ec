"""Every malformed step is one ConfigError naming its field (issue 9, classes 1, 3 and 4).

Each case here crashed with a raw exception, or was accepted and then misbehaved, before
``core/validation.py``. The tests assert the field, and a fix only where this package wrote it.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from airflow_remote_ml.core import ConfigError, StepSpec
from airflow_remote_ml.core.errors import BackendNotFoundError
from airflow_remote_ml.core.spec import SPEC_FIELDS, reject_unknown_options
from airflow_remote_ml.core.validation import (
    MAX_TIMEOUT_SECONDS,
    build_operator_spec,
    check_backend_name,
    validate_operator_arguments,
)

BASE = {"command": ["python", "train.py"]}


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def self_referencing() -> list[object]:
    loop: list[object] = []
    loop.append(loop)
    return loop


# (kwargs over BASE, the field the error must name, a fix this package wrote, or None)
CASES = [
    # wrong container types
    ({"params": [1, 2]}, "params", "mapping"),
    ({"params": "alpha=1"}, "params", "not 'name=value' text"),
    ({"inputs": ["s3://b/x"]}, "inputs", "mapping"),
    ({"outputs": 5}, "outputs", "list"),
    ({"outputs": {"model": "x"}}, "outputs", "list"),
    ({"backend_options": ["kubernetes"]}, "backend_options", "mapping"),
    ({"resources": {"cpu": [2]}}, "resources.cpu", "'500m'"),
    ({"env": {1: "x"}}, "env.1", "strings as keys"),
    ({"shell": "yes"}, "shell", "True or False"),
    ({"command": b"python"}, "command", None),
    # extreme numbers
    ({"resources": {"cpu": 10**400}}, "resources.cpu", None),
    ({"resources": {"cpu": 10**7}}, "resources.cpu", None),
    ({"resources": {"memory": 10**400}}, "resources.memory", None),
    ({"resources": {"memory": "9" * 400 + "Gi"}}, "resources.memory", None),
    ({"resources": {"memory": 0.5}}, "resources.memory", None),
    ({"resources": {"gpu": 10**400}}, "resources.gpu", None),
    ({"resources": {"gpu": "9" * 30}}, "resources.gpu", None),
    ({"resources": {"profile": "gpu\n"}}, "resources.profile", None),
    ({"resources": {"gpu": "²"}}, "resources.gpu", None),  # str.isdigit() is true for it; int() is not
    ({"resources": {"memory": "٣Gi"}}, "resources.memory", None),
    ({"timeout": 10**400}, "timeout", "at most 30 days"),
    ({"timeout": 1e10}, "timeout", "at most 30 days"),
    ({"timeout": MAX_TIMEOUT_SECONDS + 1}, "timeout", "at most 30 days"),
    ({"timeout": timedelta(days=999_999_999)}, "timeout", "at most 30 days"),
    ({"env": {"N": 10**5000}}, "env.N", None),
    ({"env": {"N": float("nan")}}, "env.N", None),
    ({"params": {"n": 10**5000}}, "params.n", "as strings"),
    # nesting and non-JSON parameters
    ({"params": {"deep": nested(100_000)}}, None, "flatten"),
    ({"params": {"loop": self_referencing()}}, None, "flatten"),
    ({"params": {"x": {1: "one"}}}, "params.x.1", "str keys"),
    ({"params": {"x": {1, 2}}}, "params.x", None),
    ({"backend_options": {"docker": {"x": float("nan")}}}, "backend_options.docker.x", None),
    # values no process can receive
    ({"image": 123}, "image", None),
    ({"image": "python 3.11"}, "image", None),
    ({"image": "python:3.11\x00"}, "image", None),
    ({"env": {"X": "a\x00b"}}, "env.X", None),
    ({"command": ["python", "a\x00b"]}, "command[1]", None),
    ({"command": "echo \x00", "shell": True}, "command", None),
    # malformed secret references
    ({"secrets": {"DB": "db-creds/"}}, "secrets.DB", None),
    ({"secrets": {"DB": "a/b/c"}}, "secrets.DB", None),
    ({"secrets": {"DB": {"name": 5}}}, "secrets.DB.name", None),
    ({"secrets": {"DB": {"name": "db", "key": ["k"]}}}, "secrets.DB.key", None),
    ({"secrets": {"DB": "db creds/key"}}, "secrets.DB.name", None),
    # names that collide in the step's environment or with the runtime's own arguments
    ({"inputs": {"Data": "s3://b/x", "data": "s3://b/y"}}, "inputs.data", "differ in letters"),
    ({"outputs": ["Model", "model"]}, "outputs.model", "differ in letters"),
    ({"callable": "pkg.mod:train", "command": None, "params": {"inputs": 1}}, "params.inputs", "inputs_config"),
    ({"params": {"outputs": {}}}, "params.outputs", "outputs_config"),
    # input URIs that only fail inside the remote step
    ({"inputs": {"data": "data/train.csv"}}, "inputs.data", "absolute path"),
    ({"inputs": {"data": "./train.csv"}}, "inputs.data", "absolute path"),
    ({"inputs": {"data": "s4://bucket/train.csv"}}, "inputs.data", "did you mean 's3'?"),
    ({"inputs": {"data": "simplecache::s4://bucket/x"}}, "inputs.data", "did you mean 's3'?"),
    ({"inputs": {"data": "s3://"}}, "inputs.data", "s3://bucket/key"),
    ({"inputs": {"data": " s3://bucket/x"}}, "inputs.data", None),
    # a misspelt backend as a key of backend_options
    ({"backend_options": {"kuberntes": {"node_selector": {}}}}, "backend_options.kuberntes",
     "did you mean 'kubernetes'?"),
    ({"backend_options": {1: {}}}, "backend_options.1", None),
]

# Cases the old checks already refused: kept so the rewrite cannot regress them.
REGRESSION_GUARDS = [
    ({"resources": {"memory": [1]}}, "resources.memory", "'4Gi'"),
    ({"env": {"X": b"bytes"}}, "env.X", None),
    ({"command": {"python": "x"}}, "command", None),
    ({"resources": {"cpu": float("nan")}}, "resources.cpu", None),
    ({"resources": {"cpu": float("inf")}}, "resources.cpu", None),
    ({"resources": {"cpu": "1e400"}}, "resources.cpu", None),
    ({"resources": {"memory": float("nan")}}, "resources.memory", None),
    ({"timeout": float("nan")}, "timeout", None),
    ({"timeout": float("inf")}, "timeout", None),
    ({"timeout": [60]}, "timeout", None),
    ({"secrets": ["DB"]}, "secrets", None),
    ({"inputs": {"data": 5}}, "inputs.data", None),
    ({"resources": {"profile": "  "}}, "resources.profile", None),
]


@pytest.mark.parametrize(("kwargs", "field", "fix"), CASES + REGRESSION_GUARDS,
                         ids=[f"bug{i}" for i in range(len(CASES))] + [f"guard{i}" for i in range(len(REGRESSION_GUARDS))])
def test_malformed_input_is_one_config_error_naming_the_field(kwargs, field, fix):
    with pytest.raises(ConfigError) as info:
        StepSpec.build(**{**BASE, **kwargs})
    if field is not None:
        assert info.value.field == field
    else:  # a deep structure: the path to where the limit hit
        assert info.value.field.startswith("params.")
    if fix is not None:
        assert fix in (info.value.fix or "")


@pytest.mark.parametrize("uri", ["s3://bucket/x.csv", "/data/x.csv", "file:///data/x", "gs://b/k", "dbfs:/raw/x",
                                 "datum://0123", "https://host/f.csv", "simplecache::s3://bucket/x",
                                 "abfs://container/x", "hf://datasets/x/y"])
def test_real_uris_are_accepted(uri):
    assert StepSpec.build(**BASE, inputs={"data": uri}).inputs == {"data": uri}


def test_accepted_specs_survive_json():
    spec = StepSpec.build(callable="pkg.mod:train", params={"a": [1, {"b": None}], "t": (1, 2)},
                          outputs={"model", "metrics"}, resources={"cpu": "250m", "memory": 1024, "gpu": "2"},
                          backend_options={"kubernetes": {"tolerations": [{"key": "gpu"}]}}, timeout="60",
                          secrets={"DB": {"name": "db", "key": "pw"}})
    assert spec.outputs == ("metrics", "model")  # a set is sorted: the order is deterministic
    assert StepSpec.from_json(json.loads(json.dumps(spec.to_json(), allow_nan=False))) == spec


def test_from_json_refuses_unknown_fields():
    with pytest.raises(ConfigError) as info:
        StepSpec.from_json({**BASE, "outputz": ["m"]})
    assert info.value.field == "spec.outputz" and info.value.fix == "did you mean 'outputs'?"
    with pytest.raises(ConfigError) as info:
        StepSpec.from_json(["not", "a", "mapping"])
    assert info.value.field == "spec"
    assert set(SPEC_FIELDS) == set(StepSpec.__dataclass_fields__)


def test_option_helpers_refuse_a_non_mapping():
    with pytest.raises(ConfigError) as info:
        reject_unknown_options("backend_options.docker", ["shm_size"], {"shm_size"})
    assert info.value.field == "backend_options.docker"


# -- the operator's arguments -------------------------------------------------------------------------


def templated(value: object) -> bool:
    """What the operator's _is_templated says, for the plain strings used here."""
    return isinstance(value, str) and "{{" in value


@pytest.mark.parametrize(
    ("values", "field", "fix"),
    [
        ({"outputs": "model"}, "outputs", "['model']"),
        ({"parameters": [1, 2]}, "parameters", "mapping"),
        ({"parameters": {"inputs": 1}}, "parameters.inputs", None),
        ({"compute": {"cpu": [2]}}, "compute.cpu", None),
        ({"compute": {"gpu": 10**400}}, "compute.gpu", None),
        ({"backend_config": [None]}, "backend_config", None),
        ({"backend_config": {"kubernetes": [1]}}, "backend_config.kubernetes", None),
        ({"backend": ""}, "backend", None),
        ({"backend": 5}, "backend", None),
        ({"deferrable": "yes"}, "deferrable", None),
        ({"artifact_root": 5}, "artifact_root", None),
        ({"timeout": 1e10}, "timeout", None),
        ({"inputs": {"data": "rel/path"}, "outputs": "{{ params.outputs }}"}, "inputs.data", None),
    ],
)
def test_operator_arguments_are_checked_one_by_one(values, field, fix):
    with pytest.raises(ConfigError) as info:
        validate_operator_arguments(values, is_templated=templated)
    assert info.value.field == field
    if fix is not None:
        assert fix in (info.value.fix or "")


def test_a_misspelt_backend_is_refused_with_a_suggestion():
    with pytest.raises(BackendNotFoundError) as info:
        validate_operator_arguments({"backend": "kuberntes"}, is_templated=templated)
    assert info.value.fix == "did you mean 'kubernetes'?"


def test_templated_arguments_wait_for_rendering():
    validate_operator_arguments({"backend": "{{ params.backend }}", "outputs": "{{ params.outputs }}",
                                 "parameters": "{{ params.p }}", "compute": {"cpu": 2}, "command": ["x"]},
                                is_templated=templated)


def test_a_backend_that_renders_to_nothing_is_refused():
    with pytest.raises(ConfigError) as info:
        check_backend_name("  ", ["docker", "local"])
    assert info.value.field == "backend"
    assert check_backend_name(None, ["local"]) is None
    assert check_backend_name("local", ["local"]) == "local"


def test_build_operator_spec_names_the_operator_arguments():
    with pytest.raises(ConfigError) as info:
        build_operator_spec({"command": ["x"], "compute": {"memory": "4GG"}})
    assert info.value.field == "compute.memory"
    with pytest.raises(ConfigError) as info:
        build_operator_spec({"command": ["x"], "parameters": {"x": object()}})
    assert info.value.field == "parameters.x"
    with pytest.raises(ConfigError) as info:
        build_operator_spec({"command": ["x"], "paramters": {}})
    assert info.value.field == "paramters" and info.value.fix == "did you mean 'parameters'?"
    spec = build_operator_spec({"callable": "a.b:c", "parameters": {"k": 1}, "compute": {"cpu": 1}})
    assert spec.params == {"k": 1} and spec.resources.cpu == 1
