"""One status model for every backend, and the values that cross process boundaries.

``RunHandle``, ``RunStatus`` and ``StepResult`` survive a JSON round-trip: they travel through the task
state store, trigger kwargs, trigger events and XCom.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RunState(enum.StrEnum):
    """Where a remote job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"

    @property
    def is_terminal(self) -> bool:
        return self not in (RunState.QUEUED, RunState.RUNNING)


@dataclass(frozen=True)
class RunStatus:
    """A backend's answer to "how is the job doing?".

    ``remote_state`` is the backend's own word for it (``Pending``, ``TERMINATED/FAILED``, ...), kept for
    logs and error messages; ``message`` says why, when the backend tells.

    ``reason`` is the platform's own specific cause of a failure, in its own word (``OOMKilled``,
    ``Evicted``, ``ErrImagePull``, ``INTERNAL_ERROR``, Valohai ``crashed``...). A status with a reason is
    what the task's error leads with: it outranks the generic error the in-step runtime may have
    recorded (a kernel OOM kill of the step's child leaves the runtime alive to write "exit code 137").
    """

    state: RunState
    remote_state: str = ""
    message: str = ""
    exit_code: int | None = None
    reason: str = ""

    @property
    def is_terminal(self) -> bool:
        return self.state.is_terminal

    @property
    def is_successful(self) -> bool:
        return self.state is RunState.SUCCEEDED

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "remote_state": self.remote_state,
            "message": self.message,
            "exit_code": self.exit_code,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunStatus:
        return cls(
            state=RunState(data["state"]),
            remote_state=data.get("remote_state", ""),
            message=data.get("message", ""),
            exit_code=data.get("exit_code"),
            reason=data.get("reason", ""),
        )


@dataclass(frozen=True)
class RunHandle:
    """Enough to find a submitted job again, from any process.

    ``data`` is backend-specific and JSON-serialisable (namespace, cluster, manifest URI, ...).
    """

    backend: str
    job_id: str
    url: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "job_id": self.job_id, "url": self.url, "data": dict(self.data)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunHandle:
        return cls(backend=data["backend"], job_id=data["job_id"], url=data.get("url"),
                   data=dict(data.get("data") or {}))


@dataclass(frozen=True)
class LogChunk:
    """New log lines and the cursor to ask for the ones after them.

    ``more``: the read stopped at a size bound with more output already there; the waiting loops read again
    at once (a backend that bounds its reads keeps a long log out of memory without losing its end).
    """

    lines: list[str]
    cursor: Any = None
    more: bool = False


@dataclass(frozen=True)
class StepResult:
    """What a finished step hands to the next one. Its ``to_xcom()`` stays a few KB whatever the data."""

    outputs: dict[str, str]
    metrics: dict[str, Any]
    backend: str
    job_id: str
    url: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)

    def to_xcom(self) -> dict[str, Any]:
        return {
            "outputs": dict(self.outputs),
            "metrics": dict(self.metrics),
            "backend": self.backend,
            "job_id": self.job_id,
            "url": self.url,
        }
