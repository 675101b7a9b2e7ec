"""The step lifecycle's rules, every path, against an in-memory platform with fault knobs (no I/O, fake time).

Each test names the field report it covers (issue 8): a slow create that still lands, an outage during the
wait, a kill after defer, a failure between submit and the wait.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from airflow_remote_ml.core import PollPolicy, RunHandle, RunState, RunStatus, StepIdentity
from airflow_remote_ml.core.errors import BackendAPIError, TransientBackendError
from airflow_remote_ml.core.lifecycle import CancelUnconfirmedError, MemoryJournal, Phase, StepLifecycle

BASE = StepIdentity("dag", "train", "manual__1", -1)


@dataclass
class Job:
    id: str
    identity: str
    state: RunState = RunState.RUNNING
    created_at: float = 0.0


@dataclass
class Platform:
    """A remote platform as the lifecycle sees it, with the faults real ones have."""

    name: str = "mem"
    poll_policy: PollPolicy = field(default_factory=lambda: PollPolicy(first_delay=1.0, factor=1.0, cap=1.0))
    idempotent_submit: bool = False
    create_settle_seconds: float = 30.0
    now: float = 0.0
    jobs: dict[str, Job] = field(default_factory=dict)
    #: Faults, consumed in order.
    submit_faults: list[str] = field(default_factory=list)   # "slow" (lands late), "lost" (lands now), "429", "503"
    lands_after: float = 5.0                                   # seconds after a "slow" submit that its job appears
    outage_until: float = -1.0                                 # every call fails before this time
    cancel_stops: bool = True                                  # a cancel ends the job at once
    submits: int = 0
    cancels: int = 0
    _pending: list[tuple[float, Job]] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    # the clock the lifecycle is given
    def clock(self) -> float:
        self._land()
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += max(seconds, 0.001)
        self._land()

    def _land(self) -> None:
        for when, job in list(self._pending):
            if when <= self.now:
                self.jobs[job.id] = job
                self._pending.remove((when, job))

    def _check(self) -> None:
        if self.now < self.outage_until:
            raise TransientBackendError(self.name, "service unavailable", 503)

    def _new(self, identity: str) -> Job:
        return Job(f"job-{next(self._ids)}", identity, created_at=self.now)

    # the backend interface
    def submit(self, request: StepIdentity) -> RunHandle:
        self._check()
        self.submits += 1
        identity = request.key
        fault = self.submit_faults.pop(0) if self.submit_faults else None
        if fault == "429":
            raise TransientBackendError(self.name, "rate limited", 429, retry_after=2.0)
        if fault == "503":
            raise TransientBackendError(self.name, "unavailable", 503)
        if self.idempotent_submit:
            for job in self.jobs.values():
                if job.identity == identity:
                    return self.handle(job)
        job = self._new(identity)
        if fault == "slow":
            self._pending.append((self.now + self.lands_after, job))
            raise TransientBackendError(self.name, "read timed out")
        self.jobs[job.id] = job
        if fault == "lost":
            raise TransientBackendError(self.name, "connection reset by peer")
        return self.handle(job)

    def find(self, identity: StepIdentity) -> RunHandle | None:
        self._check()
        mine = sorted((j for j in self.jobs.values() if j.identity == identity.key), key=lambda j: j.created_at)
        return self.handle(mine[0]) if mine else None

    def poll(self, handle: RunHandle) -> RunStatus:
        self._check()
        job = self.jobs.get(handle.job_id)
        if job is None:
            return RunStatus(RunState.LOST, "gone")
        return RunStatus(job.state, job.state.value)

    def wait(self, handle: RunHandle, timeout: float) -> RunStatus:
        self.sleep(timeout)
        return self.poll(handle)

    def read_logs(self, handle, cursor=None):
        from airflow_remote_ml.core import LogChunk

        self._check()
        return LogChunk([], cursor)

    def cancel(self, handle: RunHandle) -> None:
        self._check()
        self.cancels += 1
        job = self.jobs.get(handle.job_id)
        if job is not None and not job.state.is_terminal and self.cancel_stops:
            job.state = RunState.CANCELLED

    def mark_finished(self, handle: RunHandle) -> None:
        pass

    def handle(self, job: Job) -> RunHandle:
        return RunHandle(self.name, job.id)

    # what the tests ask
    def running(self, identity: StepIdentity | None = None) -> list[str]:
        return [j.id for j in self.jobs.values() if not j.state.is_terminal
                and (identity is None or j.identity == identity.key)]

    def for_identity(self, identity: StepIdentity) -> list[str]:
        return [j.id for j in self.jobs.values() if j.identity == identity.key] + [
            j.id for _, j in self._pending if j.identity == identity.key]


def lifecycle(platform: Platform, journal: MemoryJournal | None, **kwargs) -> StepLifecycle:
    kwargs.setdefault("budget_seconds", 120.0)
    return StepLifecycle(platform, journal, BASE, clock=platform.clock, monotonic=platform.clock,
                         sleep=platform.sleep, **kwargs)


def request(identity: StepIdentity) -> StepIdentity:
    return identity  # the platform double takes the identity itself as the request


# -- submitting exactly once -----------------------------------------------------------------------------


def test_a_slow_create_that_lands_late_is_found_not_submitted_again():
    platform = Platform(submit_faults=["slow"], lands_after=8.0)
    lc = lifecycle(platform, MemoryJournal())
    handle = lc.start(request)
    assert platform.submits == 1
    assert platform.for_identity(BASE.with_generation(0)) == [handle.job_id]


def test_a_lost_create_response_is_found_by_identity():
    platform = Platform(submit_faults=["lost"])
    journal = MemoryJournal()
    handle = lifecycle(platform, journal).start(request)
    assert platform.submits == 1 and len(platform.jobs) == 1
    assert journal.record["phase"] == "submitted" and journal.record["handle"]["job_id"] == handle.job_id


def test_a_create_that_never_lands_is_submitted_again_after_the_settle_window():
    platform = Platform(submit_faults=["slow"], lands_after=10_000.0, create_settle_seconds=30.0)
    handle = lifecycle(platform, MemoryJournal()).start(request)
    assert platform.submits == 2
    assert platform.now >= 30.0  # it looked for the whole settle window first
    assert platform.running() == [handle.job_id]


def test_a_create_landing_after_the_resubmit_keeps_the_oldest_and_cancels_the_duplicate():
    platform = Platform(submit_faults=["slow"], lands_after=31.0, create_settle_seconds=30.0)

    original_submit = platform.submit

    def submit_and_let_the_first_land(identity):
        handle = original_submit(identity)
        platform.sleep(2.0)  # the first create lands while the second is answered
        return handle

    platform.submit = submit_and_let_the_first_land  # type: ignore[method-assign]
    handle = lifecycle(platform, MemoryJournal()).start(request)
    assert len(platform.jobs) == 2
    assert platform.running() == [handle.job_id]
    assert handle.job_id == min(platform.jobs.values(), key=lambda j: j.created_at).id


def test_an_idempotent_backend_is_simply_asked_again():
    platform = Platform(submit_faults=["lost"], idempotent_submit=True)
    lc = lifecycle(platform, MemoryJournal())
    lc.start(request)
    assert platform.submits == 2 and len(platform.jobs) == 1


def test_a_429_at_submit_is_retried_without_waiting_for_a_settle():
    platform = Platform(submit_faults=["429", "429"])
    lifecycle(platform, MemoryJournal()).start(request)
    assert platform.submits == 3 and len(platform.jobs) == 1
    assert platform.now < platform.create_settle_seconds


def test_an_outage_at_submit_is_borne_as_long_as_one_during_the_wait():
    platform = Platform(outage_until=100.0)
    lc = lifecycle(platform, MemoryJournal(), budget_seconds=120.0)
    lc.start(request)
    assert len(platform.jobs) == 1
    platform2 = Platform(outage_until=1000.0)
    with pytest.raises(TransientBackendError):
        lifecycle(platform2, MemoryJournal(), budget_seconds=120.0).start(request)
    assert platform2.jobs == {}


def test_a_definite_refusal_is_not_retried():
    platform = Platform()

    def refuse(identity):
        platform.submits += 1
        raise BackendAPIError("mem", "bad request", 400)

    platform.submit = refuse  # type: ignore[method-assign]
    with pytest.raises(BackendAPIError):
        lifecycle(platform, MemoryJournal()).start(request)
    assert platform.submits == 1


def test_a_bad_request_fails_before_anything_is_recorded():
    journal = MemoryJournal()

    def bad(identity):
        raise ValueError("no")

    with pytest.raises(ValueError):
        lifecycle(Platform(), journal).start(bad)
    assert journal.writes == []


# -- owning the job: guard, kill, defer ------------------------------------------------------------------


def test_a_failure_right_after_submit_stops_the_job():
    """Issue 8 item 4: a ReadTimeout recording the handle left the job running, unowned."""
    platform = Platform()

    class FlakyJournal(MemoryJournal):
        def write(self, record):
            if record["phase"] == "submitted":
                raise TimeoutError("task state store: read timed out")
            super().write(record)

    with pytest.raises(TimeoutError):
        lifecycle(platform, FlakyJournal()).start(request)
    assert len(platform.jobs) == 1 and platform.running() == []


def test_anything_failing_inside_the_guard_stops_the_job_and_records_it_finished():
    platform = Platform()
    journal = MemoryJournal()
    lc = lifecycle(platform, journal)
    lc.start(request)
    with pytest.raises(RuntimeError):
        lc.guarded(lambda: (_ for _ in ()).throw(RuntimeError("xcom push failed")))
    assert platform.running() == []
    assert journal.record["phase"] == "finished" and journal.record["state"] == "cancelled"


def test_after_hand_over_a_kill_does_not_cancel_the_job_the_trigger_waits_for():
    """Issue 8 item 3: a SIGTERM after defer() cancelled the job and the trigger reported exit 143."""
    platform = Platform()
    journal = MemoryJournal()
    lc = lifecycle(platform, journal)
    handle = lc.start(request)
    lc.hand_over()
    assert journal.record["phase"] == "deferred"
    lc.abandon()  # what on_kill and the guard do
    assert platform.running() == [handle.job_id] and platform.cancels == 0


# -- the end: finished only when known terminal --------------------------------------------------------


def test_an_outage_during_the_wait_leaves_no_orphan_and_no_duplicate():
    """Issue 8 item 2: the wait gave up, the cancel failed, the record said finished, a retry started a
    second job while the first ran on."""
    platform = Platform()
    journal = MemoryJournal()
    lc = lifecycle(platform, journal, budget_seconds=60.0)
    first = lc.start(request)
    platform.outage_until = platform.now + 10_000.0
    with pytest.raises(TransientBackendError):
        lc.guarded(lambda: lc.wait(on_line=lambda line: None, deadline=None))
    assert journal.record["phase"] == "cancelling"  # not "finished": nobody confirmed the job stopped
    assert platform.running() == [first.job_id]
    # The service comes back; Airflow retries the task.
    platform.outage_until = -1.0
    second = lifecycle(platform, journal).start(request)
    assert platform.running() == [second.job_id]
    assert platform.jobs[first.job_id].state is RunState.CANCELLED
    assert journal.record["generation"] == 1


def test_an_unconfirmed_cancel_blocks_the_next_submit_until_it_is_confirmed():
    platform = Platform(cancel_stops=False)
    journal = MemoryJournal()
    lc = lifecycle(platform, journal)
    first = lc.start(request)
    assert lc.cancel(confirm_seconds=5.0) is False
    assert journal.record["phase"] == "cancelling"
    with pytest.raises(CancelUnconfirmedError):
        lifecycle(platform, journal).start(request)
    assert platform.running() == [first.job_id] and len(platform.jobs) == 1
    platform.cancel_stops = True
    lifecycle(platform, journal).start(request)
    assert len(platform.jobs) == 2 and len(platform.running()) == 1


def test_a_worker_crash_mid_wait_reattaches_to_the_same_job():
    platform = Platform()
    journal = MemoryJournal()
    first = lifecycle(platform, journal).start(request)
    # SIGKILL: nothing runs; the record still says submitted.
    again = lifecycle(platform, journal).start(request)
    assert again.job_id == first.job_id and len(platform.jobs) == 1 and platform.submits == 1


def test_a_crash_between_intent_and_handle_finds_the_job_even_if_it_lands_late():
    platform = Platform(lands_after=12.0)
    journal = MemoryJournal()
    original_submit = platform.submit

    def submit_and_die(identity):
        platform.submit_faults.append("slow")
        with pytest.raises(TransientBackendError):
            original_submit(identity)
        raise KeyboardInterrupt("the worker dies while the create is still in flight")

    platform.submit = submit_and_die  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        lifecycle(platform, journal).start(request)
    platform.submit = original_submit  # type: ignore[method-assign]
    assert journal.record["phase"] == "intent"
    handle = lifecycle(platform, journal).start(request)
    assert platform.submits == 1 and list(platform.jobs) == [handle.job_id]


def test_a_deferred_job_that_succeeded_is_not_adopted_by_the_next_try():
    """The trigger ended the task with this job's result; a clear must run anew, not return it again."""
    platform = Platform()
    journal = MemoryJournal()
    lc = lifecycle(platform, journal)
    first = lc.start(request)
    lc.hand_over()
    platform.jobs[first.job_id].state = RunState.SUCCEEDED
    second = lifecycle(platform, journal).start(request)
    assert second.job_id != first.job_id and journal.record["generation"] == 1


def test_a_deferred_job_still_running_when_its_task_was_failed_is_cancelled_first():
    platform = Platform()
    journal = MemoryJournal()
    lc = lifecycle(platform, journal)
    first = lc.start(request)
    lc.hand_over()
    second = lifecycle(platform, journal).start(request)
    assert platform.jobs[first.job_id].state is RunState.CANCELLED
    assert platform.running() == [second.job_id]


def test_a_finished_record_starts_the_next_generation():
    platform = Platform()
    journal = MemoryJournal()
    lc = lifecycle(platform, journal)
    handle = lc.start(request)
    platform.jobs[handle.job_id].state = RunState.SUCCEEDED
    lc.finish(RunStatus(RunState.SUCCEEDED))
    assert journal.record["phase"] == Phase.FINISHED.value
    lifecycle(platform, journal).start(request)
    assert journal.record["generation"] == 1 and len(platform.jobs) == 2


def test_a_step_timeout_cancels_and_confirms():
    platform = Platform()
    journal = MemoryJournal()
    lc = lifecycle(platform, journal)
    lc.start(request)
    outcome = lc.wait(on_line=lambda line: None, deadline=platform.now + 50.0)
    assert outcome.timed_out and outcome.status.state is RunState.CANCELLED
    assert journal.record["phase"] == "finished" and platform.running() == []
