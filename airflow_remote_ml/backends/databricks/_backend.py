"""The ``databricks`` backend: a step becomes one Databricks job run (``runs/submit``).

All HTTP goes through the provider's ``DatabricksHook`` (sync in the worker, its ``a_`` methods in the
trigger), so authentication (PAT, service-principal OAuth, Azure AD) and retries are the provider's.
The backend adds what the hook lacks: retries that wait for the server's ``Retry-After``, one choke
point that maps errors to ours, raw state parsing that survives new states, and a poll schedule.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import requests
from airflow.providers.databricks.hooks.databricks import DatabricksHook
from tenacity import stop_after_attempt, wait_exponential

from airflow_remote_ml import runtime
from airflow_remote_ml.backends.databricks._payload import (
    NAME,
    OPTION_NAMES,
    DatabricksConfig,
    build_submit_payload,
    matches_identity,
    parse_description,
    task_key,
    validate_request,
)
from airflow_remote_ml.backends.databricks._states import (
    ApiErrorInfo,
    DatabricksPollPolicy,
    exit_code_from,
    metrics_from_logs,
    parse_error_body,
    status_from_run,
    task_run_id,
)
from airflow_remote_ml.core.artifacts import is_local, local_path
from airflow_remote_ml.core.backend import Backend, StepRequest, result_from_manifest
from airflow_remote_ml.core.errors import (
    ArtifactError,
    BackendAPIError,
    ConfigError,
    RemoteMLError,
    TransientBackendError,
)
from airflow_remote_ml.core.identity import StepIdentity
from airflow_remote_ml.core.poll import PollPolicy, parse_retry_after
from airflow_remote_ml.core.status import LogChunk, RunHandle, RunState, RunStatus, StepResult

log = logging.getLogger(__name__)

#: ``dbfs/read`` returns at most 1 MB per call.
DBFS_READ_CHUNK = 1 << 20
#: Paths that only exist inside a workspace: Airflow reaches them through ``local_mounts`` or an API.
_WORKSPACE_ONLY = ("/Volumes/", "/Workspace/", "/dbfs/")


class _NotFound(Exception):
    """The run (or file) does not exist: 400 "Run N does not exist.", 404, RESOURCE_DOES_NOT_EXIST."""


# -- retries that honour Retry-After --------------------------------------------------------------------


def retry_after_of(exc: BaseException | None) -> float | None:
    """Seconds from the ``Retry-After`` header of a ``requests`` or ``aiohttp`` HTTP error, if any."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) if response is not None else getattr(exc, "headers", None)
    if not headers:
        return None
    return parse_retry_after(headers.get("Retry-After"))


class RetryAfterWait:
    """A tenacity ``wait`` for the hook: exponential backoff, but never shorter than ``Retry-After``.

    The hook retries 429/5xx by itself yet ignores ``Retry-After``; plugging this in keeps its retries
    and makes them polite.
    """

    def __init__(self, minimum: float, maximum: float, max_retry_after: float) -> None:
        self._backoff = wait_exponential(min=minimum, max=maximum)
        self.max_retry_after = max_retry_after

    def __call__(self, retry_state: Any) -> float:
        base = float(self._backoff(retry_state))
        outcome = retry_state.outcome
        retry_after = retry_after_of(outcome.exception()) if outcome is not None and outcome.failed else None
        if retry_after is not None:
            return max(base, min(retry_after, self.max_retry_after))
        return base


def error_info(exc: BaseException) -> ApiErrorInfo | None:
    """What went wrong in a hook call, or None for errors that are not about HTTP (bugs, config)."""
    from tenacity import RetryError

    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, RetryError):
        if cause is not exc and isinstance(cause, requests.HTTPError | requests.ConnectionError):
            break
        cause = cause.__cause__
    if isinstance(cause, RetryError):
        # The hook gave up after its retries: the last attempt says why.
        cause = cause.last_attempt.exception()
    if cause is None:
        cause = exc
    status = getattr(exc, "http_status_code", None)
    response = getattr(cause, "response", None)
    if response is not None and getattr(response, "status_code", None) is not None:
        status = response.status_code
        code, message = parse_error_body(response.text or "")
        return ApiErrorInfo(status, code, message, retry_after_of(cause))
    aiohttp_status = getattr(cause, "status", None)
    if aiohttp_status is not None and hasattr(cause, "request_info"):  # aiohttp.ClientResponseError
        reason = str(getattr(cause, "message", ""))
        return ApiErrorInfo(int(aiohttp_status), "", reason, retry_after_of(cause))
    if isinstance(
        cause, requests.ConnectionError | requests.Timeout | asyncio.TimeoutError | ConnectionError
    ):
        return ApiErrorInfo(None, "", f"{type(cause).__name__}: {cause}")
    if type(cause).__name__ in ("ClientConnectorError", "ServerDisconnectedError", "ClientOSError"):
        return ApiErrorInfo(None, "", f"{type(cause).__name__}: {cause}")
    if status is not None:
        code, message = parse_error_body(str(exc))
        return ApiErrorInfo(int(status), code, message)
    return None


# -- run bookkeeping --------------------------------------------------------------------------------------


@dataclass
class _Seen:
    """What this backend instance last learnt about a run (saves calls; never needed for correctness)."""

    status: RunStatus
    #: The next check may reuse ``status``: the look-up right after submit/find doubles as the first check.
    fresh: bool = False
    task_run_id: int | None = None
    final: RunStatus | None = None
    output: dict[str, Any] | None = None
    #: Manifest watching: when the next Jobs API check is due (monotonic) and how many were made.
    next_api: float = 0.0
    api_checks: int = 0
    checks_since_manifest: int = 0


class DatabricksBackend(Backend):
    """Runs a step as a Databricks job run. See ``docs/backends/databricks.md``."""

    name: ClassVar[str] = NAME
    config_class = DatabricksConfig
    option_names = OPTION_NAMES
    poll_policy = DatabricksPollPolicy()
    has_job_page = True
    config: DatabricksConfig

    def __init__(self, config: DatabricksConfig) -> None:
        super().__init__(config)
        self.poll_policy = DatabricksPollPolicy(  # type: ignore[misc]
            first_delay=config.poll_first_delay,
            quick_delay=config.poll_quick_delay,
            quick_window=config.poll_quick_window,
            cap=config.poll_cap,
        )
        # While the manifest is watched, the Jobs API is only a fallback: a sparse schedule suffices.
        self.watch_policy = PollPolicy(first_delay=2 * config.poll_first_delay, factor=2.0,
                                       cap=config.poll_cap)
        version = config.api_version
        self._submit_ep = ("POST", f"{version}/jobs/runs/submit")
        self._get_ep = ("GET", f"{version}/jobs/runs/get")
        self._output_ep = ("GET", f"{version}/jobs/runs/get-output")
        self._cancel_ep = ("POST", f"{version}/jobs/runs/cancel")
        self._list_ep = ("GET", f"{version}/jobs/runs/list")
        self._hook: DatabricksHook | None = None
        self._ahook: DatabricksHook | None = None
        self._seen: dict[int, _Seen] = {}
        self._placed: set[str] = set()

    # -- the hook and the one place errors are mapped ----------------------------------------------------

    def _make_hook(self) -> DatabricksHook:
        retry_args = {
            "stop": stop_after_attempt(self.config.retry_limit),
            "wait": RetryAfterWait(
                self.config.retry_delay, 2**self.config.retry_limit, self.config.max_retry_after
            ),
        }
        return DatabricksHook(
            self.config.databricks_conn_id,
            timeout_seconds=self.config.request_timeout,
            retry_limit=self.config.retry_limit,
            retry_delay=self.config.retry_delay,
            retry_args=retry_args,
            caller="airflow-remote-ml",
        )

    def _mapped(self, exc: BaseException, action: str) -> BaseException:
        if isinstance(exc, RemoteMLError | _NotFound):
            return exc
        if "AirflowNotFoundException" in {c.__name__ for c in type(exc).__mro__}:
            return ConfigError(
                "databricks_conn_id",
                f"{exc}",
                f"create the Airflow connection {self.config.databricks_conn_id!r} (type databricks)",
            )
        info = error_info(exc)
        if info is None:
            return BackendAPIError(self.name, f"{action}: {exc}")
        if info.not_found:
            return _NotFound(info.message)
        text = f"{action}: {info.error_code + ': ' if info.error_code else ''}{info.message or exc}"
        if info.transient:
            return TransientBackendError(self.name, text, info.status, info.retry_after)
        if info.status in (401, 403):
            text += f" (check the credentials of the Airflow connection {self.config.databricks_conn_id!r})"
        return BackendAPIError(self.name, text, info.status)

    def _call(self, endpoint: tuple[str, str], payload: dict[str, Any], action: str) -> dict[str, Any]:
        if self._hook is None:
            self._hook = self._make_hook()
        try:
            return self._hook._do_api_call(endpoint, payload) or {}
        except Exception as exc:
            raise self._mapped(exc, action) from exc

    async def _acall(
        self, endpoint: tuple[str, str], payload: dict[str, Any], action: str, *, run_lookup: bool = False
    ) -> dict[str, Any]:
        """Async call. ``run_lookup``: the hook's async path drops error bodies, so a bare 400 on a
        ``run_id`` look-up is taken for the documented "Run N does not exist." (the only 400 such a
        request earns)."""
        if self._ahook is None:
            # One hook keeps the connection and any OAuth token cached across calls.
            self._ahook = self._make_hook()
        hook = self._ahook
        try:
            # A session per call: checks are seconds apart, and nothing leaks when a caller never
            # closes the backend (an aiohttp session also belongs to one event loop).
            async with hook:
                return await hook._a_do_api_call(endpoint, payload) or {}
        except Exception as exc:
            mapped = self._mapped(exc, action)
            if run_lookup and isinstance(mapped, BackendAPIError) and mapped.status_code == 400:
                raise _NotFound(str(mapped)) from exc
            raise mapped from exc

    # -- validation and submission -------------------------------------------------------------------------

    def validate(self, request: StepRequest) -> None:
        super().validate(request)
        validate_request(request, self.config)

    def _uses_runtime(self, request: StepRequest) -> bool:
        options = request.spec.options_for(self.name)
        return options.get("task", "spark_python_task") == "spark_python_task" and not options.get(
            "python_file"
        )

    def runtime_uri(self, request: StepRequest) -> str:
        """Where the runtime goes: content-addressed, so a new version never overwrites a running one."""
        digest = hashlib.sha256(runtime.source().encode()).hexdigest()[:12]
        directory = self.config.runtime_dir or _join(request.artifact_root, "_remote_ml")
        return _join(directory, f"remote_ml_runtime_v{runtime.PROTOCOL_VERSION}_{digest}.py")

    def submit(self, request: StepRequest) -> RunHandle:
        runtime_file = None
        if self._uses_runtime(request):
            runtime_file = self.runtime_uri(request)
            if self.config.upload_runtime and runtime_file not in self._placed:
                self._write(runtime_file, runtime.source().encode())
                self._placed.add(runtime_file)
        payload = build_submit_payload(request, self.config, runtime_file)
        answer = self._call(self._submit_ep, payload, "submitting the run")
        run_id = int(answer["run_id"])
        handle_data = {
            "run_id": run_id,
            "manifest_uri": request.manifest_uri,
            "declared_outputs": sorted(request.outputs),
            "outputs": dict(request.outputs),
            "task": request.spec.options_for(self.name).get("task", "spark_python_task"),
            "runtime": runtime_file is not None,
            "task_key": task_key(request.identity),
        }
        url = None
        try:
            run = self._call(self._get_ep, {"run_id": run_id}, "reading the submitted run")
            url = run.get("run_page_url")
            self._remember(run_id, run, fresh=True)
        except (TransientBackendError, _NotFound) as exc:
            # The run exists; its page link is a courtesy that must not fail the submission.
            log.warning("databricks: run %s submitted but not readable yet: %s", run_id, exc)
        log.info("databricks: submitted run %s for %s", run_id, request.identity.key)
        return RunHandle(self.name, str(run_id), url, handle_data)

    # -- find: reattach without creating anything ------------------------------------------------------------

    def find(self, identity: StepIdentity) -> RunHandle | None:
        """The run submitted for ``identity``, from ``runs/list`` (submit-runs, active then recent).

        ``runs/submit`` with the identity's idempotency token would also answer the run id, but it would
        *create* the run when there is none, so find lists instead: the run name ends with the token.
        """
        for params in self._list_passes():
            page_token = None
            for _ in range(max(1, self.config.find_max_pages)):
                query = {**params, **({"page_token": page_token} if page_token else {})}
                answer = self._call(self._list_ep, query, "listing runs")
                for run in answer.get("runs") or []:
                    if matches_identity(run.get("run_name"), identity):
                        return self._handle_for(int(run["run_id"]))
                page_token = answer.get("next_page_token")
                if not page_token or not answer.get("has_more", True):
                    break
        return None

    def _list_passes(self) -> list[dict[str, Any]]:
        passes: list[dict[str, Any]] = [
            {"run_type": "SUBMIT_RUN", "active_only": "true", "completed_only": "false", "limit": 25}
        ]
        if self.config.find_completed:
            since = int((time.time() - self.config.find_lookback_hours * 3600) * 1000)
            passes.append(
                {
                    "run_type": "SUBMIT_RUN",
                    "active_only": "false",
                    "completed_only": "true",
                    "limit": 25,
                    "start_time_from": since,
                }
            )
        return passes

    def _handle_for(self, run_id: int) -> RunHandle | None:
        try:
            run = self._call(self._get_ep, {"run_id": run_id}, "reading the run")
        except _NotFound:
            return None
        tasks = run.get("tasks") or [{}]
        task = tasks[0]
        meta = parse_description(task.get("description")) or _meta_from_parameters(task) or {}
        outputs = dict(meta.get("outputs") or {})
        self._remember(run_id, run, fresh=True)
        return RunHandle(
            self.name,
            str(run_id),
            run.get("run_page_url"),
            {
                "run_id": run_id,
                "manifest_uri": meta.get("manifest_uri"),
                "declared_outputs": sorted(outputs),
                "outputs": outputs,
                "task": meta.get("task", "spark_python_task"),
                "runtime": bool(meta.get("runtime", _meta_from_parameters(task) is not None)),
                "task_key": task.get("task_key"),
            },
        )

    # -- status --------------------------------------------------------------------------------------------

    def _remember(self, run_id: int, run: dict[str, Any], *, fresh: bool = False) -> _Seen:
        status = status_from_run(
            run, success_with_failures_is_success=self.config.success_with_failures_is_success
        )
        seen = self._seen.get(run_id)
        if seen is None:
            seen = self._seen[run_id] = _Seen(status, next_api=time.monotonic() + self.watch_policy.delay(0),
                                              api_checks=1)
        seen.status, seen.fresh = status, fresh
        seen.task_run_id = task_run_id(run) or seen.task_run_id
        return seen

    def _fresh(self, run_id: int) -> RunStatus | None:
        seen = self._seen.get(run_id)
        if seen is None:
            return None
        if seen.final is not None:
            return seen.final
        if seen.fresh and not seen.status.is_terminal:
            seen.fresh = False
            return seen.status
        return None

    def poll(self, handle: RunHandle) -> RunStatus:
        run_id = int(handle.data["run_id"])
        cached = self._fresh(run_id)
        if cached is not None:
            return cached
        try:
            run = self._call(self._get_ep, {"run_id": run_id}, "reading the run state")
        except _NotFound:
            return _gone()
        seen = self._remember(run_id, run)
        if seen.status.is_terminal:
            seen.final = self._explain(handle, seen, self._output(handle, seen))
            return seen.final
        return seen.status

    async def apoll(self, handle: RunHandle) -> RunStatus:
        run_id = int(handle.data["run_id"])
        cached = self._fresh(run_id)
        if cached is not None:
            return cached
        try:
            run = await self._acall(self._get_ep, {"run_id": run_id}, "reading the run state",
                                    run_lookup=True)
        except _NotFound:
            return _gone()
        seen = self._remember(run_id, run)
        if seen.status.is_terminal:
            output = await self._aoutput(handle, seen)
            seen.final = await asyncio.to_thread(self._explain, handle, seen, output)
            return seen.final
        return seen.status

    def _explain(self, handle: RunHandle, seen: _Seen, output: dict[str, Any]) -> RunStatus:
        """A failed run's status with the step's own error, Databricks' error and trace, and exit code."""
        status = seen.status
        if status.state is not RunState.FAILED:
            return status
        manifest_error, exit_code = None, None
        if handle.data.get("runtime") and handle.data.get("manifest_uri"):
            try:
                manifest = self._read_json(handle.data["manifest_uri"])
            except RemoteMLError:  # an unreadable manifest must not hide the failure itself
                manifest = None
            if manifest:
                manifest_error, exit_code = manifest.get("error"), manifest.get("exit_code")
        error = output.get("error")
        if exit_code is None:
            exit_code = exit_code_from(error)
        parts = [str(manifest_error or error or status.message or status.remote_state)]
        if manifest_error and error and error not in parts[0]:
            parts.append(f"Databricks: {error}")
        if output.get("error_trace"):
            parts.append(str(output["error_trace"]).rstrip())
        return RunStatus(status.state, status.remote_state, "\n".join(parts), exit_code)

    # -- waiting: the manifest as a completion signal ------------------------------------------------------

    def _watch_path(self, handle: RunHandle) -> str | None:
        """The manifest as a local file Airflow can stat, when the step runs the runtime; else None."""
        uri = handle.data.get("manifest_uri")
        if not (self.config.watch_manifest and handle.data.get("runtime") and uri):
            return None
        path = self._mount_of(uri)
        if path is None and is_local(uri) and not uri.startswith("dbfs:"):
            path = local_path(uri)
            if path.startswith(_WORKSPACE_ONLY) and not os.path.isdir(os.path.dirname(path)):
                return None
        return path

    def _api_due(self, seen: _Seen, now: float) -> bool:
        return now >= seen.next_api

    def _api_checked(self, seen: _Seen, now: float) -> None:
        seen.next_api = now + self.watch_policy.delay(seen.api_checks)
        seen.api_checks += 1

    def _soon(self, seen: _Seen, now: float) -> None:
        """The manifest is there but the run is not TERMINATED yet (process exit, cluster clean-up):
        look again soon, backing off in case the clean-up takes a while."""
        delay = 4 * self.config.watch_interval * 2 ** seen.checks_since_manifest
        seen.next_api = now + min(self.config.poll_cap, delay)
        seen.checks_since_manifest += 1

    def wait(self, handle: RunHandle, timeout: float) -> RunStatus:
        """Return once the run is terminal or ``timeout`` passed.

        With a watchable manifest the runtime's own completion signal is a file: it is looked for every
        ``watch_interval`` seconds at no API cost, and the Jobs API is asked when it appears (then about
        every second until the run is TERMINATED) or when the sparse fallback schedule says so.
        """
        path = self._watch_path(handle)
        seen = self._seen.get(int(handle.data["run_id"]))
        if path is None or seen is None:
            return super().wait(handle, timeout)
        deadline = time.monotonic() + timeout
        status = seen.final or seen.status
        while not status.is_terminal:
            now = time.monotonic()
            appeared = os.path.exists(path)
            # The first sight of the manifest triggers a check; later ones follow _soon()'s schedule.
            if (appeared and not seen.checks_since_manifest) or self._api_due(seen, now):
                status = self.poll(handle)
                self._api_checked(seen, now)
                if appeared and not status.is_terminal:
                    self._soon(seen, now)
            if status.is_terminal or now >= deadline:
                break
            time.sleep(max(0.0, min(self.config.watch_interval, deadline - time.monotonic())))
        return status

    async def await_change(self, handle: RunHandle, timeout: float) -> RunStatus:
        path = self._watch_path(handle)
        seen = self._seen.get(int(handle.data["run_id"]))
        if path is None or seen is None:
            return await super().await_change(handle, timeout)
        deadline = time.monotonic() + timeout
        status = seen.final or seen.status
        while not status.is_terminal:
            now = time.monotonic()
            # A stat in a thread: a hung network mount must not stall the triggerer's event loop.
            appeared = await asyncio.to_thread(os.path.exists, path)
            # The first sight of the manifest triggers a check; later ones follow _soon()'s schedule.
            if (appeared and not seen.checks_since_manifest) or self._api_due(seen, now):
                status = await self.apoll(handle)
                self._api_checked(seen, now)
                if appeared and not status.is_terminal:
                    self._soon(seen, now)
            if status.is_terminal or now >= deadline:
                break
            await asyncio.sleep(max(0.0, min(self.config.watch_interval, deadline - time.monotonic())))
        return status

    # -- output and logs -------------------------------------------------------------------------------------

    def _output_to_fetch(self, handle: RunHandle, seen: _Seen | None, refresh: bool) -> tuple[_Seen | None, Any]:
        """The run's bookkeeping and, when no call is needed, the answer (``{}`` or the cached output)."""
        seen = seen or self._seen.get(int(handle.data["run_id"]))
        if seen is None or seen.task_run_id is None:
            return None, {}
        if seen.output is not None and not refresh:
            return None, seen.output
        return seen, None

    def _output(
        self, handle: RunHandle, seen: _Seen | None = None, *, refresh: bool = False
    ) -> dict[str, Any]:
        """``runs/get-output`` of the task run (the parent run of a multi-task run has none): once per run."""
        seen, answer = self._output_to_fetch(handle, seen, refresh)
        if seen is None:
            return answer
        try:
            seen.output = self._call(self._output_ep, {"run_id": seen.task_run_id}, "reading the run output")
        except (BackendAPIError, _NotFound) as exc:
            log.warning("databricks: no output for run %s: %s", handle.job_id, exc)
            return seen.output or {}
        return seen.output

    async def _aoutput(
        self, handle: RunHandle, seen: _Seen | None = None, *, refresh: bool = False
    ) -> dict[str, Any]:
        seen, answer = self._output_to_fetch(handle, seen, refresh)
        if seen is None:
            return answer
        try:
            seen.output = await self._acall(
                self._output_ep, {"run_id": seen.task_run_id}, "reading the run output"
            )
        except (BackendAPIError, _NotFound) as exc:
            log.warning("databricks: no output for run %s: %s", handle.job_id, exc)
            return seen.output or {}
        return seen.output

    def read_logs(self, handle: RunHandle, cursor: Any = None) -> LogChunk:
        """The task's stdout/stderr from ``runs/get-output`` (its last 5 MB), line-numbered by the cursor.

        While the run goes on, logs are fetched only with ``stream_logs`` (a call per check); at the end
        they are fetched once.
        """
        seen = self._seen.get(int(handle.data["run_id"]))
        if seen is None or (seen.final is None and seen.status.is_terminal):
            self.poll(handle)
            seen = self._seen.get(int(handle.data["run_id"]))
        if seen is None:
            return LogChunk([], cursor)
        terminal = seen.final is not None
        if not terminal and not self.config.stream_logs:
            return LogChunk([], cursor)
        return _chunk(self._output(handle, seen, refresh=not terminal), cursor, terminal)

    async def aread_logs(self, handle: RunHandle, cursor: Any = None) -> LogChunk:
        seen = self._seen.get(int(handle.data["run_id"]))
        if seen is None or (seen.final is None and seen.status.is_terminal):
            await self.apoll(handle)
            seen = self._seen.get(int(handle.data["run_id"]))
        if seen is None:
            return LogChunk([], cursor)
        terminal = seen.final is not None
        if not terminal and not self.config.stream_logs:
            return LogChunk([], cursor)
        return _chunk(await self._aoutput(handle, seen, refresh=not terminal), cursor, terminal)

    # -- cancel -------------------------------------------------------------------------------------------

    def cancel(self, handle: RunHandle) -> None:
        run_id = int(handle.data["run_id"])
        try:
            self._call(self._cancel_ep, {"run_id": run_id}, "cancelling the run")
        except _NotFound:
            return
        except BackendAPIError as exc:
            if exc.status_code != 400:  # 400 INVALID_STATE: already over, which is what we want
                raise
        self._forget_fresh(run_id)

    async def acancel(self, handle: RunHandle) -> None:
        run_id = int(handle.data["run_id"])
        try:
            await self._acall(self._cancel_ep, {"run_id": run_id}, "cancelling the run", run_lookup=True)
        except _NotFound:
            return
        except BackendAPIError as exc:
            if exc.status_code != 400:
                raise
        self._forget_fresh(run_id)

    def _forget_fresh(self, run_id: int) -> None:
        seen = self._seen.get(run_id)
        if seen is not None:
            seen.fresh = False

    # -- results -------------------------------------------------------------------------------------------

    def fetch_result(self, handle: RunHandle) -> StepResult:
        """From the runtime's manifest; a notebook's exit value or the logs' metrics for other tasks."""
        uri = handle.data.get("manifest_uri")
        if not uri:
            raise ArtifactError(
                f"run {handle.job_id} has no manifest location; was it started by this backend?"
            )
        manifest = self._read_json(uri)
        if manifest is None and not handle.data.get("runtime"):
            manifest = self._manifest_from_output(handle)
        if manifest is None:
            raise ArtifactError(
                f"the run finished but wrote no result manifest at {uri!r}; the artifact root must be a "
                "location both the cluster and Airflow reach (set local_mounts for dbfs:/ or /Volumes paths "
                "Airflow sees as directories)"
            )
        return result_from_manifest(manifest, handle, handle.data.get("declared_outputs"))

    def _manifest_from_output(self, handle: RunHandle) -> dict[str, Any]:
        """A manifest for a task without the runtime: notebook exit value (JSON) or JSON lines in the logs."""
        output = self._output(handle)
        metrics: dict[str, Any] = {}
        outputs = {name: {"uri": uri} for name, uri in (handle.data.get("outputs") or {}).items()}
        result = (output.get("notebook_output") or {}).get("result")
        if result:
            try:
                value = json.loads(result)
            except ValueError:
                value = None
            if isinstance(value, dict):
                if isinstance(value.get("outputs"), dict):
                    outputs.update(
                        {k: v if isinstance(v, dict) else {"uri": v} for k, v in value["outputs"].items()}
                    )
                reported = value.get("metrics")
                if not isinstance(reported, dict):
                    reported = {k: v for k, v in value.items() if k != "outputs"}
                metrics.update(reported)
        metrics.update(metrics_from_logs(output.get("logs") or ""))
        return {
            "protocol_version": runtime.PROTOCOL_VERSION,
            "status": "succeeded",
            "outputs": outputs,
            "metrics": metrics,
            "synthesized": True,
        }

    # -- artifact I/O seen from Airflow ----------------------------------------------------------------------

    def _mount_of(self, uri: str) -> str | None:
        for prefix in sorted(self.config.local_mounts, key=len, reverse=True):
            if uri.startswith(prefix):
                return os.path.join(self.config.local_mounts[prefix], uri[len(prefix) :].lstrip("/"))
        return None

    def _write(self, uri: str, data: bytes) -> None:
        """Place a file where the cluster reads it: a mount, the DBFS API, a local path or fsspec."""
        target = self._mount_of(uri)
        if target is None and uri.startswith("dbfs:/"):
            self._call(
                ("POST", "2.0/dbfs/put"),
                {"path": uri[len("dbfs:") :], "overwrite": True, "contents": base64.b64encode(data).decode()},
                f"uploading {uri}",
            )
            return
        if target is None and is_local(uri):
            path = local_path(uri)
            top = "/" + path.lstrip("/").split("/", 1)[0]
            if path.startswith(_WORKSPACE_ONLY) and not os.path.isdir(top):
                raise ConfigError(
                    "runtime_dir",
                    f"Airflow cannot write {uri!r}",
                    f"map it with backend_config[{self.name}].local_mounts, use a dbfs:/ runtime_dir, "
                    "or deploy the runtime there yourself and set upload_runtime=False",
                )
            target = path
        if target is not None:
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            tmp = f"{target}.tmp-{os.getpid()}"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
            return
        import fsspec

        with fsspec.open(uri, "wb") as fh:
            fh.write(data)

    def read_manifest(self, uri: str) -> dict[str, Any] | None:
        return self._read_json(uri)

    def _read_json(self, uri: str) -> dict[str, Any] | None:
        text = self._read_text(uri)
        if text is None:
            return None
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ArtifactError(f"the result manifest at {uri!r} is unreadable: {exc}") from exc
        return value if isinstance(value, dict) else None

    def _read_text(self, uri: str) -> str | None:
        target = self._mount_of(uri)
        if target is None and uri.startswith("dbfs:/"):
            return self._dbfs_read(uri)
        if target is None and is_local(uri):
            target = local_path(uri)
        if target is not None:
            try:
                with open(target, encoding="utf-8") as fh:
                    return fh.read()
            except FileNotFoundError:
                return None
        from airflow_remote_ml.core.artifacts import read_json

        value = read_json(uri)
        return None if value is None else json.dumps(value)

    def _dbfs_read(self, uri: str) -> str | None:
        path = uri[len("dbfs:") :]
        chunks: list[bytes] = []
        offset = 0
        while True:
            try:
                answer = self._call(
                    ("GET", "2.0/dbfs/read"),
                    {"path": path, "offset": offset, "length": DBFS_READ_CHUNK},
                    f"reading {uri}",
                )
            except _NotFound:
                return None
            data = base64.b64decode(answer.get("data") or "")
            chunks.append(data)
            offset += len(data)
            if int(answer.get("bytes_read") or 0) < DBFS_READ_CHUNK or not data:
                return b"".join(chunks).decode("utf-8")

    # -- lifecycle -------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._hook = None
        self._ahook = None

    async def aclose(self) -> None:
        self.close()


def _gone() -> RunStatus:
    return RunStatus(
        RunState.LOST,
        "NOT_FOUND",
        "the run no longer exists (deleted, or past the workspace's run retention)",
    )


def _chunk(output: dict[str, Any], cursor: Any, terminal: bool) -> LogChunk:
    text = str(output.get("logs") or "")
    lines = text.splitlines()
    if not terminal and text and not text.endswith("\n"):
        lines = lines[:-1]  # a partial last line is handed over once it is complete
    start = int(cursor or 0)
    return LogChunk(lines[start:], max(start, len(lines)))


def _join(base: str, name: str) -> str:
    if is_local(base) and not base.startswith(("dbfs:", "s3:", "gs:", "abfss:")):
        return os.path.join(local_path(base), name)
    return base.rstrip("/") + "/" + name


def _meta_from_parameters(task: dict[str, Any]) -> dict[str, Any] | None:
    """Handle data from the runtime's step JSON argument (runs submitted without a description)."""
    params = (task.get("spark_python_task") or {}).get("parameters") or []
    if not params:
        return None
    try:
        step = json.loads(params[0])
    except ValueError:
        return None
    if not isinstance(step, dict) or "manifest_uri" not in step:
        return None
    return {
        "manifest_uri": step["manifest_uri"],
        "outputs": step.get("outputs") or {},
        "task": "spark_python_task",
        "runtime": True,
    }
