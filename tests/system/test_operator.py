"""The operator's promises: results, error text, cancel on kill/timeout, reattach after a crash, rerun on clear."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
from airflow.sdk import NEVER_EXPIRE
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from airflow_remote_ml.core import StepFailedError, StepTimeoutError
from airflow_remote_ml.operators import STATE_KEY, RemoteExecutionOperator
from airflow_remote_ml.triggers import RemoteStepTrigger
from tests.system.helpers import FakeTI, FileStateStore, context

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def config(tmp_path):
    return {"state_dir": str(tmp_path / "jobs"), "kill_grace_seconds": 2}


@pytest.fixture
def store(tmp_path):
    return FileStateStore(str(tmp_path / "state.json"))


def make(tmp_path, config, **kwargs):
    kwargs.setdefault("task_id", "step")
    return RemoteExecutionOperator(backend="local", backend_config=config, artifact_root=str(tmp_path / "art"),
                                   **kwargs)


COUNTED = ("import os, sys, time\n"
           "open(sys.argv[1], 'a').write('started\\n')\n"
           "time.sleep(float(sys.argv[2]))\n"
           "open(os.environ['REMOTE_ML_OUTPUT_MODEL'], 'w').write('m')\n"
           "print('{\"score\": 0.9}')\n")


def counted_step(tmp_path, seconds: float) -> dict:
    return {"command": [sys.executable, "-c", COUNTED, str(tmp_path / "starts.txt"), str(seconds)],
            "outputs": ["model"]}


def starts(tmp_path) -> int:
    path = tmp_path / "starts.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_success_returns_uris_and_metrics_as_its_one_xcom_row(tmp_path, config, store):
    ti = FakeTI()
    result = make(tmp_path, config, **counted_step(tmp_path, 0)).execute(context(ti, store))
    assert result["backend"] == "local" and result["metrics"] == {"score": 0.9}
    assert os.path.exists(result["outputs"]["model"])
    # Airflow pushes the return value; the operator pushes only the extra link's row, which for a backend
    # without a job page (local) is the run's "Remote ML" view. Issue 11: 6 rows per task before.
    assert ti.xcoms == {"_link_RemoteJobLink": "/remote-ml/dags/dag/runs/manual__run"}
    assert len(json.dumps(result)) < 1024
    assert store.get(STATE_KEY)["phase"] == "finished"


def test_bad_spec_fails_at_parse_time_naming_the_field(tmp_path, config):
    from airflow_remote_ml.core import ConfigError

    with pytest.raises(ConfigError, match=r"compute.memory: '4GG' is not a size; use e.g. '512Mi' or '4Gi'"):
        make(tmp_path, config, command=["true"], compute={"memory": "4GG"})
    with pytest.raises(ConfigError, match="did you mean 'docker'"):
        RemoteExecutionOperator(task_id="x", backend="dokcer", command=["true"])
    with pytest.raises(ConfigError, match="reserved XCom key"):
        make(tmp_path, config, command=["true"], outputs=["metrics"])


def test_templated_bad_value_fails_before_anything_is_submitted(tmp_path, config, store):
    op = make(tmp_path, config, command=["true"], compute={"memory": "{{ params.mem }}"})
    op.compute = {"memory": "4GG"}  # what rendering produced
    with pytest.raises(AirflowFailException, match="compute.memory"):
        op.execute(context(FakeTI(), store))
    assert not os.path.exists(config["state_dir"]) or not os.listdir(config["state_dir"])
    assert store.get(STATE_KEY) is None


def test_failed_step_error_has_exit_code_and_log_tail(tmp_path, config, store):
    op = make(tmp_path, config, command=[sys.executable, "-c",
                                         "import sys; print('epoch 1 loss=0.3', flush=True); sys.exit(3)"])
    with pytest.raises(StepFailedError) as info:
        op.execute(context(FakeTI(), store))
    text = str(info.value)
    assert "exit code: 3" in text
    assert "epoch 1 loss=0.3" in text
    assert info.value.exit_code == 3


def test_missing_output_fails_the_task_naming_it(tmp_path, config, store):
    op = make(tmp_path, config, command=[sys.executable, "-c", "print('no output')"], outputs=["model"])
    with pytest.raises(StepFailedError, match="'model'"):
        op.execute(context(FakeTI(), store))


def test_kill_cancels_the_remote_job(tmp_path, config, store):
    op = make(tmp_path, config, **counted_step(tmp_path, 120))
    errors: list[BaseException] = []

    def run():
        try:
            op.execute(context(FakeTI(), store))
        except BaseException as exc:  # the task ends with the job's cancellation
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while starts(tmp_path) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    handle = op._handle
    op.on_kill()
    thread.join(30)
    assert not thread.is_alive()
    backend = op._make_backend()
    assert backend.poll(handle).state.value == "cancelled"
    pid = int(open(os.path.join(handle.data["job_dir"], "pid")).read().split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert store.get(STATE_KEY)["phase"] == "finished"
    assert errors and isinstance(errors[0], StepFailedError)


def test_step_timeout_cancels_and_says_so(tmp_path, config, store):
    op = make(tmp_path, config, command=["sleep", "60"], timeout=1)
    with pytest.raises(StepFailedError, match="timeout"):
        op.execute(context(FakeTI(), store))


def test_operator_deadline_cancels_a_job_that_outlives_its_timeout(tmp_path, config, store, monkeypatch):
    import airflow_remote_ml.operators as operators

    monkeypatch.setattr(operators, "TIMEOUT_GRACE_SECONDS", 0.0)
    # A command that ignores SIGTERM and the runtime's own timer cannot stop: Airflow's deadline must.
    op = make(tmp_path, config, timeout=1, command=[
        sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
    started = time.monotonic()
    with pytest.raises(StepTimeoutError, match="timed out after 1s"):
        op.execute(context(FakeTI(), store))
    assert time.monotonic() - started < 30


CRASHING_WORKER = textwrap.dedent("""
    import json, sys
    sys.path[:0] = {paths!r}
    from airflow_remote_ml.operators import RemoteExecutionOperator
    from tests.system.helpers import FakeTI, FileStateStore, context
    op = RemoteExecutionOperator(task_id="step", backend={backend!r}, backend_config={config!r},
                                 artifact_root={root!r}, **{step!r})
    op.execute(context(FakeTI(try_number=1), FileStateStore({store!r})))
""")


def test_worker_crash_then_retry_reattaches_and_exactly_one_job_runs(tmp_path, config, store):
    step = counted_step(tmp_path, 4)
    script = CRASHING_WORKER.format(paths=[REPO], backend="local", config=config, root=str(tmp_path / "art"),
                                    step=step, store=store.path)
    worker = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 60
    while starts(tmp_path) == 0:
        assert time.monotonic() < deadline and worker.poll() is None
        time.sleep(0.05)
    os.killpg(worker.pid, signal.SIGKILL)  # the worker dies hard: no on_kill, no cleanup
    worker.wait()
    record = store.get(STATE_KEY)
    assert record["phase"] == "submitted"

    retry = make(tmp_path, config, **step)
    result = retry.execute(context(FakeTI(try_number=2), store))
    assert result["job_id"] == record["handle"]["job_id"]
    assert result["metrics"] == {"score": 0.9}
    assert starts(tmp_path) == 1


def test_crash_between_submit_and_recording_the_handle_still_finds_the_job(tmp_path, config, store, monkeypatch):
    from airflow_remote_ml.backends.local import LocalBackend

    step = counted_step(tmp_path, 2)
    original = LocalBackend.submit

    def submit_then_die(self, request):
        original(self, request)
        raise KeyboardInterrupt("worker lost right after submitting")

    monkeypatch.setattr(LocalBackend, "submit", submit_then_die)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path, config, **step).execute(context(FakeTI(), store))
    # The interrupted try cancelled what it had started? No: it never learnt the handle, the job runs on.
    monkeypatch.setattr(LocalBackend, "submit", original)
    assert store.get(STATE_KEY)["phase"] == "intent"
    result = make(tmp_path, config, **step).execute(context(FakeTI(try_number=2), store))
    assert result["metrics"] == {"score": 0.9}
    assert starts(tmp_path) == 1


def test_a_cleared_task_runs_anew(tmp_path, config, store):
    step = counted_step(tmp_path, 0)
    first = make(tmp_path, config, **step).execute(context(FakeTI(), store))
    second = make(tmp_path, config, **step).execute(context(FakeTI(try_number=2), store))
    assert starts(tmp_path) == 2
    assert first["job_id"] != second["job_id"]
    assert first["outputs"]["model"] != second["outputs"]["model"]
    assert store.get(STATE_KEY)["generation"] == 1


def test_a_cleared_task_runs_anew_when_airflow_dropped_the_record_on_success(tmp_path, config, store):
    # Airflow 3.3's [state_store] clear_on_success=True deletes a task instance's state store keys when it
    # succeeds (execution API, ti_update_state). A later clear must still run a new job, not meet the first
    # try's job again under the same identity.
    step = counted_step(tmp_path, 0)
    first = make(tmp_path, config, **step).execute(context(FakeTI(), store))
    os.remove(store.path)  # what clear_on_success leaves: no record at all
    second = make(tmp_path, config, **step).execute(context(FakeTI(try_number=2), store))
    assert starts(tmp_path) == 2
    assert first["job_id"] != second["job_id"]
    assert first["outputs"]["model"] != second["outputs"]["model"]


class RetentionRecordingStore(FileStateStore):
    """The file store, also keeping the ``retention`` each write asked Airflow for."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.writes: list[tuple[str, Any]] = []

    def set(self, key: str, value: Any, retention: Any = None, **_: Any) -> None:
        self.writes.append((value["phase"], retention))
        super().set(key, value)


def test_the_record_of_a_job_that_may_run_never_expires_a_finished_one_does(tmp_path, config):
    # [state_store] default_retention_days (30 unless the deployment sets fewer) expires keys: a record
    # guarding a live job must not go before the job does, or a retry would submit a second one.
    store = RetentionRecordingStore(str(tmp_path / "state.json"))
    make(tmp_path, config, **counted_step(tmp_path, 0)).execute(context(FakeTI(), store))
    assert store.writes == [("intent", NEVER_EXPIRE), ("submitted", NEVER_EXPIRE), ("finished", None)]
    op = make(tmp_path, config, deferrable=True, **counted_step(tmp_path, 0))
    with pytest.raises(TaskDeferred):
        op.execute(context(FakeTI(try_number=2), store))
    assert store.writes[-1] == ("deferred", NEVER_EXPIRE)


def test_a_retry_after_a_failed_step_starts_a_new_job(tmp_path, config, store):
    op = make(tmp_path, config, command=[sys.executable, "-c", "import sys; sys.exit(1)"])
    with pytest.raises(StepFailedError):
        op.execute(context(FakeTI(), store))
    with pytest.raises(StepFailedError):
        make(tmp_path, config, command=[sys.executable, "-c", "import sys; sys.exit(1)"]).execute(
            context(FakeTI(try_number=2), store))
    assert store.get(STATE_KEY)["generation"] == 1


def test_deferred_mode_runs_through_the_trigger(tmp_path, config, store):
    op = make(tmp_path, config, deferrable=True, **counted_step(tmp_path, 0.5))
    ti = FakeTI()
    with pytest.raises(TaskDeferred) as info:
        op.execute(context(ti, store))
    trigger = info.value.trigger
    assert isinstance(trigger, RemoteStepTrigger)
    classpath, kwargs = trigger.serialize()
    json.dumps(kwargs)  # trigger kwargs must survive the database
    rebuilt = RemoteStepTrigger(**json.loads(json.dumps(kwargs)))

    async def first_event():
        async for event in rebuilt.run():
            return event.payload

    # Outside a triggerer (no task instance on the trigger, as under dag.test()) the task resumes on the worker.
    payload = asyncio.run(first_event())
    assert payload["status"]["state"] == "succeeded" and payload["error"] is None
    result = make(tmp_path, config, deferrable=True, **counted_step(tmp_path, 0.5)).execute_complete(
        context(ti, store), payload)
    assert result["metrics"] == {"score": 0.9} and os.path.exists(result["outputs"]["model"])
    assert starts(tmp_path) == 1
    # The next try (a user's clear) runs anew rather than adopting this result.
    again = make(tmp_path, config, **counted_step(tmp_path, 0)).execute(context(FakeTI(try_number=2), store))
    assert again["job_id"] != result["job_id"] and starts(tmp_path) == 2


def test_trigger_on_kill_cancels_the_job(tmp_path, config, store):
    op = make(tmp_path, config, deferrable=True, **counted_step(tmp_path, 120))
    with pytest.raises(TaskDeferred) as info:
        op.execute(context(FakeTI(), store))
    trigger = info.value.trigger
    deadline = time.monotonic() + 30
    while starts(tmp_path) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    asyncio.run(trigger.on_kill())
    backend = op._make_backend()
    assert backend.poll(trigger.handle).state.value == "cancelled"


def test_trigger_deadline_cancels_the_job(tmp_path, config, store):
    op = make(tmp_path, config, deferrable=True, **counted_step(tmp_path, 120))
    with pytest.raises(TaskDeferred) as info:
        op.execute(context(FakeTI(), store))
    _, kwargs = info.value.trigger.serialize()
    trigger = RemoteStepTrigger(**{**kwargs, "deadline": time.time() + 1})

    async def first_event():
        async for event in trigger.run():
            return event.payload

    payload = asyncio.run(first_event())
    assert payload["timed_out"] is True
    assert payload["status"]["state"] == "cancelled"
    with pytest.raises(StepTimeoutError):
        make(tmp_path, config, deferrable=True, **counted_step(tmp_path, 120)).execute_complete(
            context(FakeTI(), store), payload)


def test_secret_reference_reaches_the_step_but_not_xcom_or_the_record(tmp_path, config, store, monkeypatch, caplog):
    monkeypatch.setenv("AIRFLOW_VAR_DB_CREDS", json.dumps({"password": "s3cret-value"}))
    ti = FakeTI()
    op = make(tmp_path, config, secrets={"DB_PASSWORD": "db_creds/password"}, outputs=["seen"], command=[
        sys.executable, "-c", "import os; open(os.environ['REMOTE_ML_OUTPUT_SEEN'], 'w').write(os.environ['DB_PASSWORD'])"])
    result = op.execute(context(ti, store))
    assert open(result["outputs"]["seen"]).read() == "s3cret-value"
    assert "s3cret-value" not in json.dumps(ti.xcoms)
    assert "s3cret-value" not in open(store.path).read()
    assert "s3cret-value" not in caplog.text
    step_files = [os.path.join(root, f) for root, _, files in os.walk(config["state_dir"]) for f in files]
    assert all("s3cret-value" not in open(path, errors="replace").read() for path in step_files)


def test_missing_secret_fails_before_submitting(tmp_path, config, store):
    op = make(tmp_path, config, secrets={"TOKEN": "no_such_variable_xyz"}, command=["true"])
    with pytest.raises(AirflowFailException, match="no Airflow Variable 'no_such_variable_xyz'"):
        op.execute(context(FakeTI(), store))


@pytest.mark.docker
def test_worker_crash_on_docker_then_retry_reattaches_to_the_same_container(tmp_path, store, docker_engine):
    from tests.conftest import RUNNER_IMAGE

    root = tmp_path / "art"
    root.mkdir()
    counter = root / "starts.txt"  # under the artifact root: the container sees it at the same path
    step = {"image": RUNNER_IMAGE, "outputs": ["model"], "command": ["python3", "-c", COUNTED, str(counter), "4"]}
    script = CRASHING_WORKER.format(paths=[REPO], backend="docker", config={}, root=str(root), step=step,
                                    store=store.path)
    worker = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 120
    while not counter.exists():
        assert time.monotonic() < deadline and worker.poll() is None
        time.sleep(0.05)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    record = store.get(STATE_KEY)
    assert record["phase"] == "submitted"

    retry = RemoteExecutionOperator(task_id="step", backend="docker", artifact_root=str(root), **step)
    result = retry.execute(context(FakeTI(try_number=2), store))
    assert result["job_id"] == record["handle"]["job_id"]
    assert result["metrics"] == {"score": 0.9}
    assert len(counter.read_text().splitlines()) == 1


# -- issue 8: one owner of the step's life -------------------------------------------------------------------


def _wait_started(tmp_path) -> None:
    deadline = time.monotonic() + 60
    while starts(tmp_path) == 0:
        assert time.monotonic() < deadline, "the step never started"
        time.sleep(0.05)


def _pid_alive(handle) -> bool:
    pid = int(open(os.path.join(handle.data["job_dir"], "pid")).read().split()[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_kill_after_defer_leaves_the_job_to_the_trigger(tmp_path, config, store):
    """Item 3: a SIGTERM that reaches the task process after defer() must not cancel the trigger's job."""
    op = make(tmp_path, config, deferrable=True, **counted_step(tmp_path, 120))
    with pytest.raises(TaskDeferred) as info:
        op.execute(context(FakeTI(), store))
    _wait_started(tmp_path)
    op.on_kill()  # the supervisor's SIGTERM, after the task deferred
    handle = info.value.trigger.handle
    backend = op._make_backend()
    assert backend.poll(handle).state.value == "running"
    assert store.get(STATE_KEY)["phase"] == "deferred"
    backend.cancel(handle)


class _FailingXComTI(FakeTI):
    def xcom_push(self, key, value):
        raise TimeoutError("api-server: read timed out")


@pytest.fixture
def paged_local(monkeypatch):
    """The local backend with a job page, like the platforms: its handle has a URL, so the link is pushed."""
    from airflow_remote_ml.backends.local import LocalBackend
    from airflow_remote_ml.core import registry

    class PagedLocalBackend(LocalBackend):
        name = "local-paged"

        def _handle(self, job_id, step):
            handle = super()._handle(job_id, step)
            return type(handle)(handle.backend, handle.job_id, f"https://jobs.example/{job_id}", handle.data)

    monkeypatch.setitem(registry._extra_backends, PagedLocalBackend.name, PagedLocalBackend)
    return PagedLocalBackend.name


def test_a_job_page_is_the_extra_links_own_row_pushed_at_submit(tmp_path, config, store, paged_local):
    ti = FakeTI()
    op = make(tmp_path, config, **counted_step(tmp_path, 0))
    op.backend = paged_local
    result = op.execute(context(ti, store))
    # One row for the link, under the key Airflow's link machinery reads (BaseOperatorLink.xcom_key).
    from airflow_remote_ml.links import RemoteJobLink

    assert ti.xcoms == {RemoteJobLink().xcom_key: f"https://jobs.example/{result['job_id']}"}
    assert result["url"] == f"https://jobs.example/{result['job_id']}"


def test_a_failure_between_submit_and_the_wait_stops_the_job(tmp_path, config, store, paged_local):
    """Item 4: an XCom push that failed after submit left the step running, unowned."""
    op = make(tmp_path, config, **counted_step(tmp_path, 120))
    op.backend = paged_local
    with pytest.raises(TimeoutError):
        op.execute(context(_FailingXComTI(), store))
    record = store.get(STATE_KEY)
    from airflow_remote_ml.core import RunHandle

    handle = RunHandle.from_json(record["handle"])
    assert not _pid_alive(handle)
    assert record["phase"] == "finished" and record["state"] == "cancelled"


def test_a_config_error_at_run_time_fails_once_without_retry(tmp_path, config, store):
    """Issue 9 item 2: a ConfigError raised while running (render, unmapping, validate) is final."""
    op = make(tmp_path, config, command=["true"], compute={"memory": "{{ params.mem }}"})
    op.compute = {"memory": "4GG"}
    from airflow_remote_ml.core import ConfigError

    with pytest.raises(AirflowFailException) as info:
        op.execute(context(FakeTI(), store))
    assert isinstance(info.value, ConfigError) and info.value.field == "compute.memory"


def test_a_config_error_in_the_constructor_is_final_too(tmp_path, config):
    """Unmapping a mapped task runs the constructor on the worker: the error must not be retried."""
    from airflow_remote_ml.core import ConfigError

    with pytest.raises(ConfigError) as info:
        make(tmp_path, config, command=["true"], compute={"memory": "4GG"})
    assert isinstance(info.value, AirflowFailException)


def test_a_restarted_trigger_does_not_repeat_log_lines(tmp_path, config, store, monkeypatch):
    """Item 9: the log cursor was not carried across a trigger restart; lines appeared twice."""
    shown: list[str] = []

    class TaskLog:  # what the triggerer forwards into the task log
        def info(self, msg, *args):
            shown.append(msg % args if args else msg)

        def __getattr__(self, name):
            return lambda *a, **k: None

    monkeypatch.setattr(RemoteStepTrigger, "log", property(lambda self: TaskLog()))
    gate = tmp_path / "gate"
    script = ("import os, sys, time\n"
              "print('line-1', flush=True); print('line-2', flush=True)\n"
              f"while not os.path.exists({str(gate)!r}): time.sleep(0.05)\n"
              "print('line-3', flush=True)\n")
    op = make(tmp_path, config, deferrable=True, command=[sys.executable, "-c", script])
    with pytest.raises(TaskDeferred) as info:
        op.execute(context(FakeTI(), store))
    _, kwargs = info.value.trigger.serialize()

    def step_lines() -> list[str]:  # lines read together are one record (core/wait.py log_records)
        return [line for record in shown for line in record.split("\n") if line.startswith("line-")]

    async def run_until_two_lines() -> None:
        trigger = RemoteStepTrigger(**json.loads(json.dumps(kwargs)))
        task = asyncio.ensure_future(trigger.run().__anext__())
        deadline = time.monotonic() + 60
        while len(step_lines()) < 2:
            assert time.monotonic() < deadline and not task.done(), shown
            await asyncio.sleep(0.05)
        task.cancel()  # the triggerer dies
        with pytest.raises(asyncio.CancelledError):
            await task

    async def run_to_end():
        trigger = RemoteStepTrigger(**json.loads(json.dumps(kwargs)))
        gate.write_text("go")
        async for event in trigger.run():
            return event.payload

    asyncio.run(run_until_two_lines())
    assert asyncio.run(run_to_end())["status"]["state"] == "succeeded"
    assert step_lines() == ["line-1", "line-2", "line-3"]


def test_resolved_secret_values_are_masked(tmp_path, config, store, monkeypatch):
    """Issue 9 item 6: `name/key` references were never registered with Airflow's secrets masker."""
    from airflow.sdk.log import _secrets_masker

    monkeypatch.setenv("AIRFLOW_VAR_API_CREDS", json.dumps({"token": "tok-7f3a9c"}))
    op = make(tmp_path, config, secrets={"API_TOKEN": "api_creds/token"},
              command=[sys.executable, "-c", "import os; print(os.environ['API_TOKEN'])"])
    op.execute(context(FakeTI(), store))
    assert "tok-7f3a9c" not in str(_secrets_masker().redact("the token is tok-7f3a9c"))


def test_operator_arguments_are_checked_as_passed(tmp_path, config):
    """Issue 9 item 3: `outputs="model"` ran with outputs m, o, d, e, l; a misspelt backend key was ignored."""
    from airflow_remote_ml.core import ConfigError

    with pytest.raises(ConfigError) as info:
        make(tmp_path, config, command=["true"], outputs="model")
    assert info.value.field == "outputs" and "['model']" in (info.value.fix or "")
    with pytest.raises(ConfigError, match="did you mean 'kubernetes'"):
        make(tmp_path, config, command=["true"], backend_options={"kuberntes": {"namespace": "ml"}})
    with pytest.raises(ConfigError) as info:
        make(tmp_path, config, command=["true"], compute={"cpu": [2]})
    assert info.value.field == "compute.cpu"


def test_a_backend_template_rendering_to_nothing_fails_instead_of_using_the_default(tmp_path, config, store):
    op = make(tmp_path, config, command=["true"])
    op.backend = ""  # what "{{ params.backend }}" rendered to
    with pytest.raises(AirflowFailException, match="backend: is empty"):
        op.execute(context(FakeTI(), store))
    assert store.get(STATE_KEY) is None
