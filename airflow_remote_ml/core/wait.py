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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_remote_ml.core.errors import (
    RemoteJobLostError,
    StepCancelledError,
    StepFailedError,
    StepTimeoutError,
    TransientBackendError,
)
from airflow_remote_ml.core.poll import PollPolicy
from airflow_remote_ml.core.status import RunState, RunStatus

if TYPE_CHECKING:
    from airflow_remote_ml.core.backend import Backend
    from airflow_remote_ml.core.status import LogChunk, RunHandle

log = logging.getLogger(__name__)

#: Consecutive transient API errors tolerated while waiting before giving up.
MAX_TRANSIENT_ERRORS = 10


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
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.on_line = on_line
        self.cursor = cursor
        self.tail: deque[str] = deque(maxlen=tail)
        self.policy = policy or PollPolicy()
        self.deadline = deadline
        self.clock = clock
        self.attempt = 0
        self.errors = 0

    def feed(self, chunk: LogChunk) -> None:
        for line in chunk.lines:
            self.tail.append(line)
            self.on_line(line)
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
        self.errors = 0

    def failed(self, backend: Backend, exc: TransientBackendError) -> float:
        """Seconds to back off after a transient error; re-raises after too many in a row."""
        self.errors += 1
        if self.errors > MAX_TRANSIENT_ERRORS:
            raise exc
        log.warning("%s: %s; retrying", backend.name, exc)
        return self.policy.delay(self.attempt, exc.retry_after)

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
) -> Outcome:
    """Block until the job is terminal or ``deadline`` (a ``clock()`` value) passes, streaming logs."""
    follower = Follower(on_line, cursor, policy=policy or backend.poll_policy, deadline=deadline, clock=clock)
    status = _retrying(lambda: backend.poll(handle), None)
    while True:
        _feed(follower, lambda: backend.read_logs(handle, follower.cursor))
        if status.is_terminal:
            return follower.outcome(status)
        delay = follower.next_delay()
        if delay is None:
            return follower.outcome(status, timed_out=True)
        try:
            status = backend.wait(handle, delay)
            follower.checked()
        except TransientBackendError as exc:
            time.sleep(follower.failed(backend, exc))


async def await_completion(
    backend: Backend,
    handle: RunHandle,
    *,
    on_line: Callable[[str], None] = lambda line: None,
    deadline: float | None = None,
    cursor: Any = None,
    policy: PollPolicy | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Outcome:
    """The async twin of :func:`wait_for_completion`, for the trigger. ``deadline`` is a ``clock()`` value."""
    follower = Follower(on_line, cursor, policy=policy or backend.poll_policy, deadline=deadline, clock=clock)
    status = await backend.apoll(handle)
    while True:
        try:
            follower.feed(await backend.aread_logs(handle, follower.cursor))
        except TransientBackendError as exc:
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


def _retrying(call: Callable[[], RunStatus], policy: PollPolicy | None) -> RunStatus:
    policy = policy or PollPolicy()
    for attempt in range(MAX_TRANSIENT_ERRORS + 1):
        try:
            return call()
        except TransientBackendError as exc:
            if attempt == MAX_TRANSIENT_ERRORS:
                raise
            time.sleep(policy.delay(attempt, exc.retry_after))
    raise AssertionError("unreachable")


def _feed(follower: Follower, read: Callable[[], LogChunk]) -> None:
    try:
        follower.feed(read())
    except TransientBackendError as exc:
        # Logs are best effort while waiting; the status decides the outcome.
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
    manifest_uri = handle.data.get("manifest_uri")
    if manifest_uri and status.state is RunState.FAILED:
        try:
            manifest = backend.read_manifest(manifest_uri)
        except Exception:  # an unreadable manifest must not hide the step's own failure
            manifest = None
        if manifest and manifest.get("error"):
            reason = str(manifest["error"])
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
