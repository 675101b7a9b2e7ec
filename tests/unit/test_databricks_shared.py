"""The shared run list of waiting Databricks runs (backends/databricks/_shared.py), without a server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from airflow_remote_ml.backends.databricks import _shared
from airflow_remote_ml.backends.databricks._shared import WorkspaceWatch
from airflow_remote_ml.core.errors import BackendAPIError, TransientBackendError


class Pages:
    """A runs/list that answers from a script of pages (or raises), recording every request."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.params: list[dict[str, Any]] = []
        self.sessions = 0

    def session(self) -> Any:
        @contextlib.asynccontextmanager
        async def opened() -> AsyncIterator[Any]:
            self.sessions += 1

            async def page(params: dict[str, Any]) -> dict[str, Any]:
                self.params.append(dict(params))
                answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
                if isinstance(answer, BaseException):
                    raise answer
                return answer

            yield page

        return opened


def _runs(*ids: int) -> list[dict[str, Any]]:
    return [{"run_id": i, "state": {"life_cycle_state": "RUNNING"}} for i in ids]


async def _first_list(watch: WorkspaceWatch, *run_ids: int) -> None:
    for run_id in run_ids:
        watch.join(run_id, 60.0)
    for _ in range(100):
        if watch.lists or watch.error or watch.broken:
            return
        await watch.changed(1.0)


def test_a_list_follows_next_page_token_until_has_more_is_false_in_one_session() -> None:
    pages = Pages({"runs": _runs(3, 2), "has_more": True, "next_page_token": "t2"},
                  {"runs": _runs(1), "has_more": False})

    async def scenario() -> WorkspaceWatch:
        watch = WorkspaceWatch(pages.session(), period=60, linger=0, min_waiters=2)
        await _first_list(watch, 1, 2)
        watch.leave(1)
        watch.leave(2)
        return watch

    watch = asyncio.run(scenario())
    assert sorted(watch.active) == [1, 2, 3] and watch.complete
    assert pages.params == [{"active_only": "true", "run_type": "SUBMIT_RUN", "limit": 25},
                            {"active_only": "true", "run_type": "SUBMIT_RUN", "limit": 25, "page_token": "t2"}]
    assert pages.sessions == 1


def test_a_list_longer_than_max_pages_is_incomplete(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_shared, "MAX_PAGES", 2)
    pages = Pages({"runs": _runs(9), "has_more": True, "next_page_token": "more"})

    async def scenario() -> WorkspaceWatch:
        watch = WorkspaceWatch(pages.session(), period=60, linger=0, min_waiters=1)
        await _first_list(watch, 1)
        watch.leave(1)
        return watch

    watch = asyncio.run(scenario())
    assert not watch.complete and len(pages.params) == 2


def test_a_transient_failure_is_kept_for_the_waiters_and_a_refusal_stops_the_list() -> None:
    down = TransientBackendError("databricks", "503 TEMPORARILY_UNAVAILABLE", 503, retry_after=None)
    refused = BackendAPIError("databricks", "403 Invalid access token.", 403)

    async def scenario(answer: BaseException) -> WorkspaceWatch:
        watch = WorkspaceWatch(Pages(answer).session(), period=60, linger=0, min_waiters=1)
        await _first_list(watch, 1)
        watch.leave(1)
        return watch

    failed = asyncio.run(scenario(down))
    assert failed.error is down and failed.broken is None and failed.listed_at == 0.0
    stopped = asyncio.run(scenario(refused))
    assert stopped.broken is refused and not stopped.shared


def test_too_few_waiters_make_no_list() -> None:
    pages = Pages({"runs": [], "has_more": False})

    async def scenario() -> WorkspaceWatch:
        watch = WorkspaceWatch(pages.session(), period=60, linger=0, min_waiters=2)
        watch.join(1, 60.0)
        await asyncio.sleep(0.05)
        assert not watch.shared and pages.params == []  # one waiter reads its own run
        watch.join(2, 60.0)  # the second waiter starts the list at once
        await _first_list(watch)
        watch.leave(1)
        watch.leave(2)
        return watch

    watch = asyncio.run(scenario())
    assert watch.lists >= 1 and len(pages.params) >= 1
