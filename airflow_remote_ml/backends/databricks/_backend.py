"""The ``databricks`` backend: a step becomes one Databricks job run (``runs/submit``).

All HTTP goes through the provider's ``DatabricksHook`` (sync in the worker, its ``a_`` methods in the
trigger), so authentication (PAT, service-principal OAuth, Azure AD) and retries are the provider's.
The backend adds what the hook lacks: retries that wait for the server's ``Retry-After``, one choke
point that maps errors to ours, raw state parsing that survives new states, and a poll schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

from airflow.providers.databricks.hooks.databricks import DatabricksHook
from tenacity import stop_after_attempt

from airflow_remote_ml import runtime
from airflow_remote_ml.backends.databricks import _jobs
from airflow_remote_ml.backends.databricks._errors import RetryAfterWait, map_error
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
from airflow_remote_ml.backends.databricks._shared import WorkspaceWatch, watch_for
from airflow_remote_ml.backends.databricks._states import (
    DatabricksPollPolicy,
    exit_code_from,
    metrics_from_logs,
    status_from_run,
    task_run_id,
)
from airflow_remote_ml.backends.databricks._storage import WORKSPACE_ONLY, NotFound, Storage
from airflow_remote_ml.backends.databricks._validation import check_config, check_sources
from airflow_remote_ml.core.artifacts import is_local, local_path
from airflow_remote_ml.core.backend import Backend, StepRequest, result_from_manifest
from airflow_remote_ml.core.errors import (
    ArtifactError,
    BackendAPIError,
    RemoteMLError,
    TransientBackendError,
)
from airflow_remote_ml.core.identity import StepIdentity
from airflow_remote_ml.core.jobs import JobInfo
from airflow_remote_ml.core.poll import PollPolicy
from airflow_remote_ml.core.status import LogChunk, RunHandle, RunState, RunStatus, StepResult

log = logging.getLogger(__name__)



# -- run bookkeeping --------------------------------------------------------------------------------------


@dataclass
class _Seen:
    """What this backend instance last learnt about a run (saves calls; never needed for correctness)."""

    status: RunStatus
    #: The next check may reuse ``status``: the look-up right after submit/find doubles as the first check.
    fresh: bool = False
    #: When ``status`` was read (monotonic): a fresh status older than the first poll delay is not reused.
    read_at: float = 0.0
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
    #: ``runs/submit`` carries the identity's ``idempotency_token``: "If a run with the provided token already
    #: exists, the request does not create a new run but returns the ID of the existing run instead ...
    #: Databricks guarantees that exactly one run is launched with that idempotency token" (Jobs API). So an
    #: ambiguous submit is simply sent again, and the hook's own retries of a timed-out submit are safe.
    idempotent_submit: ClassVar[bool] = True
    #: A submitted run shows in ``runs/list`` at once; the margin covers a slow control plane.
    create_settle_seconds: ClassVar[float] = 30.0
    #: Deferred runs of one workspace share one ``runs/list`` of active runs (see ``_shared``) from this many
    #: waiting in one triggerer; fewer each read their own run (a list of a busy workspace may be longer
    #: than one ``runs/get``).
    shared_watch_from: ClassVar[int] = 2
    config: DatabricksConfig

    def __init__(self, config: DatabricksConfig) -> None:
        check_config(config)  # every setting by type and range before anything computes with it
        super().__init__(config)
        self.poll_policy = DatabricksPollPolicy(  # type: ignore[misc]
            first_delay=config.poll_first_delay,
            factor=config.poll_factor,
            quick_delay=config.poll_quick_delay,
            quick_window=config.poll_quick_window,
            cap=config.poll_cap,
        )
        # While the manifest is watched, the Jobs API is only a fallback: a sparse schedule suffices.
        self.watch_policy = PollPolicy(first_delay=2 * config.poll_first_delay, factor=2.0,
                                       cap=config.watch_cap)
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
        self._storage = Storage(config.local_mounts, self._call, self.name)
        # Deferred waits on the shared list: the watch each run joined, and when it was last checked
        # (monotonic: a runs/get of its own, or the start of a list that served it).
        self._joined: dict[int, WorkspaceWatch] = {}
        self._checked: dict[int, float] = {}
        self._workspace: str | None = None

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

    def _mapped(self, exc: BaseException, action: str, *, ambiguous: bool = False) -> BaseException:
        return map_error(exc, action, backend=self.name, conn_id=self.config.databricks_conn_id,
                         ambiguous=ambiguous)

    def _call(
        self, endpoint: tuple[str, str], payload: dict[str, Any], action: str, *, ambiguous: bool = False
    ) -> dict[str, Any]:
        """The one place every sync request goes through: the hook's retries, then our errors."""
        hook = self._sync_hook()
        try:
            return hook._do_api_call(endpoint, payload) or {}
        except Exception as exc:
            raise self._mapped(exc, action, ambiguous=ambiguous) from exc

    def _sync_hook(self) -> DatabricksHook:
        if self._hook is None:
            self._hook = self._make_hook()
        return self._hook

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
                raise NotFound(str(mapped)) from exc
            raise mapped from exc

    # -- validation and submission -------------------------------------------------------------------------

    def validate(self, request: StepRequest) -> None:
        # What the Jobs API would refuse, checked by type before the payload builder reads it (see _validation).
        check_sources(self.config, request)
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
        runtime_file = self.runtime_uri(request) if self._uses_runtime(request) else None
        # Built (and so checked) before anything is uploaded or submitted.
        payload = build_submit_payload(request, self.config, runtime_file)
        if runtime_file is not None and self.config.upload_runtime and runtime_file not in self._placed:
            self._storage.write_once(runtime_file, runtime.source().encode())
            self._placed.add(runtime_file)
        # Ambiguous: a timeout or a dropped connection may hide a run that was created. Sending the same
        # token again answers that run, so the caller may retry at once (TransientBackendError).
        answer = self._call(self._submit_ep, payload, "submitting the run", ambiguous=True)
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
        url = self._page_url_after_submit(run_id)
        log.info("databricks: submitted run %s for %s", run_id, request.identity.key)
        return RunHandle(self.name, str(run_id), url, handle_data)

    def publish_code(self, request: StepRequest) -> None:
        """The code archive goes where the runtime reads the artifact root on the cluster (a volume, DBFS, an
        object store), through the same storage path as the runtime file; only the runtime imports it."""
        code = request.code
        if code is None or not self._uses_runtime(request):
            return
        if code.uri in self._placed:
            return
        if code.archive is None:
            raise ArtifactError(f"the code archive for {code.uri} was not built in this process")
        self._storage.write_once(code.uri, code.archive)  # content-addressed: one that exists is this one
        self._placed.add(code.uri)

    def _page_url_after_submit(self, run_id: int) -> str:
        """The run page URL: from ``runs/get`` (which also serves as the first check), or built from host and id.

        The hook has already retried a 429/5xx of that read; when it still fails the run exists anyway, so the
        submission must not fail, and the link must not be lost for good (it goes into the handle, the XCom
        link and every later error): it is then built from the workspace host and the run id.
        """
        try:
            run = self._call(self._get_ep, {"run_id": run_id}, "reading the submitted run")
        except (BackendAPIError, NotFound) as exc:
            log.warning("databricks: run %s submitted but not readable yet (%s); linking it by id", run_id, exc)
            return self._built_page_url(run_id)
        self._remember(run_id, run, fresh=True)
        return str(run.get("run_page_url") or self._built_page_url(run_id))

    def _built_page_url(self, run_id: int) -> str:
        """``<workspace>/jobs/runs/<run_id>``: the Jobs UI's run page for a run id, needing no API call."""
        return run_page_url(self._sync_hook()._endpoint_url(""), run_id)

    # -- find: reattach without creating anything ------------------------------------------------------------

    def find(self, identity: StepIdentity) -> RunHandle | None:
        """The run submitted for ``identity``, from ``runs/list`` (submit-runs, active then recent).

        ``runs/submit`` with the identity's idempotency token would also answer the run id, but it would
        *create* the run when there is none, so find lists instead: the run name ends with the token.
        """
        matches: dict[int, tuple[int, int]] = {}
        for params in self._list_passes():
            page_token = None
            for _ in range(max(1, self.config.find_max_pages)):
                query = {**params, **({"page_token": page_token} if page_token else {})}
                answer = self._call(self._list_ep, query, "listing runs")
                for run in answer.get("runs") or []:
                    if matches_identity(run.get("run_name"), identity):
                        run_id = int(run["run_id"])
                        matches[run_id] = (int(run.get("start_time") or 0), run_id)
                page_token = answer.get("next_page_token")
                if not page_token or not answer.get("has_more", True):
                    break
        # One run per token is the rule; should there be several (a run submitted before tokens were
        # used, a token reused after its run was deleted), every caller adopts the same one: the oldest.
        for _, run_id in sorted(matches.values()):
            handle = self._handle_for(run_id)
            if handle is not None:
                return handle
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
        except NotFound:
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
        seen.status, seen.fresh, seen.read_at = status, fresh, time.monotonic()
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
            # Reused only as the check the caller would have made right away anyway; an older answer may
            # hide what happened since (a cancel, a remote delete, a revoked token).
            if time.monotonic() - seen.read_at > self.config.poll_first_delay:
                return None
            return seen.status
        return None

    def poll(self, handle: RunHandle) -> RunStatus:
        run_id = int(handle.data["run_id"])
        cached = self._fresh(run_id)
        if cached is not None:
            return cached
        try:
            run = self._call(self._get_ep, {"run_id": run_id}, "reading the run state")
        except NotFound:
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
        except NotFound:
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
        if status.reason:
            # The platform ended the run (driver lost, cluster failure, timeout): its words lead.
            parts = [f"{status.reason}: {status.message or status.remote_state}"]
            if error and error not in parts[0]:
                parts.append(f"Databricks: {error}")
            if manifest_error:
                parts.append(f"step: {manifest_error}")
        else:
            parts = [str(manifest_error or error or status.message or status.remote_state)]
            if manifest_error and error and error not in parts[0]:
                parts.append(f"Databricks: {error}")
        if output.get("error_trace"):
            parts.append(str(output["error_trace"]).rstrip())
        return RunStatus(status.state, status.remote_state, "\n".join(parts), exit_code, status.reason)

    # -- waiting: the manifest as a completion signal ------------------------------------------------------

    def _watch_path(self, handle: RunHandle) -> str | None:
        """The manifest as a local file Airflow can stat, when the step runs the runtime; else None."""
        uri = handle.data.get("manifest_uri")
        if not (self.config.watch_manifest and handle.data.get("runtime") and uri):
            return None
        path = self._mount_of(uri)
        if path is None and is_local(uri) and not uri.startswith("dbfs:"):
            path = local_path(uri)
            if path.startswith(WORKSPACE_ONLY) and not os.path.isdir(os.path.dirname(path)):
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
        seen.next_api = now + min(self.config.watch_cap, delay)
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
        """The status once terminal or after about ``timeout`` seconds (the trigger's wait).

        With other runs of the workspace waiting in this triggerer, their checks are one shared
        ``runs/list`` of active runs (see ``_shared``): a run still listed costs no request, one that left
        the list is read once. With a watchable manifest the file is looked for every ``watch_interval``
        seconds (no API cost) and a check follows its appearance at once.
        """
        run_id = int(handle.data["run_id"])
        seen = self._seen.get(run_id)
        if seen is not None and seen.final is not None:
            return seen.final
        watch = await self._watch(handle)
        path = self._watch_path(handle)
        if path is None or seen is None:
            if watch is None:
                return await super().await_change(handle, timeout)
            return await self._await_shared(handle, watch, timeout)
        deadline = time.monotonic() + timeout
        status = seen.final or seen.status
        while not status.is_terminal:
            now = time.monotonic()
            # A stat in a thread: a hung network mount must not stall the triggerer's event loop.
            appeared = await asyncio.to_thread(os.path.exists, path)
            listed = self._consume(run_id, watch) if watch is not None else None
            # The first sight of the manifest triggers a check; later ones follow _soon()'s schedule. A
            # list taken for every waiter is a check too, and free, so it is read whenever one came.
            first_sight = appeared and not seen.checks_since_manifest
            if first_sight or listed is not None or self._api_due(seen, now):
                status = await self._settle(handle, listed) if listed is not None and not first_sight \
                    else await self._check(handle)
                self._api_checked(seen, now)
                if appeared and not status.is_terminal:
                    self._soon(seen, now)
            if status.is_terminal or now >= deadline:
                break
            await asyncio.sleep(max(0.0, min(self.config.watch_interval, deadline - time.monotonic())))
        return status

    # -- waiting on the workspace's shared list (see _shared) ----------------------------------------------

    async def _workspace_key(self) -> str:
        """The workspace's host and a digest of the credentials: the runs a list shows depend on both."""
        if self._workspace is None:
            hook = self._ahook = self._ahook or self._make_hook()
            cache = getattr(hook, "_a_cache_databricks_conn", None)
            if cache is not None:
                await cache()  # the connection, read the triggerer's (async) way
            conn = hook.databricks_conn if cache is not None else await asyncio.to_thread(
                lambda: hook.databricks_conn)
            secret = json.dumps([conn.login, conn.password, conn.extra_dejson, self.config.api_version],
                                sort_keys=True, default=str)
            self._workspace = f"{hook.host}#{hashlib.sha256(secret.encode()).hexdigest()[:16]}"
        return self._workspace

    def _lister(self) -> Any:
        """The list session of a watch: a hook of its own (so it outlives the waiter that created it), and
        one HTTP session for all the pages of one list."""
        hook = self._make_hook()

        @contextlib.asynccontextmanager
        async def session() -> AsyncIterator[Any]:
            async with hook:
                async def list_page(params: dict[str, Any]) -> dict[str, Any]:
                    try:
                        return await hook._a_do_api_call(self._list_ep, params) or {}
                    except Exception as exc:
                        raise self._mapped(exc, "listing the active runs") from exc

                yield list_page

        return session

    async def _watch(self, handle: RunHandle) -> WorkspaceWatch | None:
        """The shared watch this run waits on, joined on first use; None when there is none to use."""
        run_id = int(handle.data["run_id"])
        watch = self._joined.get(run_id)
        if watch is None:
            if self.shared_watch_from <= 0:
                return None
            try:
                key = await self._workspace_key()
            except Exception as exc:  # no connection to key on: this run reads its own status
                log.warning("databricks: no shared run list (%s); reading run %s directly", exc, run_id)
                return None
            cap = self.poll_policy.cap
            # Slightly quicker than the schedule's cap: a waiter due at its last check + cap always finds a
            # list started in between, so it never needs a runs/get of its own on the cap grid.
            period = cap - min(2.0, cap * 0.1)
            watch = watch_for(key, self._lister, period=period, linger=cap,
                              min_waiters=self.shared_watch_from)
            watch.join(run_id, period)
            self._joined[run_id] = watch
            seen = self._seen.get(run_id)
            self._checked.setdefault(run_id, seen.read_at if seen is not None else time.monotonic())
        return None if watch.broken is not None or watch.closed else watch

    def _unwatch(self, run_id: int) -> None:
        watch = self._joined.pop(run_id, None)
        if watch is not None:
            watch.leave(run_id)

    def _consume(self, run_id: int, watch: WorkspaceWatch) -> dict[str, Any] | None:
        """The newest list, once, when it started after this run's last check: ``{"run": ...}`` for a run
        still active, ``{}`` for one that left it. None when there is no such list."""
        checked = self._checked.get(run_id, 0.0)
        if watch.listed_at <= checked:
            return None
        self._checked[run_id] = watch.listed_at
        listed = watch.active.get(run_id)
        if listed is None and not watch.complete:
            return None  # beyond an incomplete list: no news, the run's own schedule reads it
        return {"run": listed} if listed is not None else {}

    async def _settle(self, handle: RunHandle, listed: dict[str, Any]) -> RunStatus:
        """The status from a list: as listed while active; a run that left it is read for its result."""
        run = listed.get("run")
        if run is None:
            return await self._check(handle)
        return self._remember(int(handle.data["run_id"]), run).status

    async def _check(self, handle: RunHandle) -> RunStatus:
        """The run's own ``runs/get`` (and its output once terminal)."""
        run_id = int(handle.data["run_id"])
        started = time.monotonic()
        status = await self.apoll(handle)
        self._checked[run_id] = started
        if status.is_terminal:
            self._unwatch(run_id)
        return status

    async def _await_shared(self, handle: RunHandle, watch: WorkspaceWatch, timeout: float) -> RunStatus:
        """Wait for the next list that serves this run, at most until ``timeout`` after its last check.

        A list started after the last check is a check; when none came in time (too few waiters to list
        yet, or a list late) the run is read directly, so no gap between two checks is longer than the
        poll schedule's. While the lists fail (an outage),
        a waiter that is due raises the list's transient error instead of adding a request of its own: the
        wait's transient-error budget then governs every waiter alike.
        """
        run_id = int(handle.data["run_id"])
        due = self._checked.get(run_id, time.monotonic()) + timeout
        while True:
            if watch.broken is not None or watch.closed:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                return await self._check(handle)
            listed = self._consume(run_id, watch)
            if listed is not None:
                return await self._settle(handle, listed)
            left = due - time.monotonic()
            if left <= 0:
                error = watch.error
                if error is not None and watch.error_at >= self._checked.get(run_id, 0.0):
                    raise TransientBackendError(self.name, f"the shared run list failed: {error}",
                                                error.status_code, error.retry_after)
                return await self._check(handle)
            await watch.changed(left)

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
        except (BackendAPIError, NotFound) as exc:
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
        except (BackendAPIError, NotFound) as exc:
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
        except NotFound:
            return
        except BackendAPIError as exc:
            if exc.status_code != 400:  # 400 INVALID_STATE: already over, which is what we want
                raise
        self._forget_fresh(run_id)

    # -- jobs (see ._jobs) ----------------------------------------------------------------------------------

    def list_jobs(self, dag_id: str | None = None) -> list[JobInfo]:
        return _jobs.list_jobs(self, dag_id)

    def remove_job(self, job: JobInfo) -> None:
        _jobs.remove(self, job)

    async def acancel(self, handle: RunHandle) -> None:
        run_id = int(handle.data["run_id"])
        try:
            await self._acall(self._cancel_ep, {"run_id": run_id}, "cancelling the run", run_lookup=True)
        except NotFound:
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
        return self._storage.mount_of(uri)

    def _write(self, uri: str, data: bytes) -> None:
        self._storage.write(uri, data)

    def read_manifest(self, uri: str) -> dict[str, Any] | None:
        return self._read_json(uri)

    def _read_json(self, uri: str) -> dict[str, Any] | None:
        return self._storage.read_json(uri)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._hook = None
        self._ahook = None

    async def aclose(self) -> None:
        for run_id in list(self._joined):
            self._unwatch(run_id)
        self.close()


def run_page_url(workspace_url: str, run_id: int | str) -> str:
    """The run page of ``run_id`` in the workspace at ``workspace_url`` (``https://host[:port]/``)."""
    return f"{workspace_url.rstrip('/')}/jobs/runs/{run_id}"


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
