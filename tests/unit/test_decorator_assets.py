"""Outputs as Airflow Assets: which Assets a step publishes, their events' extra, Assets as inputs."""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk import DAG, Asset, TaskGroup

from airflow_remote_ml import assets as asset_support
from airflow_remote_ml.core.errors import ArtifactError, ConfigError
from airflow_remote_ml.core.status import StepResult
from airflow_remote_ml.decorators import remote_ml_task
from airflow_remote_ml.operators import RemoteExecutionOperator

MODEL = Asset(name="demo.train.model", uri="x-remote-ml://demo/train/model", group="remote-ml")


def fit(alpha: float, outputs: dict[str, str]) -> None: ...


def make_dag() -> DAG:
    return DAG(dag_id="demo", schedule=None, start_date=datetime(2026, 1, 1))


def test_a_steps_asset_has_a_stable_name_and_uri() -> None:
    assert asset_support.step_asset("demo", "train", "model") == MODEL
    # Airflow leaves an "x-" scheme as it is (airflow/sdk/definitions/asset/__init__.py _sanitize_uri).
    assert MODEL.uri == "x-remote-ml://demo/train/model"


@pytest.mark.parametrize(("assets", "published"), [
    (True, {"model": MODEL, "report": asset_support.step_asset("demo", "train", "report")}),
    (["model"], {"model": MODEL}),
    ({"model": Asset("s3://ml/churn-model")}, {"model": Asset("s3://ml/churn-model")}),
    (None, {}), (False, {}),
])
def test_assets_true_names_or_asset_objects(assets: Any, published: dict[str, Asset]) -> None:
    assert asset_support.output_assets(assets, ["model", "report"], "demo", "train") == published


@pytest.mark.parametrize(("assets", "outputs", "dag_id", "field", "problem"), [
    (["scores"], ["model"], "demo", "assets.scores", "is not a declared output (outputs: model)"),
    ({"model": "s3://x"}, ["model"], "demo", "assets.model", "expected an Asset, got str 's3://x'"),
    (True, "{{ params.outputs }}", "demo", "assets", "needs the outputs listed when the DAG is parsed"),
    ("model", ["model"], "demo", "assets", "expected True, a list of output names or a mapping, got str"),
    (True, ["model"], None, "assets", "default Assets are named after the task's DAG"),
])
def test_a_wrong_assets_argument_is_a_config_error(assets: Any, outputs: Any, dag_id: str | None, field: str,
                                                   problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        asset_support.output_assets(assets, outputs, dag_id, "train")
    assert error.value.field == field and error.value.problem.startswith(problem)


def test_published_outputs_are_outlets_and_asset_inputs_inlets_at_parse_time() -> None:
    external = Asset("s3://lake/customers.parquet")
    with make_dag():
        op = RemoteExecutionOperator(task_id="train", callable="m:f", outputs=["model"], assets=True,
                                     outlets=[external], inputs={"data": external, "other": "/data/x"})
    assert op.outlets == [external, MODEL]
    assert op.inlets == [external]


def test_a_mapped_task_gets_its_outlets_when_the_dag_is_parsed() -> None:
    """A mapped task's outlets are its partial arguments (MappedOperator never runs __init__ when parsed)."""
    from airflow.serialization.serialized_objects import DagSerialization

    with make_dag() as dag:
        with TaskGroup("scenarios"):
            RemoteExecutionOperator.partial(task_id="train", callable="m:f", outputs=["model"],
                                            assets=True).expand(parameters=[{"a": 1}])
        remote_ml_task(outputs=["model"], assets=["model"])(fit).expand(alpha=[0.1, 1.0])
    grouped = asset_support.step_asset("demo", "scenarios.train", "model")
    decorated = asset_support.step_asset("demo", "fit", "model")
    assert dag.task_dict["scenarios.train"].outlets == [grouped]
    assert dag.task_dict["fit"].outlets == [decorated]
    # What the dag processor registers from the serialized DAG (airflow/dag_processing/collection.py reads a
    # mapped task's outlets from its partial_kwargs): both Assets, so their events will be accepted.
    from airflow.dag_processing.collection import _get_dag_assets
    from airflow.serialization.definitions.assets import SerializedAsset
    from airflow.serialization.serialized_objects import LazyDeserializedDAG

    lazy = LazyDeserializedDAG(data=DagSerialization.to_dict(dag))
    registered = {(task_id, asset.name) for task_id, asset in _get_dag_assets(lazy, SerializedAsset, inlets=False)}
    assert registered == {("scenarios.train", grouped.name), ("fit", decorated.name)}


def test_a_decorated_tasks_asset_inputs_are_inlets() -> None:
    with make_dag() as dag:
        remote_ml_task(outputs=["model"], assets=True)(fit)(alpha=1, inputs={"previous": MODEL})
    assert dag.task_dict["fit"].inlets == [MODEL]
    assert dag.task_dict["fit"].outlets == [asset_support.step_asset("demo", "fit", "model")]


# -- the event ---------------------------------------------------------------------------------------------------

RESULT = StepResult(outputs={"model": "/art/demo/run1/train/model"}, metrics={"rmse": 0.5}, backend="docker",
                    job_id="c0ffee", url="http://jobs/c0ffee",
                    manifest={"outputs": {"model": {"uri": "/art/demo/run1/train/model", "size": 12, "sha256": "ab",
                                                    "kind": "file"}}})


def test_the_event_extra_carries_the_artifact_its_checksum_metrics_and_origin() -> None:
    assert asset_support.event_extra(RESULT, "model") == {
        "uri": "/art/demo/run1/train/model", "sha256": "ab", "size": 12, "kind": "file", "metrics": {"rmse": 0.5},
        "backend": "docker", "job_id": "c0ffee", "url": "http://jobs/c0ffee"}


def test_a_succeeded_step_fills_its_outlet_events(monkeypatch: pytest.MonkeyPatch) -> None:
    import airflow.sdk
    from airflow.sdk.execution_time.context import OutletEventAccessors

    with make_dag():
        op = RemoteExecutionOperator(task_id="train", callable="m:f", outputs=["model"], assets=["model"])
    events = OutletEventAccessors()
    monkeypatch.setattr(airflow.sdk, "get_current_context", lambda: {"outlet_events": events})
    op._on_result(RESULT, {})
    assert events[MODEL].extra == asset_support.event_extra(RESULT, "model")


def test_a_step_without_assets_needs_no_task_context() -> None:
    op = RemoteExecutionOperator(task_id="plain", callable="m:f", outputs=["model"])
    op._on_result(RESULT, {})  # no get_current_context(): it would raise outside a running task


# -- Assets as inputs ----------------------------------------------------------------------------------------------

class _Events(list):  # what context["inlet_events"][asset] is: a sequence of events with .extra
    pass


def _context(triggering: dict[Asset, list[Any]] | None = None, newest: list[Any] | None = None) -> dict[str, Any]:
    class Inlets(dict):
        def __getitem__(self, asset: Asset) -> _Events:
            return _Events(newest or [])

    return {"triggering_asset_events": triggering or {}, "inlet_events": Inlets()}


def _event(uri: str | None) -> SimpleNamespace:
    return SimpleNamespace(extra={"uri": uri} if uri else {})


def test_an_asset_input_is_the_artifact_of_the_event_that_triggered_the_run() -> None:
    context = _context(triggering={MODEL: [_event("/art/run2/model")]}, newest=[_event("/art/run3/model")])
    assert asset_support.input_uri("model", MODEL, context) == "/art/run2/model"


def test_otherwise_the_newest_event_of_the_asset() -> None:
    assert asset_support.input_uri("model", MODEL, _context(newest=[_event("/a/1"), _event("/a/2")])) == "/a/2"


def test_an_asset_of_another_producer_stands_for_its_own_uri() -> None:
    lake = Asset("s3://lake/customers.parquet")
    assert asset_support.input_uri("data", lake, _context(newest=[_event(None)])) == "s3://lake/customers.parquet"


def test_a_step_asset_without_events_is_an_error_saying_what_to_run() -> None:
    with pytest.raises(ArtifactError, match="has no event yet.*run the DAG that produces it first"):
        asset_support.input_uri("model", MODEL, _context())
    with pytest.raises(ArtifactError, match="has no 'uri' in its extra"):
        asset_support.input_uri("model", MODEL, _context(newest=[_event(None)]))


def test_rendering_resolves_asset_inputs_before_the_spec_is_built() -> None:
    with make_dag():
        op = RemoteExecutionOperator(task_id="score", callable="m:f", inputs={"model": MODEL, "data": "/d"})
    op.render_template_fields(_context(newest=[_event("/art/run9/model")]))
    assert op.inputs == {"model": "/art/run9/model", "data": "/d"}
    assert op._build_spec().inputs["model"] == "/art/run9/model"


def test_a_taskflow_task_mapped_twice_names_each_asset_after_its_own_task_id() -> None:
    with make_dag() as dag:
        decorated = remote_ml_task(outputs=["model"], assets=True)(fit)
        decorated.expand(alpha=[0.1])
        decorated.expand(alpha=[1.0])
    assert dag.task_dict["fit"].outlets == [asset_support.step_asset("demo", "fit", "model")]
    assert dag.task_dict["fit__1"].outlets == [asset_support.step_asset("demo", "fit__1", "model")]
