"""The ``docker`` backend: one container per step, on a local or remote Docker engine.

The step runtime is injected as ``python3 -c <runtime source>`` (nothing to install in the image) and
reads the step from ``REMOTE_ML_STEP``. A local artifact root is bind-mounted at the same path, so the
output URIs the step writes are valid on the worker and for the next step.

Identity and reattachment: the container is named ``identity.name()`` and labelled with
``identity.labels()``; :meth:`DockerBackend.find` looks it up by the step-id label. Labels cannot change
after creation, so the backend marks a container by *renaming* it: ``<name>.cancelled`` once Airflow
cancels it and ``.finished`` appended once Airflow is done with it. Identity names never contain a dot,
so the marks are the dot-separated suffixes of the name, and a finished container is never reattached.

Completion is event-driven: :meth:`DockerBackend.wait` blocks in the engine's container wait API and
returns the moment the container stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import DeviceRequest, Mount

from airflow_remote_ml import runtime
from airflow_remote_ml.core.artifacts import is_local, local_path, read_json
from airflow_remote_ml.core.backend import Backend, BackendConfig, StepRequest
from airflow_remote_ml.core.errors import BackendAPIError, ConfigError, TransientBackendError
from airflow_remote_ml.core.identity import LABEL_PREFIX, LABEL_STEP_ID, StepIdentity
from airflow_remote_ml.core.poll import PollPolicy
from airflow_remote_ml.core.spec import parse_cpu, parse_memory, reject_unknown_options
from airflow_remote_ml.core.status import LogChunk, RunHandle, RunState, RunStatus

log = logging.getLogger(__name__)

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
    stop_timeout: float = 10.0
    user: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    init: bool = True
    artifact_mount: bool = True
    artifact_host_path: str | None = None
    secrets_from: str = "airflow"


# -- pure functions: state mapping, request building, log parsing (no I/O) ----------------------------------


def marks(name: str) -> set[str]:
    """The marks of a container name (``/step-abc.cancelled.finished`` → ``{"cancelled", "finished"}``)."""
    return set(name.lstrip("/").split(".")[1:])


def status_from_inspect(attrs: Mapping[str, Any]) -> RunStatus:
    """Map ``docker inspect`` output to a :class:`RunStatus`. Every engine state is covered."""
    state = attrs.get("State") or {}
    status = str(state.get("Status") or "").lower()
    code = state.get("ExitCode")
    error = state.get("Error") or ""
    cancelled = MARK_CANCELLED in marks(str(attrs.get("Name") or ""))
    if status == "created":
        if cancelled:
            return RunStatus(RunState.CANCELLED, status, "cancelled before it started")
        if error:  # the engine tried to start it and could not (no such executable, bad mount, ...)
            return RunStatus(RunState.FAILED, status, f"the container could not start: {error}", code or None)
        return RunStatus(RunState.QUEUED, status, "created, not started yet")
    if status == "running":
        return RunStatus(RunState.RUNNING, status)
    if status == "restarting":
        return RunStatus(RunState.RUNNING, status, "the engine is restarting the container (restart policy)")
    if status == "paused":
        return RunStatus(RunState.RUNNING, status, "paused; it resumes with 'docker unpause'")
    if status in ("exited", "removing", "dead"):
        if state.get("OOMKilled"):
            limit = (attrs.get("HostConfig") or {}).get("Memory") or 0
            shown = f" of {limit / 1024 ** 2:.0f} MiB" if limit else ""
            return RunStatus(RunState.FAILED, status,
                             f"OOMKilled: the step used more than its memory limit{shown}; raise resources.memory",
                             code)
        if cancelled and code != 0:
            return RunStatus(RunState.CANCELLED, status, "cancelled", code)
        if status == "dead":
            return RunStatus(RunState.FAILED, status, "the container is dead: the engine failed to stop or "
                             "remove it" + (f" ({error})" if error else ""), code)
        if code == 0:
            return RunStatus(RunState.SUCCEEDED, status, "", 0)
        return RunStatus(RunState.FAILED, status, _exit_message(code, error), code)
    log.warning("docker: unknown container state %r; treating it as running", status)
    return RunStatus(RunState.RUNNING, status or "unknown", f"unknown container state {status!r}")


def _exit_message(code: Any, error: str) -> str:
    message = f"the step exited with code {code}"
    if code == 127:
        message += " (command not found: is the backend's python interpreter in the image?)"
    if isinstance(code, int) and 128 < code < 128 + 65:
        with contextlib.suppress(ValueError):
            message += f" (killed by {signal.Signals(code - 128).name})"
    return message + (f": {error}" if error else "")


def status_after_removal(manifest: Mapping[str, Any] | None, identity: Mapping[str, Any] | None) -> RunStatus:
    """The status of a container that no longer exists: its result manifest tells how it ended, if any."""
    if manifest and (identity is None or manifest.get("identity") == identity):
        code = manifest.get("exit_code")
        if manifest.get("status") == "succeeded":
            return RunStatus(RunState.SUCCEEDED, "removed", "", 0 if code is None else code)
        return RunStatus(RunState.FAILED, "removed", str(manifest.get("error") or _exit_message(code, "")), code)
    return RunStatus(RunState.LOST, "removed", "the container was removed before its result was recorded")


_TS_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d) ?")


def parse_log_entries(raw: bytes | str) -> list[tuple[int, str]]:
    """``(nanoseconds since the epoch, text)`` of each entry of ``docker logs --timestamps`` output."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    entries: list[tuple[int, str]] = []
    for line in text.split("\n"):
        match = _TS_RE.match(line)
        if not match:
            if line and entries:  # a continuation (should not happen; keep the text, never drop it)
                entries[-1] = (entries[-1][0], entries[-1][1] + "\n" + line)
            continue
        stamp, fraction, zone = match.groups()
        moment = datetime.fromisoformat(stamp + ("+00:00" if zone == "Z" else zone))
        nanos = int(moment.timestamp()) * 1_000_000_000 + int((fraction or "0").ljust(9, "0"))
        entries.append((nanos, line[match.end():].rstrip("\r")))
    return entries


def demux(stream: bytes) -> bytes:
    """The payload of the engine's multiplexed stdout/stderr stream: 8-byte frame headers dropped, in order."""
    parts = []
    at = 0
    while at + 8 <= len(stream):
        size = int.from_bytes(stream[at + 4:at + 8], "big")
        parts.append(stream[at + 8:at + 8 + size])
        at += 8 + size
    return b"".join(parts)


def next_log_chunk(entries: Sequence[tuple[int, str]], cursor: Mapping[str, int] | None) -> LogChunk:
    """New lines and the next cursor, from the entries the engine returned for ``since=cursor["since"]``.

    The engine's ``since`` is inclusive and is sent in whole seconds, and the entries come in log order,
    so the first ``skip`` of them are the ones already handed out. The next ``since`` is one second
    before the second of the newest entry: an entry written a moment late with a slightly older
    timestamp (stdout and stderr are stamped by separate readers) still falls inside that window.
    """
    since = int((cursor or {}).get("since", 0))
    skip = int((cursor or {}).get("skip", 0))
    if not entries:
        return LogChunk([], {"since": since, "skip": skip})
    new = [text for _, text in entries[skip:]]
    newest = max(nanos for nanos, _ in entries)
    next_since = max(since, newest // 1_000_000_000 - 1)
    seen = sum(1 for nanos, _ in entries if nanos >= next_since * 1_000_000_000)
    return LogChunk(new, {"since": next_since, "skip": seen})


def parse_mount(value: Any, field_name: str) -> Mount:
    """A :class:`docker.types.Mount` from ``{"source", "target", "type", "read_only"}`` or ``"src:dst[:ro]"``."""
    fix = "use {'source': '/data', 'target': '/data', 'read_only': True} or '/data:/data:ro'"
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise ConfigError(field_name, f"{value!r} is not 'source:target[:ro|rw]'", fix)
        value = {"source": parts[0], "target": parts[1], "read_only": len(parts) == 3 and parts[2] == "ro"}
    if not isinstance(value, Mapping):
        raise ConfigError(field_name, f"expected a mapping or a string, got {type(value).__name__}", fix)
    reject_unknown_options(field_name, value, {"source", "target", "type", "read_only"})
    target, source = value.get("target"), value.get("source")
    kind = value.get("type") or ("bind" if str(source or "").startswith("/") else "volume")
    if not isinstance(target, str) or not target.startswith("/"):
        raise ConfigError(f"{field_name}.target", f"{target!r} is not an absolute path", fix)
    if kind not in ("bind", "volume", "tmpfs"):
        raise ConfigError(f"{field_name}.type", f"{kind!r} is not a mount type", "use 'bind', 'volume' or 'tmpfs'")
    if kind != "tmpfs" and not source:
        raise ConfigError(f"{field_name}.source", "is missing", fix)
    return Mount(target=target, source=source, type=kind, read_only=bool(value.get("read_only", False)))


def _volume_mounts(volumes: Mapping[str, Any] | Sequence[str]) -> list[Mount]:
    if isinstance(volumes, Mapping):
        mounts = []
        for source, spec in volumes.items():
            spec = {"bind": spec} if isinstance(spec, str) else dict(spec or {})
            mode = spec.get("mode", "rw")
            mounts.append(parse_mount(f"{source}:{spec.get('bind')}:{mode}", f"volumes.{source}"))
        return mounts
    return [parse_mount(item, f"volumes[{i}]") for i, item in enumerate(volumes)]


def _check_options(prefix: str, options: Mapping[str, Any], allowed: frozenset[str]) -> None:
    """Type checks of step options and profile settings: a bad value fails before anything runs."""
    reject_unknown_options(prefix, options, set(allowed))
    for key, value in options.items():
        name = f"{prefix}.{key}"
        if key in ("user", "working_dir", "network_mode", "ipc_mode", "runtime", "gpu_driver") and not (
                isinstance(value, str) or (key == "user" and isinstance(value, int))):
            raise ConfigError(name, f"{value!r} is not a string", "give a string")
        if key == "working_dir" and not value.startswith("/"):
            raise ConfigError(name, f"{value!r} is not an absolute path", "use e.g. '/opt/code'")
        if key in ("extra_hosts", "labels") and not (isinstance(value, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
            raise ConfigError(name, f"{value!r} is not a mapping of strings", "use {'name': 'value'}")
        if key == "labels" and any(k.startswith(LABEL_PREFIX) for k in value):
            raise ConfigError(name, f"keys starting with {LABEL_PREFIX!r} are reserved for the step identity",
                              "choose another label key")
        if key in ("cap_add", "entrypoint_prefix", "gpu_device_ids") and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ConfigError(name, f"{value!r} is not a list of strings", "use e.g. ['tini', '--']")
        if key == "mounts":
            if not isinstance(value, list):
                raise ConfigError(name, f"{value!r} is not a list", "use a list of mounts")
            for i, item in enumerate(value):
                parse_mount(item, f"{name}[{i}]")
        if key == "init" and not isinstance(value, bool):
            raise ConfigError(name, f"{value!r} is not true or false", "use True or False")
        if key == "shm_size":
            parse_memory(value, name)
        if key == "memory":
            parse_memory(value, name)
        if key == "cpu":
            parse_cpu(value, name)
        if key == "gpus" and value != "all" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(name, f"{value!r} is not a GPU count", "use a whole number or 'all'")


def container_request(config: DockerConfig, request: StepRequest, profile: Mapping[str, Any],
                      secret_env: Mapping[str, str]) -> dict[str, Any]:
    """The container to create for ``request``: ``create_container`` keywords plus ``host_config`` keywords.

    Settings apply in this order, later winning: backend config, resource profile, the step's own
    resources, the step's ``backend_options["docker"]``.
    """
    spec = request.spec
    settings: dict[str, Any] = {**profile, **spec.options_for("docker")}
    env = {**spec.env, **secret_env, "REMOTE_ML_STEP": json.dumps(request.runtime_config()),
           "PYTHONUNBUFFERED": "1"}
    labels = {**config.labels, **dict(profile.get("labels") or {}), **dict(settings.get("labels") or {}),
              **request.extra_labels, **request.identity.labels(),
              LABEL_MANIFEST: request.manifest_uri, LABEL_OUTPUTS: ",".join(spec.outputs)}

    mounts = [parse_mount(m, f"mounts[{i}]") for i, m in enumerate(config.mounts)]
    mounts += _volume_mounts(config.volumes)
    mounts += [parse_mount(m, f"profiles.{spec.resources.profile}.mounts[{i}]")
               for i, m in enumerate(profile.get("mounts") or [])]
    mounts += [parse_mount(m, f"backend_options.docker.mounts[{i}]")
               for i, m in enumerate(spec.options_for("docker").get("mounts") or [])]
    targets = {m["Target"] for m in mounts}
    if config.artifact_mount and is_local(request.artifact_root):
        root = local_path(request.artifact_root)
        if root not in targets:
            mounts.append(Mount(target=root, source=config.artifact_host_path or root, type="bind"))
            targets.add(root)
        # Inputs that are local files outside the artifact root (a data set on the worker): read-only.
        for uri in spec.inputs.values():
            path = local_path(uri) if is_local(uri) else None
            if (path and os.path.isabs(path) and not _under(path, root) and os.path.exists(path)
                    and not any(_under(path, t) for t in targets)):
                mounts.append(Mount(target=path, source=path, type="bind", read_only=True))
                targets.add(path)

    host: dict[str, Any] = {"mounts": mounts}
    network_mode = settings.get("network_mode") or config.network_mode
    if network_mode:
        host["network_mode"] = network_mode
    cpu = spec.resources.cpu or parse_cpu(profile.get("cpu"), f"profiles.{spec.resources.profile}.cpu")
    if cpu:
        host["nano_cpus"] = int(cpu * 1e9)
    memory = spec.resources.memory or parse_memory(profile.get("memory"), f"profiles.{spec.resources.profile}.memory")
    if memory:
        host["mem_limit"] = memory
    gpus = spec.resources.gpu or profile.get("gpus") or 0
    if gpus:
        host["device_requests"] = [DeviceRequest(
            count=-1 if gpus == "all" else int(gpus), capabilities=[["gpu"]],
            driver=profile.get("gpu_driver") or "", device_ids=profile.get("gpu_device_ids") or None)]
    if settings.get("runtime"):
        host["runtime"] = settings["runtime"]
    if settings.get("shm_size"):
        host["shm_size"] = parse_memory(settings["shm_size"], "backend_options.docker.shm_size")
    for key in ("extra_hosts", "ipc_mode", "cap_add"):
        if settings.get(key) is not None:
            host[key] = settings[key]
    init = settings.get("init", config.init)
    if init:
        host["init"] = True

    create: dict[str, Any] = {
        "image": spec.image,
        "name": request.identity.name(),
        "entrypoint": [*settings.get("entrypoint_prefix", []), *runtime.launch_command(config.python)],
        "environment": env,
        "labels": labels,
    }
    user = settings.get("user", config.user)
    if user is not None:
        create["user"] = str(user)
    if settings.get("working_dir"):
        create["working_dir"] = settings["working_dir"]
    return {"create": create, "host": host}


def _under(path: str, root: str) -> bool:
    return os.path.normpath(path) == os.path.normpath(root) or os.path.normpath(path).startswith(
        os.path.normpath(root).rstrip("/") + "/")


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


# -- the backend ------------------------------------------------------------------------------------------


class _Gone(BackendAPIError):
    """The container (or image) does not exist (HTTP 404)."""


class DockerBackend(Backend):
    name: ClassVar[str] = "docker"
    config_class = DockerConfig
    option_names = OPTION_NAMES
    # wait() returns when the container stops; the policy only bounds how often logs are fetched.
    poll_policy = PollPolicy(first_delay=0.5, factor=1.5, cap=5.0)
    has_job_page = False
    config: DockerConfig

    def __init__(self, config: DockerConfig, api_client: Any = None) -> None:
        """``api_client``: a ready ``docker.APIClient`` (or a test double with its methods) to use instead
        of connecting lazily from the configuration."""
        super().__init__(config)
        if config.removal_policy not in REMOVAL_POLICIES:
            raise ConfigError("backend_config[docker].removal_policy", f"{config.removal_policy!r} is not known",
                              f"use one of {', '.join(REMOVAL_POLICIES)}")
        if config.pull not in PULL_POLICIES:
            raise ConfigError("backend_config[docker].pull", f"{config.pull!r} is not known",
                              f"use one of {', '.join(PULL_POLICIES)}")
        if config.secrets_from not in ("airflow", "env"):
            raise ConfigError("backend_config[docker].secrets_from", f"{config.secrets_from!r} is not known",
                              "use 'airflow' or 'env'")
        for name, settings in config.profiles.items():
            _check_options(f"profiles.{name}", settings or {}, frozenset(PROFILE_NAMES))
        for i, mount in enumerate(config.mounts):
            parse_mount(mount, f"backend_config[docker].mounts[{i}]")
        _volume_mounts(config.volumes)
        self._client: docker.APIClient | None = api_client
        self._owns_client = api_client is None
        self._registry_auth: dict[str, str] | None = None

    # -- the engine client and the one place SDK errors are mapped ----------------------------------------

    def _engine_settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {}
        if self.config.conn_id:
            settings, self._registry_auth = read_connection(self.config.conn_id)
        for key in ("base_url", "tls_ca_cert", "tls_client_cert", "tls_client_key"):
            if getattr(self.config, key):
                settings[key] = getattr(self.config, key)
        if self.config.api_version != "auto" or "api_version" not in settings:
            settings["api_version"] = self.config.api_version
        settings.setdefault("tls_verify", self.config.tls_verify)
        settings.setdefault("timeout", self.config.timeout)
        return settings

    @property
    def api(self) -> docker.APIClient:
        """The engine's low-level client, created on first use and reused for every call."""
        if self._client is None:
            s = self._engine_settings()
            kwargs: dict[str, Any] = {}
            if s.get("base_url"):
                kwargs["base_url"] = s["base_url"]
                certs = [s.get("tls_ca_cert"), s.get("tls_client_cert"), s.get("tls_client_key")]
                if any(certs) or str(s["base_url"]).startswith("https://"):
                    if bool(s.get("tls_client_cert")) != bool(s.get("tls_client_key")):
                        raise ConfigError("tls_client_key", "a client certificate needs its key and vice versa",
                                          "set both tls_client_cert and tls_client_key")
                    client_cert = (s["tls_client_cert"], s["tls_client_key"]) if s.get("tls_client_cert") else None
                    try:
                        kwargs["tls"] = docker.TLSConfig(client_cert=client_cert, ca_cert=s.get("tls_ca_cert"),
                                                         verify=bool(s["tls_verify"]))
                    except docker.errors.TLSParameterError as exc:
                        raise ConfigError("tls_ca_cert/tls_client_cert/tls_client_key", str(exc),
                                          "give paths of PEM files that exist on the worker") from None
            else:  # DOCKER_HOST, DOCKER_TLS_VERIFY and DOCKER_CERT_PATH, as the docker CLI reads them
                kwargs.update(docker.utils.kwargs_from_env())
                kwargs.setdefault("base_url", DEFAULT_SOCKET)
            with self._mapped("connecting to the engine at " + str(kwargs["base_url"])):
                self._client = docker.APIClient(version=s["api_version"], timeout=s["timeout"], **kwargs)
        return self._client

    @contextlib.contextmanager
    def _mapped(self, action: str) -> Iterator[None]:
        """Map docker SDK and transport errors to ours: 404 → _Gone, 429/5xx/connection → transient."""
        try:
            yield
        except NotFound as exc:
            raise _Gone(self.name, f"{action}: {exc.explanation or exc}", 404) from exc
        except APIError as exc:
            code = exc.status_code
            message = f"{action}: {exc.explanation or exc}"
            if code is not None and (code == 429 or code >= 500):
                raise TransientBackendError(self.name, message, code) from exc
            raise BackendAPIError(self.name, message, code) from exc
        except (requests.exceptions.RequestException, DockerException, OSError) as exc:
            raise TransientBackendError(self.name, f"{action}: {exc}") from exc

    def _inspect(self, container_id: str) -> dict[str, Any]:
        with self._mapped(f"inspecting container {container_id[:12]}"):
            return self.api.inspect_container(container_id)

    def _handle(self, container_id: str, name: str, labels: Mapping[str, str], identity: StepIdentity) -> RunHandle:
        outputs = labels.get(LABEL_OUTPUTS) or ""
        return RunHandle(backend=self.name, job_id=container_id[:12], url=None, data={
            "container_id": container_id,
            "name": name.lstrip("/").split(".")[0],
            "manifest_uri": labels.get(LABEL_MANIFEST),
            "declared_outputs": sorted(o for o in outputs.split(",") if o),
            "identity": identity.to_json(),
        })

    # -- validation -------------------------------------------------------------------------------------------

    def validate(self, request: StepRequest) -> None:
        super().validate(request)
        spec = request.spec
        if not spec.image:
            raise ConfigError("image", "is not set: the docker backend needs an image",
                              "set image='airflow-remote-ml/runner:latest' (or any image with python3)")
        _check_options("backend_options.docker", spec.options_for(self.name), self.option_names)
        profile = self.config.profile(spec.resources.profile, self.name)
        if spec.resources.gpu and profile.get("gpus") not in (None, "all") and spec.resources.gpu > profile["gpus"]:
            raise ConfigError("resources.gpu", f"asks for {spec.resources.gpu} GPUs but profile "
                              f"{spec.resources.profile!r} has {profile['gpus']}", "ask for fewer or change profile")
        self._ensure_artifact_root(request)
        # Build the request once without secrets: every remaining value error surfaces here, not at submit.
        container_request(self.config, request, profile, {})

    def _ensure_artifact_root(self, request: StepRequest) -> None:
        """A local artifact root must exist before the engine bind-mounts it (the engine refuses a missing
        source), so it is created here, on the worker, with the worker's ownership."""
        if not (self.config.artifact_mount and is_local(request.artifact_root)) or self.config.artifact_host_path:
            return
        root = local_path(request.artifact_root)
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise ConfigError("artifact_root", f"{root!r} cannot be created on the worker ({exc.strerror})",
                              "use a directory the worker can create and the Docker host can bind-mount, "
                              "or set artifact_host_path") from None
        if not os.path.isdir(root):
            raise ConfigError("artifact_root", f"{root!r} is not a directory", "use a directory")

    def _secret_env(self, request: StepRequest) -> dict[str, str]:
        if not request.spec.secrets:
            return {}
        from airflow_remote_ml.hooks import resolve_secret

        return {env: resolve_secret(ref, source=self.config.secrets_from) for env, ref in request.spec.secrets.items()}

    # -- submit and find --------------------------------------------------------------------------------------

    def submit(self, request: StepRequest) -> RunHandle:
        profile = self.config.profile(request.spec.resources.profile, self.name)
        self._ensure_artifact_root(request)
        built = container_request(self.config, request, profile, self._secret_env(request))
        create, image, name = built["create"], request.spec.image or "", built["create"]["name"]
        if self.config.pull == "always":
            self._pull(image)
        with self._mapped(f"creating container {name}"):
            host_config = self.api.create_host_config(**built["host"])
        try:
            container_id = self._create(create, host_config)
        except _Gone as exc:
            if not isinstance(exc.__cause__, ImageNotFound) or self.config.pull == "never":
                raise self._image_error(image, "pull is 'never'" if isinstance(exc.__cause__, ImageNotFound)
                                        else str(exc)) from None
            self._pull(image)
            container_id = self._create(create, host_config)
        except BackendAPIError as exc:
            if exc.status_code != 409:
                raise
            # A retry after a crash between create and start: the name is taken by our own container.
            attrs = self._inspect(name)
            if (attrs.get("Config") or {}).get("Labels", {}).get(LABEL_STEP_ID) != request.identity.digest:
                raise BackendAPIError(self.name, f"a container named {name!r} exists that does not belong to "
                                      "this step; remove or rename it", 409) from None
            container_id = attrs["Id"]
            if attrs["State"]["Status"] != "created":
                log.info("docker: container %s for %s already started; reusing it", name, request.identity.key)
                return self._handle(container_id, name, create["labels"], request.identity)
            log.info("docker: reusing the created, never started container %s", name)
        try:
            with self._mapped(f"starting container {name}"):
                self.api.start(container_id)
        except BackendAPIError as exc:
            if "executable file not found" in str(exc):
                raise ConfigError("python", f"{self.config.python!r} is not in image {image!r}",
                                  "use an image with python3, or set backend_config python='/path/to/python'") from None
            if exc.status_code == 400:
                raise ConfigError("image", f"the container could not start: {exc}",
                                  "fix the setting the engine names") from None
            raise
        log.info("docker: started container %s (%s) for %s", name, container_id[:12], request.identity.key)
        return self._handle(container_id, name, create["labels"], request.identity)

    def _create(self, create: dict[str, Any], host_config: dict[str, Any]) -> str:
        with self._mapped(f"creating container {create['name']}"):
            return self.api.create_container(host_config=host_config, **create)["Id"]

    def _pull(self, image: str) -> None:
        repository, tag = docker.utils.parse_repository_tag(image)
        log.info("docker: pulling %s", image)
        try:
            with self._mapped(f"pulling {image}"):
                self.api.pull(repository, tag=tag or "latest", auth_config=self._registry_auth)
        except BackendAPIError as exc:
            raise self._image_error(image, str(exc)) from None

    @staticmethod
    def _image_error(image: str, reason: str) -> ConfigError:
        return ConfigError("image", f"{image!r} not found locally and could not be pulled ({reason})",
                           "check the name and tag, build or load the image on the Docker host, or give the "
                           "connection registry credentials")

    def find(self, identity: StepIdentity) -> RunHandle | None:
        with self._mapped("listing containers"):
            found = self.api.containers(all=True, filters={"label": f"{LABEL_STEP_ID}={identity.digest}"})
        # Finished ones belong to an earlier Airflow attempt; never-started ones are reused by submit().
        candidates = [c for c in found if not any(MARK_FINISHED in marks(n) for n in c.get("Names") or [])
                      and c.get("State") != "created"]
        if not candidates:
            return None
        newest = max(candidates, key=lambda c: c.get("Created") or 0)
        return self._handle(newest["Id"], (newest.get("Names") or ["/"])[0], newest.get("Labels") or {}, identity)

    # -- status, waiting, logs --------------------------------------------------------------------------------

    def poll(self, handle: RunHandle) -> RunStatus:
        try:
            return status_from_inspect(self._inspect(handle.data["container_id"]))
        except _Gone:
            return self._status_after_removal(handle)

    def _status_after_removal(self, handle: RunHandle) -> RunStatus:
        uri = handle.data.get("manifest_uri")
        try:
            manifest = read_json(uri) if uri else None
        except Exception:  # an unreadable manifest means the same as none
            manifest = None
        return status_after_removal(manifest, handle.data.get("identity"))

    def wait(self, handle: RunHandle, timeout: float) -> RunStatus:
        """Block in the engine's wait API until the container stops, at most ``timeout`` seconds."""
        if timeout <= 0:
            return self.poll(handle)
        container_id = handle.data["container_id"]
        try:
            self._wait(container_id, timeout, "not-running")
            status = self.poll(handle)
            if status.state is RunState.QUEUED:
                # "not-running" is true at once for a created container; wait for it to run and stop.
                self._wait(container_id, timeout, "next-exit")
                status = self.poll(handle)
            return status
        except _Gone:
            return self._status_after_removal(handle)
        except _WaitTimeout:
            return self.poll(handle)

    def _wait(self, container_id: str, timeout: float, condition: str) -> None:
        try:
            with self._mapped(f"waiting for container {container_id[:12]}"):
                self.api.wait(container_id, timeout=timeout, condition=condition)
        except TransientBackendError as exc:
            # The SDK reports a read timeout as a ConnectionError over a unix socket, ReadTimeout over TCP.
            cause = exc.__cause__
            if isinstance(cause, requests.exceptions.ReadTimeout) or "timed out" in str(cause).lower():
                raise _WaitTimeout from None
            raise

    async def await_change(self, handle: RunHandle, timeout: float) -> RunStatus:
        # The engine's wait API is blocking HTTP; a thread keeps the triggerer's event loop free.
        return await asyncio.to_thread(self.wait, handle, timeout)

    def read_logs(self, handle: RunHandle, cursor: Any = None) -> LogChunk:
        since = int((cursor or {}).get("since", 0))
        params: dict[str, Any] = {"stdout": 1, "stderr": 1, "timestamps": 1}
        if since > 0:
            params["since"] = since
        # One request where the SDK's logs() makes two (it inspects first to learn whether the container
        # has a TTY; ours never do, so the answer is always the multiplexed stream).
        url = f"{self.api.base_url}/v{self.api.api_version}/containers/{handle.data['container_id']}/logs"
        try:
            with self._mapped(f"reading the logs of container {handle.job_id}"):
                response = self.api.get(url, params=params, timeout=self.api.timeout)
                try:
                    response.raise_for_status()
                except requests.exceptions.HTTPError as exc:
                    raise docker.errors.create_api_error_from_http_exception(exc) from exc
        except _Gone:
            return LogChunk([], cursor)
        return next_log_chunk(parse_log_entries(demux(response.content)), cursor)

    # -- cancel, marks, cleanup -------------------------------------------------------------------------------

    def cancel(self, handle: RunHandle) -> None:
        container_id = handle.data["container_id"]
        try:
            attrs = self._inspect(container_id)
            if attrs["State"]["Status"] in ("exited", "dead", "removing"):
                return  # already over: nothing to stop, and its own outcome stands
            self._add_mark(container_id, attrs["Name"], MARK_CANCELLED)
            with self._mapped(f"stopping container {handle.job_id}"):
                self.api.stop(container_id, timeout=int(max(0, self.config.stop_timeout)))
        except _Gone:
            return
        log.info("docker: cancelled container %s", handle.job_id)

    def mark_finished(self, handle: RunHandle) -> None:
        """Rename the container with the ``.finished`` mark; one the removal policy is going to remove
        anyway is removed at once instead (a removed container cannot be reattached either)."""
        try:
            attrs = self._inspect(handle.data["container_id"])
            status = status_from_inspect(attrs)
            if status.is_terminal and self._removes(status):
                self._remove(handle)
            else:
                self._add_mark(handle.data["container_id"], attrs["Name"], MARK_FINISHED)
        except _Gone:
            return

    def _add_mark(self, container_id: str, name: str, mark: str) -> None:
        name = name.lstrip("/")
        if mark in marks(name):
            return
        try:
            with self._mapped(f"renaming container {container_id[:12]}"):
                self.api.rename(container_id, f"{name}.{mark}")
        except BackendAPIError as exc:
            if exc.status_code != 409:
                raise
            # The name is taken (by an older container of the same step): any unique suffix will do.
            with self._mapped(f"renaming container {container_id[:12]}"):
                self.api.rename(container_id, f"{name}.{mark}.{uuid.uuid4().hex[:8]}")

    def _removes(self, status: RunStatus) -> bool:
        policy = self.config.removal_policy
        return policy == "always" or (policy == "on_success" and status.is_successful)

    def cleanup(self, handle: RunHandle, status: RunStatus) -> None:
        if not self._removes(status):
            if not status.is_successful:
                log.info("docker: keeping container %s for debugging (removal_policy=%s)", handle.job_id,
                         self.config.removal_policy)
            return
        self._remove(handle)

    def _remove(self, handle: RunHandle) -> None:
        try:
            with self._mapped(f"removing container {handle.job_id}"):
                self.api.remove_container(handle.data["container_id"], v=True, force=True)
        except _Gone:
            return
        except BackendAPIError as exc:
            if exc.status_code != 409:  # 409: a removal is already in progress
                raise

    def close(self) -> None:
        if self._client is not None and self._owns_client:
            self._client.close()
            self._client = None


class _WaitTimeout(Exception):
    """The wait API did not answer within the timeout: the container is still running."""
