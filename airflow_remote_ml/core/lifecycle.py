"""The one owner of a step's life: record, submit, reattach, cancel, finish.

Exactly one remote job per step and none left running after its task ends: the rules that make this
true live here once, backend-neutral and without Airflow. The operator (on the worker) and the trigger
(in the triggerer) only drive a :class:`StepLifecycle`; none of them decides on its own whether to
submit, reattach, cancel or call a job finished.

Its memory is a :class:`Journal`: one small JSON record per task instance (Airflow's task state store on
a worker) that outlives the process. The record moves through these phases::

    (none) ──► intent ──► submitted ──► deferred ──► finished
                 │            │  │                      ▲
                 │            │  └──────► cancelling ───┘   (cancel confirmed by a later try)
                 └────────────┴───────────────────────────┘   (known terminal / cancel confirmed)

* ``intent`` is written *before* the submit: a job may exist under this generation's identity even when
  the worker died before it heard back, so a later try looks it up by identity before submitting.
* ``submitted`` holds the handle. A later try (after a worker crash) reattaches to a running job, or
  adopts a succeeded one.
* ``deferred``: the trigger owns the wait and may end the task itself; the worker owns nothing. A later
  try never adopts this job's result (the task already ended with it): it confirms the job ended
  (cancelling it if need be) and starts the next generation.
* ``cancelling``: the task ended and a cancel was asked for but not confirmed (an outage, a slow stop).
  The next try confirms the cancel before anything new is submitted.
* ``finished`` only for a job known terminal or confirmed cancelled. The next try (a retry of a failure,
  a user's clear) starts a new generation: a new identity, a new job.

Rules for the submit itself: an ambiguous answer (timeout, 5xx, dropped connection) may have created the
job, so it is followed by look-ups by identity, with backoff, for longer than the slowest create
(``Backend.create_settle_seconds``) before any new submit; a backend whose submit is idempotent
(``Backend.idempotent_submit``) is simply asked again. One :class:`TransientBudget` covers submit, wait
and cancel alike.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from airflow_remote_ml.core.errors import RemoteMLError, TransientBackendError
from airflow_remote_ml.core.identity import StepIdentity
from airflow_remote_ml.core.poll import PollPolicy, TransientBudget
from airflow_remote_ml.core.status import RunHandle, RunStatus
from airflow_remote_ml.core.wait import TRANSIENT_BUDGET_SECONDS, Outcome, wait_for_completion

log = logging.getLogger(__name__)

#: Seconds a cancel is given to show in the job's status before it counts as unconfirmed. On a kill the
#: task supervisor escalates SIGTERM to SIGKILL after 5 s, so the operator passes a shorter window there.
CANCEL_CONFIRM_SECONDS = 30.0
#: Backoff of the look-ups by identity after an ambiguous submit.
SETTLE_POLICY = PollPolicy(first_delay=0.5, factor=1.5, cap=5.0)


class Phase(enum.StrEnum):
    INTENT = "intent"
    SUBMITTED = "submitted"
    DEFERRED = "deferred"
    CANCELLING = "cancelling"
    FINISHED = "finished"


class Journal(Protocol):
    """Where a task instance's record lives between tries (Airflow's task state store on a worker)."""

    def read(self) -> dict[str, Any] | None: ...

    def write(self, record: dict[str, Any]) -> None: ...


class MemoryJournal:
    """A journal that lives as long as the object: for tests, and runs without a task state store."""

    def __init__(self, record: Mapping[str, Any] | None = None) -> None:
        self.record: dict[str, Any] | None = dict(record) if record else None
        self.writes: list[dict[str, Any]] = []

    def read(self) -> dict[str, Any] | None:
        return dict(self.record) if self.record else None

    def write(self, record: dict[str, Any]) -> None:
        self.record = dict(record)
        self.writes.append(dict(record))


@dataclass
class Record:
    """The journal's record, as data."""

    generation: int
    phase: Phase
    backend: str
    handle: RunHandle | None = None
    submitted_at: float | None = None
    state: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {**self.extra, "generation": self.generation, "phase": self.phase.value,
                                "backend": self.backend, "submitted_at": self.submitted_at}
        data["handle"] = self.handle.to_json() if self.handle else None
        if self.state is not None:
            data["state"] = self.state
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Record | None:
        if not isinstance(data, Mapping) or "generation" not in data:
            return None
        known = {"generation", "phase", "backend", "handle", "submitted_at", "state"}
        try:
            phase = Phase(data.get("phase") or Phase.INTENT)
        except ValueError:
            phase = Phase.INTENT  # an unknown phase is treated as the most cautious one
        if data.get("phase") == "submitting":  # the phase name before this module existed
            phase = Phase.INTENT
        return cls(
            generation=int(data["generation"]),
            phase=phase,
            backend=str(data.get("backend") or ""),
            handle=RunHandle.from_json(data["handle"]) if data.get("handle") else None,
            submitted_at=data.get("submitted_at"),
            state=data.get("state"),
            extra={k: v for k, v in data.items() if k not in known},
        )


class CancelUnconfirmedError(RemoteMLError):
    """A job that must stop could not be confirmed stopped; the next try confirms it before going on."""


class StepLifecycle:
    """Drives one task instance's remote job through its life, following the journal's record.

    Args:
        backend: the backend the step runs on.
        journal: the record's store, or ``None`` when there is none (each try is then its own job).
        base: the task instance's identity without generation.
        fallback_generation: the task's try number: the generation without a journal (it keeps tries apart),
            and what a journal without a record starts from (see :meth:`start`).
        budget_seconds: how long one streak of transient API errors is borne.
        clock, monotonic, sleep: injectable for tests.
    """

    def __init__(
        self,
        backend: Any,
        journal: Journal | None,
        base: StepIdentity,
        *,
        fallback_generation: int = 0,
        budget_seconds: float = TRANSIENT_BUDGET_SECONDS,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        logger: Any = None,
    ) -> None:
        self.backend = backend
        self.journal = journal
        self.base = base
        self.fallback_generation = fallback_generation
        self.budget_seconds = budget_seconds
        self.clock = clock
        self.monotonic = monotonic
        self.sleep = sleep
        self.log = logger or log
        self.record: Record | None = None
        self.handle: RunHandle | None = None
        #: Whether this process is responsible for the job: cancels it on failure, records its end.
        self.owns_job = False
        self._abandoned = False

    # -- reading the record ---------------------------------------------------------------------------

    def load(self) -> Record | None:
        self.record = Record.from_json(self.journal.read()) if self.journal is not None else None
        return self.record

    def _write(self, record: Record) -> None:
        self.record = record
        if self.journal is not None:
            self.journal.write(record.to_json())

    @property
    def identity(self) -> StepIdentity:
        generation = self.record.generation if self.record else self.fallback_generation
        return self.base.with_generation(generation)

    # -- start: reattach or submit --------------------------------------------------------------------

    def start(self, make_request: Callable[[StepIdentity], Any]) -> RunHandle:
        """Reattach to this task instance's live job, or submit exactly one under the right identity.

        ``make_request(identity)`` builds (and validates) the request; it is called before anything is
        recorded or submitted, so a bad request fails with nothing left behind.
        """
        record = self.load()
        name = self.backend.name
        if self.journal is None:
            self.log.warning("No task state store: crash recovery is disabled for this run")
            identity = self.base.with_generation(self.fallback_generation)
            return self._submit(make_request(identity), identity, look_first=True)
        if record is None:
            # No record: a first try, or Airflow dropped it (``[state_store] clear_on_success`` deletes a task
            # instance's keys when it succeeds; ``default_retention_days`` expires them). A cleared task's
            # next try must not meet the first try's job again under the same identity, so the try number
            # picks the generation: every try moves it up by at most one, so try - 1 is one no try used.
            generation = max(0, self.fallback_generation - 1)
        elif record.backend != name:
            if record.phase is not Phase.FINISHED:
                self.log.warning("The earlier try ran on backend %r, this one on %r: its job %s is not "
                                 "followed from here", record.backend, name,
                                 record.handle.job_id if record.handle else "(unknown id)")
            generation = record.generation + 1
        elif record.phase is Phase.FINISHED:
            generation = record.generation + 1
        else:
            handle = self._resume(record, make_request)
            if handle is not None:
                return handle
            assert self.record is not None
            generation = self.record.generation + 1
        identity = self.base.with_generation(generation)
        request = make_request(identity)
        self.record = Record(generation, Phase.INTENT, name)
        return self._submit(request, identity, look_first=False)

    def _resume(self, record: Record, make_request: Callable[[StepIdentity], Any]) -> RunHandle | None:
        """Deal with an unfinished record: the live job's handle to reattach to, or None to go on anew."""
        identity = self.base.with_generation(record.generation)
        handle = record.handle
        if handle is None:
            # The earlier try died between recording its intent and recording a handle: the job may
            # exist without us knowing its id, perhaps not yet visible. Its identity finds it.
            handle = self._settle(identity, record.submitted_at)
            if handle is None:
                self.log.info("No job was created for %s by the earlier try; submitting it now", identity.key)
                return self._submit(make_request(identity), identity, look_first=False, record=record)
        status = self._call(lambda: self.backend.poll(handle))
        if record.phase in (Phase.CANCELLING, Phase.DEFERRED):
            # The task that owned this job has ended: never adopt its result; make sure it is over.
            if not status.is_terminal:
                self.log.info("Job %s of an earlier try is still %s; cancelling it before going on",
                              handle.job_id, status.remote_state or status.state.value)
                self.handle, self.owns_job = handle, True
                if not self.cancel(confirm_seconds=CANCEL_CONFIRM_SECONDS):
                    raise CancelUnconfirmedError(
                        f"{self.backend.name} job {handle.job_id} of an earlier try could not be confirmed "
                        "stopped; nothing new was submitted, the next try checks again")
            else:
                self._finish_record(handle, status)
            return None
        if not status.is_terminal or status.is_successful:
            self.log.info("Reattaching to %s job %s (%s) started by an earlier try", self.backend.name,
                          handle.job_id, status.remote_state or status.state.value)
            self.handle, self.owns_job = handle, True
            self._write(Record(record.generation, Phase.SUBMITTED, self.backend.name, handle,
                               record.submitted_at, extra=record.extra))
            return handle
        self.log.info("The earlier try's job %s ended %s; starting a new one", handle.job_id, status.state.value)
        self._finish_record(handle, status)
        return None

    def _submit(self, request: Any, identity: StepIdentity, *, look_first: bool,
                record: Record | None = None) -> RunHandle:
        name = self.backend.name
        base = record or self.record or Record(identity.generation, Phase.INTENT, name)
        intent = Record(identity.generation, Phase.INTENT, name, None, self.clock(), extra=base.extra)
        self._write(intent)  # before the submit: a job may exist from here on
        handle = self._find(identity) if look_first else None
        if handle is None:
            handle = self._create(request, identity)
            self.log.info("Submitted %s job %s for %s", name, handle.job_id, identity.key)
        else:
            self.log.info("Found %s job %s already submitted for %s", name, handle.job_id, identity.key)
        self.handle, self.owns_job = handle, True
        # From here on the job exists: a failure to record it must not leave it running unowned.
        self.guarded(lambda: self._write(Record(identity.generation, Phase.SUBMITTED, name, handle,
                                                intent.submitted_at, extra=intent.extra)))
        return handle

    def _create(self, request: Any, identity: StepIdentity) -> RunHandle:
        """Submit once; after an ambiguous answer, find the job by identity before submitting again."""
        budget = TransientBudget(self.budget_seconds)
        ambiguous_since: float | None = None
        while True:
            try:
                handle: RunHandle = self.backend.submit(request)
            except TransientBackendError as exc:
                if not budget.failed(self.monotonic()):
                    raise
                if exc.status_code == 429:
                    # Refused before it was processed (rate limited): nothing was created.
                    self.sleep(SETTLE_POLICY.delay(budget.errors - 1, exc.retry_after))
                    continue
                self.log.warning("%s: submitting %s got no clear answer (%s); looking it up before trying "
                                 "again", self.backend.name, identity.key, exc)
                ambiguous_since = ambiguous_since or self.clock()
                if getattr(self.backend, "idempotent_submit", False):
                    self.sleep(SETTLE_POLICY.delay(budget.errors - 1, exc.retry_after))
                    continue
                found = self._settle(identity, ambiguous_since)
                if found is not None:
                    return found
                continue
            if ambiguous_since is not None and not getattr(self.backend, "idempotent_submit", False):
                # A create we gave up on may have landed after all: keep the oldest job, cancel ours.
                oldest = self._find(identity)
                if oldest is not None and oldest.job_id != handle.job_id:
                    self.log.warning("%s: an earlier submit of %s landed late as job %s; cancelling the "
                                     "duplicate %s", self.backend.name, identity.key, oldest.job_id,
                                     handle.job_id)
                    self._call(lambda duplicate=handle: self.backend.cancel(duplicate))  # type: ignore[misc]
                    return oldest
            return handle

    def _settle(self, identity: StepIdentity, since: float | None) -> RunHandle | None:
        """Look the job up by identity until ``create_settle_seconds`` after ``since`` have passed."""
        settle = float(getattr(self.backend, "create_settle_seconds", 60.0))
        until = (since if since is not None else self.clock()) + settle
        attempt = 0
        while True:
            handle = self._find(identity)
            if handle is not None or self.clock() >= until:
                return handle
            self.sleep(min(SETTLE_POLICY.delay(attempt), max(0.05, until - self.clock())))
            attempt += 1

    def _find(self, identity: StepIdentity) -> RunHandle | None:
        return self._call(lambda: self.backend.find(identity))

    def _call(self, call: Callable[[], Any]) -> Any:
        """One backend call, retried through transient errors within the budget."""
        budget = TransientBudget(self.budget_seconds)
        while True:
            try:
                return call()
            except TransientBackendError as exc:
                if not budget.failed(self.monotonic()):
                    raise
                self.log.warning("%s: %s; retrying", self.backend.name, exc)
                self.sleep(SETTLE_POLICY.delay(budget.errors - 1, exc.retry_after))

    # -- while the job runs ---------------------------------------------------------------------------

    def guarded(self, step: Callable[[], Any]) -> Any:
        """Run ``step``; if it raises (anything, a kill included), stop the job first."""
        try:
            return step()
        except BaseException:
            self.abandon()
            raise

    def wait(self, *, on_line: Callable[[str], None], deadline: float | None,
             cursor: Any = None, on_lines: Callable[[list[str]], None] | None = None) -> Outcome:
        """Follow the job to its end (sync); a job past ``deadline`` (a clock() time) is cancelled."""
        handle = self._owned()
        outcome = wait_for_completion(
            self.backend, handle, on_line=on_line, on_lines=on_lines, cursor=cursor,
            deadline=None if deadline is None else self.monotonic() + (deadline - self.clock()),
            budget=TransientBudget(self.budget_seconds), sleep=self.sleep, clock=self.monotonic,
        )
        if outcome.timed_out:
            self.log.warning("Step exceeded its timeout; cancelling %s job %s", self.backend.name, handle.job_id)
            self.cancel(confirm_seconds=CANCEL_CONFIRM_SECONDS)
            outcome.status = self._call(lambda: self.backend.poll(handle))
        return outcome

    def hand_over(self) -> None:
        """Before ``defer()``: record that the trigger owns the job; this process owns nothing after."""
        handle = self._owned()
        assert self.record is not None
        self._write(Record(self.record.generation, Phase.DEFERRED, self.backend.name, handle,
                           self.record.submitted_at, extra=self.record.extra))
        self.owns_job = False

    def take_back(self, handle: RunHandle) -> None:
        """After the trigger fired (``execute_complete``): this process owns the job's end again."""
        self.load()
        self.handle, self.owns_job = handle, True

    # -- the end -------------------------------------------------------------------------------------

    def cancel(self, *, confirm_seconds: float = CANCEL_CONFIRM_SECONDS) -> bool:
        """Stop the job and confirm it stopped. True when confirmed; the record says which it was."""
        handle = self._owned()
        try:
            self._call(lambda: self.backend.cancel(handle))
        except Exception:
            self.log.exception("Cancelling %s job %s failed; it may still be running: the next try of this "
                               "task cancels it before anything else", self.backend.name, handle.job_id)
            self._write_quietly(Phase.CANCELLING, None)
            return False
        status = self._confirm_terminal(handle, confirm_seconds)
        if status is None:
            self.log.warning("%s job %s was asked to stop but is not stopped yet; the next try of this task "
                             "confirms it", self.backend.name, handle.job_id)
            self._write_quietly(Phase.CANCELLING, None)
            return False
        self._finish_record(handle, status)
        return True

    def abandon(self) -> None:
        """The task is failing or being killed: never leave the job running. Never raises.

        Called once: a kill runs ``on_kill`` and then unwinds through the guard, which must not wait for
        the same cancel twice within the supervisor's grace.
        """
        if not self.owns_job or self.handle is None or self._abandoned:
            return
        self._abandoned = True
        try:
            status = self.backend.poll(self.handle)
            if status.is_terminal:
                self._finish_record(self.handle, status)
                return
        except Exception:  # an outage: try to cancel all the same
            pass
        try:
            self.cancel(confirm_seconds=self.kill_confirm_seconds)
        except BaseException:  # bookkeeping must not hide the task's real outcome
            self.log.exception("Stopping job %s failed", self.handle.job_id)

    #: How long :meth:`abandon` waits to see a cancel take effect (the supervisor's SIGKILL comes at 5 s).
    kill_confirm_seconds: float = 1.5

    def finish(self, status: RunStatus) -> None:
        """The job is known terminal: record it finished (Airflow is done with this generation)."""
        handle = self._owned()
        self._finish_record(handle, status)

    def _confirm_terminal(self, handle: RunHandle, seconds: float) -> RunStatus | None:
        until = self.monotonic() + seconds
        attempt = 0
        while True:
            try:
                status = self.backend.poll(handle)
                if status.is_terminal:
                    return status
            except Exception as exc:  # unconfirmed, not fatal
                self.log.debug("Polling %s while confirming its cancel failed: %s", handle.job_id, exc)
            if self.monotonic() >= until:
                return None
            self.sleep(min(SETTLE_POLICY.delay(attempt), max(0.05, until - self.monotonic())))
            attempt += 1

    def _finish_record(self, handle: RunHandle, status: RunStatus) -> None:
        generation = self.record.generation if self.record else self.fallback_generation
        extra = self.record.extra if self.record else {}
        submitted_at = self.record.submitted_at if self.record else None
        self._write(Record(generation, Phase.FINISHED, self.backend.name, handle, submitted_at,
                           state=status.state.value, extra=extra))
        self.owns_job = False
        try:
            self.backend.mark_finished(handle)
        except Exception:
            self.log.warning("Could not mark job %s finished on %s", handle.job_id, self.backend.name,
                             exc_info=True)

    def _write_quietly(self, phase: Phase, state: str | None) -> None:
        try:
            record = self.record or Record(self.identity.generation, phase, self.backend.name)
            self._write(Record(record.generation, phase, self.backend.name, self.handle, record.submitted_at,
                               state=state, extra=record.extra))
        except Exception:
            self.log.warning("Could not record phase %s of job %s", phase.value,
                             self.handle.job_id if self.handle else "?", exc_info=True)

    def _owned(self) -> RunHandle:
        if self.handle is None:
            raise RuntimeError("no job: call start() or take_back() first")
        return self.handle
