"""Pure parts of the Databricks backend that read what the Jobs API answers: run states, errors, polling.

Nothing here does I/O, so each piece is table-tested in ``tests/unit/test_databricks_backend.py``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from airflow_remote_ml.core.poll import PollPolicy
from airflow_remote_ml.core.status import RunState, RunStatus

log = logging.getLogger(__name__)

# -- run states ------------------------------------------------------------------------------------------

#: ``state.life_cycle_state`` of a Jobs API run → our state, for the states that need no result_state.
#: (Jobs API reference, ``RunLifeCycleState``.) TERMINATED is decided by ``result_state``.
LIFE_CYCLE_STATES: dict[str, RunState] = {
    # "The run is queued" (queueing enabled, a concurrency limit reached).
    "QUEUED": RunState.QUEUED,
    # "The run has been triggered ... the cluster and execution context are being prepared."
    "PENDING": RunState.QUEUED,
    # "The run is blocked on an upstream dependency."
    "BLOCKED": RunState.QUEUED,
    # "The run is waiting for a retry." The run is not over: the service starts another attempt.
    "WAITING_FOR_RETRY": RunState.QUEUED,
    "RUNNING": RunState.RUNNING,
    # "The task of this run has completed, and the cluster and execution context are being cleaned up."
    # Kept non-terminal like the provider's RunState: cancel and the run page still refer to a live run.
    "TERMINATING": RunState.RUNNING,
    # "This run was aborted because a previous run of the same job was already active."
    "SKIPPED": RunState.FAILED,
    # "An exceptional state that indicates a failure in the Jobs service."
    "INTERNAL_ERROR": RunState.FAILED,
}

#: ``state.result_state`` of a TERMINATED run → our state (``RunResultState``).
#: SUCCESS_WITH_FAILURES is decided by the ``success_with_failures_is_success`` setting.
RESULT_STATES: dict[str, RunState] = {
    "SUCCESS": RunState.SUCCEEDED,
    "FAILED": RunState.FAILED,
    "TIMEDOUT": RunState.FAILED,
    "CANCELED": RunState.CANCELLED,
    "MAXIMUM_CONCURRENT_RUNS_REACHED": RunState.FAILED,
    "EXCLUDED": RunState.FAILED,
    "UPSTREAM_FAILED": RunState.FAILED,
    "UPSTREAM_CANCELED": RunState.CANCELLED,
    "DISABLED": RunState.FAILED,
}

#: The Jobs API 2.2 ``status.state`` (``RunLifecycleStateV2State``), used when ``life_cycle_state`` is
#: missing or is a value this version does not know.
STATUS_STATES: dict[str, RunState] = {
    "QUEUED": RunState.QUEUED,
    "PENDING": RunState.QUEUED,
    "BLOCKED": RunState.QUEUED,
    "WAITING": RunState.QUEUED,
    "RUNNING": RunState.RUNNING,
    "TERMINATING": RunState.RUNNING,
}

#: ``status.termination_details.code`` → our state, for a terminated run whose result_state is unknown.
_TERMINATION_CODES: dict[str, RunState] = {
    "SUCCESS": RunState.SUCCEEDED,
    "USER_CANCELED": RunState.CANCELLED,
    "CANCELED": RunState.CANCELLED,
}

_EXPLANATIONS = {
    "SKIPPED": "the run was skipped (a previous run of the same job was already active)",
    "INTERNAL_ERROR": "the Jobs service failed (INTERNAL_ERROR)",
    "TIMEDOUT": "the run timed out on Databricks",
    "MAXIMUM_CONCURRENT_RUNS_REACHED": "the run was not started: maximum concurrent runs reached",
    "EXCLUDED": "the run was excluded (its run conditions were not met)",
    "UPSTREAM_FAILED": "an upstream task failed",
    "UPSTREAM_CANCELED": "an upstream task was cancelled",
    "DISABLED": "the run was disabled and never executed",
    "SUCCESS_WITH_FAILURES": "the run succeeded with failures (some tasks failed); "
    "set success_with_failures_is_success=True to accept it",
}

_warned: set[tuple[str, str]] = set()


def _warn_once(run_id: Any, text: str) -> None:
    key = (str(run_id), text)
    if key not in _warned:
        _warned.add(key)
        log.warning("databricks run %s: %s; still waiting", run_id, text)


#: Result states that say why a run ended without the step's own code failing: they become the reason.
_REASON_RESULTS = frozenset(
    {"TIMEDOUT", "CANCELED", "UPSTREAM_CANCELED", "UPSTREAM_FAILED", "MAXIMUM_CONCURRENT_RUNS_REACHED",
     "EXCLUDED", "DISABLED"}
)
#: ``status.termination_details.code`` values that are no reason of their own: success, the task's own
#: failure (RUN_EXECUTION_ERROR: "the run was completed with task failures"), a user's cancel.
_PLAIN_CODES = frozenset({"", "SUCCESS", "SUCCESS_WITH_FAILURES", "RUN_EXECUTION_ERROR", "USER_CANCELED",
                          "CANCELED", "SKIPPED"})
#: What Databricks shows when the driver died, most often of memory (its JVM or Python process was killed).
DRIVER_STOPPED = "The spark driver has stopped unexpectedly"
_OOM_HINT = (
    "the driver most likely ran out of memory: give it a node type with more memory (compute.memory, a "
    "profile's node_type_id or driver_node_type_id), or collect less data to the driver"
)


def failure_reason(life: str, result: Any, status: Mapping[str, Any]) -> str:
    """The platform's own word for why a run ended (``RunStatus.reason``), or ``""`` when the step's code did.

    ``INTERNAL_ERROR``/``SKIPPED`` life cycle states, the result states of :data:`_REASON_RESULTS`, and the
    2.2 ``termination_details.code`` of a platform failure (``DRIVER_ERROR``, ``CLUSTER_ERROR``,
    ``LIBRARY_INSTALLATION_ERROR``, ``CLOUD_FAILURE``, ``INTERNAL_ERROR``...: ``TerminationCodeCode``).
    """
    if life in ("INTERNAL_ERROR", "SKIPPED"):
        return life
    if result in _REASON_RESULTS:
        return str(result)
    code = str((status.get("termination_details") or {}).get("code") or "")
    return "" if code in _PLAIN_CODES else code


def with_reason(status: RunStatus, run: Mapping[str, Any]) -> RunStatus:
    """``status`` with the platform's reason and, for a stopped driver, what to do about it."""
    if not status.is_terminal or status.is_successful:
        return status
    state = run.get("state") or {}
    v2 = run.get("status") or {}
    reason = failure_reason(str(state.get("life_cycle_state") or ""), state.get("result_state"), v2)
    if not reason:
        return status
    details = str((v2.get("termination_details") or {}).get("message") or "")
    message = status.message
    if details and details not in message:
        message = _join(message, details)
    if DRIVER_STOPPED in message and _OOM_HINT not in message:
        message = f"{message} ({_OOM_HINT})"
    return RunStatus(status.state, status.remote_state, message, status.exit_code, reason)


def status_from_run(run: Mapping[str, Any], *, success_with_failures_is_success: bool = False) -> RunStatus:
    """Map a raw ``runs/get`` (or ``runs/list`` entry) answer to a :class:`RunStatus`.

    Parsed from the raw JSON on purpose: the provider's ``RunState`` raises on a life-cycle state it does
    not know, and a new state must keep the wait going (with a warning), never crash it. A run the platform
    ended carries its reason (:func:`failure_reason`).
    """
    return with_reason(_status_from_run(run, success_with_failures_is_success), run)


def _status_from_run(run: Mapping[str, Any], success_with_failures_is_success: bool) -> RunStatus:
    state = run.get("state") or {}
    status = run.get("status") or {}
    life = str(state.get("life_cycle_state") or "")
    result = state.get("result_state")
    message = str(state.get("state_message") or "")
    run_id = run.get("run_id", "?")
    remote = f"{life}/{result}" if result else life

    if (
        life == "TERMINATED"
        or (not life and status.get("state") == "TERMINATED")
        or (life not in LIFE_CYCLE_STATES and status.get("state") == "TERMINATED")
    ):
        return _terminated(
            run_id, remote or "TERMINATED", result, message, status, success_with_failures_is_success
        )
    if life in LIFE_CYCLE_STATES:
        mapped = LIFE_CYCLE_STATES[life]
        if mapped.is_terminal:
            return RunStatus(mapped, remote, _join(_EXPLANATIONS.get(life, life), message))
        return RunStatus(mapped, remote, message)
    # A life-cycle state newer than this code: fall back to the 2.2 status object, else keep waiting.
    v2 = str(status.get("state") or "")
    if v2 in STATUS_STATES:
        if life:
            _warn_once(run_id, f"unknown life_cycle_state {life!r} (status.state {v2})")
        return RunStatus(STATUS_STATES[v2], remote or v2, message)
    _warn_once(run_id, f"unknown life_cycle_state {life or '(none)'!r}")
    return RunStatus(RunState.RUNNING, remote or "UNKNOWN", message)


def _terminated(
    run_id: Any,
    remote: str,
    result: Any,
    message: str,
    status: Mapping[str, Any],
    success_with_failures_is_success: bool,
) -> RunStatus:
    if result == "SUCCESS_WITH_FAILURES":
        if success_with_failures_is_success:
            return RunStatus(RunState.SUCCEEDED, remote, message)
        return RunStatus(RunState.FAILED, remote, _join(_EXPLANATIONS[result], message))
    if result in RESULT_STATES:
        mapped = RESULT_STATES[result]
        if mapped is RunState.SUCCEEDED:
            return RunStatus(mapped, remote, message)
        return RunStatus(mapped, remote, _join(_EXPLANATIONS.get(result, ""), message) or str(result))
    # A result state this version does not know (or none yet): the 2.2 termination details decide.
    details = status.get("termination_details") or {}
    code = str(details.get("code") or "")
    if code in _TERMINATION_CODES:
        if result:
            _warn_once(run_id, f"unknown result_state {result!r}, decided by termination code {code}")
        return RunStatus(_TERMINATION_CODES[code], remote, message or str(details.get("message") or ""))
    if code:
        return RunStatus(
            RunState.FAILED,
            remote,
            _join(f"terminated with code {code}", message or str(details.get("message") or "")),
        )
    if result:
        return RunStatus(
            RunState.FAILED, remote, _join(f"terminated with unknown result_state {result}", message)
        )
    # TERMINATED without any result yet: the answer is incomplete; look again rather than guess.
    _warn_once(run_id, "TERMINATED without result_state")
    return RunStatus(RunState.RUNNING, remote, message)


def _join(*parts: str) -> str:
    return ": ".join(p for p in parts if p)


def task_run_id(run: Mapping[str, Any], task_key: str | None = None) -> int | None:
    """The run id of the (single) task of a submitted run: ``runs/get-output`` needs it."""
    tasks = run.get("tasks") or []
    for task in tasks:
        if task_key is None or task.get("task_key") == task_key:
            return int(task["run_id"])
    return None


_EXIT_CODE_RE = re.compile(r"exit(?:ed)? (?:with )?(?:exit )?code:? ?(-?\d+)", re.IGNORECASE)


def exit_code_from(text: str | None) -> int | None:
    """An exit code mentioned in an error text ("Python process exited with exit code 7.")."""
    if not text:
        return None
    match = _EXIT_CODE_RE.search(text)
    return int(match.group(1)) if match else None


def metrics_from_logs(text: str) -> dict[str, Any]:
    """JSON objects printed one per line (the runtime's metrics convention), for tasks without a manifest."""
    metrics: dict[str, Any] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                metrics.update(value)
    return metrics


# -- errors --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiErrorInfo:
    """An HTTP error of the Jobs API: ``{"error_code", "message"}``, status and Retry-After."""

    status: int | None
    error_code: str = ""
    message: str = ""
    retry_after: float | None = None

    @property
    def transient(self) -> bool:
        return self.status is None or self.status == 429 or self.status >= 500

    @property
    def not_found(self) -> bool:
        """``runs/get`` on an unknown id answers 400 INVALID_PARAMETER_VALUE "Run N does not exist."."""
        if self.status == 404 or self.error_code == "RESOURCE_DOES_NOT_EXIST":
            return True
        return self.status == 400 and "does not exist" in self.message


_BODY_RE = re.compile(r"Response: (.*), Status Code: (\d+)\s*$", re.DOTALL)


def parse_error_body(text: str) -> tuple[str, str]:
    """``(error_code, message)`` from a documented error body (or from the hook's wrapped message)."""
    match = _BODY_RE.search(text)
    if match:
        text = match.group(1)
    try:
        body = json.loads(text)
    except ValueError:
        return "", text.strip()
    if isinstance(body, dict):
        return str(body.get("error_code") or ""), str(body.get("message") or "")
    return "", text.strip()


# -- polling -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatabricksPollPolicy(PollPolicy):
    """Checks where a run is likely to end, never further apart than the provider's 30 s.

    The provider's ``DatabricksSubmitRunOperator`` looks every 30 s, so it notices a run's end up to 30 s late
    whatever its length, and makes about 20 checks per 10 minutes. This schedule spends a few checks early,
    where short runs on a warm cluster end (``first_delay``, then ×``factor``: at 3 and 12 s), then joins the
    ``cap`` grid (30, 60, 90, ... s): its checks include every check time of a 30 s loop started with it, so at
    every run length it notices the end no later than the provider does, for about the same number of calls
    (22 checks over 10 minutes vs its 21). Optionally, for ``quick_window`` seconds the checks come every
    ``first_delay`` growing to at most ``quick_delay`` (off by default). A longer ``Retry-After`` always wins.
    """

    first_delay: float = 3.0
    factor: float = 3.0
    cap: float = 30.0
    quick_delay: float = 3.0
    quick_window: float = 0.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        base = self.schedule(max(0, attempt) + 1)[-1]
        if retry_after is not None and retry_after > base:
            return float(retry_after)
        return base

    def schedule(self, checks: int) -> list[float]:
        """The first ``checks`` delays (pure; used by :meth:`delay` and by the benchmark)."""
        delays: list[float] = []
        elapsed = 0.0
        quick = self.first_delay
        for _ in range(checks):
            if elapsed >= self.cap:
                delay = self.cap  # on the grid: every check at a multiple of cap
            elif elapsed < self.quick_window:
                delay = min(quick, self.quick_delay, self.cap)
                quick += self.first_delay
            else:
                delay = min(self.cap, delays[-1] * self.factor if delays else self.first_delay)
            if elapsed < self.cap < elapsed + delay:
                delay = self.cap - elapsed  # land on the cap grid: every later check is at a multiple of cap
            delays.append(delay)
            elapsed += delay
        return delays

    def worst_delay(self, horizon: float) -> float:
        """The longest a run ending at any time up to ``horizon`` goes unnoticed (the widest gap)."""
        worst, elapsed = 0.0, 0.0
        for delay in self.schedule(10_000):
            worst = max(worst, delay)
            elapsed += delay
            if elapsed >= horizon:
                return worst
        return worst

    def checks_until(self, duration: float) -> int:
        """How many checks it takes until one falls at or after ``duration`` seconds."""
        elapsed = 0.0
        for count, delay in enumerate(self.schedule(100_000), start=1):
            elapsed += delay
            if elapsed >= duration:
                return count
        raise ValueError(f"{duration} s is beyond the schedule")
