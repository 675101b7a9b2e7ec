"""Pure request building for the Databricks backend: a :class:`StepRequest` becomes a ``runs/submit`` body.

No I/O: :func:`build_submit_payload` takes the request, the backend settings and where the step runtime
was placed, and returns the JSON body. Everything the Jobs API would refuse, or that cannot work on the
chosen compute, is refused here first with a :class:`ConfigError` naming the field and the fix.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_remote_ml.core.backend import BackendConfig, StepRequest
from airflow_remote_ml.core.errors import ConfigError
from airflow_remote_ml.core.identity import StepIdentity
from airflow_remote_ml.core.spec import parse_cpu, parse_memory, reject_unknown_options

NAME = "databricks"

#: Task types a step can become, chosen with ``backend_options["databricks"]["task"]``.
TASK_TYPES = (
    "spark_python_task",
    "python_wheel_task",
    "notebook_task",
    "spark_jar_task",
    "spark_submit_task",
)

#: Fields of a Jobs API ``ClusterSpec`` (``new_cluster``) a profile or the settings may set.
NEW_CLUSTER_KEYS = frozenset(
    {
        "spark_version",
        "node_type_id",
        "driver_node_type_id",
        "num_workers",
        "autoscale",
        "spark_conf",
        "spark_env_vars",
        "instance_pool_id",
        "driver_instance_pool_id",
        "policy_id",
        "apply_policy_default_values",
        "custom_tags",
        "aws_attributes",
        "azure_attributes",
        "gcp_attributes",
        "data_security_mode",
        "single_user_name",
        "runtime_engine",
        "enable_elastic_disk",
        "enable_local_disk_encryption",
        "init_scripts",
        "cluster_log_conf",
        "ssh_public_keys",
        "docker_image",
        "cluster_name",
        "kind",
        "is_single_node",
        "use_ml_runtime",
        "workload_type",
    }
)
#: Keys of a resource profile: a cluster shape, or an existing cluster, plus libraries.
PROFILE_KEYS = NEW_CLUSTER_KEYS | {"existing_cluster_id", "libraries", "python_path"}

#: ``backend_options["databricks"]`` keys.
OPTION_NAMES = frozenset(
    {
        "task",
        "python_file",
        "source",
        "parameters",
        "package_name",
        "entry_point",
        "named_parameters",
        "notebook_path",
        "base_parameters",
        "main_class_name",
        "jar_uri",
        "existing_cluster_id",
        "new_cluster",
        "libraries",
        "python_path",
        "run_name",
        "spark_conf",
        "spark_env_vars",
        "num_workers",
        "autoscale",
        "node_type_id",
        "spark_version",
    }
)
_CLUSTER_OPTION_KEYS = (
    "spark_conf",
    "spark_env_vars",
    "num_workers",
    "autoscale",
    "node_type_id",
    "spark_version",
)

#: The task description carries what :meth:`find` needs to rebuild a handle (the Jobs API keeps no tags
#: on submitted runs); this prefix marks it as ours.
DESCRIPTION_PREFIX = "airflow-remote-ml "
_TASK_KEY_BAD = re.compile(r"[^\w-]+")


@dataclass(frozen=True)
class DatabricksConfig(BackendConfig):
    """Settings of the databricks backend (``backend_config=``, or ``[remote_ml] backend_config``).

    Attributes:
        databricks_conn_id: the Airflow connection the provider's ``DatabricksHook`` authenticates with
            (PAT, service-principal OAuth, Azure AD: whatever the connection holds).
        api_version: Jobs API version of the paths, ``"2.2"`` (default) or ``"2.1"``.
        existing_cluster_id: run every step on this all-purpose cluster (unless a profile says otherwise).
        new_cluster: the default job cluster (a Jobs API ``ClusterSpec``); profiles and options refine it.
        node_types: catalogue ``[{"node_type_id", "cpu", "memory", "gpu"}]``; when given, a step's
            ``resources`` pick the smallest node type that fits.
        libraries: libraries installed for every step (Jobs API ``Library`` objects).
        python_path: directories prepended to ``sys.path`` of a ``callable`` step (e.g. a workspace folder).
        runtime_dir: where the step runtime file is placed; default ``<artifact_root>/_remote_ml``.
        upload_runtime: place the runtime there before submitting (DBFS API for ``dbfs:/``, a
            ``local_mounts`` directory, a local path, or fsspec); False when it is deployed by other means.
        local_mounts: ``{"dbfs:/": "/mnt/dbfs"}``: where Airflow sees a remote prefix as a directory.
            Used to read result manifests and to place the runtime without API calls.
        success_with_failures_is_success: treat ``SUCCESS_WITH_FAILURES`` as success (default False: a
            step is one task, so some failure in it is a failure).
        stream_logs: fetch ``runs/get-output`` at every check to stream logs while the run is going (one
            more call per check). By default the logs are fetched once, when the run has ended.
        timeout_grace_seconds: added to the step's timeout for the run's ``timeout_seconds``, so the
            runtime stops the step (and writes its manifest) before Databricks kills the run.
        max_parameter_bytes: largest step JSON passed as the runtime's argument.
        find_completed: let :meth:`find` also search recently completed runs (active ones are always
            searched); a missed completed run is still never duplicated, thanks to the idempotency token.
        find_lookback_hours, find_max_pages: how far back and how many 25-run pages :meth:`find` reads.
        retry_limit, retry_delay, request_timeout: passed to the hook; retries of 429/5xx wait at least
            the server's ``Retry-After`` (at most ``max_retry_after`` seconds).
        poll_first_delay, poll_factor, poll_quick_delay, poll_quick_window, poll_cap: the
            :class:`DatabricksPollPolicy` (3 s, ×3, to a 30 s cap: never later than the provider's 30 s).
        watch_cap: the longest gap of the fallback checks while the manifest is watched (the manifest, not
            the API, signals the end of a normal run).
        dbfs_fuse: the clusters mount DBFS at ``/dbfs`` (the FUSE mount), so the step runtime can read and
            write ``dbfs:/`` artifacts there. Off by default: serverless compute has no ``/dbfs`` and a
            workspace can disable it, and without it the runtime would write a local folder named ``dbfs:``
            on the driver. With it off, a ``dbfs:/`` artifact root or input of a runtime step is refused.
        watch_manifest: when Airflow sees the result manifest as a file (a local or ``local_mounts``
            path), look for it every ``watch_interval`` seconds (no API call) and ask the Jobs API only
            when it appears, or on a sparse schedule (``poll_first_delay`` × 2, doubling to ``watch_cap``)
            for runs that end without one (cluster failures, cancellations).
    """

    databricks_conn_id: str = "databricks_default"
    api_version: str = "2.2"
    existing_cluster_id: str | None = None
    new_cluster: dict[str, Any] = field(default_factory=dict)
    node_types: list[dict[str, Any]] = field(default_factory=list)
    libraries: list[dict[str, Any]] = field(default_factory=list)
    python_path: list[str] = field(default_factory=list)
    runtime_dir: str | None = None
    upload_runtime: bool = True
    local_mounts: dict[str, str] = field(default_factory=dict)
    success_with_failures_is_success: bool = False
    stream_logs: bool = False
    timeout_grace_seconds: float = 60.0
    max_parameter_bytes: int = 10_000
    find_completed: bool = True
    find_lookback_hours: float = 48.0
    find_max_pages: int = 8
    retry_limit: int = 3
    retry_delay: float = 1.0
    request_timeout: int = 180
    max_retry_after: float = 300.0
    poll_first_delay: float = 3.0
    poll_factor: float = 3.0
    poll_quick_delay: float = 3.0
    poll_quick_window: float = 0.0
    poll_cap: float = 30.0
    watch_cap: float = 120.0
    dbfs_fuse: bool = False
    watch_manifest: bool = True
    watch_interval: float = 0.25

    def __post_init__(self) -> None:
        prefix = f"backend_config[{NAME}]"
        if self.api_version not in ("2.1", "2.2"):
            raise ConfigError(
                f"{prefix}.api_version", f"{self.api_version!r} is not supported", "use '2.2' or '2.1'"
            )
        for name, profile in self.profiles.items():
            if not isinstance(profile, Mapping):
                raise ConfigError(
                    f"{prefix}.profiles.{name}",
                    "must be a mapping",
                    "use e.g. {'node_type_id': 'i3.xlarge', 'num_workers': 2}",
                )
            reject_unknown_options(f"{prefix}.profiles.{name}", profile, set(PROFILE_KEYS))
        reject_unknown_options(f"{prefix}.new_cluster", self.new_cluster, set(NEW_CLUSTER_KEYS))
        for i, node in enumerate(self.node_types):
            if not isinstance(node, Mapping) or not node.get("node_type_id"):
                raise ConfigError(
                    f"{prefix}.node_types[{i}]",
                    "needs a node_type_id",
                    "use {'node_type_id': 'i3.xlarge', 'cpu': 4, 'memory': '30Gi', 'gpu': 0}",
                )


# -- small helpers ----------------------------------------------------------------------------------------


def run_name(identity: StepIdentity) -> str:
    """A readable run name that ends with the identity's token, so :meth:`find` can match it exactly."""
    readable = f"{identity.dag_id}.{identity.task_id}"
    if identity.map_index >= 0:
        readable += f"[{identity.map_index}]"
    return f"{readable[:200]} #{identity.generation} {identity.idempotency_token}"


def matches_identity(name: str | None, identity: StepIdentity) -> bool:
    return bool(name) and str(name).endswith(f" {identity.idempotency_token}")


def task_key(identity: StepIdentity) -> str:
    """``[\\w-]{1,100}`` as the Jobs API demands."""
    return (_TASK_KEY_BAD.sub("_", identity.task_id).strip("_") or "step")[:100]


def describe(request: StepRequest, task: str, uses_runtime: bool) -> str:
    """The task description: what a handle needs, so a restarted worker rebuilds it from the run alone."""
    meta = {
        "manifest_uri": request.manifest_uri,
        "outputs": dict(request.outputs),
        "task": task,
        "runtime": uses_runtime,
    }
    return DESCRIPTION_PREFIX + json.dumps(meta, separators=(",", ":"), sort_keys=True)


def parse_description(text: str | None) -> dict[str, Any] | None:
    if not text or not text.startswith(DESCRIPTION_PREFIX):
        return None
    try:
        meta = json.loads(text[len(DESCRIPTION_PREFIX) :])
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def substitute(args: Sequence[str], request: StepRequest) -> list[str]:
    """``{inputs.x}``, ``{outputs.x}`` and ``{params.x}`` in task parameters become URIs and values.

    The same placeholders the runtime understands in a command, but resolved to the URIs themselves: a
    task that runs without the runtime (a user file, a wheel, a JAR) reads and writes them directly.
    """
    from airflow_remote_ml.runtime import _substitute

    values = {
        "inputs": dict(request.spec.inputs),
        "outputs": dict(request.outputs),
        "params": dict(request.spec.params),
    }
    return [_substitute(str(arg), values) for arg in args]


def default_parameters(request: StepRequest) -> list[str]:
    """Parameters of a task that runs without the runtime and names none itself."""
    return [
        "--params",
        json.dumps(dict(request.spec.params), sort_keys=True),
        "--inputs",
        json.dumps(dict(request.spec.inputs), sort_keys=True),
        "--outputs",
        json.dumps(dict(request.outputs), sort_keys=True),
        "--manifest",
        request.manifest_uri,
    ]


def choose_node_type(
    node_types: Sequence[Mapping[str, Any]], cpu: float | None, memory: int | None, gpu: int
) -> str | None:
    """The smallest node type (fewest GPUs, then CPUs, then memory) that fits the resources, or None."""
    fitting = []
    for node in node_types:
        n_cpu = parse_cpu(node.get("cpu"), "node_types.cpu") or 0.0
        n_mem = parse_memory(node.get("memory"), "node_types.memory") or 0
        n_gpu = int(node.get("gpu") or 0)
        if (cpu is None or n_cpu >= cpu) and (memory is None or n_mem >= memory) and n_gpu >= gpu:
            fitting.append((n_gpu, n_cpu, n_mem, str(node["node_type_id"])))
    return min(fitting)[3] if fitting else None


# -- the payload --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compute:
    """Where the task runs: an existing cluster or a job cluster spec, plus libraries."""

    existing_cluster_id: str | None
    new_cluster: dict[str, Any] | None
    libraries: list[dict[str, Any]]
    python_path: list[str]


def resolve_compute(request: StepRequest, config: DatabricksConfig) -> Compute:
    """Settings → profile → per-step options, later ones winning; resources pick the node type."""
    options = request.spec.options_for(NAME)
    resources = request.spec.resources
    profile = config.profile(resources.profile, NAME)
    existing = options.get("existing_cluster_id") or profile.get("existing_cluster_id")
    if (
        existing is None
        and not any(k in profile for k in NEW_CLUSTER_KEYS)
        and not options.get("new_cluster")
    ):
        existing = config.existing_cluster_id
    libraries = [*config.libraries, *(profile.get("libraries") or []), *(options.get("libraries") or [])]
    python_path = [
        *(options.get("python_path") or []),
        *(profile.get("python_path") or []),
        *config.python_path,
    ]
    if existing:
        # An all-purpose cluster has the shape it has: resources do not reshape it (documented).
        return Compute(str(existing), None, libraries, python_path)
    cluster: dict[str, Any] = {**config.new_cluster}
    cluster.update({k: v for k, v in profile.items() if k in NEW_CLUSTER_KEYS})
    cluster.update(dict(options.get("new_cluster") or {}))
    cluster.update({k: options[k] for k in _CLUSTER_OPTION_KEYS if k in options})
    explicit_node = (
        "node_type_id" in profile
        or "node_type_id" in options
        or "node_type_id" in (options.get("new_cluster") or {})
    )
    if not explicit_node and config.node_types and (resources.cpu or resources.memory or resources.gpu):
        chosen = choose_node_type(config.node_types, resources.cpu, resources.memory, resources.gpu)
        if chosen is None:
            raise ConfigError(
                "resources",
                f"no node type in backend_config[{NAME}].node_types fits "
                f"cpu={resources.cpu}, memory={resources.memory}, gpu={resources.gpu}",
                "lower the request or add a larger node type",
            )
        cluster["node_type_id"] = chosen
    if "autoscale" in cluster and "num_workers" in cluster and "autoscale" in options:
        cluster.pop("num_workers")  # the step asked for autoscaling explicitly
    elif "autoscale" in cluster and "num_workers" in cluster and "num_workers" in options:
        cluster.pop("autoscale")
    return Compute(None, cluster, libraries, python_path)


def build_submit_payload(
    request: StepRequest, config: DatabricksConfig, runtime_file: str | None
) -> dict[str, Any]:
    """The ``runs/submit`` body for a step (Jobs API 2.1/2.2, one task).

    Args:
        request: the validated step request.
        config: the backend settings.
        runtime_file: where the step runtime was placed (the default ``spark_python_task`` runs it);
            None when the step names its own file or another task type.
    """
    spec = request.spec
    options = spec.options_for(NAME)
    kind = options.get("task", "spark_python_task")
    if kind not in TASK_TYPES:
        raise ConfigError(
            f"backend_options.{NAME}.task",
            f"{kind!r} is not a task type this backend submits",
            f"use one of {', '.join(TASK_TYPES)}",
        )
    compute = resolve_compute(request, config)
    uses_runtime = kind == "spark_python_task" and not options.get("python_file")
    task: dict[str, Any] = {
        "task_key": task_key(request.identity),
        "description": describe(request, kind, uses_runtime),
    }
    if uses_runtime:
        if not runtime_file:
            raise ConfigError("runtime_dir", "the step runtime has no location", "set runtime_dir")
        check_runtime_locations(request, config)
        extra = {"env": dict(request.spec.env)} if compute.existing_cluster_id and request.spec.env else {}
        step = request.runtime_config(python_path=list(compute.python_path), **extra)
        argument = json.dumps(step, separators=(",", ":"), sort_keys=True)
        if len(argument.encode()) > config.max_parameter_bytes:
            raise ConfigError(
                "params",
                f"the step description is {len(argument.encode())} bytes, more than the "
                f"{config.max_parameter_bytes} a task parameter may carry",
                "pass large values as an input artifact instead of params",
            )
        task["spark_python_task"] = {"python_file": runtime_file, "parameters": [argument]}
    else:
        task[kind] = _user_task(kind, request, options)
    if compute.existing_cluster_id:
        task["existing_cluster_id"] = compute.existing_cluster_id
    else:
        task["new_cluster"] = _with_step_env(compute.new_cluster or {}, request)
    if compute.libraries:
        task["libraries"] = compute.libraries
    payload: dict[str, Any] = {
        "run_name": options.get("run_name") or run_name(request.identity),
        "idempotency_token": request.identity.idempotency_token,
        "tasks": [task],
    }
    if options.get("run_name"):
        # The identity must stay at the end of the name: find() matches on it.
        payload["run_name"] = f"{str(options['run_name'])[:200]} {request.identity.idempotency_token}"
    if spec.timeout:
        payload["timeout_seconds"] = math.ceil(spec.timeout + max(0.0, config.timeout_grace_seconds))
    return payload


def check_runtime_locations(request: StepRequest, config: DatabricksConfig) -> None:
    """Refuse ``dbfs:/`` artifacts for the runtime unless the clusters mount ``/dbfs``.

    The runtime is stdlib-only: on the driver it reaches ``dbfs:/x`` as the FUSE path ``/dbfs/x``, and
    without that mount it falls back to fsspec, which resolves ``dbfs:/x`` to a local folder named ``dbfs:``:
    the step "succeeds" into the driver's disk and Airflow then finds no manifest. Refused before submitting.
    """
    if config.dbfs_fuse:
        return
    places = [("artifact_root", request.artifact_root), ("artifact_root", request.manifest_uri)]
    places += [(f"inputs.{name}", str(uri)) for name, uri in request.spec.inputs.items()]
    for field_name, uri in places:
        if uri.startswith("dbfs:"):
            raise ConfigError(
                field_name,
                f"{uri!r} is on DBFS, which the step runtime reaches only through the cluster's /dbfs mount "
                "(serverless compute has none, and a workspace may disable it)",
                "use a Unity Catalog volume (/Volumes/<catalog>/<schema>/<volume>/...) or an object store "
                f"URI (s3://, abfss://, gs://) instead, or set backend_config[{NAME}].dbfs_fuse=True if your "
                "clusters mount /dbfs",
            )


def _with_step_env(cluster: Mapping[str, Any], request: StepRequest) -> dict[str, Any]:
    """The step's env and secrets become the job cluster's ``spark_env_vars``; secrets stay references."""
    cluster = dict(cluster)
    env = dict(cluster.get("spark_env_vars") or {})
    env.update(request.spec.env)
    for name, ref in request.spec.secrets.items():
        env[name] = "{{secrets/%s/%s}}" % (ref.name, ref.key)  # noqa: UP031 - braces are literal
    if env:
        cluster["spark_env_vars"] = env
    return cluster


def _user_task(kind: str, request: StepRequest, options: Mapping[str, Any]) -> dict[str, Any]:
    """A task that runs the user's own code: the step's ``command`` gives its parameters."""
    spec = request.spec
    if spec.callable is not None:
        raise ConfigError(
            "callable",
            f"a {kind} runs your code, not a callable",
            "give the task's arguments as command=[...], or drop the task option to run the "
            "callable through the runtime",
        )
    command = (
        list(spec.command) if isinstance(spec.command, tuple) else ([spec.command] if spec.command else [])
    )
    if kind == "spark_python_task":
        task: dict[str, Any] = {"python_file": str(options["python_file"])}
        if options.get("source"):
            task["source"] = options["source"]
        task["parameters"] = substitute(command, request) if command else default_parameters(request)
        return task
    if kind == "python_wheel_task":
        for name in ("package_name", "entry_point"):
            if not options.get(name):
                raise ConfigError(
                    f"backend_options.{NAME}.{name}",
                    "is required for a python_wheel_task",
                    "name the wheel's package and its entry point",
                )
        task = {"package_name": options["package_name"], "entry_point": options["entry_point"]}
        if options.get("named_parameters"):
            task["named_parameters"] = {
                k: v if isinstance(v, str) else json.dumps(v) for k, v in spec.params.items()
            }
        else:
            task["parameters"] = substitute(command, request) if command else default_parameters(request)
        return task
    if kind == "notebook_task":
        path = options.get("notebook_path")
        if not path:
            raise ConfigError(
                f"backend_options.{NAME}.notebook_path",
                "is required for a notebook_task",
                "give the notebook's workspace path",
            )
        base = {k: v if isinstance(v, str) else json.dumps(v) for k, v in spec.params.items()}
        base.update({f"input_{k}": v for k, v in spec.inputs.items()})
        base.update({f"output_{k}": v for k, v in request.outputs.items()})
        base["remote_ml_manifest_uri"] = request.manifest_uri
        base.update(
            {k: substitute([str(v)], request)[0] for k, v in (options.get("base_parameters") or {}).items()}
        )
        task = {"notebook_path": path, "base_parameters": base}
        if options.get("source"):
            task["source"] = options["source"]
        return task
    if kind == "spark_jar_task":
        if not options.get("main_class_name"):
            raise ConfigError(
                f"backend_options.{NAME}.main_class_name",
                "is required for a spark_jar_task",
                "name the JAR's main class (and add the JAR under libraries)",
            )
        task = {
            "main_class_name": options["main_class_name"],
            "parameters": substitute(command, request) if command else default_parameters(request),
        }
        if options.get("jar_uri"):
            task["jar_uri"] = options["jar_uri"]
        return task
    # spark_submit_task: the command is the spark-submit argument list.
    if not command:
        raise ConfigError(
            "command",
            "a spark_submit_task needs the spark-submit arguments",
            "use command=['--class', 'org.example.Main', 'dbfs:/jars/app.jar', ...]",
        )
    return {"parameters": substitute(command, request)}


def validate_request(request: StepRequest, config: DatabricksConfig) -> None:
    """Backend-specific checks (after the generic ones): everything that would fail on submit."""
    options = request.spec.options_for(NAME)
    kind = options.get("task", "spark_python_task")
    if kind not in TASK_TYPES:
        raise ConfigError(
            f"backend_options.{NAME}.task",
            f"{kind!r} is not a task type this backend submits",
            f"use one of {', '.join(TASK_TYPES)}",
        )
    for name, ref in request.spec.secrets.items():
        if not ref.key:
            raise ConfigError(
                f"secrets.{name}",
                f"{ref.name!r} names a secret scope but no key",
                "use 'scope/key' (a Databricks secret scope and the key in it)",
            )
    compute = resolve_compute(request, config)
    uses_runtime = kind == "spark_python_task" and not options.get("python_file")
    # An existing cluster takes no per-run environment. Plain env still reaches a runtime step (it
    # travels in the step itself); secret references resolve only in a job cluster's spark_env_vars.
    if compute.existing_cluster_id and (request.spec.secrets or (request.spec.env and not uses_runtime)):
        field_name = "secrets" if request.spec.secrets else "env"
        raise ConfigError(
            field_name,
            "an existing cluster cannot take per-run environment variables"
            + ("" if request.spec.secrets else " for a task that does not run the step runtime"),
            "run the step on a job cluster (new_cluster or a profile with a cluster shape)",
        )
    if not compute.existing_cluster_id:
        cluster = compute.new_cluster or {}
        if not cluster.get("spark_version"):
            raise ConfigError(
                f"backend_config[{NAME}].new_cluster.spark_version",
                "is not set",
                "set it in new_cluster or the profile, e.g. '15.4.x-scala2.12', or use an "
                "existing_cluster_id",
            )
        if not (cluster.get("node_type_id") or cluster.get("instance_pool_id") or cluster.get("policy_id")):
            raise ConfigError(
                f"backend_config[{NAME}].new_cluster.node_type_id",
                "is not set",
                "set node_type_id (or instance_pool_id) in new_cluster or the profile",
            )
    if (
        request.spec.resources.gpu
        and compute.new_cluster is not None
        and not config.node_types
        and not request.spec.resources.profile
    ):
        raise ConfigError(
            "resources.gpu",
            "a GPU on Databricks comes from the node type",
            f"define a profile with a GPU node_type_id, or backend_config[{NAME}].node_types",
        )
    build_submit_payload(request, config, "dbfs:/validate.py")
