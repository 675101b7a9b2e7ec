"""The waiting loops with a scripted backend: no I/O, no sleeping beyond a few milliseconds."""

from __future__ import annotations

import asyncio

import pytest

from airflow_remote_ml.core import Backend, LogChunk, PollPolicy, RunHandle, RunState, RunStatus
from airflow_remote_ml.core.errors import TransientBackendError
from airflow_remote_ml.core.wait import MAX_TRANSIENT_ERRORS, await_completion, wait_for_completion

FAST = PollPolicy(first_delay=0.001, factor=1.0, cap=0.001)


class Scripted(Backend):
    """Answers waits from a script: a RunStatus, or an exception to raise."""

    name = "scripted"

    def __init__(self, script, lines=()):
        super().__init__(config=None)  # type: ignore[arg-type]
        self.script = list(script)
        self.lines = list(lines)

    def _next(self):
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Exception):
            raise item
        return item

    def submit(self, request):  # pragma: no cover - not used
        raise NotImplementedError

    def find(self, identity):  # pragma: no cover - not used
        return None

    def poll(self, handle):
        return self._next()

    def wait(self, handle, timeout):
        return self._next()

    async def await_change(self, handle, timeout):
        return self._next()

    async def apoll(self, handle):
        return self._next()

    def cancel(self, handle):  # pragma: no cover - not used
        pass

    def read_logs(self, handle, cursor=None):
        start = cursor or 0
        return LogChunk(self.lines[start:], len(self.lines))


RUNNING = RunStatus(RunState.RUNNING, "running")
DONE = RunStatus(RunState.SUCCEEDED, "done")
HANDLE = RunHandle("scripted", "job-1")
BUSY = TransientBackendError("scripted", "busy", 429, retry_after=0.001)


def test_transient_errors_are_retried_and_logs_stream_once():
    backend = Scripted([RUNNING, BUSY, BUSY, RUNNING, DONE], lines=["a", "b"])
    lines: list[str] = []
    outcome = wait_for_completion(backend, HANDLE, on_line=lines.append, policy=FAST)
    assert outcome.status == DONE and not outcome.timed_out
    assert lines == ["a", "b"] and outcome.tail == ["a", "b"] and outcome.cursor == 2


def test_too_many_transient_errors_in_a_row_give_up():
    backend = Scripted([RUNNING, BUSY])
    with pytest.raises(TransientBackendError):
        wait_for_completion(backend, HANDLE, policy=FAST)
    assert MAX_TRANSIENT_ERRORS >= 3


def test_the_deadline_ends_the_wait_as_timed_out():
    ticks = iter(range(100))
    backend = Scripted([RUNNING])
    outcome = wait_for_completion(backend, HANDLE, policy=FAST, deadline=3, clock=lambda: next(ticks))
    assert outcome.timed_out and outcome.status == RUNNING


def test_the_async_loop_behaves_the_same():
    backend = Scripted([RUNNING, BUSY, RUNNING, DONE], lines=["x"])
    lines: list[str] = []
    outcome = asyncio.run(await_completion(backend, HANDLE, on_line=lines.append, policy=FAST))
    assert outcome.status == DONE and lines == ["x"]
    ticks = iter(range(100))
    outcome = asyncio.run(await_completion(Scripted([RUNNING]), HANDLE, policy=FAST, deadline=2,
                                           clock=lambda: next(ticks)))
    assert outcome.timed_out
