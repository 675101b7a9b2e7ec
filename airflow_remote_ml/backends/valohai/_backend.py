"""The valohai backend's I/O side: :class:`ValohaiBackend` drives executions through :class:`ValohaiAPI`.

Request building, the status table, the event cursor and output matching are pure functions in
:mod:`._execution`; every HTTP call and error mapping goes through :mod:`._client`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, ClassVar
from urllib.parse import urljoin

from airflow_remote_ml.backends.valohai import _jobs
from airflow_remote_ml.backends.valohai._client import ValohaiAPI, _NotFound
from airflow_remote_ml.backends.valohai._execution import (
    IDENTITY_TAG_PREFIX,
    MANIFEST_NAME,
    LogCursor,
    ValohaiConfig,
    _handle_data,
    build_execution,
    check_code_reachable,
    event_line,
    events_to_fetch,
    explain_failure,
    map_status,
    match_outputs,
    new_events,
    output_uri,
    step_mode,
)
from airflow_remote_ml.backends.valohai._shared import ProjectWatch, watch_for
from airflow_remote_ml.backends.valohai._validation import (
    OPTION_NAMES,
    check_config,
    check_request,
    check_step_parameters,
    declared_step,
)
from airflow_remote_ml.core.artifacts import is_local, local_path
from airflow_remote_ml.core.backend import Backend, StepRequest
from airflow_remote_ml.core.errors import ArtifactError, ConfigError
from airflow_remote_ml.core.identity import StepIdentity
from airflow_remote_ml.core.jobs import JobInfo
from airflow_remote_ml.core.poll import PollPolicy
from airflow_remote_ml.core.status import LogChunk, RunHandle, RunState, RunStatus, StepResult

log = logging.getLogger(__name__)

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)


class ValohaiBackend(Backend):
    name: ClassVar[str] = "valohai"
    config_class = ValohaiConfig
    option_names = OPTION_NAMES
    # Executions take minutes; starting a machine alone takes a while. Ask often at first, then every 20 s:
    # one request per look (the execution with its latest events, see poll), so a waiting execution costs
    # 3 requests a minute including its log, and its end is noticed 10 s later on median (half the period).
    poll_policy = PollPolicy(first_delay=1.0, factor=1.5, cap=20.0)
    has_job_page = True
    # Valohai has no idempotency token: POST /api/v0/executions/ takes no client request id (valohai-cli's
    # run command sends project, commit, step, parameters, inputs, environment, image, title and
    # environment_variables only), so the same identity submitted twice is two executions. Exactly once
    # rests on the identity tag that find() looks up.
    idempotent_submit: ClassVar[bool] = False
    # A create whose answer was lost is visible at once, but one still being processed shows up only when
    # the server finishes it. The server side of a request is bounded by the gateway's timeout (the
    # longest request_timeout allowed is MAX_REQUEST_TIMEOUT, below it): wait half as long again.
    create_settle_seconds: ClassVar[float] = 90.0
    config: ValohaiConfig

    def __init__(self, config: ValohaiConfig, *, api: ValohaiAPI | None = None) -> None:
        super().__init__(config)
        self.settings = _effective_settings(config)
        check_config(self.settings)  # every setting by type and range before the client computes with it
        if api is None:
            if not self.settings.token:
                raise ConfigError("backend_config[valohai].token", "no Valohai API token",
                                  "set conn_id to a Valohai connection (token as password) or give 'token'")
            api = ValohaiAPI(self.settings.host, self.settings.token, conn_id=config.conn_id,
                             timeout=self.settings.request_timeout, max_retries=self.settings.max_retries,
                             max_retry_wait=self.settings.max_retry_wait)
        self.api = api
        self._project_id: str | None = None
        self._final: dict[str, RunStatus] = {}
        # The events that came with the latest poll of each execution, not yet read by read_logs.
        self._inline_events: dict[str, list[dict[str, Any]]] = {}
        # Deferred waits: the shared watch each execution joined (and when), its last status and log read.
        self._watching: dict[str, tuple[ProjectWatch, float]] = {}
        self._last_status: dict[str, RunStatus] = {}
        self._last_log_read: dict[str, float] = {}
        # Commits' parsed valohai.yaml (None: unreadable) and their API URLs, for the parameter check.
        self._configs: dict[tuple[str, str], Any] = {}
        self._commit_urls: dict[str, str] = {}

    # -- checks and lookups ------------------------------------------------------------------------------

    def validate(self, request: StepRequest) -> None:
        # Not super().validate(): profiles may come from the connection, so they are checked on the settings.
        check_request(request, self.settings)
        if step_mode(request, self.settings)[0] == "runtime":
            check_code_reachable(request)

    def publish_code(self, request: StepRequest) -> None:
        # A Valohai step of valohai.yaml runs the repository's own code; only the runtime step imports the
        # shipped archive (downloaded as its code input, see build_execution).
        if step_mode(request, self.settings)[0] == "runtime":
            super().publish_code(request)

    def project_id(self) -> str:
        """The project's id, looking a name (or ``owner/name``) up once."""
        if self._project_id:
            return self._project_id
        project = self.settings.project
        if not project:
            raise ConfigError("backend_config[valohai].project", "no Valohai project", "set 'project'")
        if _UUID.match(project):
            self._project_id = project
            return project
        owner, _, name = project.rpartition("/")
        found = [p for p in self.api.paged("projects/", {"name": name, "limit": 100})
                 if p.get("name") == name and (not owner or (p.get("owner") or {}).get("username") == owner)]
        if not found:
            raise ConfigError("backend_config[valohai].project",
                              f"the token sees no Valohai project {project!r}",
                              "check the name, or use the project id from the project's settings page")
        if len(found) > 1:
            raise ConfigError("backend_config[valohai].project", f"{len(found)} projects are named {name!r}",
                              "use 'owner/name' or the project id")
        self._project_id = str(found[0]["id"])
        return self._project_id

    def branch_commit(self, project_id: str, branch: str) -> str:
        """The identifier of the newest commit Valohai has fetched on ``branch``.

        Resolved here rather than sent as ``commit`` because executions are created from a commit
        identifier (the old airflow-valohai-plugin did the same); ``ref`` is matched locally too, in case
        a server ignores the filter.
        """
        params = {"project": project_id, "ref": branch, "ordering": "-commit_time", "limit": 100}
        on_branch = []
        for scanned, commit in enumerate(self.api.paged("commits/", params)):
            if scanned >= 1000:
                break
            if branch in {commit.get("ref"), *(commit.get("ref_names") or [])}:
                on_branch.append(commit)
        if on_branch:
            newest = max(on_branch, key=lambda c: str(c.get("commit_time") or ""))
            if newest.get("url"):
                self._commit_urls[str(newest["identifier"])] = str(newest["url"])
            return str(newest["identifier"])
        raise ConfigError("backend_config[valohai].branch", f"Valohai knows no commit on branch {branch!r}",
                          "check the branch name; after pushing it set 'fetch': true so Valohai fetches it")

    def _check_parameters(self, request: StepRequest, project_id: str, commit: str, step: str,
                          values: Mapping[str, Any]) -> None:
        """The parameter values against their types in the commit's valohai.yaml, before the create.

        ``valohai-cli`` does the same: it loads the commit with ``?include=config`` and types each parameter
        option from the step's declaration (``RemoteProject.get_config``, ``RunCommand``). Best effort: when
        the declaration cannot be read (an outage, an old server), the create's own 400 still names the
        field. Read once per commit and backend.
        """
        key = (project_id, commit)
        if key not in self._configs:
            try:
                self._configs[key] = self._commit_config(project_id, commit)
            except Exception as exc:  # the create's own validation is the backstop
                log.info("valohai: could not read the configuration of commit %s (%s); the parameters are "
                         "checked by Valohai itself", commit, exc)
                self._configs[key] = None
        declared = declared_step(self._configs[key], step)
        if declared is None:
            return
        from_options = set(request.spec.options_for(self.name).get("parameters") or {})
        check_step_parameters(declared, values, lambda name: (
            f"backend_options.valohai.parameters.{name}" if name in from_options else f"parameters.{name}"))

    def _commit_config(self, project_id: str, commit: str) -> Any:
        url = self._commit_urls.get(commit)
        if url is None:
            params = {"project": project_id, "identifier": commit, "limit": 100}
            page = self.api.request("GET", "commits/", params=params, retry=False)
            found = [c for c in (page.get("results") or []) if c.get("identifier") == commit]
            if not found:
                return None
            url = str(found[0].get("url") or f"commits/{found[0]['id']}/")
        return (self.api.request("GET", url, params={"include": "config"}, retry=False) or {}).get("config")

    def _handle(self, execution: Mapping[str, Any], data: Mapping[str, Any]) -> RunHandle:
        url = (execution.get("urls") or {}).get("display")
        if not url and execution.get("link"):
            url = urljoin(self.api.host + "/", str(execution["link"]))
        project = execution.get("project")
        project_id = project.get("id") if isinstance(project, Mapping) else project
        return RunHandle(backend=self.name, job_id=str(execution["id"]), url=url,
                         data={**data, "project_id": data.get("project_id") or project_id,
                               "counter": execution.get("counter")})

    # -- the interface ---------------------------------------------------------------------------------------

    def submit(self, request: StepRequest) -> RunHandle:
        project_id = self.project_id()
        body, data = build_execution(request, self.settings, project_id)
        if self.settings.fetch:
            self.api.request("POST", f"projects/{project_id}/fetch/", json_body={})
        if not (request.spec.options_for(self.name).get("commit") or self.settings.commit):
            body["commit"] = self.branch_commit(project_id, str(self.settings.branch))
        if data["mode"] == "step" and body["parameters"]:
            self._check_parameters(request, project_id, str(body["commit"]), str(body["step"]), body["parameters"])
        # Sent once: creating is not idempotent. A timeout, a dropped connection or a 5xx leaves the outcome
        # unknown (the execution may exist), so it surfaces as TransientBackendError and the lifecycle looks
        # the identity tag up for create_settle_seconds before any new submit; a 429 was refused for now
        # and carries Retry-After.
        execution = self.api.request("POST", "executions/", json_body=body, retry=False)
        handle = self._handle(execution, data)
        log.info("valohai: created execution #%s for %s: %s", execution.get("counter"), request.identity.key,
                 handle.url)
        return handle

    def find(self, identity: StepIdentity) -> RunHandle | None:
        tag = f"{IDENTITY_TAG_PREFIX}{identity.digest}"
        project_id = self.project_id()
        # Tags cannot be filtered on, so scan the project's newest executions. Every match is collected:
        # when a retried create made two, all callers must adopt the same one, the oldest.
        params = {"project": project_id, "ordering": "-ctime", "limit": max(1, self.settings.find_page_size)}
        matches = []
        for scanned, execution in enumerate(self.api.paged("executions/", params)):
            if scanned >= self.settings.find_scan_limit:
                break
            if tag in (execution.get("tags") or []):
                matches.append(execution)
        if not matches:
            return None
        oldest = min(matches, key=lambda e: (str(e.get("ctime") or ""), int(e.get("counter") or 0),
                                             str(e.get("id"))))
        if len(matches) > 1:
            log.warning("valohai: %d executions carry the identity of %s; adopting the oldest, #%s",
                        len(matches), identity.key, oldest.get("counter"))
        if "environment_variables" not in oldest:
            oldest = self.api.request("GET", f"executions/{oldest['id']}/", params={"exclude": "events,metadata"})
        return self._handle(oldest, _handle_data(oldest))

    def poll(self, handle: RunHandle) -> RunStatus:
        if handle.job_id in self._final:
            return self._final[handle.job_id]
        try:
            # The execution detail carries its events (valohai-cli's `logs --stream` reads them from there), so
            # one request answers both the status and the log: read_logs then needs no request of its own.
            execution = self.api.request("GET", f"executions/{handle.job_id}/",
                                         params={"exclude": "metadata,outputs"})
        except _NotFound:
            self._inline_events.pop(handle.job_id, None)
            return RunStatus(RunState.LOST, "not found", "the Valohai execution no longer exists")
        events = execution.get("events")
        if isinstance(events, list):
            self._inline_events[handle.job_id] = events
        status = map_status(execution)
        if status.is_terminal and not status.is_successful:
            tail = sorted(events, key=lambda e: str(e.get("time", "")))[-40:] if isinstance(events, list) \
                else self._last_events(handle, 40)
            status = explain_failure(status, tail)
        if status.state is RunState.FAILED and handle.data.get("mode") == "runtime":
            status = self._runtime_failure(handle, status)
        if status.is_terminal:
            self._final[handle.job_id] = status
        return status

    def _runtime_failure(self, handle: RunHandle, status: RunStatus) -> RunStatus:
        """The runtime's manifest says why the step failed and with which exit code."""
        try:
            manifest = self._manifest(handle.job_id)
        except Exception as exc:  # the status is what matters; the manifest only explains it
            log.warning("valohai: could not read the manifest of execution %s: %s", handle.job_id, exc)
            return status
        if not manifest:
            return status
        # The platform's why (status.message, reason) stays first; the runtime's own words follow.
        error = str(manifest.get("error") or "")
        message = f"{status.message}; {error}" if error and error not in status.message else status.message
        exit_code = manifest.get("exit_code")
        return RunStatus(status.state, status.remote_state, message,
                         exit_code if exit_code is not None else status.exit_code, status.reason)

    # -- jobs (see ._jobs) ----------------------------------------------------------------------------------

    def list_jobs(self, dag_id: str | None = None) -> list[JobInfo]:
        return _jobs.list_jobs(self, dag_id)

    def remove_job(self, job: JobInfo) -> None:
        _jobs.remove(self, job)

    def cancel(self, handle: RunHandle) -> None:
        try:
            self.api.request("POST", f"executions/{handle.job_id}/stop/", json_body={})
        except _NotFound:
            return  # already gone: nothing to stop
        self._final.pop(handle.job_id, None)

    def read_logs(self, handle: RunHandle, cursor: Any = None) -> LogChunk:
        """New log lines after ``cursor``, de-duplicated by event identity; the cursor is plain JSON."""
        position = LogCursor.from_json(cursor)
        inline = self._inline_events.pop(handle.job_id, None)
        if inline is not None and position.seen:
            fresh, after = new_events(inline, position)
            # Trusted only when it overlaps what was shown: then nothing lies between, even if the detail
            # holds only the newest events. Otherwise (a burst, a first read) ask the events endpoint.
            if len(fresh) < len(inline) or not fresh:
                return LogChunk([event_line(e) for e in fresh], after.to_json())
        url = f"executions/{handle.job_id}/events/"
        page = self.api.request("GET", url, params={"limit": max(1, self.settings.log_batch)})
        events = list(page.get("events") or [])
        fresh, after = new_events(events, position)
        again = events_to_fetch(int(page.get("total", len(events))), len(events), len(fresh), position)
        if again:
            # More arrived than a page holds, or one landed among older events: ask for all unshown ones.
            page = self.api.request("GET", url, params={"limit": again})
            fresh, after = new_events(list(page.get("events") or []), position)
        return LogChunk([event_line(e) for e in fresh], after.to_json())

    def _last_events(self, handle: RunHandle, count: int) -> list[dict[str, Any]]:
        try:
            page = self.api.request("GET", f"executions/{handle.job_id}/events/", params={"limit": count})
        except Exception as exc:  # a courtesy in an error message; never mask the real error
            log.warning("valohai: could not read the events of execution %s: %s", handle.job_id, exc)
            return []
        return sorted(page.get("events") or [], key=lambda e: str(e.get("time", "")))

    def log_tail(self, handle: RunHandle, lines: int = 40) -> list[str]:
        return [event_line(e) for e in self._last_events(handle, lines)]

    def fetch_result(self, handle: RunHandle) -> StepResult:
        execution = self.api.request("GET", f"executions/{handle.job_id}/",
                                     params={"exclude": "events,metadata"})
        datums = self._outputs(handle.job_id)
        declared = list(handle.data.get("declared_outputs") or [])
        matched = match_outputs(declared, [d for d in datums if d.get("name") != MANIFEST_NAME])
        missing = [name for name in declared if name not in matched]
        if missing:
            names = ", ".join(repr(n) for n in missing)
            produced = ", ".join(sorted(str(d.get("name")) for d in datums)) or "none"
            raise ArtifactError(f"declared output(s) {names} not among the outputs of Valohai execution "
                                f"{handle.job_id} (outputs: {produced}); write them to "
                                "$VH_OUTPUTS_DIR/<name>")
        manifest: dict[str, Any] = {}
        if handle.data.get("mode") == "runtime":
            manifest = self._manifest(handle.job_id, datums) or {}
            manifest.setdefault("versions", {})["inputs"] = dict(handle.data.get("inputs") or {})
        metrics = {k: v for k, v in (execution.get("cumulative_metadata") or {}).items() if k != "_time"}
        metrics.update(manifest.get("metrics") or {})
        outputs: dict[str, str] = {}
        entries = manifest.setdefault("outputs", {})
        export = handle.data.get("export") or {}
        for name, hits in matched.items():
            datum_uri = output_uri(hits)
            entry = entries.setdefault(name, {"size": sum(int(d.get("size") or 0) for d in hits)})
            entry["datum"] = datum_uri
            final = self._export(name, hits, export[name]) if name in export else datum_uri
            entry["uri"] = outputs[name] = final
        manifest.update({"metrics": metrics, "execution": {
            "id": execution.get("id"), "counter": execution.get("counter"), "status": execution.get("status"),
            "commit": (execution.get("commit") or {}).get("identifier"), "step": execution.get("step"),
            "environment": (execution.get("environment") or {}).get("slug"),
            "parameters": execution.get("parameters")}})
        return StepResult(outputs=outputs, metrics=metrics, backend=self.name, job_id=handle.job_id,
                          url=handle.url, manifest=manifest)

    def close(self) -> None:
        self.api.close()

    # -- deferred waiting: the shared list of a project (see ._shared) ---------------------------------------

    def _new_api(self) -> ValohaiAPI:
        api = self.api
        return ValohaiAPI(api.host, str(self.settings.token), conn_id=api.conn_id, timeout=api.timeout,
                          max_retries=api.max_retries, max_retry_wait=api.max_retry_wait)

    def _watch(self, handle: RunHandle) -> ProjectWatch | None:
        joined = self._watching.get(handle.job_id)
        if joined is not None:
            return joined[0]
        project_id = handle.data.get("project_id")
        if not project_id or self.settings.shared_watch_from <= 0 or not self.settings.token:
            return None
        watch = watch_for(self.api.host, str(project_id), self._new_api, period=self.poll_policy.cap,
                          linger=self.poll_policy.cap * 3, min_waiters=self.settings.shared_watch_from)
        watch.join()
        self._watching[handle.job_id] = (watch, time.monotonic())
        return watch

    def _unwatch(self, job_id: str) -> None:
        joined = self._watching.pop(job_id, None)
        if joined is not None:
            joined[0].leave()

    async def apoll(self, handle: RunHandle) -> RunStatus:
        status = await asyncio.to_thread(self.poll, handle)
        self._last_status[handle.job_id] = status
        if status.is_terminal:
            self._unwatch(handle.job_id)
        return status

    async def await_change(self, handle: RunHandle, timeout: float) -> RunStatus:
        """The status once terminal or after ``timeout``; with enough waiters, from the shared list.

        On the shared list, an execution still listed costs no request; one that left it (it ended, or
        was deleted) is asked for once, directly.
        """
        if handle.job_id in self._final:
            return self._final[handle.job_id]
        watch = self._watch(handle)
        if watch is None or not watch.shared:
            await asyncio.sleep(timeout)
            return await self.apoll(handle)
        joined_at = self._watching[handle.job_id][1]
        deadline = time.monotonic() + timeout
        status = self._last_status.get(handle.job_id)
        while True:
            if watch.shared and watch.listed_at > joined_at:
                listed = watch.incomplete.get(handle.job_id)
                if listed is None:
                    status = await self.apoll(handle)
                    if status.is_terminal:
                        return status
                    # Created after that list was taken: the next one shows it.
                    joined_at = watch.listed_at
                else:
                    status = self._last_status[handle.job_id] = map_status(listed)
                    joined_at = watch.listed_at
            elif not watch.shared:
                return await self.apoll(handle)
            left = deadline - time.monotonic()
            if left <= 0:
                return status if status is not None else await self.apoll(handle)
            await watch.changed(left)

    async def aread_logs(self, handle: RunHandle, cursor: Any = None) -> LogChunk:
        joined = self._watching.get(handle.job_id)
        final = handle.job_id in self._final
        if joined is not None and joined[0].shared and not final and handle.job_id not in self._inline_events:
            # On the shared list a log read is this execution's own request: pace it (never the final one).
            last = self._last_log_read.get(handle.job_id)
            if last is not None and time.monotonic() - last < self.settings.shared_log_interval:
                return LogChunk([], cursor)
        self._last_log_read[handle.job_id] = time.monotonic()
        return await asyncio.to_thread(self.read_logs, handle, cursor)

    async def aclose(self) -> None:
        for job_id in list(self._watching):
            self._unwatch(job_id)
        await asyncio.to_thread(self.close)

    # -- outputs ---------------------------------------------------------------------------------------------

    def _outputs(self, execution_id: str) -> list[dict[str, Any]]:
        return list(self.api.paged("data/", {"output_execution": execution_id, "limit": 500}))

    def _manifest(self, execution_id: str,
                  datums: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
        datums = self._outputs(execution_id) if datums is None else datums
        for datum in datums:
            if datum.get("name") == MANIFEST_NAME:
                return json.loads(self.api.download(str(datum["id"])))
        return None

    def _export(self, name: str, datums: list[Mapping[str, Any]], target: str) -> str:
        """Copy an output's datums to ``target`` under the artifact root: a file, or a directory of files."""
        single = len(datums) == 1 and "/" not in str(datums[0].get("name"))
        for datum in datums:
            content = self.api.download(str(datum["id"]))
            rel = str(datum["name"])[len(name) + 1:] if str(datum["name"]).startswith(name + "/") else \
                os.path.basename(str(datum["name"]))
            _write(target if single else _join(target, rel), content)
        log.info("valohai: exported output %s (%s) to %s", name, output_uri(list(datums)), target)
        return target


def _join(base: str, rel: str) -> str:
    return os.path.join(local_path(base), *rel.split("/")) if is_local(base) else f"{base.rstrip('/')}/{rel}"


def _write(uri: str, content: bytes) -> None:
    if is_local(uri):
        path = local_path(uri)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".part", "wb") as fh:
            fh.write(content)
        os.replace(path + ".part", path)
        return
    import fsspec

    with fsspec.open(uri, "wb") as fh:
        fh.write(content)


def _effective_settings(config: ValohaiConfig) -> ValohaiConfig:
    """The config with a connection's host, token and extras filled in; explicit settings win."""
    if not config.conn_id:
        return config
    from airflow_remote_ml.valohai_hook import backend_config_from_connection

    from_conn = backend_config_from_connection(config.conn_id)
    explicit = {f.name: getattr(config, f.name) for f in fields(config)
                if getattr(config, f.name) != ValohaiConfig.__dataclass_fields__[f.name].default
                and getattr(config, f.name) not in ({}, [])}
    return ValohaiConfig(**{**from_conn, **explicit})
