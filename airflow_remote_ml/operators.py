"""RemoteExecutionOperator: one step, any backend, chosen per run."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_remote_ml import hooks
from airflow_remote_ml.core.artifacts import ArtifactStore
from airflow_remote_ml.core.backend import Backend, StepRequest
from airflow_remote_ml.core.errors import BackendUnavailableError, ConfigError, RemoteMLError
from airflow_remote_ml.core.identity import StepIdentity
from airflow_remote_ml.core.registry import available_backends, create_backend
from airflow_remote_ml.core.spec import StepSpec
from airflow_remote_ml.core.status import RunHandle, RunState, RunStatus
from airflow_remote_ml.core.wait import failure_error, wait_for_completion
from airflow_remote_ml.links import XCOM_JOB_URL_KEY, RemoteJobLink
from airflow_remote_ml.triggers import RemoteStepTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

#: Key of this operator's record in Airflow's task state store.
STATE_KEY = "airflow_remote_ml"
#: XCom keys the operator pushes besides ``return_value``; an output may not take one of these names.
RESERVED_XCOM_KEYS = frozenset({"return_value", "outputs", "metrics", "backend", "job_id", "url",
                                "remote_job_url"})
#: Extra seconds past a step's own timeout before Airflow cancels it (the runtime stops it first).
TIMEOUT_GRACE_SECONDS = 60.0

_SPEC_FIELDS = ("image", "command", "callable", "shell", "parameters", "env", "secrets", "inputs", "outputs",
                "compute", "timeout", "backend_options")


def _default_deferrable() -> bool:
    try:
        from airflow.sdk.configuration import conf

        return conf.getboolean("operators", "default_deferrable", fallback=False)
    except Exception:
        return False


class RemoteExecutionOperator(BaseOperator):
    """Run one ML step on a pluggable backend and hand its outputs on as URIs.

    The step is backend-neutral: the same arguments run as a subprocess (``local``), a container
    (``docker``), a pod (``kubernetes``), a job run (``databricks``) or an execution (``valohai``).
    ``backend`` is templated, so ``backend="{{ params.backend }}"`` picks it per run.

    Args:
        backend: registered backend name; default ``[remote_ml] default_backend`` (``local``).
        backend_config: settings for the backend, merged over ``[remote_ml] backend_config``; or a
            mapping keyed by backend name, of which the chosen backend's section applies.
        image: container image (container backends).
        command: argv list to run (a string only with ``shell=True``). ``{inputs.x}``,
            ``{outputs.x}`` and ``{params.x}`` in arguments become paths and values.
        callable: ``'package.module:function'`` called with ``parameters`` as keyword arguments.
        parameters: JSON-serialisable parameters of the step.
        env: environment variables of the step.
        secrets: ``{ENV_NAME: 'secret-name/key'}`` references resolved where the step runs.
        inputs: ``{name: uri}``; an upstream step's ``.output["outputs"]["name"]`` works.
        outputs: names of the artifacts the step must produce.
        compute: the step's resources, ``{'cpu': 2, 'memory': '4Gi', 'gpu': 1, 'profile': 'gpu'}``
            (named ``compute`` because ``resources`` is taken by BaseOperator).
        timeout: seconds (or a timedelta) the step may run before it is stopped.
        backend_options: ``{backend_name: {...}}`` escape hatch; options for other backends are ignored.
        artifact_root: where outputs go; default ``[remote_ml] artifact_root``.
        code_version: recorded in the step's version record (e.g. a git SHA).
        deferrable: wait in the triggerer instead of on a worker; default ``[operators] default_deferrable``.

    Returns (XCom): ``{"outputs": {name: uri}, "metrics": {...}, "backend", "job_id", "url"}``.
    """

    template_fields: Sequence[str] = (
        "backend", "backend_config", "image", "command", "callable", "parameters", "env", "secrets", "inputs",
        "outputs", "compute", "timeout", "backend_options", "artifact_root", "code_version",
    )
    template_fields_renderers = {"parameters": "json", "env": "json", "inputs": "json", "compute": "json",
                                 "backend_options": "json", "backend_config": "json"}
    operator_extra_links = (RemoteJobLink(),)
    ui_color = "#dbeafe"

    def __init__(
        self,
        *,
        backend: str | None = None,
        backend_config: Mapping[str, Any] | None = None,
        image: str | None = None,
        command: Sequence[str] | str | None = None,
        callable: str | None = None,  # noqa: A002 - the name users expect
        shell: bool = False,
        parameters: Mapping[str, Any] | None = None,
        env: Mapping[str, Any] | None = None,
        secrets: Mapping[str, Any] | None = None,
        inputs: Mapping[str, Any] | None = None,
        outputs: Sequence[str] | None = None,
        compute: Mapping[str, Any] | None = None,
        timeout: float | timedelta | None = None,
        backend_options: Mapping[str, Mapping[str, Any]] | None = None,
        artifact_root: str | None = None,
        code_version: str | None = None,
        deferrable: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.backend = backend
        self.backend_config = dict(backend_config or {})
        self.image = image
        self.command = command
        self.callable = callable
        self.shell = shell
        self.parameters = parameters or {}
        self.env = env or {}
        self.secrets = secrets or {}
        self.inputs = inputs or {}
        self.outputs = list(outputs or [])
        self.compute = compute or {}
        self.timeout = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        self.backend_options = backend_options or {}
        self.artifact_root = artifact_root
        self.code_version = code_version
        self.deferrable = _default_deferrable() if deferrable is None else deferrable
        self._backend: Backend | None = None
        self._handle: RunHandle | None = None
        self._store: Any = None
        self._ti: Any = None
        self._record: dict[str, Any] = {}
        self._validate_literal_arguments()

    # -- validation ----------------------------------------------------------------------------------------

    def _validate_literal_arguments(self) -> None:
        """Fail at DAG parse time for arguments that are already final (no template, no XComArg)."""
        if isinstance(self.backend, str) and not _is_templated(self.backend) \
                and self.backend not in available_backends():
            from airflow_remote_ml.core.errors import BackendNotFoundError

            raise BackendNotFoundError(self.backend, available_backends())
        values = {name: getattr(self, name) for name in _SPEC_FIELDS}
        if any(_is_templated(value) for value in values.values()):
            return
        self._build_spec()

    def _build_spec(self) -> StepSpec:
        for name in self.outputs if isinstance(self.outputs, (list, tuple)) else ():
            if name in RESERVED_XCOM_KEYS:
                raise ConfigError(f"outputs.{name}", "is a reserved XCom key of this operator",
                                  "choose another output name")
        return StepSpec.build(
            image=self.image, command=self.command, callable=self.callable, shell=self.shell,
            params=_plain(self.parameters), env=self.env, secrets=self.secrets, inputs=_plain(self.inputs),
            outputs=self.outputs, resources=self.compute, timeout=self.timeout,
            backend_options=self.backend_options,
        )

    def _make_backend(self) -> Backend:
        name = self.backend or hooks.default_backend()
        return create_backend(name, merge_backend_config(name, hooks.deployment_backend_config(name),
                                                         self.backend_config))

    # -- execution -------------------------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        started = time.time()
        try:
            spec = self._build_spec()
            backend = self._backend = self._make_backend()
            artifacts = ArtifactStore(self.artifact_root or hooks.default_artifact_root())
        except (ConfigError, BackendUnavailableError) as exc:
            # A wrong configuration never heals by retrying.
            raise AirflowFailException(str(exc)) from exc
        ti = self._ti = context["ti"]
        map_index = getattr(ti, "map_index", -1)
        base = StepIdentity(ti.dag_id, ti.task_id, ti.run_id, -1 if map_index is None else map_index)
        self._store = context.get("task_state_store")
        try:
            handle = self._attach_or_submit(backend, spec, base, artifacts, ti)
        except (ConfigError, BackendUnavailableError) as exc:
            raise AirflowFailException(str(exc)) from exc
        self._handle = handle
        # Always pushed (empty without a page) so the extra link never looks up a missing XCom.
        ti.xcom_push(key=XCOM_JOB_URL_KEY, value=handle.url or "")
        if handle.url:
            self.log.info("Remote job: %s", handle.url)
        deadline = self._deadline(spec, started)
        if self.deferrable:
            self.log.info("Deferring: waiting for %s job %s in the triggerer", backend.name, handle.job_id)
            trigger = RemoteStepTrigger(backend=backend.name, backend_config=backend.config_json(),
                                        handle=handle.to_json(), deadline=deadline)
            backend.close()
            self.defer(trigger=trigger, method_name="execute_complete")
        try:
            outcome = wait_for_completion(
                backend, handle, on_line=self._log_line,
                deadline=None if deadline is None else time.monotonic() + (deadline - time.time()),
            )
            status = outcome.status
            if outcome.timed_out:
                self.log.warning("Step exceeded its timeout; cancelling %s job %s", backend.name, handle.job_id)
                backend.cancel(handle)
                status = backend.poll(handle)
        except BaseException:
            # Killed, timed out by Airflow, or the wait itself broke: never leave the job running.
            self._cancel_quietly(backend, handle)
            self._finish_record(backend, handle, RunStatus(RunState.CANCELLED, "cancelled"))
            raise
        return self._finish(backend, handle, status, outcome.tail, outcome.timed_out, spec.timeout)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """Resume after the trigger fired: turn its event into the task's result or error."""
        self._store = context.get("task_state_store")
        self._ti = context["ti"]
        self._record = self._read_record() or {}
        backend = self._backend = self._make_backend()
        handle = self._handle = RunHandle.from_json(event["handle"])
        if event.get("error"):
            self._cancel_quietly(backend, handle)
            self._finish_record(backend, handle, RunStatus(RunState.FAILED, "error"))
            raise RemoteMLError(f"waiting for {backend.name} job {handle.job_id} failed: {event['error']}")
        status = RunStatus.from_json(event["status"])
        return self._finish(backend, handle, status, list(event.get("tail") or []),
                            bool(event.get("timed_out")), self._build_spec().timeout)

    def on_kill(self) -> None:
        if self._backend is not None and self._handle is not None:
            self.log.info("Killed: cancelling %s job %s", self._backend.name, self._handle.job_id)
            self._cancel_quietly(self._backend, self._handle)
            self._finish_record(self._backend, self._handle, RunStatus(RunState.CANCELLED, "killed"))

    # -- reattachment ----------------------------------------------------------------------------------------

    def _attach_or_submit(self, backend: Backend, spec: StepSpec, base: StepIdentity, artifacts: ArtifactStore,
                          ti: Any) -> RunHandle:
        """Reconnect to this task instance's running job, or start one under a fresh identity.

        The record in the task state store says which generation of job this task instance is on and
        whether Airflow is done with it. A retry after a worker crash finds an unfinished record and
        reattaches (or, if the worker died before the handle was written, finds the job by its
        deterministic identity). A finished record means a user cleared the task or it is retrying a
        failure: the next generation starts a new job.
        """
        record = self._read_record()
        if self._store is None:
            self.log.warning("No task state store in the context: crash recovery is disabled for this run")
            # Without a store each try is its own job; the try number keeps their identities apart.
            generation = int(getattr(ti, "try_number", 0) or 0)
        elif record and record.get("phase") != "finished" and record.get("backend") == backend.name:
            generation = int(record["generation"])
            identity = base.with_generation(generation)
            handle = RunHandle.from_json(record["handle"]) if record.get("handle") else backend.find(identity)
            if handle is not None:
                status = backend.poll(handle)
                if not status.is_terminal or status.is_successful:
                    self.log.info("Reattaching to %s job %s (%s) started by an earlier try",
                                  backend.name, handle.job_id, status.remote_state or status.state.value)
                    self._record = {**record, "phase": "submitted", "handle": handle.to_json()}
                    self._write_record(self._record)
                    return handle
                self.log.info("The earlier try's job %s ended %s; starting a new one", handle.job_id,
                              status.state.value)
                backend.mark_finished(handle)
                generation += 1
            else:
                # The earlier try died between recording its intent and recording a handle: the job may
                # exist without us knowing its id. The deterministic identity finds it.
                return self._submit(backend, spec, identity, artifacts, look_first=True)
        else:
            generation = int(record["generation"]) + 1 if record else 0
        return self._submit(backend, spec, base.with_generation(generation), artifacts, look_first=False)

    def _submit(self, backend: Backend, spec: StepSpec, identity: StepIdentity, artifacts: ArtifactStore,
                *, look_first: bool) -> RunHandle:
        request = StepRequest.create(spec, identity, artifacts, code_version=self.code_version)
        backend.validate(request)
        self._record = {"generation": identity.generation, "phase": "submitting", "backend": backend.name,
                        "submitted_at": time.time()}
        self._write_record(self._record)
        handle = backend.find(identity) if look_first else None
        if handle is None:
            handle = backend.submit(request)
            self.log.info("Submitted %s job %s for %s", backend.name, handle.job_id, identity.key)
        else:
            self.log.info("Found %s job %s already submitted for %s", backend.name, handle.job_id, identity.key)
        self._record = {**self._record, "phase": "submitted", "handle": handle.to_json()}
        self._write_record(self._record)
        return handle

    def _read_record(self) -> dict[str, Any] | None:
        if self._store is None:
            return None
        value = self._store.get(STATE_KEY)
        return dict(value) if isinstance(value, Mapping) else None

    def _write_record(self, record: dict[str, Any]) -> None:
        if self._store is not None:
            self._store.set(STATE_KEY, record)

    def _finish_record(self, backend: Backend, handle: RunHandle, status: RunStatus) -> None:
        try:
            self._record = {**self._record, "phase": "finished", "state": status.state.value,
                            "handle": handle.to_json(), "backend": backend.name}
            self._record.setdefault("generation", 0)
            self._write_record(self._record)
            backend.mark_finished(handle)
        except Exception:  # bookkeeping must not hide the task's real outcome
            self.log.warning("Could not record the end of job %s", handle.job_id, exc_info=True)

    # -- outcome ------------------------------------------------------------------------------------------------

    def _finish(self, backend: Backend, handle: RunHandle, status: RunStatus, tail: list[str], timed_out: bool,
                timeout: float | None) -> Any:
        try:
            if timed_out or not status.is_successful:
                raise failure_error(backend, handle, status, tail, timed_out=timed_out, timeout=timeout)
            result = backend.fetch_result(handle)
            for name, uri in result.outputs.items():
                self.log.info("Output %s: %s", name, uri)
            if result.metrics:
                self.log.info("Metrics: %s", result.metrics)
            xcom = result.to_xcom()
            self._push_parts(xcom)
            return xcom
        finally:
            self._finish_record(backend, handle, status)
            try:
                backend.cleanup(handle, status)
            except Exception:
                self.log.warning("Cleaning up job %s failed", handle.job_id, exc_info=True)
            backend.close()

    def _push_parts(self, xcom: dict[str, Any]) -> None:
        """Push ``outputs``, ``metrics`` and each output's URI under its own key.

        ``upstream.output["outputs"]["model"]`` is an XComArg for key ``model`` (Airflow's XComArg keeps
        the last key), so the URI under that key is what a downstream step receives.
        """
        if self._ti is None:
            return
        self._ti.xcom_push(key="outputs", value=xcom["outputs"])
        self._ti.xcom_push(key="metrics", value=xcom["metrics"])
        for name, uri in xcom["outputs"].items():
            self._ti.xcom_push(key=name, value=uri)

    def _deadline(self, spec: StepSpec, started: float) -> float | None:
        """Wall-clock time after which Airflow cancels the job (the runtime stops it at its timeout)."""
        deadlines = []
        if spec.timeout:
            submitted = float(self._record.get("submitted_at") or started)
            deadlines.append(submitted + spec.timeout + TIMEOUT_GRACE_SECONDS)
        if self.deferrable and self.execution_timeout:
            # Airflow ends a deferred task at its execution_timeout without on_kill: cancel first.
            deadlines.append(started + self.execution_timeout.total_seconds() - 5)
        return min(deadlines) if deadlines else None

    def _cancel_quietly(self, backend: Backend, handle: RunHandle) -> None:
        try:
            backend.cancel(handle)
        except Exception:
            self.log.exception("Cancelling %s job %s failed; it may still be running", backend.name, handle.job_id)

    def _log_line(self, line: str) -> None:
        self.log.info("%s", line)


def merge_backend_config(name: str, deployment: Mapping[str, Any], task: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings of backend ``name``: the deployment's, overridden by the task's.

    A task's ``backend_config`` is either the chosen backend's settings, or a mapping keyed by backend
    name (``{"kubernetes": {...}, "docker": {...}}``) so one DAG carries settings for every backend it may
    run on. ``profiles`` merge by profile name, so a DAG can add a profile without repeating the
    deployment's.
    """
    task = dict(task or {})
    if task and all(key in available_backends() for key in task):
        task = dict(task.get(name) or {})
    merged = {**deployment, **task}
    if isinstance(deployment.get("profiles"), Mapping) and isinstance(task.get("profiles"), Mapping):
        merged["profiles"] = {**deployment["profiles"], **task["profiles"]}
    return merged


def _plain(value: Any) -> Any:
    """Resolved XCom values as plain JSON data (a mapped task's results arrive as a lazy sequence)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (str, bytes)):
        return value
    if isinstance(value, Sequence) or (hasattr(value, "__getitem__") and hasattr(value, "__len__")):
        # Index, don't iterate: iterating a lazy XCom sequence probes one item past its end.
        return [_plain(value[i]) for i in range(len(value))]
    return value


def _is_templated(value: Any) -> bool:
    """True when a value still holds Jinja or an XComArg, i.e. is only final at run time."""
    try:
        from airflow.sdk.definitions.xcom_arg import XComArg
    except ImportError:  # pragma: no cover
        XComArg = ()  # type: ignore[assignment,misc]
    if isinstance(value, XComArg):
        return True
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, Mapping):
        return any(_is_templated(k) or _is_templated(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return any(_is_templated(v) for v in value)
    return False
