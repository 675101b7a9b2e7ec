"""The docker backend follows a container it started over the engine's attach stream; when the stream
cannot be trusted it reads the engine's log from the lines already relayed: none lost, none twice.

Against the engine API double of test_docker_backend.py, whose attach stream is a real socket fed with
the engine's framing (``pkg/stdcopy``); the real engine runs the same cases in
tests/integration/test_docker_attach.py.
"""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from airflow_remote_ml.backends.docker import DockerBackend, DockerConfig, _attach, lines_after_counts
from airflow_remote_ml.core import RunState
from airflow_remote_ml.core.errors import TransientBackendError
from airflow_remote_ml.core.wait import wait_for_completion
from tests.unit.test_docker_backend import FakeAPI, api_error, backend, frame, make_request

STAMP = "2026-11-24T17:34:48.{:09d}Z"


def started(tmp_path, **config: Any) -> tuple[Any, FakeAPI, Any, str]:
    b, api = backend(**config)
    handle = b.submit(make_request(tmp_path))
    return b, api, handle, handle.data["container_id"]


class Emitter:
    """The container's writes, each stamped a nanosecond after the last (the log keeps arrival order)."""

    def __init__(self, api: FakeAPI, container_id: str) -> None:
        self.api, self.container_id, self.n = api, container_id, 0

    def __call__(self, stream: int, text: str) -> None:
        for line in text.splitlines(keepends=True):
            self.n += 1
            self.api.emit(self.container_id, stream, line.encode(), STAMP.format(self.n))


def block_while_running(api: FakeAPI) -> None:
    """The engine's wait API blocks while the container runs; the SDK raises the read timeout (as a
    ConnectionError over a unix socket) when its timeout passes first."""

    def on_wait(container: str, condition: str | None) -> None:
        if api._get(container)["State"]["Status"] == "running":
            raise requests.exceptions.ConnectionError("UnixHTTPConnectionPool: Read timed out.")

    api.on_wait = on_wait


def read_until(b: Any, handle: Any, cursor: Any, count: int) -> tuple[list[str], Any]:
    """Relay until ``count`` lines came (the reader thread is asynchronous); bounded, never a fixed sleep."""
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while len(lines) < count:
        assert time.monotonic() < deadline, f"only {lines} arrived"
        chunk = b.read_logs(handle, cursor)
        lines += chunk.lines
        cursor = chunk.cursor
        if len(lines) < count:
            time.sleep(0.01)
    return lines, cursor


def test_a_started_step_is_relayed_from_the_stream_and_its_log_is_never_read_back(tmp_path):
    b, api, handle, cid = started(tmp_path)
    emit = Emitter(api, cid)
    emit(1, "line 1\nline 2\n")
    emit(2, "warn\n")
    emit(1, "no newline at the end")
    api.exit(cid, 0)
    outcome = wait_for_completion(b, handle, deadline=time.monotonic() + 60)
    assert outcome.status.is_successful
    assert outcome.tail == ["line 1", "line 2", "warn", "no newline at the end"]
    assert outcome.cursor == {"stdout": 3, "stderr": 1}
    assert not [c for c in api.calls if c[0] == "logs"]


def test_wait_returns_early_to_relay_a_backlog_without_an_engine_call(tmp_path, monkeypatch):
    monkeypatch.setattr(_attach, "HIGH_WATER_LINES", 3)
    b, api, handle, cid = started(tmp_path)
    Emitter(api, cid)(1, "a\nb\nc\nd\n")
    before = len(api.calls)
    status = b.wait(handle, 3600)  # returns on the backlog: pytest-timeout (300 s) fails it otherwise
    assert status.state is RunState.RUNNING
    assert api.calls[before:] == []  # neither the wait API nor an inspect
    lines, _ = read_until(b, handle, None, 4)
    assert lines == ["a", "b", "c", "d"]


@pytest.mark.parametrize("how", ["closed by us", "dropped by the engine while the container runs",
                                 "ended by an engine that then fails a call"])
def test_a_broken_stream_falls_back_to_the_log_without_loss_or_repeat(tmp_path, how):
    b, api, handle, cid = started(tmp_path)
    block_while_running(api)
    emit = Emitter(api, cid)
    emit(1, "out 1\nout 2\n")
    emit(2, "err 1\n")
    seen, cursor = read_until(b, handle, None, 3)
    emit(1, "out 3\n")  # on the stream too, perhaps read but not handed out yet
    if how == "closed by us":
        b._attached[cid].close()
    elif how == "dropped by the engine while the container runs":
        for engine, _ in api.attached.pop(cid):
            engine.close()  # EOF although the container still runs: the connection, not the output, ended
        status = b.wait(handle, 5)
        assert status.state is RunState.RUNNING
    else:
        for engine, _ in api.attached.pop(cid):
            engine.close()  # a restarting engine ends every stream, then refuses connections for a while

        def refused(container: str, condition: str | None) -> None:
            raise requests.exceptions.ConnectionError("[Errno 111] Connection refused")

        api.on_wait = refused
        with pytest.raises(TransientBackendError):
            b.wait(handle, 5)
        block_while_running(api)
    assert not b._attached[cid].usable
    emit(2, "err 2\n")
    emit(1, "out 4\n")
    api.exit(cid, 0)
    outcome = wait_for_completion(b, handle, cursor=cursor, deadline=time.monotonic() + 60)
    relayed = seen + [line for line in outcome.tail if line not in seen]
    assert outcome.tail[-3:] == ["out 3", "err 2", "out 4"]
    assert sorted(relayed) == sorted(["out 1", "out 2", "err 1", "out 3", "err 2", "out 4"])
    assert "since" in outcome.cursor  # on from here with the log's own cursor
    assert b.read_logs(handle, outcome.cursor).lines == []


def test_a_counts_cursor_without_the_stream_reads_the_log_after_those_lines(tmp_path):
    b, api, handle, cid = started(tmp_path)
    emit = Emitter(api, cid)
    emit(1, "a\n")
    emit(2, "x\n")
    emit(1, "b\nc\n")
    emit(2, "y\n")
    other = DockerBackend(DockerConfig(), api_client=api)  # another worker, the same engine: no stream
    chunk = other.read_logs(handle, {"stdout": 2, "stderr": 1})
    assert chunk.lines == ["c", "y"]
    assert other.read_logs(handle, chunk.cursor).lines == []


def test_lines_after_counts_skips_per_stream_whatever_the_interleaving():
    log = b"".join([
        frame(2, STAMP.format(1).encode() + b" err 1\n"),
        frame(1, STAMP.format(2).encode() + b" out 1\n"),
        # A line longer than the log copier's 16 KiB buffer is stored as partial entries, no newline but
        # on the last (daemon/logger/copier.go): it is one line of its stream.
        frame(1, STAMP.format(3).encode() + b" " + b"x" * 16384),
        frame(1, STAMP.format(4).encode() + b" tail\n"),
        frame(2, STAMP.format(5).encode() + b" err 2\n"),
        frame(1, STAMP.format(6).encode() + b" out 3\n"),
    ])
    assert lines_after_counts(log, {"stdout": 2, "stderr": 1}).lines == ["err 2", "out 3"]
    assert lines_after_counts(log, {"stdout": 3, "stderr": 2}).lines == []
    assert lines_after_counts(log, {"stdout": 0, "stderr": 0}).lines[0] == "err 1"
    second = int(datetime(2026, 11, 24, 17, 34, 48, tzinfo=UTC).timestamp())
    # The log's own cursor after all of it: a second before its newest entry, and the entries from there
    # (the partial entry and the next are one line to the timestamp parser).
    assert lines_after_counts(log, {"stdout": 0, "stderr": 2}).cursor == {"since": second - 1, "seen": 5}


def test_a_backlog_nobody_relays_is_given_up_and_read_from_the_log(tmp_path, monkeypatch):
    monkeypatch.setattr(_attach, "LIMIT_LINES", 4)
    b, api, handle, cid = started(tmp_path)
    emit = Emitter(api, cid)
    emit(1, "1\n")
    seen, cursor = read_until(b, handle, None, 1)
    session = b._attached[cid]
    emit(1, "2\n3\n4\n5\n6\n")
    deadline = time.monotonic() + 30
    while session.usable:  # the reader gives up once over the limit
        assert time.monotonic() < deadline
        time.sleep(0.01)
    api.exit(cid, 0)
    outcome = wait_for_completion(b, handle, cursor=cursor, deadline=time.monotonic() + 60)
    assert seen + outcome.tail == ["1", "2", "3", "4", "5", "6"]


def test_an_engine_that_refuses_the_attach_still_runs_the_step_and_its_log_is_read(tmp_path):
    b, api = backend()

    def refuse(container: str, params: Any = None) -> Any:
        raise api_error(500, "attach failed")

    api.attach_socket = refuse  # type: ignore[method-assign]
    handle = b.submit(make_request(tmp_path))
    cid = handle.data["container_id"]
    Emitter(api, cid)(1, "hello\n")
    api.exit(cid, 0)
    outcome = wait_for_completion(b, handle, deadline=time.monotonic() + 60)
    assert outcome.tail == ["hello"] and "since" in outcome.cursor


def test_attach_off_reads_the_log(tmp_path):
    b, api, handle, cid = started(tmp_path, attach=False)
    assert "attach" not in [c[0] for c in api.calls]
    Emitter(api, cid)(1, "hello\n")
    api.exit(cid, 0)
    assert wait_for_completion(b, handle, deadline=time.monotonic() + 60).tail == ["hello"]


def test_close_detaches_and_leaves_the_container_running(tmp_path):
    b, api, handle, cid = started(tmp_path)
    session = b._attached[cid]
    b.close()
    assert not session.usable and api._get(cid)["State"]["Status"] == "running"


class RecvOnly:
    """A transport with only ``recv`` (an SSH channel, paramiko's ``Channel``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, n: int) -> bytes:
        return self.sock.recv(n)

    def close(self) -> None:
        self.sock.close()


def wait_for(condition: Any) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_the_reader_splits_frames_torn_anywhere_over_a_recv_only_transport():
    ours, engine = socket.socketpair()
    session = _attach.AttachedOutput(RecvOnly(ours), "test")
    stream = frame(1, "été\nsecond".encode()) + frame(2, b"err\r\n") + frame(1, b" line\n")
    for i in range(len(stream)):  # one byte at a time: every frame header and payload torn
        engine.sendall(stream[i:i + 1])
    engine.close()
    wait_for(lambda: session.eof)
    session.confirm_end()
    assert session.take() == (["été", "err", "second line"], {"stdout": 2, "stderr": 1})


def test_a_stream_that_ends_inside_a_frame_is_broken_not_ended():
    ours, engine = socket.socketpair()
    session = _attach.AttachedOutput(ours, "test")
    engine.sendall(frame(1, b"whole\n") + frame(1, b"cut short\n")[:-3])
    engine.close()
    wait_for(lambda: not session.usable)
    assert not session.eof and session.take() == ([], {"stdout": 0, "stderr": 0})
