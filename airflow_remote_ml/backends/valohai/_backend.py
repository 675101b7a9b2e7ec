"""The valohai backend's I/O side: :class:`ValohaiBackend` drives executions through :class:`ValohaiAPI`.

Request building, the status table, the event cursor and output matching are pure functions in
:mod:`._execution`; every HTTP call and error mapping goes through :mod:`._client`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, ClassVar
from urllib.parse import urljoin

from airflow_remote_ml.backends.valohai._client import ValohaiAPI, _NotFound
from airflow_remote_ml.backends.valohai._execution import (
    IDENTITY_TAG_PREFIX,
    MANIFEST_NAME,
    RUNTIME_INPUT_SLOTS,
    ValohaiConfig,
    _handle_data,
    build_execution,
    event_line,
    map_status,
    match_outputs,
    new_events,
    output_uri,
    step_mode,
)
from airflow_remote_ml.core.artifacts import is_local, local_path
from airflow_remote_ml.core.backend import Backend, StepRequest
from airflow_remote_ml.core.errors import ArtifactError, ConfigError, TransientBackendError
from airflow_remote_ml.core.identity import StepIdentity
from airflow_remote_ml.core.poll import PollPolicy
from airflow_remote_ml.core.spec import reject_unknown_options
from airflow_remote_ml.core.status import LogChunk, RunHandle, RunState, RunStatus, StepResult

log = logging.getLogger(__name__)

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)


class ValohaiBackend(Backend):
    name: ClassVar[str] = "valohai"
    config_class = ValohaiConfig
    option_names = frozenset({"step", "commit", "environment", "title", "tags", "inputs", "parameters",
                              "image", "priority", "runtime_config", "export_outputs"})
    # Executions take minutes; starting a machine alone takes a while. Ask often at first, then calmly.
    poll_policy = PollPolicy(first_delay=1.0, factor=1.5, cap=30.0)
    has_job_page = True
    config: ValohaiConfig

    def __init__(self, config: ValohaiConfig, *, api: ValohaiAPI | None = None) -> None:
        super().__init__(config)
        self.settings = _effective_settings(config)
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

    # -- checks and lookups ------------------------------------------------------------------------------

    def validate(self, request: StepRequest) -> None:
        # Not super().validate(): profiles may come from the connection, so check them on the settings.
        spec, settings = request.spec, self.settings
        options = spec.options_for(self.name)
        reject_unknown_options(f"backend_options.{self.name}", options, set(self.option_names))
        mode, _ = step_mode(request, settings)
        if not settings.project:
            raise ConfigError("backend_config[valohai].project", "no Valohai project",
                              "set 'project' (name, 'owner/name' or id) in the config or the connection")
        if not (options.get("commit") or settings.commit or settings.branch):
            raise ConfigError("backend_config[valohai].branch", "no commit or branch to run",
                              "set 'branch' (e.g. 'main') or 'commit' in the config or the connection")
        profile = settings.profile(spec.resources.profile, self.name)
        unknown = sorted(set(profile) - {"environment"})
        if unknown:
            raise ConfigError(f"profiles.{spec.resources.profile}.{unknown[0]}",
                              "is not a Valohai profile setting",
                              "a Valohai profile sets 'environment' (a machine type slug)")
        if spec.secrets:
            raise ConfigError("secrets", "the valohai backend does not pass secrets",
                              "define them as secret environment variables of the Valohai project (Valohai "
                              "injects them into every execution) and drop them from 'secrets'")
        if spec.resources.gpu and not (options.get("environment") or profile.get("environment")
                                       or settings.environment):
            raise ConfigError("resources.gpu", "Valohai picks the machine from the environment; none is set",
                              "set resources.profile to a profile whose 'environment' is a GPU machine")
        for key, kind in (("tags", list), ("inputs", Mapping), ("parameters", Mapping), ("title", str)):
            if key in options and not isinstance(options[key], kind):
                raise ConfigError(f"backend_options.valohai.{key}", f"expected a {kind.__name__}",
                                  "see docs/backends/valohai.md")
        if mode == "runtime" and len(spec.inputs) > len(RUNTIME_INPUT_SLOTS):
            raise ConfigError("inputs", f"the runtime step takes at most {len(RUNTIME_INPUT_SLOTS)} inputs",
                              "pass a directory URI, or run a Valohai step declaring its own inputs")

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
            return str(newest["identifier"])
        raise ConfigError("backend_config[valohai].branch", f"Valohai knows no commit on branch {branch!r}",
                          "check the branch name; after pushing it set 'fetch': true so Valohai fetches it")

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
        for attempt in range(self.settings.max_retries + 1):
            try:
                # Creating is not idempotent: never blindly resent. After a transient failure the server
                # may have created it anyway, so look for the identity tag before trying again.
                execution = self.api.request("POST", "executions/", json_body=body, retry=False)
                break
            except TransientBackendError as exc:
                found = self.find(request.identity)
                if found is not None:
                    return found
                if attempt == self.settings.max_retries:
                    raise
                delay = min(self.settings.max_retry_wait, max(0.5 * 2 ** attempt, exc.retry_after or 0))
                log.warning("valohai: creating the execution failed (%s); retrying in %.1fs", exc, delay)
                self.api.sleep(delay)
        handle = self._handle(execution, data)
        log.info("valohai: created execution #%s for %s: %s", execution.get("counter"), request.identity.key,
                 handle.url)
        return handle

    def find(self, identity: StepIdentity) -> RunHandle | None:
        tag = f"{IDENTITY_TAG_PREFIX}{identity.digest}"
        project_id = self.project_id()
        # Tags cannot be filtered on: look at running executions first (the usual reattach), then at all.
        for extra in ({"status": "incomplete"}, {}):
            params = {"project": project_id, "ordering": "-ctime", "limit": 100, **extra}
            for scanned, execution in enumerate(self.api.paged("executions/", params)):
                if scanned >= self.settings.find_scan_limit:
                    break
                if tag in (execution.get("tags") or []):
                    if "environment_variables" not in execution:
                        execution = self.api.request("GET", f"executions/{execution['id']}/",
                                                     params={"exclude": "events,metadata"})
                    return self._handle(execution, _handle_data(execution))
        return None

    def poll(self, handle: RunHandle) -> RunStatus:
        if handle.job_id in self._final:
            return self._final[handle.job_id]
        try:
            execution = self.api.request("GET", f"executions/{handle.job_id}/",
                                         params={"exclude": "events,metadata,outputs"})
        except _NotFound:
            return RunStatus(RunState.LOST, "not found", "the Valohai execution no longer exists")
        status = map_status(execution)
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
        return RunStatus(status.state, status.remote_state, str(manifest.get("error") or status.message),
                         manifest.get("exit_code"))

    def cancel(self, handle: RunHandle) -> None:
        try:
            self.api.request("POST", f"executions/{handle.job_id}/stop/", json_body={})
        except _NotFound:
            return  # already gone: nothing to stop
        self._final.pop(handle.job_id, None)

    def read_logs(self, handle: RunHandle, cursor: Any = None) -> LogChunk:
        seen = int(cursor or 0)
        url = f"executions/{handle.job_id}/events/"
        page = self.api.request("GET", url, params={"limit": max(1, self.settings.log_batch)})
        events, new_cursor, missing = new_events(page, seen)
        if missing:
            # More arrived than the page held: ask again for exactly the new ones (limit counts from the end).
            page = self.api.request("GET", url, params={"limit": int(page.get("total", 0)) - seen})
            events, new_cursor, missing = new_events(page, seen)
            if missing:
                log.warning("valohai: %d log events of execution %s could not be fetched", missing,
                            handle.job_id)
        return LogChunk([event_line(e) for e in events], new_cursor)

    def log_tail(self, handle: RunHandle, lines: int = 40) -> list[str]:
        try:
            page = self.api.request("GET", f"executions/{handle.job_id}/events/", params={"limit": lines})
        except Exception:  # a courtesy in an error message; never mask the real error
            return []
        return [event_line(e) for e in page.get("events") or []]

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
