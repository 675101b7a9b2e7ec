"""The valohai backend's pure part (no I/O): settings, the create-execution request, the status table,
the event cursor and output matching."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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


def _handle_data(execution: Mapping[str, Any]) -> dict[str, Any]:
    """What submit recorded in the execution's environment, for a handle rebuilt by ``find``."""
    env = execution.get("environment_variables") or {}
    with contextlib.suppress(TypeError, ValueError):
        data = json.loads(env.get(HANDLE_ENV) or "{}")
        if isinstance(data, dict):
            return data
    return {}
