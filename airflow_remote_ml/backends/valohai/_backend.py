"""The ``valohai`` backend: each step is a Valohai execution, created through the v0 REST API.

Valohai versions every execution (code commit, data, parameters, environment, metrics) and launches the
machine a step needs; Airflow keeps the schedule and the data flow. A step runs in one of two modes:

* **a Valohai step** (``backend_options={"valohai": {"step": "train"}}``, or the ``steps`` setting mapping
  the spec's callable / task id to a step name): the execution runs that step of the commit's
  ``valohai.yaml``. Its command comes from the YAML, so the spec's ``command``/``callable`` is not run
  (it still documents the task); ``params`` become the execution's parameters and ``inputs`` its inputs.
* **the generic runtime step** (the ``runtime_step`` setting names a step whose command is
  ``python3 -c "$REMOTE_ML_BOOTSTRAP"``, see ``backends/valohai/valohai.yaml``): the spec's command or
  callable runs under airflow-remote-ml's runtime, injected through environment variables, so any step
  runs on Valohai without a YAML step of its own.

Either way the step's outputs are the files written to ``$VH_OUTPUTS_DIR``, which Valohai stores as
datums; the result carries them as ``datum://<id>`` URIs (never signed download URLs), or, with
``export_outputs``, copies them under the artifact root so a step on another backend can read them.
Metrics are the execution's metadata: the JSON objects the step printed on stdout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar
from urllib.parse import urljoin, urlparse

import requests
import tenacity

from airflow_remote_ml import runtime
from airflow_remote_ml.core.artifacts import is_local, local_path
from airflow_remote_ml.core.backend import Backend, BackendConfig, StepRequest
from airflow_remote_ml.core.errors import (
    ArtifactError,
    BackendAPIError,
    ConfigError,
    TransientBackendError,
)
from airflow_remote_ml.core.identity import StepIdentity
from airflow_remote_ml.core.poll import PollPolicy, parse_retry_after
from airflow_remote_ml.core.spec import reject_unknown_options
from airflow_remote_ml.core.status import LogChunk, RunHandle, RunState, RunStatus, StepResult

log = logging.getLogger(__name__)

DEFAULT_HOST = "https://app.valohai.com"
#: The tag that carries a step's identity; ``find`` looks executions up by it.
IDENTITY_TAG_PREFIX = "remote-ml:"
#: Environment variable holding what a handle needs, so ``find`` can rebuild one from the execution.
HANDLE_ENV = "REMOTE_ML_VALOHAI"
#: The runtime's result manifest, written to ``$VH_OUTPUTS_DIR`` in runtime mode (so it is a datum too).
MANIFEST_NAME = "remote-ml-manifest.json"
#: Inputs of the generic runtime step: Valohai only accepts inputs a step declares, so the runtime
#: step declares these slots and the bootstrap maps them back to the spec's input names.
RUNTIME_INPUT_SLOTS = tuple(f"input-{i}" for i in range(8))

INCOMPLETE = frozenset({"created", "queued", "started", "stopping"})
_STATES: dict[str, RunState] = {
    "created": RunState.QUEUED,
    "queued": RunState.QUEUED,
    "started": RunState.RUNNING,
    # Stop was asked for and the process may still be running; the end state follows.
    "stopping": RunState.RUNNING,
    "complete": RunState.SUCCEEDED,
    "error": RunState.FAILED,
    # The platform lost the execution (machine gone, internal error): how the step ended is unknown.
    "crashed": RunState.LOST,
    "stopped": RunState.CANCELLED,
}
_warned: set[tuple[Any, str]] = set()
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
_TAG_BAD = re.compile(r"[^A-Za-z0-9._:/=+-]+")

#: Runs in the execution before the runtime: maps Valohai's directories onto the runtime's step JSON.
BOOTSTRAP = r'''
import json, os, sys
step = json.loads(os.environ["REMOTE_ML_STEP"])
inputs_dir = os.environ.get("VH_INPUTS_DIR", "/valohai/inputs")
outputs_dir = os.environ.get("VH_OUTPUTS_DIR", "/valohai/outputs")
def downloaded(slot):
    folder = os.path.join(inputs_dir, slot)
    files = sorted(os.path.join(r, f) for r, _, names in os.walk(folder) for f in names)
    return files[0] if len(files) == 1 else folder
slots = step.pop("valohai_input_slots", None) or {}
step["inputs"] = {name: downloaded(slot) for name, slot in slots.items()}
step["outputs"] = {name: os.path.join(outputs_dir, name) for name in step.get("outputs") or {}}
step["manifest_uri"] = os.path.join(outputs_dir, step.get("manifest_uri") or "remote-ml-manifest.json")
os.environ["REMOTE_ML_STEP"] = json.dumps(step)
source = os.environ.pop("REMOTE_ML_RUNTIME")
os.environ.pop("REMOTE_ML_BOOTSTRAP", None)
sys.argv = ["airflow_remote_ml.runtime"]
exec(compile(source, "airflow_remote_ml/runtime.py", "exec"), {"__name__": "__main__"})
'''

# What to do about a refused field of the create request (DRF field errors name Valohai's fields).
_FIELD_FIXES = {
    "project": "set 'project' of the valohai backend to a project name, 'owner/name' or the project id",
    "commit": "set 'commit' or 'branch' to one Valohai knows; after a push set 'fetch': true",
    "step": "name a step of the commit's valohai.yaml in backend_options.valohai.step or the 'steps' setting",
    "environment": "use an environment slug of your organisation in the profile or backend_options",
    "parameters": "declare each of the step's params as a parameter of the Valohai step in valohai.yaml",
    "inputs": "declare the step's inputs in valohai.yaml and pass datum:// URIs or URLs the project can read",
}


@dataclass(frozen=True)
class ValohaiConfig(BackendConfig):
    """Settings of the Valohai backend (from ``backend_config``, a Valohai connection, or both).

    Attributes:
        host: the Valohai installation.
        token: an API token; prefer ``conn_id`` so it never travels in task or trigger arguments.
        conn_id: an Airflow connection of type ``valohai`` (host, API token as password, settings in extra).
        project: project name, ``owner/name`` or id.
        commit: the commit identifier every execution uses (wins over ``branch``).
        branch: a branch whose newest commit Valohai runs.
        fetch: ask Valohai to fetch new commits from the repository before each submission.
        environment: the default environment (machine type) slug; profiles map to others.
        steps: Valohai step names by the spec's callable (``pkg.mod:func``) or by task id.
        runtime_step: the generic step that runs any command or callable under the runtime.
        python_path: entries (relative to the repository) added to ``sys.path`` in runtime mode.
        export_outputs: copy each output under the artifact root and pass that URI on instead of a datum.
        tags: extra tags on every execution.
        request_timeout: seconds per HTTP request.
        max_retries: retries of a request refused with 429/5xx or a broken connection.
        max_retry_wait: the longest wait between retries, whatever ``Retry-After`` says.
        find_scan_limit: how many of the project's newest executions ``find`` looks through.
        log_batch: how many of the newest events one log read asks for.
    """

    host: str = DEFAULT_HOST
    token: str | None = None
    conn_id: str | None = None
    project: str | None = None
    commit: str | None = None
    branch: str | None = None
    fetch: bool = False
    environment: str | None = None
    steps: dict[str, str] = field(default_factory=dict)
    runtime_step: str | None = None
    python_path: list[str] = field(default_factory=list)
    export_outputs: bool = False
    tags: list[str] = field(default_factory=list)
    request_timeout: float = 30.0
    max_retries: int = 5
    max_retry_wait: float = 60.0
    find_scan_limit: int = 2000
    log_batch: int = 100


# -- the HTTP client: every request and every error mapping goes through ValohaiAPI.request ---------------


class _NotFound(BackendAPIError):
    """A 404: the object does not exist (or the token may not see it)."""


class ValohaiAPI:
    """A small client of the Valohai v0 API: token auth, retries honouring ``Retry-After``, error mapping."""

    def __init__(self, host: str, token: str, *, conn_id: str | None = None, timeout: float = 30.0,
                 max_retries: int = 5, max_retry_wait: float = 60.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        host = host.strip().rstrip("/")
        if "://" not in host:
            host = "https://" + host
        self.host = host
        self.base = host + "/api/v0/"
        self.conn_id = conn_id
        self.timeout = timeout
        self.max_retries = max(0, int(max_retries))
        self.max_retry_wait = max_retry_wait
        self.sleep = sleep
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Token {token}", "Accept": "application/json",
                                     "User-Agent": "airflow-remote-ml"})

    def url(self, path: str) -> str:
        return path if "://" in path else urljoin(self.base, path.lstrip("/"))

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                json_body: Any = None, retry: bool = True) -> Any:
        """Send one request (retried when transient) and return its JSON body (None when empty)."""
        def once() -> Any:
            return self._once(method, self.url(path), params, json_body)

        if not retry:
            return once()
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientBackendError),
            stop=tenacity.stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            sleep=self.sleep,
            before_sleep=lambda state: log.warning("valohai: %s %s: %s; retrying", method, path,
                                                   state.outcome.exception() if state.outcome else "?"),
            reraise=True,
        )
        return retrying(once)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        backoff = min(self.max_retry_wait, 0.5 * 2 ** (state.attempt_number - 1))
        retry_after = getattr(exc, "retry_after", None)
        return min(self.max_retry_wait, max(backoff, retry_after)) if retry_after is not None else backoff

    def _once(self, method: str, url: str, params: Mapping[str, Any] | None, json_body: Any) -> Any:
        try:
            resp = self.session.request(method, url, params=params, json=json_body, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientBackendError("valohai", f"{method} {urlparse(url).path}: {exc}") from exc
        except requests.RequestException as exc:
            raise BackendAPIError("valohai", f"{method} {urlparse(url).path}: {exc}") from exc
        error = self.error_for(method, url, resp)
        if error is not None:
            raise error
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise BackendAPIError("valohai", f"{method} {urlparse(url).path} answered non-JSON",
                                  resp.status_code) from None

    def error_for(self, method: str, url: str, resp: requests.Response) -> Exception | None:
        """The exception an HTTP answer means, or None for a success. The one choke point of error mapping."""
        code = resp.status_code
        if code < 400:
            return None
        try:
            body: Any = resp.json()
        except ValueError:
            body = None
        where = f"{method} {urlparse(url).path}"
        detail = body.get("detail") if isinstance(body, dict) else None
        if not isinstance(detail, str):
            html = "<html" in resp.text[:500].lower()
            detail = _field_text(body) if body else ("an HTML error page" if html
                                                     else resp.text[:200].strip())
        if code == 429 or code >= 500:
            return TransientBackendError("valohai", f"{where}: {detail}", code,
                                         parse_retry_after(resp.headers.get("Retry-After")))
        if code == 401:
            fix = (f"check the Valohai API token in connection {self.conn_id!r}" if self.conn_id
                   else "check the 'token' setting of the valohai backend")
            return ConfigError("conn_id" if self.conn_id else "token",
                               f"Valohai at {self.host} refused the API token ({detail})", fix)
        if code == 400 and isinstance(body, dict) and body and "detail" not in body:
            name = next(iter(body))
            problems = "; ".join(f"{k}: {_field_text(v)}" for k, v in body.items())
            return ConfigError(f"valohai.{name}", f"Valohai refused {where}: {problems}",
                               _FIELD_FIXES.get(name, "fix the field Valohai names"))
        if code == 403:
            return BackendAPIError("valohai", f"{where}: permission denied ({detail}); the token's user "
                                   "needs access to the project", code)
        if code == 404:
            return _NotFound("valohai", f"{where}: not found", code)
        return BackendAPIError("valohai", f"{where}: {detail}", code)

    def paged(self, path: str, params: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Every item of a list endpoint, following DRF's absolute ``next`` links."""
        page = self.request("GET", path, params=dict(params or {}))
        while True:
            if isinstance(page, list):  # a few endpoints answer a bare list
                yield from page
                return
            yield from page.get("results") or []
            nxt = page.get("next")
            if not nxt:
                return
            page = self.request("GET", nxt)

    def download(self, datum_id: str) -> bytes:
        """A datum's content. The short-lived signed URL is used at once and never stored or logged."""
        resp = self.session.get(self.url(f"data/{datum_id}/download/"), timeout=self.timeout)
        error = self.error_for("GET", resp.url, resp)
        if error is not None:
            raise error
        if resp.headers.get("Content-Disposition", "").startswith("attachment"):
            return resp.content
        signed = resp.json()["url"]
        # A plain GET without our Authorization header: the URL carries its own signature.
        data = requests.get(signed, timeout=max(self.timeout, 300))
        if data.status_code >= 400:
            if data.status_code == 429 or data.status_code >= 500:
                raise TransientBackendError("valohai", f"downloading datum {datum_id}", data.status_code)
            raise ArtifactError(f"downloading datum://{datum_id} failed with HTTP {data.status_code}")
        return data.content

    def close(self) -> None:
        self.session.close()


def _field_text(value: Any) -> str:
    """Messages of a DRF error value: ``[{"message", "code"}]``, ``["text"]`` or nested mappings."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "; ".join(_field_text(v) for v in value)
    if isinstance(value, dict):
        if "message" in value:
            return str(value["message"])
        return "; ".join(f"{k}: {_field_text(v)}" for k, v in value.items())
    return str(value)


# -- pure helpers: status mapping, request building, events, outputs -----------------------------------------


def map_status(execution: Mapping[str, Any]) -> RunStatus:
    """The status of an execution object. An unknown status keeps waiting (and is logged)."""
    remote = str(execution.get("status") or "")
    detail = str(execution.get("status_detail") or "")
    state = _STATES.get(remote)
    if state is None:
        if (execution.get("id"), remote) not in _warned:  # once per execution and status, not every poll
            _warned.add((execution.get("id"), remote))
            log.warning("valohai: execution %s has a status this backend does not know (%r); still waiting",
                        execution.get("id"), remote)
        state = RunState.RUNNING if execution.get("start_time") else RunState.QUEUED
        return RunStatus(state, remote, detail)
    if remote == "stopped" and "time limit" in detail.lower():
        # Valohai stopped it at its time limit: the step did not finish in time, nobody cancelled it.
        return RunStatus(RunState.FAILED, remote, f"Valohai stopped the execution: {detail}")
    if state is RunState.FAILED:
        return RunStatus(state, remote, detail or "the Valohai execution ended in error")
    if state is RunState.LOST:
        return RunStatus(state, remote, detail or "Valohai reports the execution crashed")
    return RunStatus(state, remote, detail)


def identity_tags(identity: StepIdentity) -> list[str]:
    """The lookup tag plus readable ones (tags are free text on Valohai; keep them short and plain)."""
    def clean(value: str) -> str:
        return _TAG_BAD.sub("_", value)[:100]

    tags = [f"{IDENTITY_TAG_PREFIX}{identity.digest}", clean(f"dag:{identity.dag_id}"),
            clean(f"task:{identity.task_id}")]
    if identity.map_index >= 0:
        tags.append(f"map:{identity.map_index}")
    return tags


def param_value(value: Any) -> Any:
    """Valohai parameters are strings, numbers or flags (or lists of them); structures travel as JSON."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                       for v in value):
        return value
    return json.dumps(value, sort_keys=True)


def input_urls(uri: str) -> list[str]:
    """Valohai input URLs of one of our input URIs (a multi-file output is ``datum://a,datum://b``)."""
    parts = [p.strip() for p in uri.split(",")] if uri.startswith("datum://") else [uri]
    return [p for p in parts if p]


def step_mode(request: StepRequest, config: ValohaiConfig) -> tuple[str, str]:
    """``("step", name)`` for a Valohai step or ``("runtime", name)`` for the generic runtime step."""
    options = request.spec.options_for("valohai")
    if options.get("step"):
        return "step", str(options["step"])
    for key in (request.spec.callable, request.identity.task_id):
        if key and key in config.steps:
            return "step", config.steps[key]
    if config.runtime_step:
        return "runtime", config.runtime_step
    raise ConfigError("backend_options.valohai.step", "no Valohai step runs this task",
                      "name one with backend_options={'valohai': {'step': '<step of valohai.yaml>'}}, map "
                      "the callable or task id in the backend's 'steps' setting, or set 'runtime_step' to "
                      "the generic step of backends/valohai/valohai.yaml")


def build_execution(
    request: StepRequest, config: ValohaiConfig, project_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The create-execution body and the handle data for a validated request. No I/O."""
    spec = request.spec
    options = spec.options_for("valohai")
    mode, step = step_mode(request, config)
    profile = config.profile(spec.resources.profile, "valohai")
    environment = options.get("environment") or profile.get("environment") or config.environment
    export = bool(options.get("export_outputs", config.export_outputs))
    handle_data: dict[str, Any] = {
        "project_id": project_id,
        "mode": mode,
        "declared_outputs": list(spec.outputs),
        "inputs": dict(spec.inputs),
        "export": {name: request.outputs[name] for name in spec.outputs} if export else {},
    }
    env = dict(spec.env)
    inputs: dict[str, list[str]] = {}
    parameters: dict[str, Any] = {}
    if mode == "step":
        parameters = {k: param_value(v) for k, v in spec.params.items()}
        inputs = {name: input_urls(uri) for name, uri in spec.inputs.items()}
    else:
        slots = dict(zip(sorted(spec.inputs), RUNTIME_INPUT_SLOTS, strict=False))
        inputs = {slots[name]: input_urls(uri) for name, uri in spec.inputs.items()}
        step_json = request.runtime_config(outputs={name: name for name in spec.outputs},
                                           manifest_uri=MANIFEST_NAME, python_path=list(config.python_path),
                                           valohai_input_slots=slots)
        env.update({"REMOTE_ML_STEP": json.dumps(step_json), "REMOTE_ML_RUNTIME": runtime.source(),
                    "REMOTE_ML_BOOTSTRAP": BOOTSTRAP})
    parameters.update(options.get("parameters") or {})
    for name, value in (options.get("inputs") or {}).items():
        inputs[name] = [value] if isinstance(value, str) else list(value)
    env[HANDLE_ENV] = json.dumps({k: v for k, v in handle_data.items() if k != "project_id"}, sort_keys=True)
    identity = request.identity
    default_title = f"{identity.dag_id}.{identity.task_id}" + (f"[{identity.map_index}]"
                                                             if identity.map_index >= 0 else "")
    body: dict[str, Any] = {
        "project": project_id,
        "commit": options.get("commit") or config.commit or config.branch,
        "step": step,
        "parameters": parameters,
        "inputs": inputs,
        "environment_variables": env,
        "tags": [*identity_tags(identity), *config.tags, *(options.get("tags") or [])],
        "title": options.get("title") or default_title,
    }
    if environment:
        body["environment"] = environment
    image = options.get("image", spec.image)
    if image:
        body["image"] = image
    if spec.timeout:
        body["time_limit"] = math.ceil(spec.timeout)
    for key in ("priority", "runtime_config"):
        if key in options:
            body[key] = options[key]
    return body, handle_data


def new_events(page: Mapping[str, Any], seen: int) -> tuple[list[dict[str, Any]], int, int]:
    """Slice an ``events/?limit=N`` answer (the *last* N events) after ``seen`` events.

    Returns the new events, the new cursor, and how many new events the page did not hold (the caller
    asks again with a larger limit when that is positive). There is no offset in the API, but events are
    only ever appended, so the count of events seen is an exact cursor.
    """
    events = list(page.get("events") or [])
    total = int(page.get("total", len(events)))
    fresh = total - seen
    if fresh <= 0:
        return [], max(total, 0) if total < seen else seen, 0
    if fresh > len(events):
        return events, total, fresh - len(events)
    return events[len(events) - fresh:], total, 0


def event_line(event: Mapping[str, Any]) -> str:
    message = str(event.get("message", ""))
    return f"[valohai] {message}" if event.get("stream") == "status" else message


def match_outputs(declared: list[str], datums: list[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Datums of each declared output: named exactly ``name``, ``name.<ext>``, or under ``name/``."""
    matched: dict[str, list[Mapping[str, Any]]] = {}
    for name in declared:
        hits = [d for d in datums if d.get("name") == name or str(d.get("name", "")).startswith(name + "/")
                or ("/" not in str(d.get("name", "")) and str(d.get("name", "")).split(".", 1)[0] == name)]
        if hits:
            matched[name] = sorted(hits, key=lambda d: str(d.get("name")))
    return matched


def output_uri(datums: list[Mapping[str, Any]]) -> str:
    return ",".join(f"datum://{d['id']}" for d in datums)


# -- the backend ------------------------------------------------------------------------------------------


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


def _handle_data(execution: Mapping[str, Any]) -> dict[str, Any]:
    """What submit recorded in the execution's environment, for a handle rebuilt by ``find``."""
    env = execution.get("environment_variables") or {}
    with contextlib.suppress(TypeError, ValueError):
        data = json.loads(env.get(HANDLE_ENV) or "{}")
        if isinstance(data, dict):
            return data
    return {}


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
