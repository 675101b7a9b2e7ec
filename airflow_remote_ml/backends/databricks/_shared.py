"""One status query for every Databricks run waiting in a triggerer: a shared list per workspace.

Every deferred step waiting on Databricks asks the same question ("has my run ended?") of the same
workspace. Rather than each reading its own run (``runs/get``, one request per step per check), one
:class:`WorkspaceWatch` per (event loop, workspace host, credentials) lists the workspace's active submitted
runs (``GET jobs/runs/list?active_only=true&run_type=SUBMIT_RUN&limit=25``, paged with ``next_page_token``
while ``has_more``) every ``period`` seconds and wakes the waiters. A run that left the list has ended (or
was deleted): only that waiter then asks for its own run (``runs/get``, and ``runs/get-output`` for its
result), once. So the status traffic of N waiting runs is ``ceil(active / 25)`` requests per period.

The Jobs API facts this relies on (Jobs API reference, ``GET /api/2.1/jobs/runs/list``):

* ``active_only``: "If active_only is true, only active runs are included in the results" (QUEUED,
  PENDING, RUNNING, TERMINATING, BLOCKED, WAITING_FOR_RETRY: every life cycle state but the terminal
  TERMINATED, SKIPPED and INTERNAL_ERROR).
* ``limit``: "This value must be greater than 0 and less or equal to 25" (2.1; 2.2 defaults to 20); larger
  is refused with 400 INVALID_PARAMETER_VALUE, so a page holds at most 25 runs.
* ``page_token``: "Use next_page_token or prev_page_token returned from the previous request to list the
  next or previous page of runs" (``offset`` is "Deprecated since June 2023"); ``has_more`` says whether
  another page exists.
* Runs come "in descending order by start time", so a run ending between two pages may shift the next
  page by one: a run missing for that reason is merely read once with ``runs/get`` and keeps waiting.
* The list shows the runs the caller may view, so a watch is per credentials, not only per host.

A waiter never waits longer for a check than its own poll schedule says (:meth:`DatabricksBackend
.await_change`): a list that started after its last check counts as one, and when none came in time it
reads its own run. Per-step reads (logs, the manifest) are not shared: the backend paces them per step.

Watches live in a module-level registry and stop ``linger`` seconds after their last waiter left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from airflow_remote_ml.core.errors import TransientBackendError
from airflow_remote_ml.core.poll import Broadcast

log = logging.getLogger(__name__)

#: Runs per ``runs/list`` page: the Jobs API's maximum ``limit``.
PAGE = 25
#: Pages per list at most (5,000 active runs). A longer list is incomplete: a run missing from it is not
#: taken for ended, its waiter reads it on its own schedule instead.
MAX_PAGES = 200

ListPage = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
#: Opens one HTTP session for the pages of one list and yields the page call.
ListSession = Callable[[], AbstractAsyncContextManager[ListPage]]


class WorkspaceWatch:
    """The active submitted runs of one workspace, listed once per period for every waiter."""

    def __init__(self, session: ListSession, *, period: float, linger: float, min_waiters: int,
                 name: str = "") -> None:
        self.session = session
        self.period = period
        self.linger = linger
        self.min_waiters = max(1, min_waiters)
        self.name = name
        self.loop = asyncio.get_running_loop()
        self.waiters: dict[int, int] = {}
        #: time.monotonic() at the *start* of the last complete list (0 before the first): a run known to
        #: exist before that instant is in it unless it had ended.
        self.listed_at = 0.0
        self.active: dict[int, dict[str, Any]] = {}
        #: Whether the last list held every page (see MAX_PAGES).
        self.complete = True
        #: The last failed list, when it is newer than the last complete one (an outage, a 429).
        self.error: TransientBackendError | None = None
        self.error_at = 0.0
        #: The list stopped for good (a refused token, a removed permission): waiters read their own runs.
        self.broken: BaseException | None = None
        self.requests = 0
        self.lists = 0
        #: How long the recent lists took, first page to last (seconds).
        self.durations: deque[float] = deque(maxlen=20)
        self._changed = Broadcast()
        self._task: asyncio.Task[None] | None = None
        self._idle_since: float | None = None

    @property
    def closed(self) -> bool:
        return self._task is not None and self._task.done()

    @property
    def count(self) -> int:
        return sum(self.waiters.values())

    @property
    def shared(self) -> bool:
        """Whether the waiters use the list (enough of them, and the list is running)."""
        return self.count >= self.min_waiters and not self.closed and self.broken is None

    def join(self, run_id: int, period: float) -> None:
        self.waiters[run_id] = self.waiters.get(run_id, 0) + 1
        # The quickest waiter sets the pace: no waiter's schedule may be outrun by the list.
        self.period = min(self.period, period)
        self._idle_since = None
        if self._task is None:
            self._task = self.loop.create_task(self._run(), name=f"databricks-watch-{self.name}")
        elif self.count == self.min_waiters:
            self._signal()  # enough waiters now: the list starts at once

    def leave(self, run_id: int) -> None:
        left = self.waiters.get(run_id, 0) - 1
        if left > 0:
            self.waiters[run_id] = left
        else:
            self.waiters.pop(run_id, None)
        if not self.waiters:
            self._idle_since = time.monotonic()

    async def changed(self, timeout: float) -> None:
        """Return after the next list (or failed list), or after ``timeout`` seconds."""
        await self._changed.wait(timeout)

    def _signal(self) -> None:
        self._changed.fire()

    async def _list(self) -> tuple[dict[int, dict[str, Any]], bool]:
        params: dict[str, Any] = {"active_only": "true", "run_type": "SUBMIT_RUN", "limit": PAGE}
        found: dict[int, dict[str, Any]] = {}
        async with self.session() as list_page:  # one connection for all pages of a list
            for _ in range(MAX_PAGES):
                self.requests += 1
                page = await list_page(params)
                for run in page.get("runs") or []:
                    found[int(run["run_id"])] = run
                token = page.get("next_page_token")
                if not page.get("has_more") or not token:
                    return found, True
                params = {**params, "page_token": token}
        log.warning("databricks: more than %d active runs in workspace %s; the shared list is incomplete, "
                    "waiting runs beyond it are read one by one", PAGE * MAX_PAGES, self.name)
        return found, False

    def _wanted(self) -> bool:
        return bool(self.waiters) or self._idle_since is None or time.monotonic() - self._idle_since < self.linger

    async def _run(self) -> None:
        try:
            while self._wanted():
                if self.count < self.min_waiters:
                    # Too few waiters to be worth a list: each reads its own run until more join.
                    await self.changed(min(1.0, self.linger))
                    continue
                started = time.monotonic()
                try:
                    found, complete = await self._list()
                except TransientBackendError as exc:
                    log.warning("databricks: listing the active runs of %s failed: %s", self.name, exc)
                    self.error, self.error_at = exc, started
                    self._signal()
                    await asyncio.sleep(max(0.0, started + max(self.period, exc.retry_after or 0)
                                            - time.monotonic()))
                    continue
                except Exception as exc:  # a refused token, a removed permission: waiters fall back to reads
                    log.warning("databricks: the shared run list of %s stopped: %s", self.name, exc)
                    self.broken = exc
                    return
                self.active, self.complete, self.listed_at = found, complete, started
                self.error, self.lists = None, self.lists + 1
                self.durations.append(time.monotonic() - started)
                self._signal()
                # Lists start every period (not period after the last one ended) and earlier by as long as
                # a list takes: a waiter due at its last check + its cap finds the next list *done* by then
                # (a run's end is known a list's duration after the list started).
                took = max(self.durations)
                await asyncio.sleep(max(0.0, started + max(self.period / 4, self.period - took) - time.monotonic()))
        finally:
            self.listed_at = 0.0
            self._signal()


#: Live watches by (event loop, workspace key).
_WATCHES: dict[tuple[int, str], WorkspaceWatch] = {}


def watch_for(key: str, session: Callable[[], ListSession], *, period: float, linger: float,
              min_waiters: int) -> WorkspaceWatch:
    """The running loop's watch of the workspace ``key`` (host and a digest of the credentials)."""
    loop = asyncio.get_running_loop()
    slot = (id(loop), key)
    watch = _WATCHES.get(slot)
    if watch is None or watch.closed or watch.broken is not None or watch.loop is not loop:
        watch = _WATCHES[slot] = WorkspaceWatch(session(), period=period, linger=linger,
                                                min_waiters=min_waiters, name=key.split("#", 1)[0])
    return watch


def live_watches() -> list[WorkspaceWatch]:
    """The watches that are still running (for tests and the benchmark)."""
    return [w for w in _WATCHES.values() if not w.closed]
