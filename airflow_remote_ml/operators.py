"""RemoteExecutionOperator: one step, any backend, chosen per run."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException
from airflow.sdk.execution_time.context import NEVER_EXPIRE  # airflow.sdk re-exports it; its 3.3 stub does not

from airflow_remote_ml import assets as asset_support
from airflow_remote_ml import hooks
from airflow_remote_ml.core import codepkg
from airflow_remote_ml.core.artifacts import ArtifactStore
from airflow_remote_ml.core.backend import Backend, StepRequest
from airflow_remote_ml.core.errors import BackendUnavailableError, ConfigError, RemoteMLError
from airflow_remote_ml.core.identity import StepIdentity
from airflow_remote_ml.core.lifecycle import StepLifecycle
from airflow_remote_ml.core.registry import available_backends, create_backend
from airflow_remote_ml.core.spec import StepSpec
from airflow_remote_ml.core.status import RunHandle, RunStatus, StepResult
from airflow_remote_ml.core.validation import build_operator_spec, check_backend_name, validate_operator_arguments
from airflow_remote_ml.core.wait import failure_error, log_records
from airflow_remote_ml.links import XCOM_JOB_URL_KEY, RemoteJobLink
from airflow_remote_ml.results import StepResultArg
from airflow_remote_ml.triggers import RemoteStepTrigger, checkpoint_uri
from airflow_remote_ml.ui.paths import run_url

if TYPE_CHECKING:
    from airflow.sdk import Context

#: Key of this operator's record in Airflow's task state store.
STATE_KEY = "airflow_remote_ml"
#: Names an output may not take: the keys of the step's result and the XCom keys of earlier versions
#: (which pushed ``outputs``, ``metrics`` and each output under its own key; see docs/concepts.md).
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
        inputs: ``{name: uri}``; an upstream step's ``.output["outputs"]["name"]`` works (see :attr:`output`).
        outputs: names of the artifacts the step must produce.
        compute: the step's resources, ``{'cpu': 2, 'memory': '4Gi', 'gpu': 1, 'profile': 'gpu'}``
            (named ``compute`` because ``resources`` is taken by BaseOperator).
        timeout: seconds (or a timedelta) the step may run before it is stopped.
        backend_options: ``{backend_name: {...}}`` escape hatch; options for other backends are ignored.
        artifact_root: where outputs go; default ``[remote_ml] artifact_root``.
        code_version: recorded in the step's version record (e.g. a git SHA).
        code: ship the step's code with it (docs/quickstart.md): ``True`` (the default) packs the top-level
            package of ``callable`` from the worker's files into a content-addressed archive under the
            artifact root, which the step puts first on ``sys.path``, so a stock image runs it;
            ``['pkg', ...]`` ships these packages too (also for a ``command``, on its ``PYTHONPATH``);
            ``False``: the image already has the code. The callable's package is left to the image (with a
            warning) when this worker cannot import it; a named package must be importable here.
        deferrable: wait in the triggerer instead of on a worker; default ``[operators] default_deferrable``.
        assets: publish outputs as Airflow Assets: ``True`` (every output), output names, or
            ``{output: Asset}``; an input may be an ``Asset`` (docs/assets.md).

    Returns (XCom): ``{"outputs": {name: uri}, "metrics": {...}, "backend", "job_id", "url"}``, the task's
    one XCom row besides its extra link's.
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
        code: bool | Sequence[str] = True,
        deferrable: bool | None = None,
        assets: bool | Sequence[str] | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        try:
            self.code = codepkg.check_code_argument(code)
        except ConfigError as exc:
            raise final(exc) from exc
        try:
            # Each final argument is checked as the user passed it, before it is normalised (list("model")
            # would already be five outputs); templated ones are checked again once rendered.
            validate_operator_arguments(
                {"backend": backend, "backend_config": backend_config, "image": image, "command": command,
                 "callable": callable, "shell": shell, "parameters": parameters, "env": env, "secrets": secrets,
                 "inputs": inputs, "outputs": outputs, "compute": compute, "timeout": timeout,
                 "backend_options": backend_options, "artifact_root": artifact_root, "code_version": code_version,
                 "deferrable": deferrable},
                is_templated=_is_templated)
        except (ConfigError, BackendUnavailableError) as exc:
            raise final(exc) from exc
        self.backend = backend
        self.backend_config = backend_config if _is_templated(backend_config) else dict(backend_config or {})
        self.image = image
        self.command = command
        self.callable = callable
        self.shell = shell
        self.parameters = parameters or {}
        self.env = env or {}
        self.secrets = secrets or {}
        self.inputs = inputs or {}
        self.outputs = outputs if _is_templated(outputs) else list(outputs or [])
        self.compute = compute or {}
        self.timeout = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        self.backend_options = backend_options or {}
        self.artifact_root = artifact_root
        self.code_version = code_version
        self.deferrable = _default_deferrable() if deferrable is None else deferrable
        self._backend: Backend | None = None
        self._handle: RunHandle | None = None
        self._lifecycle: StepLifecycle | None = None
        self._ti: Any = None
        try:
            self._declare_assets(assets)
            self._validate_literal_arguments()
        except (ConfigError, BackendUnavailableError) as exc:
            # Still a ConfigError at DAG parse time; when a mapped task is unmapped on a worker the same
            # error must fail the task once, never be retried.
            raise final(exc) from exc

    # -- validation ----------------------------------------------------------------------------------------

    def _validate_literal_arguments(self) -> None:
        """Fail at DAG parse time for a spec whose arguments are all final (the checks across fields)."""
        values = {name: getattr(self, name) for name in _SPEC_FIELDS}
        if any(_is_templated(value) for value in values.values()):
            return
        self._build_spec()

    def _build_spec(self) -> StepSpec:
        for name in self.outputs if isinstance(self.outputs, (list, tuple)) else ():
            if name in RESERVED_XCOM_KEYS:
                raise ConfigError(f"outputs.{name}", "is a reserved XCom key of this operator",
                                  "choose another output name")
        return build_operator_spec({
            "image": self.image, "command": self.command, "callable": self.callable, "shell": self.shell,
            "parameters": _plain(self.parameters), "env": self.env, "secrets": self.secrets,
            "inputs": _plain(self.inputs), "outputs": _plain(self.outputs), "compute": self.compute,
            "timeout": self.timeout, "backend_options": self.backend_options,
        })

    def _make_backend(self) -> Backend:
        # A template that renders to "" is an error, not a silent fall-back to the default backend.
        name = check_backend_name(self.backend, available_backends()) or hooks.default_backend()
        return create_backend(name, merge_backend_config(name, hooks.deployment_backend_config(name),
                                                         self.backend_config))

    @property
    def output(self) -> StepResultArg:
        """The step's result; ``output["outputs"]["model"]`` is the model's URI, read from that one XCom row."""
        return StepResultArg(operator=self)

    # -- execution -------------------------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        with _final_on_config_error():
            started = time.time()
            spec = self._build_spec()
            backend = self._backend = self._make_backend()
            artifacts = ArtifactStore(self.artifact_root or hooks.default_artifact_root())
            ti = self._ti = context["ti"]
            lifecycle = self._lifecycle = self._new_lifecycle(backend, context)

            # Built on this worker from its files (the DAG bundle), before anything is submitted.
            code = codepkg.prepare(spec.callable, self.code, artifacts.root, on_skip=self._code_not_shipped)
            if code is not None:
                self.log.info("Shipping code %s (sha256 %s) as %s", ", ".join(code.packages), code.sha256[:12],
                              code.uri)

            def make_request(identity: StepIdentity) -> StepRequest:
                request = StepRequest.create(spec, identity, artifacts, code_version=self.code_version, code=code)
                backend.validate(request)
                backend.publish_code(request)
                return request

            try:
                lifecycle.start(make_request)
                # Everything from here on runs inside the guard: whatever fails (an XCom push, a state-store
                # write, a kill, Airflow's execution_timeout), the job is stopped first. The backend's clients
                # are closed only after that, deferral included.
                return lifecycle.guarded(lambda: self._follow(lifecycle, spec, artifacts, started, ti))
            finally:
                backend.close()

    def _follow(self, lifecycle: StepLifecycle, spec: StepSpec, artifacts: ArtifactStore, started: float,
                ti: Any) -> Any:
        backend, handle = lifecycle.backend, lifecycle.handle
        assert handle is not None
        self._handle = handle
        # The extra link's own row, written now so the link works while the job runs (links.py). A backend
        # without a page of its own (local, docker) links to the run's "Remote ML" view instead.
        ti.xcom_push(key=XCOM_JOB_URL_KEY, value=handle.url or run_url(ti.dag_id, ti.run_id))
        if handle.url:
            self.log.info("Remote job: %s", handle.url)
        submitted_at = lifecycle.record.submitted_at if lifecycle.record else None
        deadline = self._deadline(spec, started, submitted_at)
        if self.deferrable:
            self.log.info("Deferring: waiting for %s job %s in the triggerer", backend.name, handle.job_id)
            trigger = RemoteStepTrigger(backend=backend.name, backend_config=backend.config_json(),
                                        handle=handle.to_json(), deadline=deadline,
                                        secret_refs=_secret_refs(spec, backend),
                                        checkpoint_uri=checkpoint_uri(artifacts, lifecycle.identity),
                                        end_task=self._may_end_in_triggerer(), push_result=bool(self.do_xcom_push))
            # From here the trigger owns the job: a SIGTERM that reaches this process after defer() (a slow
            # "deferred" report) must not cancel what the trigger is waiting for.
            lifecycle.hand_over()
            self.defer(trigger=trigger, method_name="execute_complete")
        outcome = lifecycle.wait(on_line=self._log_line, on_lines=self._log_lines, deadline=deadline)
        return self._finish(lifecycle, outcome.status, outcome.tail, outcome.timed_out, spec.timeout)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """Resume after the trigger fired: turn its event into the task's result or error.

        A success usually ends the task in the triggerer and never comes here (see
        :meth:`_may_end_in_triggerer`); failures always do, so their error is raised on a worker.
        """
        self.log.info("Resumed on a worker after the trigger fired")
        with _final_on_config_error():
            self._ti = context["ti"]
            backend = self._backend = self._make_backend()
            lifecycle = self._lifecycle = self._new_lifecycle(backend, context)
            handle = self._handle = RunHandle.from_json(event["handle"])
            lifecycle.take_back(handle)
            try:
                return lifecycle.guarded(lambda: self._complete(lifecycle, event))
            finally:
                backend.close()

    def _complete(self, lifecycle: StepLifecycle, event: dict[str, Any]) -> Any:
        backend, handle = lifecycle.backend, lifecycle.handle
        assert handle is not None
        if event.get("error"):
            # The guard stops the job: the trigger gave up waiting, so nobody follows it any more.
            raise RemoteMLError(f"waiting for {backend.name} job {handle.job_id} failed: {event['error']}")
        status = RunStatus.from_json(event["status"])
        return self._finish(lifecycle, status, list(event.get("tail") or []), bool(event.get("timed_out")),
                            self._build_spec().timeout)

    def _may_end_in_triggerer(self) -> bool:
        """Whether a success may end the task in the triggerer (``TaskSuccessEvent``): no worker slot.

        Not when something must run on a worker at the end: a subclass's own ``execute_complete`` or
        ``_on_result``; asset outlets (the task runner emits their events on success; the triggerer's
        ``TaskSuccessEvent`` handler only sets the state, airflow/models/trigger.py); a mapped downstream
        that expands over this result (the task runner records its length with the return value).
        """
        if type(self).execute_complete is not RemoteExecutionOperator.execute_complete:
            return False
        # A subclass that adds to the result (@task.remote_ml's return value) must run where it is built.
        if type(self)._on_result is not RemoteExecutionOperator._on_result:
            return False
        if getattr(self, "outlets", None):
            return False
        # A task outside a DAG (a test calling execute) has no downstream at all.
        return not self.has_dag() or next(self.iter_mapped_dependants(), None) is None

    def on_kill(self) -> None:
        lifecycle = self._lifecycle
        if lifecycle is not None and lifecycle.owns_job and lifecycle.handle is not None:
            self.log.info("Killed: cancelling %s job %s", lifecycle.backend.name, lifecycle.handle.job_id)
            lifecycle.abandon()

    def _new_lifecycle(self, backend: Backend, context: Context) -> StepLifecycle:
        ti = context["ti"]
        map_index = getattr(ti, "map_index", -1)
        base = StepIdentity(ti.dag_id, ti.task_id, ti.run_id, -1 if map_index is None else map_index)
        store = context.get("task_state_store")
        return StepLifecycle(backend, TaskStateJournal(store) if store is not None else None, base,
                             fallback_generation=int(getattr(ti, "try_number", 0) or 0), logger=self.log)

    # -- outcome ------------------------------------------------------------------------------------------------

    def _finish(self, lifecycle: StepLifecycle, status: RunStatus, tail: list[str], timed_out: bool,
                timeout: float | None) -> Any:
        backend, handle = lifecycle.backend, lifecycle.handle
        assert handle is not None
        try:
            if timed_out or not status.is_successful:
                raise failure_error(backend, handle, status, tail, timed_out=timed_out, timeout=timeout)
            result = backend.fetch_result(handle)
            for name, uri in result.outputs.items():
                self.log.info("Output %s: %s", name, uri)
            if result.metrics:
                self.log.info("Metrics: %s", result.metrics)
            xcom = result.to_xcom()
            self._on_result(result, xcom)
            # Airflow pushes it as ``return_value``: the one row that ``output["outputs"][name]`` reads.
            return xcom
        finally:
            if lifecycle.owns_job and status.is_terminal:
                lifecycle.finish(status)
            try:
                backend.cleanup(handle, status)
            except Exception:
                self.log.warning("Cleaning up job %s failed", handle.job_id, exc_info=True)

    def _deadline(self, spec: StepSpec, started: float, submitted_at: float | None) -> float | None:
        """Wall-clock time after which Airflow cancels the job (the runtime stops it at its timeout)."""
        deadlines = []
        if spec.timeout:
            deadlines.append(float(submitted_at or started) + spec.timeout + TIMEOUT_GRACE_SECONDS)
        if self.deferrable and self.execution_timeout:
            # Airflow ends a deferred task at its execution_timeout without on_kill: cancel first.
            deadlines.append(started + self.execution_timeout.total_seconds() - 5)
        return min(deadlines) if deadlines else None

    def _code_not_shipped(self, package: str, reason: ConfigError) -> None:
        self.log.warning("Not shipping %s with the step (%s); the step's image or python path must provide it. "
                         "code=False silences this.", package, reason.problem)

    def _log_line(self, line: str) -> None:
        self.log.info("%s", line)

    def _log_lines(self, lines: list[str]) -> None:
        """The step's lines that were read together, as few log records (core/wait.py ``log_records``)."""
        for message in log_records(lines):
            self.log.info("%s", message)

    # -- assets (docs/assets.md) --------------------------------------------------------------------------------
    # Outputs published as Airflow Assets and Assets read as inputs. The Assets join outlets/inlets when the
    # DAG is parsed (Airflow accepts events only for those); their events are filled in once the step succeeded.

    @classmethod
    def partial(cls, **kwargs: Any) -> Any:  # type: ignore[override]
        """``BaseOperator.partial``, with the Assets of ``assets`` in the mapped task's outlets at parse time."""
        return super().partial(**_with_asset_outlets(kwargs))  # type: ignore[misc]

    def _declare_assets(self, assets: Any) -> None:
        """Put the output Assets in ``outlets`` and the Asset inputs in ``inlets`` (both needed at parse time)."""
        self.assets = asset_support.output_assets(assets, self.outputs, self.dag_id if self.has_dag() else None,
                                                  self.task_id)
        self.outlets = _union(self.outlets, self.assets.values())
        self.inlets = _union(self.inlets, asset_support.asset_inputs(self.inputs).values())

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        super().render_template_fields(context, jinja_env)
        # An input given as an Asset stands for the artifact of its newest event (or the triggering one).
        assets = asset_support.asset_inputs(self.inputs)
        if assets:
            self.inputs = {name: asset_support.input_uri(name, assets[name], context) if name in assets else value
                           for name, value in self.inputs.items()}

    def _on_result(self, result: StepResult, xcom: dict[str, Any]) -> None:
        """A succeeded step's result, before it is pushed: fill in the asset event of each published output.

        Airflow emits one event per outlet when the task succeeds, with the ``extra`` set here.
        """
        if not self.assets:
            return
        from airflow.sdk import get_current_context

        outlet_events = get_current_context()["outlet_events"]
        for name, asset in self.assets.items():
            outlet_events[asset].extra = asset_support.event_extra(result, name)


def _with_asset_outlets(kwargs: dict[str, Any], *, task_id: str | None = None) -> dict[str, Any]:
    """``partial()`` keyword arguments with the Assets of ``assets`` added to ``outlets``.

    ``task_id`` is the id the task will get, when it is not ``kwargs["task_id"]`` (a TaskFlow task
    called twice becomes ``train__1``); the task group's prefix is added here, as ``partial`` does.
    """
    if not kwargs.get("assets"):
        return kwargs
    from airflow.sdk.definitions._internal.contextmanager import DagContext, TaskGroupContext

    dag = kwargs.get("dag") or DagContext.get_current()
    group = kwargs.get("task_group") or (TaskGroupContext.get_current(dag) if dag else None)
    task_id = str(task_id or kwargs.get("task_id"))
    task_id = group.child_id(task_id) if group else task_id
    try:
        published = asset_support.output_assets(kwargs["assets"], kwargs.get("outputs"), dag.dag_id if dag else None,
                                                task_id)
    except ConfigError as exc:
        raise final(exc) from exc
    return {**kwargs, "outlets": _union(kwargs.get("outlets"), published.values())}


def _union(existing: Any, extra: Any) -> list[Any]:
    items = list(existing) if isinstance(existing, (list, tuple)) else ([existing] if existing else [])
    return items + [item for item in extra if item not in items]


class TaskStateJournal:
    """The lifecycle's journal in Airflow's task state store: one JSON record per task instance."""

    def __init__(self, store: Any, key: str = STATE_KEY) -> None:
        self.store = store
        self.key = key

    def read(self) -> dict[str, Any] | None:
        value = self.store.get(self.key)
        return dict(value) if isinstance(value, Mapping) else None

    def write(self, record: dict[str, Any]) -> None:
        # Airflow 3.3 expires a key [state_store] default_retention_days (30) after its last write, and a
        # deployment may set fewer days than a long step runs. A record that guards a job which may still
        # be running (intent, submitted, deferred, cancelling) must outlive it: lost, a retry would submit
        # a second job beside it. A finished record only moves the next generation on (without it, the
        # try number does), so it expires as the deployment says.
        if record.get("phase") == "finished":
            self.store.set(self.key, record)
        else:
            self.store.set(self.key, record, retention=NEVER_EXPIRE)


def _secret_refs(spec: StepSpec, backend: Backend) -> list[dict[str, Any]]:
    """The step's secret references (never values) for the trigger, which masks their values in its logs."""
    source = getattr(backend.config, "secrets_from", None)
    if source not in ("airflow", "env"):
        return []
    return [{"name": ref.name, "key": ref.key, "source": source} for ref in spec.secrets.values()]


@contextlib.contextmanager
def _final_on_config_error() -> Iterator[None]:
    """A wrong configuration never heals by retrying: fail the task once, whatever raised it."""
    try:
        yield
    except (ConfigError, BackendUnavailableError) as exc:
        raise final(exc) from exc


def final(exc: RemoteMLError) -> RemoteMLError:
    """``exc`` as an error that is also an ``AirflowFailException``, so Airflow does not retry it.

    Its class still is ``exc``'s (a ``ConfigError`` stays one for callers and tests); only Airflow's
    no-retry marker is added.
    """
    if isinstance(exc, AirflowFailException):
        return exc
    cls = _FINAL_CLASSES.get(type(exc))
    if cls is None:
        cls = _FINAL_CLASSES[type(exc)] = type(type(exc).__name__, (type(exc), AirflowFailException),
                                               {"__module__": type(exc).__module__})
    clone: RemoteMLError = Exception.__new__(cls)
    clone.__dict__.update(exc.__dict__)
    clone.args = exc.args
    return clone


_FINAL_CLASSES: dict[type, type] = {}


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
    if _is_asset(value):  # an Asset input's artifact is known at run time (docs/assets.md)
        return True
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, Mapping):
        return any(_is_templated(k) or _is_templated(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return any(_is_templated(v) for v in value)
    return False


def _is_asset(value: Any) -> bool:
    from airflow.sdk import Asset

    return isinstance(value, Asset)
