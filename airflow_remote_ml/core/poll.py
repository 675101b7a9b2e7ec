"""When to ask a remote system again. Pure: no clock, no sleeping, shared by the sync wait and the trigger."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC
from typing import Any


@dataclass(frozen=True)
class PollPolicy:
    """Exponential backoff from ``first_delay`` up to ``cap`` seconds.

    The first checks come quickly so a short job is noticed within seconds; a long job is then asked
    at most every ``cap`` seconds. A ``Retry-After`` from the server always wins when it is longer.
    """

    first_delay: float = 0.5
    factor: float = 1.5
    cap: float = 10.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before check number ``attempt`` (0-based)."""
        base = min(self.cap, self.first_delay * (self.factor ** max(0, attempt)))
        if retry_after is not None and retry_after > base:
            return float(retry_after)
        return base

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> PollPolicy:
        return cls(**data) if data else cls()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from datetime import datetime
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class TransientBudget:
    """How long one streak of transient API errors (429, 5xx, timeouts) is borne before giving up.

    One budget for every call of a step's life, so a submit weathers the same outage a wait does: the
    budget is time since the first error of the current streak, not a count (a count of 10 was 15 s at
    submission and minutes during a wait, depending only on the backoff in between). Pure: the caller
    passes the clock's readings.
    """

    def __init__(self, seconds: float = 300.0) -> None:
        self.seconds = float(seconds)
        self.streak_started: float | None = None
        self.errors = 0

    def ok(self) -> None:
        """A call went through: the streak is over."""
        self.streak_started = None
        self.errors = 0

    def failed(self, now: float) -> bool:
        """Count one transient error at ``now``; False once the streak has lasted longer than the budget."""
        if self.streak_started is None:
            self.streak_started = now
        self.errors += 1
        return now - self.streak_started <= self.seconds

    def left(self, now: float) -> float:
        """Seconds of budget left in the current streak (the whole budget when there is none)."""
        if self.streak_started is None:
            return self.seconds
        return max(0.0, self.seconds - (now - self.streak_started))


class Broadcast:
    """Wakes every coroutine waiting for the next round of a shared query (a list serving many steps).

    A fresh event per round: a waiter that arrives after a round waits for the next one, never returns at
    once on an old one. Used by the Databricks and Valohai shared watches (their ``_shared`` modules).
    """

    def __init__(self) -> None:
        import asyncio

        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Return after the next :meth:`fire`, or after ``timeout`` seconds."""
        import asyncio
        import contextlib

        event = self._event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), max(0.0, timeout))

    def fire(self, *, last: bool = False) -> None:
        """Wake every current waiter; ``last``: the query stopped, so waiters never wait on it again."""
        import asyncio

        self._event.set()
        if not last:
            self._event = asyncio.Event()
