"""Which processes make up a local step, and stopping every one of them.

A local step is the runtime (started in its own session, so its pgid is its pid), the step's command in
a second process group the runtime creates (its pgid is recorded in the job directory's ``pgid`` file),
and whatever those start. A kill aimed only at the runtime's group never reaches the command's group, so
the step is found three ways: both process groups, and the runtime's descendants (a process that moved
to a group of its own but is still in the tree). What is found is remembered with its start time, so a
process re-parented to init when the runtime dies is still killed and a reused pid never is.

Linux reads all of it from ``/proc`` in one pass; elsewhere only the two groups are signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow_remote_ml.backends.local._logs import LogWatch

#: Upper bound on how long SIGKILLed processes may take to be gone before the kill gives up waiting.
KILL_CONFIRM_SECONDS = 1.0
_PROC = "/proc"


@dataclass(frozen=True)
class _Stat:
    pid: int
    ppid: int
    pgrp: int
    start: str  # clock ticks since boot, as the runtime writes them
    zombie: bool


def _stat(pid: int) -> _Stat | None:
    try:
        with open(f"{_PROC}/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # Field 2 (the command name) may contain spaces and ')': count fields after the last ')'.
    fields = raw[raw.rfind(b")") + 2:].split()
    if len(fields) < 20:
        return None
    return _Stat(pid, int(fields[1]), int(fields[2]), fields[19].decode(), fields[0] in (b"Z", b"X"))


def _all_stats() -> list[_Stat]:
    stats = []
    for name in os.listdir(_PROC):
        if name.isdigit() and (stat := _stat(int(name))) is not None:
            stats.append(stat)
    return stats


def group_leader_matches(pgid: int, start: str) -> bool:
    """Whether ``pgid`` is still the step's group: its leader is the recorded process, or the leader is
    gone but members remain (Linux never hands out a pid still in use as a process group id)."""
    if not start or not os.path.isdir(_PROC):
        return True
    leader = _stat(pgid)
    return leader is None or leader.start == start


def orphaned_group(pgid: int) -> bool:
    """Whether ``pgid`` names a group whose leader has died (gone, or a zombie not yet reaped): its members,
    if any, are still the step's, since the id cannot be reused while the group exists."""
    if not os.path.isdir(_PROC):
        return False
    leader = _stat(pgid)
    return leader is None or leader.zombie


@dataclass
class StepProcesses:
    """The processes of one local step, found by group and by tree, remembered across scans."""

    runtime_pid: int | None
    groups: set[int]
    known: dict[int, str] = field(default_factory=dict)  # pid -> start ticks

    def scan(self) -> dict[int, str]:
        """The step's live (non-zombie) processes now; newly found ones are remembered."""
        if not os.path.isdir(_PROC):
            return {g: "" for g in self.groups if _group_exists(g)}
        stats = _all_stats()
        by_pid = {s.pid: s for s in stats}
        children: dict[int, list[int]] = {}
        for s in stats:
            children.setdefault(s.ppid, []).append(s.pid)
        found = {s.pid for s in stats if s.pgrp in self.groups}
        todo = [self.runtime_pid] if self.runtime_pid in by_pid else []
        while todo:
            pid = todo.pop()
            if pid is None:
                continue
            found.add(pid)
            todo.extend(c for c in children.get(pid, []) if c not in found)
        for pid in found:
            self.known.setdefault(pid, by_pid[pid].start)
        alive = {}
        for pid, start in self.known.items():
            now = by_pid.get(pid)
            if now is not None and now.start == start and not now.zombie:
                alive[pid] = start
        return alive

    def signal(self, signum: int, alive: dict[int, str]) -> None:
        for pgid in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signum)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)


def pidfd(pid: int) -> int | None:
    """A file descriptor that becomes readable when ``pid`` exits (Linux >= 5.3), or None where there is
    none. Unlike ``Popen.wait(timeout)``, which polls with sleeps growing to 50 ms, it wakes at the exit,
    and it works for a process that is not our child (a restarted worker, the triggerer)."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return int(opener(pid))
    except ProcessLookupError:
        return -1  # already gone
    except OSError:  # ENOSYS on an old kernel, EPERM in some sandboxes
        return None


def wait_for_exit(pid: int, timeout: float, watch: LogWatch | None = None) -> bool | None:
    """True once ``pid`` has exited, False after ``timeout`` seconds, None when this cannot be waited on.

    With a ``watch`` the wait is cut into slices (``watch.slice``) and also ends (False) once the step's log
    holds output not read yet, so it is read back while the step runs.
    """
    import math
    import select

    fd = pidfd(pid)
    if fd is None:
        return None
    if fd < 0:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if watch is not None and watch.behind:  # the last read stopped at its bound: read on at once
            return bool(poller.poll(0))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            part = left if watch is None else min(left, watch.slice)
            if poller.poll(max(0, math.ceil(part * 1000))):
                return True
            if watch is None or time.monotonic() >= deadline or watch.unread():
                return False
    finally:
        os.close(fd)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop(step: StepProcesses, grace: float, *, term_group: int | None, reap: object = None) -> bool:
    """SIGTERM, up to ``grace`` seconds for the step to end, then SIGKILL of every process of it.

    ``term_group`` receives the SIGTERM (the runtime's group: the runtime forwards it to the command's,
    so the command sees it once); when the runtime is gone the command's groups get it directly.
    ``reap`` (a callable) is called while waiting, to reap a child of the caller. Returns True when no
    process of the step is left.
    """
    step.scan()
    targets = {term_group} if term_group is not None else set(step.groups)
    for pgid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while True:
        if callable(reap):
            reap()
        alive = step.scan()
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    confirm = time.monotonic() + KILL_CONFIRM_SECONDS
    while alive:
        step.signal(signal.SIGKILL, alive)
        time.sleep(0.01)
        if callable(reap):
            reap()
        alive = step.scan()
        if time.monotonic() >= confirm:
            break
    return not alive
