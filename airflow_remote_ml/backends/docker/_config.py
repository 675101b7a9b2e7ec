"""Settings of the docker backend: its constants, :class:`DockerConfig`, and the Airflow connection.

The connection is read lazily (:func:`read_connection` imports Airflow only when ``conn_id`` is set), so the
backend works without Airflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from airflow_remote_ml.core.backend import BackendConfig
from airflow_remote_ml.core.errors import ConfigError
from airflow_remote_ml.core.identity import LABEL_PREFIX

LABEL_MANIFEST = f"{LABEL_PREFIX}/manifest-uri"
LABEL_OUTPUTS = f"{LABEL_PREFIX}/outputs"
MARK_CANCELLED = "cancelled"
MARK_FINISHED = "finished"
REMOVAL_POLICIES = ("on_success", "always", "never")
PULL_POLICIES = ("if_missing", "always", "never")
DEFAULT_SOCKET = "unix:///var/run/docker.sock"

#: Per-step ``backend_options["docker"]`` keys; profiles accept these plus the resource keys below.
OPTION_NAMES = frozenset({
    "user", "shm_size", "extra_hosts", "working_dir", "network_mode", "labels", "mounts", "init",
    "ipc_mode", "cap_add", "entrypoint_prefix",
})
PROFILE_NAMES = OPTION_NAMES | {"cpu", "memory", "gpus", "gpu_device_ids", "gpu_driver", "runtime"}


@dataclass(frozen=True)
class DockerConfig(BackendConfig):
    """Settings of the docker backend (from ``backend_config``, the deployment's ``[remote_ml]`` section,
    and, for the engine address and TLS, the Airflow connection ``conn_id``).

    Attributes:
        base_url: the engine, e.g. ``unix:///var/run/docker.sock`` or ``tcp://host:2376``. Unset: the
            connection's ``docker_url``, else ``DOCKER_HOST`` (with ``DOCKER_TLS_VERIFY``/``DOCKER_CERT_PATH``),
            else the local socket.
        tls_ca_cert, tls_client_cert, tls_client_key: PEM file paths on the worker; any of them turns TLS on.
        tls_verify: verify the engine's certificate against ``tls_ca_cert``.
        conn_id: an Airflow connection of type ``docker``, read lazily (see :func:`settings_from_connection`).
        api_version: engine API version, ``"auto"`` negotiates with the engine.
        timeout: seconds for one API call.
        removal_policy: ``on_success`` (keep failed containers for debugging), ``always`` or ``never``.
        pull: ``if_missing`` (as ``docker run``), ``always`` or ``never``.
        network_mode: e.g. ``bridge``, ``host``, ``none`` or a network name; unset: the engine's default.
        mounts: extra mounts for every step: ``{"source", "target", "type", "read_only"}`` or ``"src:dst[:ro]"``.
        volumes: the docker SDK's ``volumes`` form, ``{"/host": {"bind": "/ctr", "mode": "ro"}}``.
        python: the interpreter in the image that runs the step runtime.
        stop_timeout: seconds between SIGTERM and SIGKILL when a step is cancelled.
        user: the container user (``"1000"``, ``"1000:1000"``, a name); unset: the image's.
        labels: extra labels for every container.
        init: run the engine's init (``docker run --init``) as PID 1. It forwards ``docker stop``'s SIGTERM
            to the runtime even before the runtime has installed its handlers (a PID 1 without a handler
            ignores SIGTERM, so the stop would wait for SIGKILL) and reaps orphaned processes.
        artifact_mount: bind-mount a local artifact root into the container at the same path.
        artifact_host_path: where the artifact root is on the Docker host when that differs from the
            worker's path (a worker that itself runs in a container).
        secrets_from: ``airflow`` (Airflow Variables) or ``env`` (the worker's environment).
        attach: follow a container this worker starts over its attach stream (as ``docker run`` does)
            instead of reading its log back from the engine; the log stays the fallback and is what a
            trigger or a reattached worker reads.
    """

    base_url: str | None = None
    tls_ca_cert: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None
    tls_verify: bool = True
    conn_id: str | None = None
    api_version: str = "auto"
    timeout: float = 60.0
    removal_policy: str = "on_success"
    pull: str = "if_missing"
    network_mode: str | None = None
    mounts: list[Any] = field(default_factory=list)
    volumes: dict[str, Any] | list[str] = field(default_factory=dict)
    python: str = "python3"
    # Airflow's task supervisor SIGKILLs a task process 5 s after SIGTERM (task-sdk supervisor.py,
    # WatchedSubprocess.kill(escalation_delay=5.0)): the cancel's stop must be confirmed before that.
    stop_timeout: float = 3.0
    user: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    init: bool = True
    artifact_mount: bool = True
    artifact_host_path: str | None = None
    secrets_from: str = "airflow"
    attach: bool = True

    # A laptop backend: a step whose profile is not configured here runs with its own resources, so a DAG
    # written for a cluster (profile="gpu") still runs on Docker.
    strict_profiles: ClassVar[bool] = False


# -- the Airflow connection (lazy: the backend works without Airflow) ------------------------------------


def settings_from_connection(host: str | None, port: int | None, login: str | None, password: str | None,
                             extra: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str] | None]:
    """Engine settings and registry credentials from a connection of type ``docker``.

    The fields mean what they mean for the Docker provider's ``DockerHook``: host, port, login and
    password are the *registry* (used to pull private images). The engine address and TLS are extras:
    ``docker_url`` (or ``base_url``), ``tls_ca_cert``, ``tls_client_cert``, ``tls_client_key``, ``tls_verify``,
    ``api_version``, ``timeout``.
    """
    settings: dict[str, Any] = {}
    if extra.get("docker_url") or extra.get("base_url"):
        settings["base_url"] = extra.get("docker_url") or extra.get("base_url")
    for key in ("tls_ca_cert", "tls_client_cert", "tls_client_key", "api_version"):
        if extra.get(key):
            settings[key] = str(extra[key])
    if "tls_verify" in extra:
        value = extra["tls_verify"]
        settings["tls_verify"] = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
    if extra.get("timeout"):
        settings["timeout"] = float(extra["timeout"])
    auth = None
    if host and login:
        registry = f"{host}:{port}" if port else host
        auth = {"username": login, "password": password or "", "serveraddress": registry}
    return settings, auth


def read_connection(conn_id: str) -> tuple[dict[str, Any], dict[str, str] | None]:
    """Read the Airflow connection ``conn_id`` (imports Airflow; called only when ``conn_id`` is set)."""
    from airflow_remote_ml.hooks import get_connection

    conn = get_connection(conn_id)
    if conn.conn_type and conn.conn_type != "docker":
        raise ConfigError("conn_id", f"connection {conn_id!r} is of type {conn.conn_type!r}",
                          "use a connection of type 'docker'")
    return settings_from_connection(conn.host, conn.port, conn.login, conn.password, conn.extra_dejson or {})
