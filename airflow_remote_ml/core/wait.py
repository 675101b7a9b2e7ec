"""Following a remote job to its end: status, streamed logs, deadline, and the error when it fails.

The sync loop (worker) and the async loop (trigger) share :class:`Follower`, which keeps the log cursor
and the tail quoted in error messages, and :func:`failure_error`, which turns a failed status into the
exception the task fails with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_remote_ml.core.errors import (
    BackendAPIError,
    RemoteJobLostError,
    StepCancelledError,
    StepFailedError,
    StepTimeoutError,
    TransientBackendError,
)
from airflow_remote_ml.core.poll import PollPolicy, TransientBudget
from airflow_remote_ml.core.status import RunState, RunStatus

if TYPE_CHECKING:
    from airflow_remote_ml.core.backend import Backend
    from airflow_remote_ml.core.status import LogChunk, RunHandle

log = logging.getLogger(__name__)

#: Seconds one streak of transient API errors is borne, at submission and while waiting alike.
TRANSIENT_BUDGET_SECONDS = 300.0


@dataclass
class Outcome:
    status: RunStatus
    cursor: Any
    tail: list[str]
    timed_out: bool = False


class Follower:
    """Forwards new log lines, remembers the last ones, and paces the checks of one wait.

    The sync loop and the async loop differ only in how they call the backend; the pacing (the poll
    policy, the deadline, consecutive transient errors) lives here once.
    """

    def __init__(self, on_line: Callable[[str], None], cursor: Any = None, tail: int = 40, *,
                 policy: PollPolicy | None = None, deadline: float | None = None,
                 clock: Callable[[], float] = time.monotonic, budget: TransientBudget | None = None,
                 on_cursor: Callable[[Any], None] | None = None,
                 on_lines: Callable[[list[str]], None] | None = None) -> None:
        self.on_line = on_line
        self.on_lines = on_lines
        self.on_cursor = on_cursor
        self.cursor = cursor
        self.tail: deque[str] = deque(maxlen=tail)
        self.policy = policy or PollPolicy()
        self.deadline = deadline
        self.clock = clock
        self.attempt = 0
        self.budget = budget or TransientBudget(TRANSIENT_BUDGET_SECONDS)

    def feed(self, chunk: LogChunk) -> None:
        if chunk.lines and self.on_cursor is not None and chunk.cursor != self.cursor:
            # Write-ahead: the cursor is saved before its lines are shown, so a restarted trigger resumes
            # after them instead of showing them twice.
            self.on_cursor(chunk.cursor)
        if self.on_lines is not None:
            if chunk.lines:
                self.on_lines(chunk.lines)
        else:
            on_line = self.on_line
            for line in chunk.lines:
                on_line(line)
        # Only a chunk's last lines can stay in the tail: one slice per chunk, not an append per line (a
        # chatty step hands on 200k lines; the appends were a third of handing them on).
        keep = self.tail.maxlen or 0
        if keep:
            self.tail.extend(chunk.lines[-keep:])
        self.cursor = chunk.cursor

    def next_delay(self) -> float | None:
        """Seconds to wait for a change before looking again, or None once the deadline has passed."""
        delay = self.policy.delay(self.attempt)
        self.attempt += 1
        if self.deadline is None:
            return delay
        left = self.deadline - self.clock()
        return None if left <= 0 else min(delay, left)

    def checked(self) -> None:
        self.budget.ok()

    def failed(self, backend: Backend, exc: TransientBackendError) -> float:
        """Seconds to back off after a transient error; re-raises once the streak outlasts the budget."""
        if not self.budget.failed(self.clock()):
            raise exc
        log.warning("%s: %s; retrying (%.0fs of the transient-error budget left)", backend.name, exc,
                    self.budget.left(self.clock()))
        return min(self.policy.delay(self.budget.errors - 1, exc.retry_after),
                   max(self.budget.left(self.clock()), 0.1))

    def outcome(self, status: RunStatus, timed_out: bool = False) -> Outcome:
        return Outcome(status, self.cursor, list(self.tail), timed_out=timed_out)


def wait_for_completion(
    backend: Backend,
    handle: RunHandle,
    *,
    on_line: Callable[[str], None] = lambda line: None,
    deadline: float | None = None,
    cursor: Any = None,
    policy: PollPolicy | None = None,
    clock: Callable[[], float] = time.monotonic,
    budget: TransientBudget | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_lines: Callable[[list[str]], None] | None = None,
) -> Outcome:
    """Block until the job is terminal or ``deadline`` (a ``clock()`` value) passes, streaming logs.

    ``on_lines``, when given, gets each read's new lines at once instead of ``on_line`` one by one (see
    :func:`log_records`)."""
    follower = Follower(on_line, cursor, policy=policy or backend.poll_policy, deadline=deadline, clock=clock,
                        budget=budget, on_lines=on_lines)
    while True:
        try:
            status = backend.poll(handle)
            follower.checked()
            break
        except TransientBackendError as exc:
            sleep(follower.failed(backend, exc))
    while True:
        _feed(follower, lambda: backend.read_logs(handle, follower.cursor), drain=status.is_terminal)
        if status.is_terminal:
            return follower.outcome(status)
        delay = follower.next_delay()
        if delay is None:
            return follower.outcome(status, timed_out=True)
        try:
            status = backend.wait(handle, delay)
            follower.checked()
        except TransientBackendError as exc:
            sleep(follower.failed(backend, exc))


async def await_completion(
    backend: Backend,
    handle: RunHandle,
    *,
    on_line: Callable[[str], None] = lambda line: None,
    deadline: float | None = None,
    cursor: Any = None,
    policy: PollPolicy | None = None,
    clock: Callable[[], float] = time.monotonic,
    budget: TransientBudget | None = None,
    on_cursor: Callable[[Any], None] | None = None,
    on_lines: Callable[[list[str]], None] | None = None,
) -> Outcome:
    """The async twin of :func:`wait_for_completion`, for the trigger. ``deadline`` is a ``clock()`` value.

    ``on_cursor`` is called with each new log cursor before its lines are passed on (see :meth:`Follower.feed`).
    """
    follower = Follower(on_line, cursor, policy=policy or backend.poll_policy, deadline=deadline, clock=clock,
                        budget=budget, on_cursor=on_cursor, on_lines=on_lines)
    while True:
        try:
            status = await backend.apoll(handle)
            follower.checked()
            break
        except TransientBackendError as exc:
            await asyncio.sleep(follower.failed(backend, exc))
    while True:
        try:
            while True:  # at the end, the rest of a log read in bounded pieces (LogChunk.more)
                chunk = await backend.aread_logs(handle, follower.cursor)
                follower.feed(chunk)
                if not (chunk.more and status.is_terminal):
                    break
        except BackendAPIError as exc:  # logs are best effort while waiting; the status decides the outcome
            log.warning("%s: reading logs failed: %s", backend.name, exc)
        if status.is_terminal:
            return follower.outcome(status)
        delay = follower.next_delay()
        if delay is None:
            return follower.outcome(status, timed_out=True)
        try:
            status = await backend.await_change(handle, delay)
            follower.checked()
        except TransientBackendError as exc:
            await asyncio.sleep(follower.failed(backend, exc))


def _feed(follower: Follower, read: Callable[[], LogChunk], *, drain: bool) -> None:
    try:
        # At the end (``drain``), the rest of a log read in bounded pieces (LogChunk.more); while the job
        # runs the next look comes after the next wait, so the deadline is checked between pieces.
        while True:
            chunk = read()
            follower.feed(chunk)
            if not (chunk.more and drain):
                break
    except BackendAPIError as exc:
        # Logs are best effort while waiting (a job deleted remotely has no log any more); the status
        # decides the outcome.
        log.warning("reading logs failed: %s", exc)


def failure_error(
    backend: Backend,
    handle: RunHandle,
    status: RunStatus,
    tail: list[str] | None = None,
    *,
    timed_out: bool = False,
    timeout: float | None = None,
) -> StepFailedError:
    """The exception a task fails with for a job that did not succeed."""
    if not tail:
        tail = backend.log_tail(handle)
    reason = status.message or f"remote state {status.remote_state or status.state.value}"
    if status.reason and status.reason not in reason:
        reason = f"{status.reason}: {reason}"
    manifest_uri = handle.data.get("manifest_uri")
    if manifest_uri and status.state is RunState.FAILED:
        try:
            manifest = backend.read_manifest(manifest_uri)
        except Exception:  # an unreadable manifest must not hide the step's own failure
            manifest = None
        step_error = str(manifest.get("error") or "") if manifest else ""
        if step_error and status.reason:
            # The platform's own cause (OOMKilled, Evicted, INTERNAL_ERROR) leads: a kernel OOM kill of the
            # step's child leaves the runtime alive to record only "exit code 137".
            if step_error not in reason:
                reason = f"{reason}\nthe step reported: {step_error}"
        elif step_error:
            reason = step_error
    kwargs: dict[str, Any] = {
        "exit_code": status.exit_code,
        "log_tail": tail,
        "url": handle.url,
        "backend": backend.name,
        "job_id": handle.job_id,
    }
    if timed_out:
        return StepTimeoutError(f"timed out after {timeout:g}s and was cancelled" if timeout else "timed out",
                                **kwargs)
    if status.state is RunState.CANCELLED:
        return StepCancelledError(f"cancelled ({reason})", **kwargs)
    if status.state is RunState.LOST:
        return RemoteJobLostError(f"the remote job was lost ({reason})", **kwargs)
    return StepFailedError(reason, **kwargs)


#: At most this many of a step's lines go into one log record (:func:`log_records`).
LINES_PER_RECORD = 500


def log_records(lines: list[str], limit: int = LINES_PER_RECORD) -> Iterator[str]:
    """The messages to log for lines that were read together: one per ``limit`` lines, joined by newlines.

    A log record costs ~70 µs in an Airflow task process (structlog's processors, the secrets masker, the JSON
    sent to the supervisor): a step printing 200k lines took 14 s to log line by line, for a 0.4 s step. Lines
    that arrive in one read are one record; a step printing a line a minute still gets a record per line.
    """
    for start in range(0, len(lines), limit):
        yield "\n".join(lines[start:start + limit])
