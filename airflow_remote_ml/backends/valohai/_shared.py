"""One status query for every Valohai execution waiting in a triggerer: a shared list per project.

Every deferred step waiting on Valohai asks the same question ("has my execution ended?") of the same
project. Rather than each polling its own execution, one :class:`ProjectWatch` per (event loop, host,
project) lists the project's unfinished executions (``GET /executions/?project=<id>&status=incomplete``,
paged, as ``vh execution list --status incomplete`` does) every ``period`` seconds and wakes the waiters.
An execution that left the list has ended (or vanished): only that waiter then asks for its own execution,
once. So the status traffic of N waiting steps is ``ceil(N / page)`` requests per period, whatever N.

Log lines are per execution and cannot be shared: the backend paces each execution's log reads
separately while it waits in shared mode (the final read of an ended execution is never held back).

Watches live in a module-level registry and stop ``linger`` seconds after their last waiter left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from airflow_remote_ml.backends.valohai._client import ValohaiAPI
from airflow_remote_ml.core.errors import TransientBackendError
from airflow_remote_ml.core.poll import Broadcast

log = logging.getLogger(__name__)

#: Executions per list page (DRF LimitOffsetPagination ``limit``).
PAGE = 100


class ProjectWatch:
    """The unfinished executions of one project, listed once per period for every waiter."""

    def __init__(self, make_api: Callable[[], ValohaiAPI], project_id: str, *, period: float,
                 linger: float, min_waiters: int) -> None:
        self.make_api = make_api
        self.project_id = project_id
        self.period = period
        self.linger = linger
        self.min_waiters = max(1, min_waiters)
        self.waiters = 0
        self.listed_at = 0.0  # time.monotonic() of the last complete list, 0 before the first
        self.incomplete: dict[str, dict[str, Any]] = {}
        self.requests = 0
        self._changed = Broadcast()
        self._task: asyncio.Task[None] | None = None
        self._idle_since: float | None = None

    @property
    def closed(self) -> bool:
        return self._task is not None and self._task.done()

    def join(self) -> None:
        self.waiters += 1
        self._idle_since = None
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"valohai-watch-{self.project_id}")

    def leave(self) -> None:
        self.waiters = max(0, self.waiters - 1)
        if not self.waiters:
            self._idle_since = time.monotonic()

    async def changed(self, timeout: float) -> None:
        """Return after the next list, or after ``timeout`` seconds."""
        await self._changed.wait(timeout)

    def _list(self, api: ValohaiAPI) -> dict[str, dict[str, Any]]:
        params = {"project": self.project_id, "status": "incomplete", "ordering": "-ctime", "limit": PAGE}
        found: dict[str, dict[str, Any]] = {}
        self.requests += 1
        page = api.request("GET", "executions/", params=params)
        while True:
            for execution in page.get("results") or []:
                found[str(execution["id"])] = execution
            if not page.get("next"):
                return found
            self.requests += 1
            page = api.request("GET", page["next"])

    def _wanted(self) -> bool:
        return bool(self.waiters) or self._idle_since is None or time.monotonic() - self._idle_since < self.linger

    async def _run(self) -> None:
        api = self.make_api()
        try:
            while self._wanted():
                if self.waiters < self.min_waiters:
                    # Too few waiters to be worth a list: each polls its own execution (which brings its log).
                    await asyncio.sleep(min(1.0, self.period))
                    continue
                try:
                    found = await asyncio.to_thread(self._list, api)
                except TransientBackendError as exc:
                    log.warning("valohai: listing the unfinished executions of project %s failed: %s",
                                self.project_id, exc)
                    await asyncio.sleep(max(self.period, exc.retry_after or 0))
                    continue
                except Exception as exc:  # a refused token, a vanished project: waiters fall back to polls
                    log.warning("valohai: the shared watch of project %s stopped: %s", self.project_id, exc)
                    return
                self.incomplete, self.listed_at = found, time.monotonic()
                self._changed.fire()
                await asyncio.sleep(self.period)
        finally:
            self.listed_at = 0.0
            self._changed.fire(last=True)
            await asyncio.to_thread(api.close)

    @property
    def shared(self) -> bool:
        """Whether the waiters use the list (enough of them, and the list is running)."""
        return self.waiters >= self.min_waiters and not self.closed


#: Live watches by (event loop, host, project id).
_WATCHES: dict[tuple[int, str, str], ProjectWatch] = {}


def watch_for(host: str, project_id: str, make_api: Callable[[], ValohaiAPI], *, period: float,
              linger: float, min_waiters: int) -> ProjectWatch:
    """The running loop's watch of ``project_id`` on ``host`` (created on first use)."""
    key = (id(asyncio.get_running_loop()), host, project_id)
    watch = _WATCHES.get(key)
    if watch is None or watch.closed:
        watch = _WATCHES[key] = ProjectWatch(make_api, project_id, period=period, linger=linger,
                                             min_waiters=min_waiters)
    return watch
