"""The valohai backend's pure part (no I/O): settings, the create-execution request, the status table,
the event cursor and output matching."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from airflow_remote_ml import runtime
from airflow_remote_ml.core.backend import BackendConfig, StepRequest
from airflow_remote_ml.core.errors import ConfigError
from airflow_remote_ml.core.identity import StepIdentity
from airflow_remote_ml.core.status import RunState, RunStatus

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
#: The runtime step's input that downloads the step's code archive (core/codepkg.py); the bootstrap points
#: the runtime's code URI at the downloaded file.
CODE_SLOT = "remote-ml-code"

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
code_slot = step.pop("valohai_code_slot", None)
if code_slot and step.get("code"):
    step["code"]["uri"] = downloaded(code_slot)
step["outputs"] = {name: os.path.join(outputs_dir, name) for name in step.get("outputs") or {}}
step["manifest_uri"] = os.path.join(outputs_dir, step.get("manifest_uri") or "remote-ml-manifest.json")
os.environ["REMOTE_ML_STEP"] = json.dumps(step)
source = os.environ.pop("REMOTE_ML_RUNTIME")
os.environ.pop("REMOTE_ML_BOOTSTRAP", None)
sys.argv = ["airflow_remote_ml.runtime"]
exec(compile(source, "airflow_remote_ml/runtime.py", "exec"), {"__name__": "__main__"})
'''


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
        find_page_size: executions per list page while ``find`` scans.
        shared_watch_from: in a triggerer, from this many executions waiting on one project they share one
            list of the project's unfinished executions instead of polling each (0: never share).
        shared_log_interval: seconds between log reads of one execution while it waits on the shared list.
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
    find_page_size: int = 100
    shared_watch_from: int = 4
    shared_log_interval: float = 600.0
    log_batch: int = 100



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
    # A failure carries Valohai's own status word as the reason (error, crashed, stopped): it leads the
    # task's error, ahead of whatever generic message the step's runtime recorded.
    if remote == "stopped" and "time limit" in detail.lower():
        # Valohai stopped it at its time limit: the step did not finish in time, nobody cancelled it.
        return RunStatus(RunState.FAILED, remote, f"Valohai stopped the execution: {detail}", reason=remote)
    if state is RunState.FAILED:
        return RunStatus(state, remote, detail or "the Valohai execution ended in error", reason=remote)
    if state is RunState.LOST:
        return RunStatus(state, remote, detail or "Valohai reports the execution crashed", reason=remote)
    if state is RunState.CANCELLED:
        return RunStatus(state, remote, detail or "the Valohai execution was stopped", reason=remote)
    return RunStatus(state, remote, detail)


#: How a status event states the step's exit code (the worker's "Process exited with code N." line).
_EXIT_CODE = re.compile(r"exit(?:ed)?(?: with)? (?:code|status) (-?\d+)", re.I)
#: Status events that say why the machine ended the step, worth quoting in the failure message.
_WHY = re.compile(r"out of memory|\boom\b|killed|crash|lost|time limit|error|fail", re.I)


def explain_failure(status: RunStatus, events: Sequence[Mapping[str, Any]]) -> RunStatus:
    """A failed status completed from the execution's last events: the exit code and the platform's why.

    Valohai's execution object has no exit code field; the worker states it in the ``status`` stream.
    A signal death (``-9``) is reported as the shell would (``137``). No I/O.
    """
    exit_code = status.exit_code
    why: list[str] = []
    for event in events:
        if event.get("stream") != "status":
            continue
        message = str(event.get("message", ""))
        match = _EXIT_CODE.search(message)
        if match:
            code = int(match.group(1))
            exit_code = 128 - code if code < 0 else code
        elif _WHY.search(message) and message not in why:
            why.append(message)
    message = status.message
    if why and not any(w in message for w in why):
        message = f"{message}: {why[-1]}" if message else why[-1]
    return RunStatus(status.state, status.remote_state, message, exit_code, status.reason or status.remote_state)


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


#: URL schemes Valohai downloads inputs from (valohai.yaml reference, step inputs: HTTP(S), s3://, azure://;
#: "Inputs with Valohai CLI": datum://, gs://, swift://; datasets: dataset://). The worker machine fetches
#: them, so a path on the Airflow worker's disk can never be one.
INPUT_URL_SCHEMES = frozenset({"http", "https", "s3", "gs", "azure", "swift", "datum", "dataset"})


def input_url_problem(url: str) -> str | None:
    """Why Valohai would refuse ``url`` as an input (the API answers 400 on ``inputs``), or None."""
    parsed = urlsplit(url)
    scheme = parsed.scheme.lower()
    if scheme in ("datum", "dataset"):
        return None if url.split("://", 1)[1] else f"{url!r} names no {scheme}"
    if scheme in INPUT_URL_SCHEMES and parsed.netloc:
        return None
    if not scheme or scheme == "file" or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
        return f"{url!r} is a path on the Airflow worker; Valohai downloads inputs from URLs only"
    return f"{url!r} is not a URL Valohai can download ({', '.join(sorted(INPUT_URL_SCHEMES))})"


def flag(value: Any, field_name: str) -> bool:
    """A yes/no option, also as the text a Jinja template renders (``"True"``, ``"false"``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(field_name, f"{value!r} is not true or false", "give a boolean (or a template rendering "
                      "to 'True'/'False')")


def input_urls(uri: str) -> list[str]:
    """Valohai input URLs of one of our input URIs (a multi-file output is ``datum://a,datum://b``)."""
    parts = [p.strip() for p in uri.split(",")] if uri.startswith("datum://") else [uri]
    return [p for p in parts if p]


def check_code_reachable(request: StepRequest) -> None:
    """The code archive is an input of the runtime step, so Valohai must be able to download its URI."""
    if request.code is None:
        return
    problem = input_url_problem(request.code.uri)
    if problem:
        raise ConfigError("code", f"the step's code archive would be at {request.code.uri!r}, which Valohai cannot "
                          f"download: {problem}",
                          "use an artifact_root Valohai downloads from (s3://, gs://, azure://), or set code=False: "
                          "Valohai runs the project's repository commit, whose code the runtime step imports "
                          "through python_path")


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
    export = flag(options.get("export_outputs", config.export_outputs), "backend_options.valohai.export_outputs")
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
        code_slot: dict[str, Any] = {}
        if request.code is not None:
            check_code_reachable(request)
            inputs[CODE_SLOT] = [request.code.uri]
            code_slot = {"valohai_code_slot": CODE_SLOT}
        step_json = request.runtime_config(outputs={name: name for name in spec.outputs},
                                           manifest_uri=MANIFEST_NAME, python_path=list(config.python_path),
                                           valohai_input_slots=slots, **code_slot)
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


#: Event ids a log cursor remembers: a late event is recognised as new when it lands among the last
#: this many events. Bounded so the cursor stays small in trigger kwargs and the task-state record.
CURSOR_WINDOW = 500


def event_id(event: Mapping[str, Any]) -> str:
    """An event's identity, as ``valohai-cli``'s LogManager computes it: md5 of ``stream+time+message``.

    The events API has no offset and no event id; the CLI (``valohai_cli/log_manager.py``) remembers
    these hashes instead of counting, because a count drops or repeats events that arrive late. 16 hex
    digits keep the cursor short; a collision only hides one line of one execution's log.
    """
    raw = "+".join((str(event.get("stream", "")), str(event.get("time", "")), str(event.get("message", ""))))
    return hashlib.md5(raw.encode("utf-8", "replace"), usedforsecurity=False).hexdigest()[:16]


@dataclass(frozen=True)
class LogCursor:
    """Where a log stream stands: how many events were shown, and the ids of the newest ones.

    JSON-serialisable (:meth:`to_json`) so it survives a trigger restart and the task-state record.
    ``horizon`` is the time of the newest event that fell out of the remembered window: an event older
    than that is taken as shown. ``skip`` carries a count-only cursor of an older version: the first
    ``skip`` events of the whole log were shown.
    """

    shown: int = 0
    seen: tuple[str, ...] = ()
    horizon: str = ""
    skip: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"v": 2, "shown": self.shown, "seen": list(self.seen), "horizon": self.horizon}

    @classmethod
    def from_json(cls, data: Any) -> LogCursor:
        """From :meth:`to_json`, ``None`` (the start) or an older count-only cursor (an int)."""
        if isinstance(data, Mapping) and data.get("v") == 2:
            return cls(int(data.get("shown") or 0), tuple(str(x) for x in data.get("seen") or ()),
                       str(data.get("horizon") or ""))
        if isinstance(data, int) and not isinstance(data, bool) and data > 0:
            return cls(shown=data, skip=data)
        return cls()


def new_events(events: Sequence[Mapping[str, Any]], cursor: LogCursor) -> tuple[list[Mapping[str, Any]], LogCursor]:
    """The events of a page not shown yet, and the cursor after showing them. No I/O.

    De-duplicates by :func:`event_id`, never by position: a late event (ordered by time among the
    events already listed) is new, an event seen before is skipped however the page shifted.
    """
    events = sorted(events, key=lambda e: str(e.get("time", "")))  # stable: arrival order within a time
    if cursor.skip:
        events = events[cursor.skip:]  # the page is the whole log (see events_to_fetch)
    seen = set(cursor.seen)
    fresh = [e for e in events if event_id(e) not in seen and str(e.get("time", "")) > cursor.horizon]
    ids = [*cursor.seen, *(event_id(e) for e in fresh)]
    horizon = cursor.horizon
    if len(ids) > CURSOR_WINDOW:
        times = {event_id(e): str(e.get("time", "")) for e in events}
        dropped, ids = ids[:-CURSOR_WINDOW], ids[-CURSOR_WINDOW:]
        horizon = max([horizon, *(times.get(i, "") for i in dropped)])
    return fresh, LogCursor(cursor.shown + len(fresh), tuple(ids), horizon)


def events_to_fetch(total: int, page_len: int, fresh: int, cursor: LogCursor) -> int:
    """How many of the newest events to ask for again (0: the page was enough).

    ``total - shown`` events are unshown; when the page held fewer new ones, the rest lie before it
    (more arrived than a page holds, or a late one landed among old ones): ask for all unshown ones
    plus the remembered window, so a late event among them is found too.
    """
    if page_len >= total:
        return 0
    if cursor.skip:
        return total
    missing = total - cursor.shown
    if missing <= fresh:
        return 0
    return min(total, missing + len(cursor.seen))


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


def _handle_data(execution: Mapping[str, Any]) -> dict[str, Any]:
    """What submit recorded in the execution's environment, for a handle rebuilt by ``find``."""
    env = execution.get("environment_variables") or {}
    with contextlib.suppress(TypeError, ValueError):
        data = json.loads(env.get(HANDLE_ENV) or "{}")
        if isinstance(data, dict):
            return data
    return {}
