"""The fault contract: every backend, the same faults, the same promises.

A backend's contract module adds one class::

    class TestValohaiFaults(FaultContract):
        @pytest.fixture
        def service(self, valohai): return ValohaiFaults(valohai)        # a FaultyService
        @pytest.fixture
        def fault_backend(self, valohai): ...                            # short client timeouts
        @pytest.fixture
        def artifact_root(self, tmp_path): ...
        @pytest.fixture
        def image(self): ...

Each test drives the backend through :class:`StepLifecycle` (the owner the operator and the trigger
use), stages one fault in the backend's double (or, for a real engine, in the real thing), and asserts
what a user paying for the compute cares about:

* exactly one remote job for the step's identity,
* no job still running once the task has ended,
* the end the task reaches, and the message the user sees.

A fault a backend cannot stage (a local process has no HTTP create to slow down) is named out of its
``service.supports``; its test is then not generated for that backend (rather than skipped, so a skip
is never read as a pass).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from typing import Any, Protocol

import pytest

from airflow_remote_ml.core import (
    ArtifactStore,
    Backend,
    RunHandle,
    RunState,
    StepIdentity,
    StepRequest,
    StepSpec,
)
from airflow_remote_ml.core.errors import RemoteJobLostError, RemoteMLError, TransientBackendError
from airflow_remote_ml.core.lifecycle import MemoryJournal, StepLifecycle
from airflow_remote_ml.core.wait import failure_error

#: The faults a double can stage; ``FaultyService.supports`` names a subset.
FAULTS = frozenset({"slow_create", "lost_create", "outage", "rate_limit", "deleted", "oom", "ignores_sigterm",
                    "crash", "kill", "defer", "trigger_restart"})


class FaultyService(Protocol):
    supports: frozenset[str]

    def jobs(self, identity: StepIdentity) -> list[tuple[str, bool]]: ...
    def slow_create(self, seconds: float) -> None: ...
    def lose_create_response(self) -> None: ...
    def outage(self, seconds: float) -> None: ...
    def rate_limit(self, count: int, retry_after: float) -> None: ...
    def delete_job(self, job_id: str) -> None: ...
    def oom_spec(self) -> dict[str, Any]: ...


#: A step that runs until told to stop (by a file appearing), so tests wait for events, not for time.
SLEEPER = "import time\nprint('working', flush=True)\nfor _ in range(3000):\n    time.sleep(0.1)\n"
QUICK = "print('hello', flush=True)\n"
#: Training code that traps SIGTERM to checkpoint (issue 8 item 5: this ran to its end after its task failed).
IGNORES_TERM = "trap '' TERM; echo ignoring SIGTERM; sleep 150"


def _requires(fault: str):
    def mark(test):
        test.fault = fault
        return test

    return mark


class FaultContract:
    """Inherit and provide ``service``, ``fault_backend``, ``artifact_root`` and ``image`` fixtures."""

    #: Generous bound on any one wait, for a loaded CI machine; correctness tests, not timing tests.
    wait_timeout: float = 180.0
    #: The backend's faults; ``__init_subclass__`` drops the tests of the others.
    supports: frozenset[str] = FAULTS

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in dir(cls):
            test = getattr(cls, name, None)
            fault = getattr(test, "fault", None)
            if name.startswith("test_") and fault and fault not in cls.supports:
                setattr(cls, name, None)  # not collected: this backend cannot stage the fault

    # -- helpers --------------------------------------------------------------------------------------

    def identity(self, task: str = "step") -> StepIdentity:
        return StepIdentity("faults", task, f"run-{uuid.uuid4().hex[:12]}")

    def lifecycle(self, backend: Backend, journal: MemoryJournal, base: StepIdentity,
                  budget: float = 60.0, try_number: int = 0) -> StepLifecycle:
        return StepLifecycle(backend, journal, base, budget_seconds=budget, fallback_generation=try_number)

    def make_request(self, artifact_root: str, image: str | None, **spec: Any):
        spec.setdefault("image", image)
        built = StepSpec.build(**spec)

        def make(identity: StepIdentity) -> StepRequest:
            return StepRequest.create(built, identity, ArtifactStore(artifact_root))

        return make

    def start(self, backend: Backend, artifact_root: str, image: str | None, base: StepIdentity,
              journal: MemoryJournal, code: str = QUICK, try_number: int = 0,
              **spec: Any) -> tuple[StepLifecycle, RunHandle]:
        lifecycle = self.lifecycle(backend, journal, base, try_number=try_number)
        if not spec.get("shell"):
            spec["command"] = ["python3", "-c", code]
        make = self.make_request(artifact_root, image, **spec)

        def validated(identity: StepIdentity) -> StepRequest:
            request = make(identity)
            backend.validate(request)
            return request

        return lifecycle, lifecycle.start(validated)

    def wait_until(self, predicate, what: str) -> None:
        deadline = time.monotonic() + self.wait_timeout
        while not predicate():
            assert time.monotonic() < deadline, f"never happened: {what}"
            time.sleep(0.1)

    def finish(self, lifecycle: StepLifecycle):
        outcome = lifecycle.wait(on_line=lambda line: None, deadline=time.time() + self.wait_timeout)
        assert not outcome.timed_out, outcome
        if outcome.status.is_terminal:
            lifecycle.finish(outcome.status)
        return outcome

    def running(self, service: FaultyService, identity: StepIdentity) -> list[str]:
        return [job for job, alive in service.jobs(identity) if alive]

    def started(self, backend: Backend, handle: RunHandle) -> bool:
        return backend.poll(handle).state is RunState.RUNNING

    # -- creating the job ----------------------------------------------------------------------------

    def test_a_cleared_task_whose_record_airflow_dropped_runs_a_new_job(self, service, fault_backend,
                                                                        artifact_root, image):
        # Airflow 3.3's [state_store] clear_on_success=True deletes a task instance's state store keys when it
        # succeeds (execution API ti_update_state); default_retention_days expires them. The next try of a
        # cleared task then reads no record: it must run a new job, not meet the first one under the same
        # identity (a Databricks idempotency token returns the existing run; a local job directory is reused).
        base = self.identity()
        first, first_handle = self.start(fault_backend, artifact_root, image, base, MemoryJournal(), try_number=1)
        assert self.finish(first).status.is_successful
        again, handle = self.start(fault_backend, artifact_root, image, base, MemoryJournal(), try_number=2)
        assert self.finish(again).status.is_successful
        assert again.identity != first.identity
        assert handle.job_id != first_handle.job_id
        # One job each (none listed once the removal policy removed a succeeded one).
        assert [job for job, _ in service.jobs(again.identity)] in ([handle.job_id], [])
        assert [job for job, _ in service.jobs(first.identity)] in ([first_handle.job_id], [])

    @_requires("slow_create")
    def test_a_slow_create_that_still_takes_effect_makes_one_job(self, service, fault_backend, artifact_root, image):
        base = self.identity()
        service.slow_create(3.0)
        lifecycle, handle = self.start(fault_backend, artifact_root, image, base, MemoryJournal())
        outcome = self.finish(lifecycle)
        assert outcome.status.is_successful, outcome
        assert [job for job, _ in service.jobs(lifecycle.identity)] == [handle.job_id]

    @_requires("lost_create")
    def test_a_create_whose_response_is_lost_makes_one_job(self, service, fault_backend, artifact_root, image):
        base = self.identity()
        service.lose_create_response()
        lifecycle, handle = self.start(fault_backend, artifact_root, image, base, MemoryJournal())
        assert self.finish(lifecycle).status.is_successful
        assert [job for job, _ in service.jobs(lifecycle.identity)] == [handle.job_id]

    @_requires("rate_limit")
    def test_a_burst_of_429s_is_waited_out_and_makes_one_job(self, service, fault_backend, artifact_root, image):
        base = self.identity()
        service.rate_limit(3, 1.0)
        lifecycle, handle = self.start(fault_backend, artifact_root, image, base, MemoryJournal())
        assert self.finish(lifecycle).status.is_successful
        assert [job for job, _ in service.jobs(lifecycle.identity)] == [handle.job_id]

    # -- while it runs -----------------------------------------------------------------------------

    @_requires("outage")
    def test_an_outage_longer_than_the_budget_fails_the_task_and_the_retry_leaves_one_job(
            self, service, fault_backend, artifact_root, image):
        base = self.identity()
        journal = MemoryJournal()
        lifecycle, first = self.start(fault_backend, artifact_root, image, base, journal, code=SLEEPER)
        lifecycle.budget_seconds = 2.0
        self.wait_until(lambda: self.started(fault_backend, first), "the step runs")
        service.outage(8.0)
        with pytest.raises(TransientBackendError):
            lifecycle.guarded(lambda: lifecycle.wait(on_line=lambda line: None, deadline=None))
        # The cancel could not get through: the record must not claim the job finished.
        assert journal.record["phase"] in ("cancelling", "finished")
        if journal.record["phase"] == "finished":
            assert not self.running(service, lifecycle.identity)
        # The retry, once the service is back: the first job is stopped, a second runs alone.
        retry = self.lifecycle(fault_backend, journal, base)
        make = self.make_request(artifact_root, image, command=["python3", "-c", QUICK])
        deadline = time.monotonic() + self.wait_timeout
        while True:
            try:
                second = retry.start(make)
                break
            except RemoteMLError:
                assert time.monotonic() < deadline, "the service never came back"
                time.sleep(0.5)
        assert second.job_id != first.job_id
        assert self.finish(retry).status.is_successful
        for identity in (base.with_generation(0), base.with_generation(1)):
            assert not self.running(service, identity)
        assert len(service.jobs(base.with_generation(0))) == 1

    @_requires("kill")
    def test_a_kill_during_the_wait_stops_the_job(self, service, fault_backend, artifact_root, image):
        base = self.identity()
        journal = MemoryJournal()
        lifecycle, handle = self.start(fault_backend, artifact_root, image, base, journal, code=SLEEPER)
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                lifecycle.guarded(lambda: lifecycle.wait(on_line=lambda line: None, deadline=None))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        self.wait_until(lambda: self.started(fault_backend, handle), "the step runs")
        lifecycle.abandon()  # what on_kill does
        thread.join(self.wait_timeout)
        self.wait_until(lambda: not self.running(service, lifecycle.identity), "the job stops")
        assert journal.record["phase"] in ("finished", "cancelling")
        assert len(service.jobs(lifecycle.identity)) == 1

    @_requires("defer")
    def test_a_kill_after_defer_leaves_the_job_to_the_trigger(self, service, fault_backend, artifact_root, image):
        base = self.identity()
        journal = MemoryJournal()
        lifecycle, handle = self.start(fault_backend, artifact_root, image, base, journal, code=SLEEPER)
        lifecycle.hand_over()
        lifecycle.abandon()  # a SIGTERM reaching the task process after defer()
        assert self.running(service, lifecycle.identity) == [handle.job_id]
        fault_backend.cancel(handle)
        self.wait_until(lambda: not self.running(service, lifecycle.identity), "the job stops")

    @_requires("crash")
    def test_a_worker_killed_during_submit_then_retried_makes_one_job(self, service, fault_backend, artifact_root,
                                                                       image):
        base = self.identity()
        journal = MemoryJournal()

        class DiesAfterSubmit(MemoryJournal):
            def write(self, record: dict[str, Any]) -> None:
                journal.write(record)
                if record["phase"] == "submitted":
                    raise KeyboardInterrupt("SIGKILL right after the create answered")

        lifecycle = self.lifecycle(fault_backend, DiesAfterSubmit(), base)
        lifecycle.guarded = lambda step: step()  # type: ignore[method-assign]  # a SIGKILL runs no guard
        make = self.make_request(artifact_root, image, command=["python3", "-c", QUICK])
        with pytest.raises(KeyboardInterrupt):
            lifecycle.start(make)
        # Only the intent survived (the handle write "died"): the retry must find the job by identity.
        journal.record = {**journal.writes[0]}
        assert journal.record["phase"] == "intent"
        retry = self.lifecycle(type(fault_backend).from_config(fault_backend.config_json()), journal, base)
        handle = retry.start(make)
        # Counted before the end: a backend may remove a succeeded job's container when it finishes.
        jobs = [job for job, _ in service.jobs(retry.identity)]
        assert jobs == [handle.job_id], (jobs, handle.job_id)
        assert self.finish(retry).status.is_successful

    @_requires("crash")
    def test_a_worker_killed_during_the_wait_then_retried_reattaches(self, service, fault_backend, artifact_root,
                                                                     image):
        base = self.identity()
        journal = MemoryJournal()
        first, handle = self.start(fault_backend, artifact_root, image, base, journal, code=SLEEPER)
        self.wait_until(lambda: self.started(fault_backend, handle), "the step runs")
        # SIGKILL: the first lifecycle never runs again. A new worker process retries.
        retry = self.lifecycle(type(fault_backend).from_config(fault_backend.config_json()), journal, base)
        again = retry.start(self.make_request(artifact_root, image, command=["python3", "-c", SLEEPER]))
        assert again.job_id == handle.job_id
        assert [job for job, _ in service.jobs(retry.identity)] == [handle.job_id]
        assert retry.cancel(confirm_seconds=self.wait_timeout)
        assert not self.running(service, retry.identity)

    @_requires("trigger_restart")
    def test_a_restarted_trigger_shows_each_log_line_once(self, service, fault_backend, artifact_root, image,
                                                          monkeypatch):
        from airflow_remote_ml.triggers import RemoteStepTrigger, checkpoint_uri

        shown: list[str] = []

        class TaskLog:
            def info(self, msg: str, *args: Any) -> None:
                shown.append(msg % args if args else msg)

            def __getattr__(self, name: str):
                return lambda *a, **k: None

        monkeypatch.setattr(RemoteStepTrigger, "log", property(lambda self: TaskLog()))
        base = self.identity()
        # Half the log, then the step waits for the test's go (a file in the shared artifact root): the first
        # trigger run is stopped while the step still runs, whatever the machine's load.
        gate = os.path.join(artifact_root, f"go-{uuid.uuid4().hex[:8]}")
        os.makedirs(artifact_root, exist_ok=True)
        code = ("import os, time\nfor i in range(3):\n    print(f'line {i}', flush=True)\n"
                f"while not os.path.exists({gate!r}):\n    time.sleep(0.05)\n"
                "for i in range(3, 6):\n    print(f'line {i}', flush=True)\n")
        lifecycle, handle = self.start(fault_backend, artifact_root, image, base, MemoryJournal(), code=code)
        lifecycle.hand_over()
        kwargs = json.loads(json.dumps(RemoteStepTrigger(
            backend=fault_backend.name, backend_config=fault_backend.config_json(), handle=handle.to_json(),
            checkpoint_uri=checkpoint_uri(ArtifactStore(artifact_root), lifecycle.identity)).serialize()[1]))

        def numbered() -> list[str]:
            # Lines read together are one record (core/wait.py log_records): count the lines a person reads.
            return [line for record in shown for line in record.split("\n") if line.startswith("line ")]

        async def first_run() -> None:
            task = asyncio.ensure_future(RemoteStepTrigger(**kwargs).run().__anext__())
            deadline = time.monotonic() + self.wait_timeout
            while not numbered():
                assert time.monotonic() < deadline and not task.done(), shown
                await asyncio.sleep(0.05)
            task.cancel()  # the triggerer dies
            with pytest.raises(asyncio.CancelledError):
                await task

        async def second_run() -> Any:
            with open(gate, "w") as fh:
                fh.write("go")
            async for event in RemoteStepTrigger(**kwargs).run():
                return event.payload
            raise AssertionError("no event")

        asyncio.run(first_run())
        payload = asyncio.run(second_run())
        assert payload["status"]["state"] == "succeeded", payload
        assert numbered() == [f"line {i}" for i in range(6)], shown

    # -- how it ends -------------------------------------------------------------------------------

    @_requires("ignores_sigterm")
    def test_a_step_that_ignores_sigterm_is_still_stopped(self, service, fault_backend, artifact_root, image):
        base = self.identity()
        lifecycle, handle = self.start(fault_backend, artifact_root, image, base, MemoryJournal(),
                                       command=IGNORES_TERM, shell=True)
        self.wait_until(lambda: self.started(fault_backend, handle), "the step runs")
        confirmed = lifecycle.cancel(confirm_seconds=self.wait_timeout)
        assert confirmed
        assert not self.running(service, lifecycle.identity)

    @_requires("deleted")
    def test_a_job_deleted_remotely_fails_the_task_saying_so(self, service, fault_backend, artifact_root, image):
        base = self.identity()
        lifecycle, handle = self.start(fault_backend, artifact_root, image, base, MemoryJournal(), code=SLEEPER)
        self.wait_until(lambda: self.started(fault_backend, handle), "the step runs")
        service.delete_job(handle.job_id)
        outcome = lifecycle.wait(on_line=lambda line: None, deadline=time.time() + self.wait_timeout)
        assert outcome.status.state in (RunState.LOST, RunState.CANCELLED, RunState.FAILED), outcome
        error = failure_error(fault_backend, handle, outcome.status, outcome.tail)
        if outcome.status.state is RunState.LOST:
            assert isinstance(error, RemoteJobLostError)
        assert handle.job_id in str(error)
        assert not self.running(service, lifecycle.identity)

    @_requires("oom")
    def test_an_oom_kill_reaches_the_user_as_such(self, service, fault_backend, artifact_root, image):
        base = self.identity()
        spec = service.oom_spec()
        spec.setdefault("image", image)
        lifecycle = self.lifecycle(fault_backend, MemoryJournal(), base)
        built = StepSpec.build(**spec)
        handle = lifecycle.start(lambda identity: StepRequest.create(built, identity, ArtifactStore(artifact_root)))
        outcome = self.finish(lifecycle)
        assert outcome.status.state is RunState.FAILED, outcome
        assert outcome.status.reason, f"the platform's reason was lost: {outcome.status}"
        error = failure_error(fault_backend, handle, outcome.status, outcome.tail)
        assert outcome.status.reason in str(error).splitlines()[0], str(error)
        assert not self.running(service, lifecycle.identity)
