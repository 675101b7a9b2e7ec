"""A deferred step's success ends its task in the triggerer; everything else resumes on a worker.

The trigger runs as the triggerer runs it: with ``task_instance`` set, and the Task SDK's comms in
place (``task_runner.SUPERVISOR_COMMS``, which the trigger runner process sets to its comms with the
triggerer). The fake comms record what the triggerer would store; the real path is proven by
tests/deployment (``test_a_deferred_success_ends_in_the_triggerer_and_hands_its_uri_on``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred
from airflow.triggers.base import TaskSuccessEvent, TriggerEvent

from airflow_remote_ml.core import StepFailedError
from airflow_remote_ml.operators import RemoteExecutionOperator
from airflow_remote_ml.triggers import RemoteStepTrigger
from tests.system.helpers import FakeTI, FileStateStore, context


@dataclass
class RunnerTI:
    """What the triggerer sets as ``trigger.task_instance`` (a ``TaskInstanceDTO``): the fields used here."""

    dag_id: str = "dag"
    task_id: str = "step"
    run_id: str = "manual__run"
    map_index: int = 3


class Comms:
    """The trigger runner's comms: records each request; ``fail`` makes the triggerer answer with an error."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[Any] = []
        self.fail = fail

    async def asend(self, msg: Any) -> None:
        self.sent.append(msg)
        if self.fail:
            raise RuntimeError("API server answered 500")

    def send(self, msg: Any) -> None:  # pragma: no cover - the trigger uses asend
        raise AssertionError("a trigger must not block its event loop on a synchronous send")


@pytest.fixture
def comms(monkeypatch):
    from airflow.sdk.execution_time import task_runner

    fake = Comms()
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", fake, raising=False)
    return fake


@pytest.fixture
def config(tmp_path):
    return {"state_dir": str(tmp_path / "jobs"), "kill_grace_seconds": 2}


@pytest.fixture
def store(tmp_path):
    return FileStateStore(str(tmp_path / "state.json"))


STEP = "import os; open(os.environ['REMOTE_ML_OUTPUT_MODEL'], 'w').write('m'); print('{\"score\": 0.9}')"


def deferred(tmp_path, config, store, command, outputs=("model",), cls=RemoteExecutionOperator, **kwargs):
    op = cls(task_id="step", backend="local", backend_config=config, artifact_root=str(tmp_path / "art"),
             deferrable=True, command=command, outputs=list(outputs), **kwargs)
    with pytest.raises(TaskDeferred) as info:
        op.execute(context(FakeTI(), store))
    _, kwargs = info.value.trigger.serialize()
    # Rebuilt from its kwargs as the triggerer does, and given its task instance.
    trigger = RemoteStepTrigger(**json.loads(json.dumps(kwargs)))
    trigger.task_instance = RunnerTI()  # type: ignore[assignment]
    return op, trigger


def first_event(trigger) -> Any:
    async def run():
        async for event in trigger.run():
            return event

    return asyncio.run(run())


def test_a_success_pushes_the_result_and_ends_the_task_in_the_triggerer(tmp_path, config, store, comms):
    _, trigger = deferred(tmp_path, config, store, [sys.executable, "-c", STEP])
    event = first_event(trigger)
    assert isinstance(event, TaskSuccessEvent) and event.xcoms is None
    (pushed,) = comms.sent
    assert (pushed.key, pushed.dag_id, pushed.task_id, pushed.run_id, pushed.map_index) == \
        ("return_value", "dag", "step", "manual__run", 3)
    # The value as JSON data, as a worker's push sends it: not a JSON string of it (Airflow 3.3.2's
    # TaskSuccessEvent(xcoms=...) handler stores json.dumps(value), which a task then reads as a str).
    assert isinstance(pushed.value, dict) and pushed.value["metrics"] == {"score": 0.9}
    assert os.path.exists(pushed.value["outputs"]["model"]) and pushed.value["backend"] == "local"


def test_a_failure_resumes_on_a_worker_whose_error_has_the_reason(tmp_path, config, store, comms):
    op, trigger = deferred(tmp_path, config, store,
                           [sys.executable, "-c", "print('loss went NaN'); raise SystemExit(3)"])
    event = first_event(trigger)
    assert type(event) is TriggerEvent and event.payload["status"]["state"] == "failed"
    assert comms.sent == []
    with pytest.raises(StepFailedError, match="exit code: 3") as info:
        op.execute_complete(context(FakeTI(), store), event.payload)
    assert "loss went NaN" in str(info.value)


def test_a_success_without_its_declared_output_resumes_on_a_worker_to_say_so(tmp_path, config, store, comms):
    op, trigger = deferred(tmp_path, config, store, [sys.executable, "-c", "print('forgot the model')"])
    event = first_event(trigger)
    assert type(event) is TriggerEvent and comms.sent == []
    with pytest.raises(StepFailedError, match="'model'"):
        op.execute_complete(context(FakeTI(), store), event.payload)


def test_a_result_the_triggerer_cannot_store_resumes_on_a_worker(tmp_path, config, store, comms):
    comms.fail = True
    op, trigger = deferred(tmp_path, config, store, [sys.executable, "-c", STEP])
    event = first_event(trigger)
    assert type(event) is TriggerEvent and event.payload["status"]["state"] == "succeeded"
    result = op.execute_complete(context(FakeTI(), store), event.payload)
    assert result["metrics"] == {"score": 0.9}


def test_without_xcom_push_the_task_ends_with_nothing_pushed(tmp_path, config, store, comms):
    _, trigger = deferred(tmp_path, config, store, [sys.executable, "-c", STEP], do_xcom_push=False)
    assert isinstance(first_event(trigger), TaskSuccessEvent) and comms.sent == []


def test_a_subclass_with_its_own_execute_complete_resumes_on_a_worker(tmp_path, config, store, comms):
    class Audited(RemoteExecutionOperator):
        def execute_complete(self, context, event):
            return {**super().execute_complete(context, event), "audited": True}

    op, trigger = deferred(tmp_path, config, store, [sys.executable, "-c", STEP], cls=Audited)
    event = first_event(trigger)
    assert type(event) is TriggerEvent and comms.sent == []
    assert op.execute_complete(context(FakeTI(), store), event.payload)["audited"] is True
