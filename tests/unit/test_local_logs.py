"""The local backend's log read-back: bounded pieces, exact cursors, the error tail, the wait's slices.

Files in ``tmp_path`` only; no process runs and nothing waits (the slice rule runs on a scripted clock).
"""

from __future__ import annotations

import builtins
import os

import pytest

from airflow_remote_ml.backends.local import LocalBackend, _logs
from airflow_remote_ml.backends.local._logs import MAX_SLICE, MIN_SLICE, READ_MAX, SLICE_BYTES, LogWatch, read_chunk
from airflow_remote_ml.core import RunHandle


def write_log(tmp_path, data: bytes) -> RunHandle:
    job_dir = tmp_path / "state" / "job-1"
    job_dir.mkdir(parents=True)
    (job_dir / "log").write_bytes(data)
    (job_dir / "exit_code").write_text("0")  # ended: a partial last line is handed on
    return RunHandle("local", "job-1", data={"job_dir": str(job_dir), "manifest_uri": str(job_dir / "m.json"),
                                             "declared_outputs": []})


def backend_for(tmp_path) -> LocalBackend:
    return LocalBackend.from_config({"state_dir": str(tmp_path / "state")})


def numbered(count: int) -> list[str]:
    return [f"line {i} " + "x" * (i % 50) for i in range(count)]


def test_a_long_log_is_read_back_in_bounded_pieces_each_line_once(tmp_path):
    """A reattach from the start of a long log never reads it whole into memory, and loses nothing."""
    lines = numbered(200_000)  # ~6 MiB
    data = ("\n".join(lines) + "\n").encode()
    assert len(data) > 4 * READ_MAX
    backend, handle = backend_for(tmp_path), write_log(tmp_path, data)
    got: list[str] = []
    cursor, pieces = None, 0
    while True:
        chunk = backend.read_logs(handle, cursor)
        assert sum(len(line) + 1 for line in chunk.lines) <= READ_MAX
        got += chunk.lines
        cursor, pieces = chunk.cursor, pieces + 1
        if not chunk.more:
            break
    assert got == lines
    assert cursor == len(data) and pieces >= 5
    assert backend.read_logs(handle, cursor).lines == []


def test_a_line_longer_than_a_read_comes_in_pieces_cut_between_characters(tmp_path):
    long_line = "é" * (READ_MAX // 2 + 1000) + "ü" * READ_MAX  # two bytes each in UTF-8
    data = f"start\n{long_line}\nend\n".encode()
    backend, handle = backend_for(tmp_path), write_log(tmp_path, data)
    got: list[str] = []
    cursor = None
    while True:
        chunk = backend.read_logs(handle, cursor)
        got += chunk.lines
        cursor = chunk.cursor
        if not chunk.more:
            break
    assert "\ufffd" not in "".join(got), "a character was split between two pieces"
    assert got[0] == "start" and got[-1] == "end"
    assert "".join(got[1:-1]) == long_line and len(got) > 3


def test_a_partial_last_line_waits_for_the_end_of_the_step(tmp_path):
    path = tmp_path / "log"
    path.write_bytes(b"one\ntwo\nthr")
    chunk, looked = read_chunk(str(path), 0, lambda: False)
    assert chunk.lines == ["one", "two"] and chunk.cursor == 8 and looked == 11 and not chunk.more
    chunk, looked = read_chunk(str(path), 8, lambda: False)
    assert chunk.lines == [] and chunk.cursor == 8, "a line still being written is not handed on"
    chunk, _ = read_chunk(str(path), 8, lambda: True)
    assert chunk.lines == ["thr"] and chunk.cursor == 11


def test_the_error_tail_reads_only_the_end_of_the_log(tmp_path, monkeypatch):
    lines = numbered(50_000)
    handle = write_log(tmp_path, ("\n".join(lines) + "\n").encode())
    log_size = os.path.getsize(os.path.join(handle.data["job_dir"], "log"))
    backend = backend_for(tmp_path)
    read_sizes: list[int] = []
    real_open = builtins.open

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def read(self, *size):
            data = self.fh.read(*size)
            read_sizes.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.fh, name)

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", lambda *a, **k: Counting(real_open(*a, **k)))
        tail = backend.log_tail(handle, 40)
    assert tail == lines[-40:]
    assert sum(read_sizes) <= _logs.TAIL_BYTES < log_size, "the tail read the whole log"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_wait_slices_follow_how_fast_the_log_grows(tmp_path):
    path = tmp_path / "log"
    path.write_bytes(b"")
    clock = Clock()
    watch = LogWatch(str(path), clock)
    assert watch.slice == MIN_SLICE  # a new step is looked at soon
    for _ in range(20):  # quiet: the slice doubles up to the poll policy's cap, one look per wait
        clock.now += watch.slice
        assert not watch.unread()
    assert watch.slice == MAX_SLICE
    with open(path, "ab") as fh:  # a chatty step: 10 MB/s
        for _ in range(3):
            clock.now += 0.01
            fh.write(b"x" * 100_000)
            fh.flush()
            assert watch.unread()
    assert watch.slice == pytest.approx(max(MIN_SLICE, SLICE_BYTES / 10e6))
    watch.read(os.path.getsize(path), more=False)
    clock.now += 0.01
    assert not watch.unread(), "output already read is not a reason to come back"
    with open(path, "ab") as fh:  # a line a second: a slice of the full second is fine
        clock.now += 1.0
        fh.write(b"one line\n")
    assert watch.unread()
    assert watch.slice == MAX_SLICE
