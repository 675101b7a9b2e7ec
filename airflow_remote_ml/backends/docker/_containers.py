"""The docker backend's pure part (no I/O): state mapping, request building, mount parsing, log parsing."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

from docker.types import DeviceRequest, Mount

from airflow_remote_ml import runtime
from airflow_remote_ml.backends.docker._config import LABEL_MANIFEST, LABEL_OUTPUTS, MARK_CANCELLED, DockerConfig
from airflow_remote_ml.core.artifacts import is_local, local_path
from airflow_remote_ml.core.backend import StepRequest
from airflow_remote_ml.core.errors import ConfigError
from airflow_remote_ml.core.identity import LABEL_PREFIX
from airflow_remote_ml.core.logs import next_chunk, parse_entries
from airflow_remote_ml.core.spec import parse_cpu, parse_memory, reject_unknown_options
from airflow_remote_ml.core.status import LogChunk, RunState, RunStatus

log = logging.getLogger(__name__)


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
            # The engine sets State.OOMKilled when the kernel's OOM killer fired in the container's memory
            # cgroup, whichever process it chose: usually the step's command (the biggest), while the
            # runtime survives and records "killed by SIGKILL" (seen on Docker 20.10, cgroup v1; asserted by
            # tests/integration/test_docker_backend.py::test_out_of_memory_says_so).
            limit = (attrs.get("HostConfig") or {}).get("Memory") or 0
            shown = f" of {limit / 1024 ** 2:.0f} MiB" if limit else ""
            return RunStatus(RunState.FAILED, status,
                             f"OOMKilled: the step used more than its memory limit{shown} and the kernel killed it "
                             f"(exit {code}); raise compute.memory", code, reason="OOMKilled")
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


def parse_log_entries(raw: bytes | str) -> list[tuple[int, str]]:
    """``(nanoseconds since the epoch, text)`` of each entry of ``docker logs --timestamps`` output."""
    return parse_entries(raw, complete=True)


def demux(stream: bytes) -> bytes:
    """The payload of the engine's multiplexed stdout/stderr stream: 8-byte frame headers dropped, in order."""
    # One frame per log entry: a 200k-line log is 200k frames, so the loop does as little as it can.
    import struct

    size_at = struct.Struct(">I").unpack_from
    parts: list[bytes] = []
    append = parts.append
    at, end = 0, len(stream)
    while at + 8 <= end:
        (size,) = size_at(stream, at + 4)
        append(stream[at + 8:at + 8 + size])
        at += 8 + size
    return b"".join(parts)


def is_count_cursor(cursor: Any) -> bool:
    """Whether ``cursor`` counts lines relayed per stream (handed out while attached, see ._attach)."""
    return isinstance(cursor, Mapping) and "stdout" in cursor and "stderr" in cursor


def lines_after_counts(stream: bytes, counts: Mapping[str, int]) -> LogChunk:
    """The lines of the engine's timestamped log (``stream``, multiplexed) after the first ``counts["stdout"]``
    stdout and ``counts["stderr"]`` stderr lines, and the timestamp cursor after the whole log.

    Exact because the log holds each stream's lines in the order the attach stream carried them: the
    engine's log copier splits each stream at its newlines into one entry per line (an entry of a line
    longer than 16 KiB is marked partial and stored without a newline; ``daemon/logger/copier.go``), and
    the log endpoint sends one frame per entry, its stream in the header (``pkg/stdcopy``). So an entry
    ending in a newline ends one line of its stream, and skipping per stream up to the n-th such entry
    skips exactly the lines relayed. Only the order *between* stdout and stderr may differ from the attach
    stream's (two copiers race), and the counts never depend on it.
    """
    import struct

    size_at = struct.Struct(">BxxxI").unpack_from
    left = {1: int(counts.get("stdout", 0)), 2: int(counts.get("stderr", 0))}
    kept: list[bytes] = []
    everything: list[bytes] = []
    at, end = 0, len(stream)
    while at + 8 <= end:
        kind, size = size_at(stream, at)
        payload = stream[at + 8:at + 8 + size]
        at += 8 + size
        everything.append(payload)
        if left.get(kind, 0) > 0:
            if payload.endswith(b"\n"):
                left[kind] -= 1
            continue
        kept.append(payload)
    cursor = next_chunk(parse_entries(b"".join(everything), complete=True), None).cursor
    return LogChunk([text for _, text in parse_entries(b"".join(kept), complete=True)], cursor)


def next_log_chunk(entries: Sequence[tuple[int, str]], cursor: Mapping[str, int] | None) -> LogChunk:
    """New lines and the next cursor (the engine's ``since`` is inclusive and in whole seconds): the shared
    timestamped-log cursor of :mod:`airflow_remote_ml.core.logs`."""
    return next_chunk(entries, cursor)


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
                      secret_env: Mapping[str, str], runtime_path: str | None = None) -> dict[str, Any]:
    """The container to create for ``request``: ``create_container`` keywords plus ``host_config`` keywords.

    ``runtime_path``: a copy of the runtime on the mounted artifact root (:func:`runtime.install`), which
    the container imports with its bytecode cached; without it the runtime's source is the argv, compiled
    on every start.

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
        "entrypoint": [*settings.get("entrypoint_prefix", []),
                       *(runtime.launch_from_file(config.python, runtime_path) if runtime_path
                         else runtime.launch_command(config.python))],
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
