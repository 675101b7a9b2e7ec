from __future__ import annotations

from datetime import timedelta

import pytest

from airflow_remote_ml.core import ConfigError, Resources, SecretRef, StepSpec
from airflow_remote_ml.core.spec import parse_cpu, parse_memory


def test_a_valid_callable_step_normalises_its_fields():
    spec = StepSpec.build(callable="pkg.mod:train", params={"alpha": 0.1}, env={"N": 3, "DEBUG": True},
                          secrets={"DB_PASSWORD": "db-creds/password"}, inputs={"data": "s3://b/d.csv"},
                          outputs=["model"], resources={"cpu": "500m", "memory": "4Gi", "gpu": 1, "profile": "gpu"},
                          timeout=timedelta(hours=1))
    assert spec.env == {"N": "3", "DEBUG": "true"}
    assert spec.secrets["DB_PASSWORD"] == SecretRef("db-creds", "password")
    assert spec.resources == Resources(cpu=0.5, memory=4 * 1024**3, gpu=1, profile="gpu")
    assert spec.timeout == 3600
    assert StepSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("kwargs", "field", "fix"),
    [
        ({}, "command", "callable="),
        ({"command": ["x"], "callable": "a:b"}, "command", "exactly one"),
        ({"command": "python train.py"}, "command", "shell=True"),
        ({"command": []}, "command", "give the program"),
        ({"command": ["python", 3]}, "command[1]", "as a string"),
        ({"callable": "train"}, "callable", "my_pipeline.steps:train"),
        ({"callable": "a:b", "params": {"x": object()}}, "params.x", "JSON"),
        ({"callable": "a:b", "params": {"not valid": 1}}, "params.not valid", "identifiers"),
        ({"callable": "a:b", "env": {"1BAD": "x"}}, "env.1BAD", "letters"),
        ({"callable": "a:b", "env": {"REMOTE_ML_X": "x"}}, "env.REMOTE_ML_X", "reserved"),
        ({"callable": "a:b", "env": {"X": {"nested": 1}}}, "env.X", "json.dumps"),
        ({"callable": "a:b", "secrets": {"X": {"key": "k"}}}, "secrets.X", "name"),
        ({"callable": "a:b", "inputs": {"data": ""}}, "inputs.data", "s3://bucket/"),
        ({"callable": "a:b", "outputs": ["model", "model"]}, "outputs.model", "once"),
        ({"callable": "a:b", "outputs": ["bad-name"]}, "outputs.bad-name", "letters"),
        ({"callable": "a:b", "outputs": "model"}, "outputs", "['model']"),
        ({"callable": "a:b", "resources": {"memory": "4GG"}}, "resources.memory", "'4Gi'"),
        ({"callable": "a:b", "resources": {"cpu": "lots"}}, "resources.cpu", "'500m'"),
        ({"callable": "a:b", "resources": {"gpu": -1}}, "resources.gpu", "whole number"),
        ({"callable": "a:b", "resources": {"gpus": 1}}, "resources.gpus", "did you mean 'gpu'"),
        ({"callable": "a:b", "timeout": -5}, "timeout", "positive"),
        ({"callable": "a:b", "timeout": "soon"}, "timeout", "seconds"),
        ({"callable": "a:b", "backend_options": {"docker": ["x"]}}, "backend_options.docker", "mapping"),
    ],
)
def test_bad_input_names_the_field_and_the_fix(kwargs, field, fix):
    with pytest.raises(ConfigError) as info:
        StepSpec.build(**kwargs)
    assert info.value.field == field
    assert fix in str(info.value)


def test_shell_string_is_accepted_only_when_asked():
    spec = StepSpec.build(command="echo hi && echo there", shell=True)
    assert spec.command == "echo hi && echo there"
    with pytest.raises(ConfigError, match="shell=True needs command to be one string"):
        StepSpec.build(command=["echo", "hi"], shell=True)


@pytest.mark.parametrize(("value", "expected"), [("512Mi", 512 * 1024**2), ("2G", 2 * 1000**3), (1024, 1024),
                                                 ("1.5Gi", int(1.5 * 1024**3)), ("100", 100)])
def test_memory_sizes(value, expected):
    assert parse_memory(value) == expected


@pytest.mark.parametrize(("value", "expected"), [("250m", 0.25), (2, 2.0), ("1.5", 1.5)])
def test_cpu_counts(value, expected):
    assert parse_cpu(value) == expected


def test_options_for_other_backends_are_ignored():
    spec = StepSpec.build(command=["x"], backend_options={"docker": {"shm_size": "1g"}, "kubernetes": {"a": 1}})
    assert spec.options_for("docker") == {"shm_size": "1g"}
    assert spec.options_for("local") == {}
