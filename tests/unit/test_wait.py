"""The waiting loops with a scripted backend: no I/O, no sleeping beyond a few milliseconds."""

from __future__ import annotations

import asyncio

import pytest

from airflow_remote_ml.core import Backend, LogChunk, PollPolicy, RunHandle, RunState, RunStatus
from airflow_remote_ml.core.errors import TransientBackendError
from airflow_remote_ml.core.poll import TransientBudget
from airflow_remote_ml.core.wait import await_completion, wait_for_completion

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


def test_a_streak_of_transient_errors_longer_than_the_budget_gives_up():
    now = [0.0]
    backend = Scripted([RUNNING, BUSY])
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += 10.0  # each failed attempt costs ten seconds of (fake) time

    with pytest.raises(TransientBackendError):
        wait_for_completion(backend, HANDLE, policy=FAST, clock=lambda: now[0], sleep=sleep,
                            budget=TransientBudget(45.0))
    # Errors at t=0, 10, 20, 30, 40 are borne; the one at t=50 is past the 45 s budget.
    assert len(slept) == 5


def test_a_success_in_between_starts_a_new_streak():
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += 10.0

    # Two streaks of three errors each (30 s) fit a 25 s budget only because a success splits them.
    backend = Scripted([BUSY, BUSY, BUSY, RUNNING, BUSY, BUSY, BUSY, DONE])
    outcome = wait_for_completion(backend, HANDLE, policy=FAST, clock=lambda: now[0], sleep=sleep,
                                  budget=TransientBudget(25.0))
    assert outcome.status == DONE


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


class WithManifest(Scripted):
    def __init__(self, manifest):
        super().__init__([RUNNING], lines=["allocating 300 MB", "Killed"])
        self.manifest = manifest

    def read_manifest(self, uri):
        return self.manifest


def test_the_platforms_reason_leads_the_error_and_the_steps_own_words_follow():
    """Issue 8 item 6 / issue 10 item 3: OOMKilled was replaced by the runtime's generic 'exit code 137'."""
    from airflow_remote_ml.core.wait import failure_error

    backend = WithManifest({"error": "the step exited with code 137"})
    handle = RunHandle("scripted", "pod-1", url="https://k8s/pod-1", data={"manifest_uri": "/m.json"})
    status = RunStatus(RunState.FAILED, "Failed", "the container used more memory than its limit; raise "
                       "compute.memory", exit_code=137, reason="OOMKilled")
    error = failure_error(backend, handle, status)
    text = str(error)
    assert text.splitlines()[0].endswith("OOMKilled: the container used more memory than its limit; raise "
                                         "compute.memory")
    assert "the step reported: the step exited with code 137" in text
    assert error.exit_code == 137 and error.url == "https://k8s/pod-1" and "Killed" in error.log_tail


def test_without_a_platform_reason_the_steps_own_error_is_the_reason():
    from airflow_remote_ml.core.wait import failure_error

    backend = WithManifest({"error": "ValueError: alpha must be positive"})
    handle = RunHandle("scripted", "job-2", data={"manifest_uri": "/m.json"})
    error = failure_error(backend, handle, RunStatus(RunState.FAILED, "failed", "exit code 1", exit_code=1))
    assert error.reason == "ValueError: alpha must be positive"


class Pieces(Scripted):
    """A backend that reads its log in bounded pieces, as the local backend does (LogChunk.more)."""

    def read_logs(self, handle, cursor=None):
        start = cursor or 0
        end = min(start + 3, len(self.lines))
        return LogChunk(self.lines[start:end], end, more=end < len(self.lines))


def test_at_the_end_a_log_read_in_pieces_is_read_to_its_last_line():
    lines = [f"line {i}" for i in range(10)]
    got: list[str] = []
    outcome = wait_for_completion(Pieces([DONE], lines=lines), HANDLE, on_line=got.append, policy=FAST)
    assert got == lines and outcome.cursor == 10
    got.clear()
    outcome = asyncio.run(await_completion(Pieces([DONE], lines=lines), HANDLE, on_line=got.append, policy=FAST))
    assert got == lines and outcome.cursor == 10


def test_while_running_one_piece_is_read_per_look_so_the_deadline_is_still_checked():
    backend = Pieces([RUNNING], lines=[f"line {i}" for i in range(10)])
    got: list[str] = []
    outcome = wait_for_completion(backend, HANDLE, on_line=got.append, policy=FAST, deadline=0.0,
                                  clock=lambda: 1.0)
    assert outcome.timed_out and got == ["line 0", "line 1", "line 2"]


def test_the_tail_holds_the_last_lines_across_chunks():
    from airflow_remote_ml.core.wait import Follower

    follower = Follower(lambda line: None, tail=5)
    follower.feed(LogChunk(["a", "b", "c", "d"], 4))
    follower.feed(LogChunk(["e", "f"], 6))
    assert list(follower.tail) == ["b", "c", "d", "e", "f"]
    follower.feed(LogChunk([f"x{i}" for i in range(9)], 15))
    assert list(follower.tail) == ["x4", "x5", "x6", "x7", "x8"]


def test_lines_read_together_reach_on_lines_at_once_in_order_and_the_tail_still_fills():
    lines = [f"line {i}" for i in range(10)]
    for run in (lambda **kw: wait_for_completion(Pieces([DONE], lines=lines), HANDLE, policy=FAST, **kw),
                lambda **kw: asyncio.run(await_completion(Pieces([DONE], lines=lines), HANDLE, policy=FAST, **kw))):
        batches: list[list[str]] = []
        single: list[str] = []
        outcome = run(on_line=single.append, on_lines=batches.append)
        assert single == [], "on_lines replaces on_line"
        assert [len(b) for b in batches] == [3, 3, 3, 1] and [line for b in batches for line in b] == lines
        assert outcome.tail == lines and outcome.cursor == 10


def test_log_records_join_up_to_the_limit_and_keep_every_line():
    from airflow_remote_ml.core.wait import log_records

    lines = [f"l{i}" for i in range(1203)]
    records = list(log_records(lines, limit=500))
    assert [r.count("\n") + 1 for r in records] == [500, 500, 203]
    assert "\n".join(records).split("\n") == lines
    assert list(log_records(["one line"])) == ["one line"] and list(log_records([])) == []


def test_the_operator_logs_a_chatty_read_as_few_records_with_every_line(monkeypatch):
    from airflow_remote_ml.operators import RemoteExecutionOperator

    records: list[str] = []

    class TaskLog:  # the task's logger: one call is one record
        def info(self, msg, *args):
            records.append(msg % args if args else msg)

    monkeypatch.setattr(RemoteExecutionOperator, "log", property(lambda self: TaskLog()))
    op = RemoteExecutionOperator(task_id="chatty", backend="local", command=["true"])
    lines = [f"step line {i}" for i in range(1200)]
    op._log_lines(lines)
    assert len(records) == 3
    assert [line for record in records for line in record.split("\n")] == lines
