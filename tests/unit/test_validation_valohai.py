"""Valohai: what the create-execution endpoint would refuse is refused before submit, naming the field;
what only Valohai knows comes back from its 400 as an InvalidRequestError, never retried (issue 9, item 4).

The rules live in ``airflow_remote_ml/backends/valohai/_validation.py``; each case here failed before it
with a TypeError/AttributeError/ValueError, or was sent to Valohai and refused there.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from airflow_remote_ml.backends.valohai import ValohaiAPI, ValohaiBackend, ValohaiConfig
from airflow_remote_ml.core import (
    ArtifactStore,
    BackendAPIError,
    ConfigError,
    InvalidRequestError,
    StepIdentity,
    StepRequest,
    StepSpec,
)

IDENTITY = StepIdentity("ml", "train", "manual__2026-01-01")


def make_request(tmp_path: Any, **spec: Any) -> StepRequest:
    spec.setdefault("callable", "example_ml.steps:train")
    spec.setdefault("backend_options", {"valohai": {"step": "train"}})
    return StepRequest.create(StepSpec.build(**spec), IDENTITY, ArtifactStore(str(tmp_path)))


def backend(**settings: Any) -> ValohaiBackend:
    base: dict[str, Any] = {"token": "t", "project": "demo", "branch": "main"}
    return ValohaiBackend(ValohaiConfig(**{**base, **settings}), api=ValohaiAPI("vh.example", "t"))


def options(**values: Any) -> dict[str, Any]:
    return {"backend_options": {"valohai": {"step": "train", **values}}}


@pytest.mark.parametrize(("spec", "settings", "field"), [
    # The case: an int environment reached the API.
    (options(environment=5), {}, "backend_options.valohai.environment"),
    # A slug is [-A-Za-z0-9_]+ (Django SlugField): this one can name no environment.
    (options(environment="aws p3 large"), {}, "backend_options.valohai.environment"),
    ({"resources": {"profile": "gpu"}}, {"profiles": {"gpu": {"environment": ["aws-p3"]}}},
     "profiles.gpu.environment"),
    # Before: list(5) raised TypeError.
    (options(inputs={"dataset": 5}), {}, "backend_options.valohai.inputs.dataset"),
    (options(inputs={"dataset": ["s3://b/x", None]}), {}, "backend_options.valohai.inputs.dataset[1]"),
    (options(inputs={"dataset": "/local/file.csv"}), {}, "backend_options.valohai.inputs.dataset"),
    (options(inputs=["s3://b/x"]), {}, "backend_options.valohai.inputs"),
    # valohai-yaml parameter values are atoms or a flat list of atoms.
    (options(parameters={"alpha": {"lr": 1}}), {}, "backend_options.valohai.parameters.alpha"),
    (options(parameters={"alpha": [[1, 2]]}), {}, "backend_options.valohai.parameters.alpha[0]"),
    (options(parameters={"alpha": None}), {}, "backend_options.valohai.parameters.alpha"),
    (options(parameters="alpha=1"), {}, "backend_options.valohai.parameters"),
    (options(title=7), {}, "backend_options.valohai.title"),
    (options(image=""), {}, "backend_options.valohai.image"),
    (options(tags=["ok", ""]), {}, "backend_options.valohai.tags[1]"),
    (options(priority=2**40), {}, "backend_options.valohai.priority"),
    (options(runtime_config=[1]), {}, "backend_options.valohai.runtime_config"),
])
def test_a_field_valohai_would_refuse_is_refused_before_submit(tmp_path, spec, settings, field):
    with pytest.raises(ConfigError) as err:
        backend(**settings).validate(make_request(tmp_path, **spec))
    assert err.value.field == field, err.value
    assert err.value.fix


@pytest.mark.parametrize(("settings", "field"), [
    ({"host": 5}, "backend_config[valohai].host"),                 # before: AttributeError ('int'.strip)
    ({"max_retries": "x"}, "backend_config[valohai].max_retries"),  # before: ValueError (int('x'))
    ({"request_timeout": "x"}, "backend_config[valohai].request_timeout"),
    ({"token": 5}, "backend_config[valohai].token"),
    ({"project": 7}, "backend_config[valohai].project"),
    ({"tags": [1]}, "backend_config[valohai].tags[0]"),
    ({"environment": 5}, "backend_config[valohai].environment"),
    ({"steps": {"pkg:train": 3}}, "backend_config[valohai].steps.pkg:train"),
    ({"python_path": "src"}, "backend_config[valohai].python_path"),
    ({"fetch": "sometimes"}, "backend_config[valohai].fetch"),
])
def test_a_malformed_setting_is_refused_when_the_backend_is_built(settings, field):
    base: dict[str, Any] = {"token": "t", "project": "demo", "branch": "main"}
    with pytest.raises(ConfigError) as err:
        ValohaiBackend.from_config({**base, **settings})
    assert err.value.field == field, err.value


def test_well_formed_options_pass(tmp_path):
    request = make_request(tmp_path, inputs={"dataset": "datum://0d7ae1f2-7c3a-4b1e-9f43-0a6f2b0c9a11"},
                           **options(environment="aws-eu-west-1-g4dn-xlarge", tags=["nightly"], priority=1,
                                     parameters={"alpha": 0.1, "layers": [1, 2], "fast": True},
                                     inputs={"extra": ["s3://bucket/a", "gs://bucket/b"]}, title="t"))
    backend(environment="0d7ae1f2-7c3a-4b1e-9f43-0a6f2b0c9a11").validate(request)


# -- what only Valohai knows: its 400 names the field, and is never retried ------------------------------


class OneAnswer(requests.Session):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__()
        self.status, self.body, self.calls = status, body, 0

    def request(self, method, url, **kwargs):  # type: ignore[override]
        self.calls += 1
        resp = requests.Response()
        resp.status_code, resp.url = self.status, url
        resp._content = json.dumps(self.body).encode()
        resp.headers["Content-Type"] = "application/json"
        return resp


def test_a_400_on_a_parameter_type_is_an_invalid_request_error_naming_the_field_and_not_retried():
    # The body the double answers for a float parameter given "abc" (valohai-yaml Parameter.validate text).
    session = OneAnswer(400, {"parameters": [{"message": "alpha: abc is not a floating-point number",
                                              "code": "invalid"}]})
    api = ValohaiAPI("vh.example", "t", max_retries=5, sleep=lambda _s: None)
    api.session = session
    with pytest.raises(InvalidRequestError) as err:
        api.request("POST", "executions/", json_body={"parameters": {"alpha": "abc"}})
    assert session.calls == 1
    assert isinstance(err.value, ConfigError) and isinstance(err.value, BackendAPIError)
    assert err.value.field == "valohai.parameters" and err.value.status_code == 400
    assert "alpha: abc is not a floating-point number" in str(err.value)
    assert "valohai.yaml" in (err.value.fix or "")


@pytest.mark.parametrize(("body", "field"), [
    # DRF's DictField keys a child's errors by the item: the field names the parameter.
    ({"parameters": {"alpha": [{"message": "A valid number is required.", "code": "invalid"}]}},
     "valohai.parameters.alpha"),
    ({"environment": [{"message": "Object with slug x does not exist.", "code": "does_not_exist"}]},
     "valohai.environment"),
    # Keys valohai-cli's ErrorFormatter prints as errors of the whole request.
    ({"non_field_errors": [{"message": "Invalid data.", "code": "invalid"}]}, "valohai"),
    ({"error": "Something is off."}, "valohai"),
])
def test_a_400_names_the_innermost_field_valohai_names(body, field):
    api = ValohaiAPI("vh.example", "t", sleep=lambda _s: None)
    api.session = OneAnswer(400, body)
    with pytest.raises(InvalidRequestError) as err:
        api.request("POST", "executions/", json_body={})
    assert err.value.field == field


# -- parameter values against the step's declaration (valohai_yaml Parameter.validate) -----------------------

STEP = {"name": "train", "parameters": [
    {"name": "epochs", "type": "integer", "min": 1, "max": 100},
    {"name": "lr", "type": "float"},
    {"name": "optimizer", "type": "string", "choices": ["adam", "sgd"]},
    {"name": "layers", "type": "integer", "multiple": "separate"},
    {"name": "fast", "type": "flag"},
]}


@pytest.mark.parametrize(("values", "field", "words"), [
    ({"epochs": "ten"}, "parameters.epochs", "is not an integer"),
    ({"epochs": 2.5}, "parameters.epochs", "is not an integer"),   # int(str(2.5), 10) fails, as on Valohai
    ({"epochs": True}, "parameters.epochs", "is not an integer"),
    ({"epochs": 0}, "parameters.epochs", "less than the minimum allowed (1)"),
    ({"epochs": 101}, "parameters.epochs", "greater than the maximum allowed (100)"),
    ({"lr": "fast"}, "parameters.lr", "is not a number"),
    ({"optimizer": "rmsprop"}, "parameters.optimizer", "is not among the choices"),
    ({"epochs": [1, 2]}, "parameters.epochs", "the step takes a single value"),
    ({"layers": [1, "x"]}, "parameters.layers", "'x' is not an integer"),
])
def test_a_value_its_declaration_refuses_names_the_parameter(values, field, words):
    from airflow_remote_ml.backends.valohai._validation import check_step_parameters

    with pytest.raises(ConfigError) as err:
        check_step_parameters(STEP, values, lambda name: f"parameters.{name}")
    assert err.value.field == field and words in err.value.problem
    assert "valohai.yaml" in (err.value.fix or "")


def test_values_the_declaration_takes_pass_and_undeclared_names_are_left_to_valohai():
    from airflow_remote_ml.backends.valohai._validation import check_step_parameters, declared_step

    check_step_parameters(STEP, {"epochs": "10", "lr": 1, "optimizer": "adam", "layers": [1, 2], "fast": "yes",
                                 "undeclared": {"x": 1}}, lambda name: name)
    assert declared_step([{"step": STEP}, {"pipeline": {}}], "train") is STEP
    assert declared_step([{"step": STEP}], "other") is None and declared_step("text: yaml", "train") is None
