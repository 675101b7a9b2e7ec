"""Secrets in the task log (issue 9, item 6): every resolved secret value is registered with Airflow's
secrets masker, on the worker and, for a deferred step, in the triggerer's own process; the trigger's
kwargs carry references, never values."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred
from airflow.sdk.log import _secrets_masker

from airflow_remote_ml.backends.local import LocalBackend, LocalConfig
from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec
from airflow_remote_ml.operators import RemoteExecutionOperator
from airflow_remote_ml.triggers import RemoteStepTrigger
from tests.system.helpers import FakeTI, FileStateStore, context


def masked(value: str) -> bool:
    return value not in str(_secrets_masker().redact(f"the value is {value}"))


def run_trigger(trigger: RemoteStepTrigger, shown: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    class TaskLog:  # what the triggerer forwards into the task log
        def info(self, msg: str, *args: Any) -> None:
            shown.append(msg % args if args else msg)

        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: None

    monkeypatch.setattr(RemoteStepTrigger, "log", property(lambda self: TaskLog()))

    async def first_event() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(first_event())


def test_the_trigger_registers_the_steps_secret_values_in_its_own_process(tmp_path, monkeypatch):
    """The triggerer is another process: the worker's registration does not reach it."""
    value = f"tok-{uuid.uuid4().hex}"
    monkeypatch.setenv("TRIGGER_TEST_TOKEN", value)
    assert not masked(value)  # nothing in this process has seen it yet
    backend = LocalBackend(LocalConfig(state_dir=str(tmp_path / "jobs"), secrets_from="env"))
    spec = StepSpec.build(command=[sys.executable, "-c", "print('step done', flush=True)"])
    request = StepRequest.create(spec, StepIdentity("dag", "t", "manual__1"), ArtifactStore(str(tmp_path / "art")))
    backend.validate(request)
    handle = backend.submit(request)
    trigger = RemoteStepTrigger(backend="local", backend_config=backend.config_json(), handle=handle.to_json(),
                                secret_refs=[{"name": "TRIGGER_TEST_TOKEN", "key": None, "source": "env"}])
    shown: list[str] = []
    payload = run_trigger(trigger, shown, monkeypatch)
    assert payload["status"]["state"] == "succeeded", payload
    assert masked(value)


def test_a_deferred_step_hands_references_not_values_and_its_printed_secret_is_masked(tmp_path, monkeypatch):
    value = f"pw-{uuid.uuid4().hex}"
    monkeypatch.setenv("DEFERRED_DB_PASSWORD", value)
    op = RemoteExecutionOperator(
        task_id="t", backend="local", deferrable=True, secrets={"DB_PASSWORD": "DEFERRED_DB/PASSWORD"},
        backend_config={"state_dir": str(tmp_path / "jobs"), "secrets_from": "env"},
        artifact_root=str(tmp_path / "art"),
        command=[sys.executable, "-c", "import os; print('password:', os.environ['DB_PASSWORD'], flush=True)"])
    with pytest.raises(TaskDeferred) as info:
        op.execute(context(FakeTI(), FileStateStore(str(tmp_path / "state.json"))))
    _, kwargs = info.value.trigger.serialize()
    assert value not in json.dumps(kwargs)
    assert kwargs["secret_refs"] == [{"name": "DEFERRED_DB", "key": "PASSWORD", "source": "env"}]
    assert masked(value)  # the worker registered it when it resolved the reference
    shown: list[str] = []
    payload = run_trigger(RemoteStepTrigger(**json.loads(json.dumps(kwargs))), shown, monkeypatch)
    assert payload["status"]["state"] == "succeeded", payload
    line = next(line for line in shown if line.startswith("password:"))
    assert value in line  # the step printed it; Airflow's log handlers redact what the masker knows:
    assert value not in str(_secrets_masker().redact(line))
