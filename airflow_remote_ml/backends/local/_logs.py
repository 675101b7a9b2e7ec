"""The local backend's log: reading it back in bounded pieces, and knowing when there is more to read.

The runtime's output goes to the job directory's ``log`` file (it must outlive the worker, so no pipe to the
worker). Airflow's task log gets it from there: :func:`read_chunk` from a byte offset (the cursor, always just
after a complete line, so a reattached worker resumes exactly there), and :class:`LogWatch` lets the wait
return as soon as output is waiting, so a chatty step's lines are read back while it runs (on the other
core) instead of all of them after its exit.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from airflow_remote_ml.core.status import LogChunk

#: The most bytes one read hands on: a long log (a reattach from its start, a step that outran the worker)
#: comes in pieces of this size (and ~6x that as Python strings), never whole into memory.
READ_MAX = 1 << 20
#: What the error message's tail reads from the end of the log: enough for its 40 lines, not the whole log.
TAIL_BYTES = 1 << 18
#: Bounds of one slice of the wait between looks at the log's size. The slice is the time the log takes to
#: grow by ``SLICE_BYTES`` at the rate seen, so what is left to read after the exit stays small (~5k lines,
#: ~0.5 ms) however fast the step writes; while nothing is written the slice doubles up to ``MAX_SLICE``,
#: the poll policy's cap, so a quiet step costs one look per wait and its lines are never shown later than
#: before.
MIN_SLICE = 0.005
MAX_SLICE = 2.0
SLICE_BYTES = 64 << 10


def read_chunk(path: str, offset: int, finished: Callable[[], bool]) -> tuple[LogChunk, int]:
    """The complete lines after ``offset`` (at most :data:`READ_MAX` bytes) and how far the read looked.

    A last line without its newline is held back until the step has ``finished()``: it is still being
    written. A line longer than a whole read is handed on in pieces, cut between characters.
    """
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size <= offset:
                return LogChunk([], offset), offset
            fh.seek(offset)
            data = fh.read(min(size - offset, READ_MAX))
    except FileNotFoundError:
        return LogChunk([], offset), offset
    looked = offset + len(data)
    more = looked < size
    end = data.rfind(b"\n")
    if end < 0:
        if len(data) >= READ_MAX:
            cut = _character_boundary(data)
            return LogChunk([data[:cut].decode(errors="replace")], offset + cut, more=True), offset + cut
        if data and finished():
            return LogChunk([data.decode(errors="replace")], looked), looked
        return LogChunk([], offset), looked
    # One decode per chunk; the cursor stays on a line boundary, so a chunk never splits a character.
    return LogChunk(data[:end + 1].decode(errors="replace").splitlines(), offset + end + 1, more=more), looked


def _character_boundary(data: bytes) -> int:
    """Where to cut ``data`` so no UTF-8 character is split (continuation bytes are 0b10xxxxxx)."""
    cut = len(data)
    while cut > len(data) - 4 and cut > 0 and data[cut - 1] & 0xC0 == 0x80:
        cut -= 1
    if cut > 0 and data[cut - 1] >= 0xC0:  # a lead byte whose continuation was cut off
        cut -= 1
    return cut or len(data)


def tail(path: str, lines: int) -> list[str]:
    """The log's last ``lines`` lines, read from its last :data:`TAIL_BYTES` only."""
    try:
        with open(path, "rb") as fh:
            start = max(0, os.fstat(fh.fileno()).st_size - TAIL_BYTES)
            fh.seek(start)
            data = fh.read(TAIL_BYTES)
    except FileNotFoundError:
        return []
    text = data.decode(errors="replace").splitlines()
    if start > 0:
        text = text[1:]  # began mid-line
    return text[-lines:]


class LogWatch:
    """How much of one job's log has been read back, and how long the wait may go without looking again."""

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock = clock
        self.looked = 0  # bytes of the log the last read covered
        self.behind = False  # that read stopped at READ_MAX with more already there
        self.slice = MIN_SLICE  # a new step is looked at soon; one that stays quiet goes to MAX_SLICE
        self._size = 0
        self._at = clock()

    def read(self, looked: int, more: bool) -> None:
        self.looked, self.behind = looked, more

    def unread(self) -> bool:
        """Whether the log has grown past the last read; sets the next slice from the rate it grew at."""
        try:
            size = os.stat(self.path).st_size
        except OSError:
            return False
        now = self.clock()
        rate = (size - self._size) / max(now - self._at, 1e-3)
        self._size, self._at = size, now
        # Quiet: twice as long each time (a step still starting soon writes); writing: as the rate says.
        self.slice = min(MAX_SLICE, self.slice * 2 if rate <= 0 else max(MIN_SLICE, SLICE_BYTES / rate))
        return size > self.looked
