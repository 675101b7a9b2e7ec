"""The docker backend's engine side: the one client, the one place SDK errors are mapped, and the calls.

Request building, state mapping and log parsing are pure functions in :mod:`._containers`; settings and the
Airflow connection are in :mod:`._config`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound

from airflow_remote_ml import runtime
from airflow_remote_ml.backends.docker import _jobs
from airflow_remote_ml.backends.docker._attach import AttachedOutput
from airflow_remote_ml.backends.docker._config import (
    DEFAULT_SOCKET,
    LABEL_MANIFEST,
    LABEL_OUTPUTS,
    MARK_CANCELLED,
    MARK_FINISHED,
    OPTION_NAMES,
    PROFILE_NAMES,
    DockerConfig,
    read_connection,
)
from airflow_remote_ml.backends.docker._containers import (
    _check_options,
    _volume_mounts,
    container_request,
    demux,
    is_count_cursor,
    lines_after_counts,
    marks,
    next_log_chunk,
    parse_log_entries,
    parse_mount,
    status_after_removal,
    status_from_inspect,
)
from airflow_remote_ml.backends.docker._validation import (
    check_config,
    check_image,
    check_option_values,
    engine_refusal,
    locate,
)
from airflow_remote_ml.core.artifacts import is_local, local_path, read_json
from airflow_remote_ml.core.backend import Backend, StepRequest
from airflow_remote_ml.core.errors import BackendAPIError, ConfigError, InvalidRequestError, TransientBackendError
from airflow_remote_ml.core.identity import LABEL_STEP_ID, StepIdentity
from airflow_remote_ml.core.jobs import JobInfo
from airflow_remote_ml.core.poll import PollPolicy
from airflow_remote_ml.core.status import LogChunk, RunHandle, RunState, RunStatus

log = logging.getLogger(__name__)

#: Seconds the log read after a container stopped waits for the engine to end its attach stream (it does
#: once the last output is copied, milliseconds after the exit); past it the log is read instead.
ATTACH_DRAIN_SECONDS = 10.0

#: Where on a mounted artifact root the runtime's copies live (one per version, see runtime.install).
RUNTIME_DIR = ".remote-ml/runtime"


class _Gone(BackendAPIError):
    """The container (or image) does not exist (HTTP 404)."""


class DockerBackend(Backend):
    name: ClassVar[str] = "docker"
    config_class = DockerConfig
    option_names = OPTION_NAMES
    # wait() returns when the container stops; the policy only bounds how often logs are fetched.
    poll_policy = PollPolicy(first_delay=0.5, factor=1.5, cap=5.0)
    has_job_page = False
    # The container's name is the identity's (deterministic): a second create for the same step answers
    # 409 Conflict and submit() adopts the container that holds the name, so an ambiguous submit can be
    # retried at once. The engine reserves the name at the start of a create, before it answers.
    idempotent_submit = True
    # A create is one synchronous call on the engine: once it has taken effect, the container is listed
    # by label at once. The bound covers a create still running on a loaded engine when its client
    # timed out (layer set-up of a large image takes seconds, not minutes).
    create_settle_seconds = 10.0
    config: DockerConfig

    def __init__(self, config: DockerConfig, api_client: Any = None) -> None:
        """``api_client``: a ready ``docker.APIClient`` (or a test double with its methods) to use instead
        of connecting lazily from the configuration."""
        super().__init__(config)
        check_config(config)  # every setting by type and range before anything computes with it
        for name, settings in config.profiles.items():
            _check_options(f"profiles.{name}", settings or {}, frozenset(PROFILE_NAMES))
            check_option_values(f"profiles.{name}", settings or {})
        for i, mount in enumerate(config.mounts):
            parse_mount(mount, f"backend_config[docker].mounts[{i}]")
        _volume_mounts(config.volumes)
        self._client: docker.APIClient | None = api_client
        self._owns_client = api_client is None
        self._registry_auth: dict[str, str] | None = None
        # What this object saw of containers that had stopped: the engine never changes a stopped
        # container's state again (we set no restart policy), so the last inspect answers mark_finished's
        # question, and a container this object removed needs no second DELETE from cleanup(). Each saves
        # an engine call after every step (DockerOperator makes none after its wait but the one DELETE).
        self._stopped: dict[str, RunStatus] = {}
        self._removed: set[str] = set()
        # The output of the containers this object started, followed over their attach streams (._attach).
        self._attached: dict[str, AttachedOutput] = {}

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
            # A create or start refused for a setting names what is wrong: final, never retried. (Other
            # calls send nothing the user wrote, so their 400 is not a configuration error.)
            if action.startswith(("creating container", "starting container")):
                refusal = engine_refusal(action, str(exc.explanation or exc), code)
                if refusal is not None:
                    raise refusal from exc
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
        check_image("image", spec.image)
        _check_options("backend_options.docker", spec.options_for(self.name), self.option_names)
        check_option_values("backend_options.docker", spec.options_for(self.name))
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

    def _install_runtime(self, request: StepRequest) -> str | None:
        """A copy of the runtime on the mounted artifact root, whose bytecode the container reuses: the
        compile of the injected source was ~8 ms of every step's start (docs/backends/docker.md). None
        (the source goes in the argv) when the root is not mounted or cannot take the copy."""
        if not (self.config.artifact_mount and is_local(request.artifact_root)):
            return None
        directory = os.path.join(local_path(request.artifact_root), RUNTIME_DIR)
        try:
            return runtime.install(directory)
        except OSError as exc:
            log.warning("docker: cannot put the runtime in %s (%s); the container compiles it every start",
                        directory, exc)
            return None

    def _secret_env(self, request: StepRequest) -> dict[str, str]:
        if not request.spec.secrets:
            return {}
        from airflow_remote_ml.hooks import resolve_secret

        return {env: resolve_secret(ref, source=self.config.secrets_from) for env, ref in request.spec.secrets.items()}

    # -- submit and find --------------------------------------------------------------------------------------

    def submit(self, request: StepRequest) -> RunHandle:
        profile = self.config.profile(request.spec.resources.profile, self.name)
        try:
            return self._submit(request, profile)
        except InvalidRequestError as exc:  # the engine refused a setting: name it where it was written
            raise locate(exc, request.spec.options_for(self.name), request.spec.resources.profile, profile,
                         self.config) from exc.__cause__

    def _submit(self, request: StepRequest, profile: Mapping[str, Any]) -> RunHandle:
        self._ensure_artifact_root(request)
        built = container_request(self.config, request, profile, self._secret_env(request),
                                  self._install_runtime(request))
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
        self._attach(container_id, name)
        try:
            with self._mapped(f"starting container {name}"):
                self.api.start(container_id)
        except BackendAPIError as exc:
            self._detach(container_id)
            if "executable file not found" in str(exc):
                raise ConfigError("python", f"{self.config.python!r} is not in image {image!r}",
                                  "use an image with python3, or set backend_config python='/path/to/python'") from None
            raise
        log.info("docker: started container %s (%s) for %s", name, container_id[:12], request.identity.key)
        return self._handle(container_id, name, create["labels"], request.identity)

    def _attach(self, container_id: str, name: str) -> None:
        """Follow the container's output from its first byte: attached before ``start``, as ``docker run``
        does. Best effort: without the stream, the output is read from the engine's log as before."""
        if not self.config.attach:
            return
        try:
            with self._mapped(f"attaching to container {name}"):
                sock = self.api.attach_socket(container_id, params={"stdout": 1, "stderr": 1, "stream": 1})
        except BackendAPIError as exc:
            log.info("docker: cannot attach to container %s (%s); reading its log instead", name, exc)
            return
        self._attached[container_id] = AttachedOutput(sock, container_id[:12])

    def _detach(self, container_id: str) -> None:
        session = self._attached.pop(container_id, None)
        if session is not None:
            session.close()

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
        # Several can exist only when one was renamed away (a mark whose name was taken): every caller adopts
        # the oldest, ties broken by id, so two workers never pick different ones.
        oldest = min(candidates, key=lambda c: (c.get("Created") or 0, c.get("Id") or ""))
        return self._handle(oldest["Id"], (oldest.get("Names") or ["/"])[0], oldest.get("Labels") or {}, identity)

    # -- status, waiting, logs --------------------------------------------------------------------------------

    def poll(self, handle: RunHandle) -> RunStatus:
        container_id = handle.data["container_id"]
        try:
            status = status_from_inspect(self._inspect(container_id))
        except _Gone:
            return self._status_after_removal(handle)
        if status.is_terminal:
            self._stopped[container_id] = status
        return status

    def _status_after_removal(self, handle: RunHandle) -> RunStatus:
        uri = handle.data.get("manifest_uri")
        try:
            manifest = read_json(uri) if uri else None
        except Exception:  # an unreadable manifest means the same as none
            manifest = None
        return status_after_removal(manifest, handle.data.get("identity"))

    def wait(self, handle: RunHandle, timeout: float) -> RunStatus:
        """Block until the container stops, at most ``timeout`` seconds: on its attach stream while that is
        open (returning early, running, when output waits to be relayed), then in the engine's wait API."""
        if timeout <= 0:
            return self.poll(handle)
        container_id = handle.data["container_id"]
        session = self._attached.get(container_id)
        if session is not None and session.live:
            # While the attach stream is open the container's stdio is open: it has not stopped. Wake up
            # for its end, or early when enough output waits to be relayed; no engine call meanwhile.
            started = time.monotonic()
            session.wait(timeout)
            if session.live:
                if session.backlog:
                    return RunStatus(RunState.RUNNING, "running")
                return self.poll(handle)
            timeout = max(timeout - (time.monotonic() - started), 0.1)
        try:
            status = self._engine_wait(handle, container_id, timeout)
        except TransientBackendError:
            if session is not None and session.eof:
                # The stream ended and the engine does not answer: an engine that went away (a restart)
                # ends every stream, so the end of this one proves nothing. Read the log from the counts.
                session.lost("the engine dropped its connections")
            raise
        if session is not None and session.eof and not status.is_terminal:
            # The engine ends the stream only when the container's stdio closes: one that still runs lost
            # its connection, not its output.
            session.lost("the attach stream ended while the container runs")
        return status

    def _engine_wait(self, handle: RunHandle, container_id: str, timeout: float) -> RunStatus:
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
        container_id = handle.data["container_id"]
        session = self._attached.get(container_id)
        if session is not None and session.matches(cursor):
            if container_id in self._stopped and not session.ended:
                # The container stopped: the engine ends the stream once the last of its output is sent.
                if session.drain(ATTACH_DRAIN_SECONDS):
                    session.confirm_end()
                else:
                    session.lost(f"the attach stream did not end within {ATTACH_DRAIN_SECONDS:g}s of the exit")
            if session.usable:
                lines, counts = session.take()
                return LogChunk(lines, counts)
            cursor = session.cursor()  # broken: on from the lines it handed out, read from the log
            del self._attached[container_id]
        if is_count_cursor(cursor):
            return self._log_after_counts(handle, cursor)
        since = int((cursor or {}).get("since", 0))
        params: dict[str, Any] = {"stdout": 1, "stderr": 1, "timestamps": 1}
        if since > 0:
            params["since"] = since
        content = self._get_log(handle, params)
        if content is None:
            return LogChunk([], cursor)
        return next_log_chunk(parse_log_entries(demux(content)), cursor)

    def _log_after_counts(self, handle: RunHandle, counts: Any) -> LogChunk:
        """The log after the lines an attach stream relayed (its counts cursor), with a timestamp cursor."""
        content = self._get_log(handle, {"stdout": 1, "stderr": 1, "timestamps": 1})
        if content is None:
            return LogChunk([], counts)
        return lines_after_counts(content, counts)

    def _get_log(self, handle: RunHandle, params: dict[str, Any]) -> bytes | None:
        """The multiplexed log (``GET /containers/{id}/logs``), None if the container is gone."""
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
            return None
        return bytes(response.content)

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
        container_id = handle.data["container_id"]
        seen = self._stopped.get(container_id)
        if seen is not None and self._removes(seen):
            self._remove(handle)  # no inspect needed: a stopped container's state stays what it was
            return
        try:
            attrs = self._inspect(container_id)
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
        if self._removes(status):
            self._remove(handle)
            return
        if not status.is_successful:
            log.info("docker: keeping container %s for debugging (removal_policy=%s)", handle.job_id,
                     self.config.removal_policy)
        # Kept containers (failed ones, removal_policy=never) go when the retention policy retires them. Only a
        # finish that keeps one adds to the pile, so only such a finish pays the engine's list call: a step
        # whose container is removed makes no more engine calls than DockerOperator's (docs/operations.md).
        _jobs.retire_containers(self, keep=handle.job_id)

    # -- jobs (see ._jobs) ----------------------------------------------------------------------------------

    def list_jobs(self, dag_id: str | None = None) -> list[JobInfo]:
        return _jobs.list_jobs(self, dag_id)

    def remove_job(self, job: JobInfo) -> None:
        _jobs.remove(self, job)

    def _remove(self, handle: RunHandle) -> None:
        container_id = handle.data["container_id"]
        self._detach(container_id)
        if container_id in self._removed:
            return
        try:
            with self._mapped(f"removing container {handle.job_id}"):
                self.api.remove_container(container_id, v=True, force=True)
        except _Gone:
            pass
        except BackendAPIError as exc:
            if exc.status_code != 409:  # 409: a removal is already in progress
                raise
        self._removed.add(container_id)

    def close(self) -> None:
        for container_id in list(self._attached):
            self._detach(container_id)
        if self._client is not None and self._owns_client:
            self._client.close()
            self._client = None


class _WaitTimeout(Exception):
    """The wait API did not answer within the timeout: the container is still running."""
