"""The one trigger that waits for any backend's job in the triggerer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_remote_ml.core.errors import ConfigError
from airflow_remote_ml.core.poll import PollPolicy
from airflow_remote_ml.core.registry import create_backend
from airflow_remote_ml.core.status import RunHandle
from airflow_remote_ml.core.wait import await_completion

CLASSPATH = "airflow_remote_ml.triggers.RemoteStepTrigger"


class RemoteStepTrigger(BaseTrigger):
    """Waits for a remote job to end, streaming its logs into the task log, and fires one event.

    Args:
        backend: the backend's registered name.
        backend_config: plain data that rebuilds the backend (``Backend.config_json()``).
        handle: the job's :class:`RunHandle` as JSON.
        deadline: wall-clock time (epoch seconds) after which the job is cancelled as timed out.
        log_cursor: where log streaming resumes (from the worker, or an earlier trigger run).
        poll_policy: overrides the backend's poll policy (JSON of :class:`PollPolicy`).

    The event payload is ``{"status", "handle", "tail", "cursor", "timed_out", "error"}``.
    """

    def __init__(
        self,
        *,
        backend: str,
        backend_config: dict[str, Any],
        handle: dict[str, Any],
        deadline: float | None = None,
        log_cursor: Any = None,
        poll_policy: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(backend, str) or not backend:
            raise ConfigError("backend", f"{backend!r} is not a backend name", "pass the backend's name")
        self.backend_name = backend
        self.backend_config = dict(backend_config or {})
        self.handle = RunHandle.from_json(handle)  # fails now, not in the triggerer, on a bad handle
        self.deadline = float(deadline) if deadline is not None else None
        self.log_cursor = log_cursor
        self.poll_policy = PollPolicy.from_json(poll_policy) if poll_policy else None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            CLASSPATH,
            {
                "backend": self.backend_name,
                "backend_config": self.backend_config,
                "handle": self.handle.to_json(),
                "deadline": self.deadline,
                "log_cursor": self.log_cursor,
                "poll_policy": self.poll_policy.to_json() if self.poll_policy else None,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        backend = create_backend(self.backend_name, self.backend_config)
        payload: dict[str, Any] = {"handle": self.handle.to_json(), "timed_out": False, "error": None,
                                   "tail": [], "cursor": self.log_cursor, "status": None}
        try:
            deadline = None
            if self.deadline is not None:
                deadline = time.monotonic() + (self.deadline - time.time())
            outcome = await await_completion(
                backend, self.handle, on_line=lambda line: self.log.info("%s", line),
                deadline=deadline, cursor=self.log_cursor, policy=self.poll_policy,
            )
            status = outcome.status
            if outcome.timed_out:
                self.log.warning("Deadline reached; cancelling remote job %s", self.handle.job_id)
                await backend.acancel(self.handle)
                status = await backend.apoll(self.handle)
            payload.update(status=status.to_json(), tail=outcome.tail, cursor=outcome.cursor,
                           timed_out=outcome.timed_out)
        except Exception as exc:  # the task must hear about it, not the triggerer's log only
            self.log.exception("Waiting for remote job %s failed", self.handle.job_id)
            payload["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            await backend.aclose()
        yield TriggerEvent(payload)

    async def on_kill(self) -> None:
        """A user killed the deferred task (mark failed/success, clear): stop the remote job too."""
        backend = create_backend(self.backend_name, self.backend_config)
        try:
            self.log.info("Task killed by a user; cancelling remote job %s", self.handle.job_id)
            await backend.acancel(self.handle)
        finally:
            await backend.aclose()
