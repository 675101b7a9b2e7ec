"""The kubernetes backend: :class:`KubernetesBackend` and :class:`KubernetesConfig` (see the package docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import kubernetes  # noqa: F401 - a missing SDK must surface as BackendUnavailableError when the module loads

from airflow_remote_ml.backends.kubernetes import _jobs
from airflow_remote_ml.backends.kubernetes import _logs as logcursor
from airflow_remote_ml.backends.kubernetes import _validation as validation
from airflow_remote_ml.backends.kubernetes._client import (
    AlreadyExists,
    ConnectionSettings,
    Invalid,
    NotFound,
    acall_with_retries,
    call_with_retries,
    check_response,
    default_namespace,
    read_connection_extras,
    resolve_settings,
    sync_configuration,
)
from airflow_remote_ml.backends.kubernetes._config import DELETE_POLICIES, KubernetesConfig
from airflow_remote_ml.backends.kubernetes._follow import FINAL_PHASES, LogFollower, PodFollower
from airflow_remote_ml.backends.kubernetes._pod import (
    ANNOTATION_IDENTITY,
    ANNOTATION_MANIFEST,
    ANNOTATION_OUTPUTS,
    OPTION_NAMES,
    PROFILE_NAMES,
    build_pod,
    check_artifact_volume,
    check_settings,
)
from airflow_remote_ml.backends.kubernetes._states import (
    ANNOTATION_CANCELLED,
    LABEL_FINISHED,
    container_status,
    never_ran,
    parse_time,
    status_after_deletion,
    status_from_pod,
    termination_manifest,
)
from airflow_remote_ml.backends.kubernetes._watch import (
    ClusterSession,
    SessionOptions,
    SessionStats,
    acquire_session,
    resource_version,
)
from airflow_remote_ml.core.artifacts import read_json
from airflow_remote_ml.core.backend import Backend, StepRequest, result_from_manifest
from airflow_remote_ml.core.errors import BackendAPIError, ConfigError, TransientBackendError
from airflow_remote_ml.core.identity import LABEL_STEP_ID, StepIdentity
from airflow_remote_ml.core.jobs import JobInfo, retention_of, retire_on_finish
from airflow_remote_ml.core.poll import PollPolicy
from airflow_remote_ml.core.status import LogChunk, RunHandle, RunState, RunStatus, StepResult

__all__ = ["KubernetesBackend", "KubernetesConfig"]

log = logging.getLogger(__name__)

JSON = dict[str, Any]
LOG_PATH = "/api/v1/namespaces/{namespace}/pods/{name}/log"
#: What kubectl sends for a log. kube-apiserver negotiates pods/log against its serializers (json, yaml,
#: protobuf) before it streams the text, so ``text/plain`` alone is a 406 there; ``*/*`` gets text/plain.
LOG_ACCEPT = "application/json, */*"
TAIL_LINES = 40
#: How long a waiting step waits for the shared watch's first list before asking for its pod itself.
SYNC_WAIT_SECONDS = 10.0


class KubernetesBackend(Backend):
    name: ClassVar[str] = "kubernetes"
    config_class = KubernetesConfig
    option_names = OPTION_NAMES
    # wait() and await_change() return the moment the pod ends; the policy only paces log reads.
    poll_policy = PollPolicy(first_delay=1.0, factor=1.5, cap=10.0)
    has_job_page = False
    # A pod's name is the step identity's (deterministic): a second create of the same identity is a 409
    # AlreadyExists, which submit() answers by attaching to the pod that exists. So a retried submit cannot
    # make a second pod.
    idempotent_submit: ClassVar[bool] = True
    # kube-apiserver's default --request-timeout is 60 s: a create it has not committed by then is abandoned,
    # one it committed is visible to list (find) at once.
    create_settle_seconds: ClassVar[float] = 60.0
    config: KubernetesConfig

    def __init__(self, config: KubernetesConfig, core_v1: Any = None) -> None:
        """``core_v1``: a ready ``kubernetes.client.CoreV1Api`` to use instead of connecting from the config."""
        # Every setting by type and range first: the checks below compute with them.
        validation.check_config(config)
        super().__init__(config)
        prefix = "backend_config[kubernetes]"
        if config.delete_policy not in DELETE_POLICIES:
            raise ConfigError(f"{prefix}.delete_policy", f"{config.delete_policy!r} is not known",
                              f"use one of {', '.join(DELETE_POLICIES)}")
        for name, settings in config.profiles.items():
            check_settings(f"profiles.{name}", settings or {}, PROFILE_NAMES)
        check_settings(prefix, {k: v for k, v in (("labels", config.labels), ("annotations", config.annotations),
                                                   ("node_selector", config.node_selector),
                                                   ("tolerations", config.tolerations)) if v},
                       frozenset({"labels", "annotations", "node_selector", "tolerations"}))
        check_artifact_volume(config.artifact_volume)
        if config.default_profile is not None:
            config.profile(config.default_profile, self.name)
        if config.startup_timeout <= 0 or config.delete_grace_seconds < 0 or config.api_retries < 0:
            raise ConfigError(prefix, "startup_timeout must be positive, delete_grace_seconds and api_retries "
                              "not negative", "fix the value")
        self._core = core_v1
        self._owns_core = core_v1 is None
        self._settings: ConnectionSettings | None = None
        self._namespace: str | None = None
        # The last state seen of each pod, its resourceVersion (to resume a watch), and the pods cancelled here.
        self._pods: dict[tuple[str, str], JSON] = {}
        self._rv: dict[tuple[str, str], str] = {}
        self._cancelled: set[tuple[str, str]] = set()
        self._deleted: set[tuple[str, str]] = set()
        self._pending_said: dict[tuple[str, str], str] = {}
        # The worker side's one watch and one log stream per pod (see :mod:`._follow`).
        self._followers: dict[tuple[str, str], PodFollower] = {}
        self._logs: dict[tuple[str, str], LogFollower] = {}
        self._held: dict[tuple[int, str], ClusterSession] = {}
        self.session_stats = SessionStats()

    # -- connection -------------------------------------------------------------------------------------------

    def settings(self) -> ConnectionSettings:
        """Where the cluster is (reads the Airflow connection once, when ``conn_id`` is set)."""
        if self._settings is None:
            extras = read_connection_extras(self.config.conn_id) if self.config.conn_id else None
            self._settings = resolve_settings(self.config.connection_fields(), extras)
        return self._settings

    def namespace(self) -> str:
        if self._namespace is None:
            self._namespace = default_namespace(self.settings())
        return self._namespace

    @property
    def core(self) -> Any:
        """The sync ``CoreV1Api``, created on first use."""
        if self._core is None:
            from kubernetes import client

            self._core = client.CoreV1Api(client.ApiClient(sync_configuration(self.settings())))
        return self._core

    def _json(self, action: str, fn: Callable[..., Any], *args: Any, attempts: int | None = None,
              **kwargs: Any) -> JSON:
        """Call a client method without model deserialisation; the API's JSON is what we map.

        ``attempts``: transient errors retried here (default ``api_retries``).
        """
        def call() -> JSON:
            resp = fn(*args, _preload_content=False, _request_timeout=self.config.request_timeout, **kwargs)
            return json.loads(resp.data)

        return call_with_retries(action, call, self.config.api_retries if attempts is None else attempts)

    # -- handles, statuses ------------------------------------------------------------------------------------

    def _handle(self, pod: Mapping[str, Any]) -> RunHandle:
        meta = pod.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        outputs = annotations.get(ANNOTATION_OUTPUTS) or ""
        identity = None
        if annotations.get(ANNOTATION_IDENTITY):
            try:
                identity = json.loads(annotations[ANNOTATION_IDENTITY])
            except ValueError:
                identity = None
        url = None
        if self.config.job_url_template:
            url = self.config.job_url_template.format(namespace=meta.get("namespace"), name=meta.get("name"),
                                                      uid=meta.get("uid"))
        # "namespace/name", as kubectl names a pod: every message that quotes the job says where it ran.
        return RunHandle(backend=self.name, job_id=f"{meta.get('namespace')}/{meta.get('name')}", url=url, data={
            "namespace": meta.get("namespace"),
            "pod": meta.get("name"),
            "uid": meta.get("uid"),
            "container": self.config.container_name,
            "manifest_uri": annotations.get(ANNOTATION_MANIFEST),
            "declared_outputs": sorted(o for o in outputs.split(",") if o),
            "identity": identity,
        })

    @staticmethod
    def _key(handle: RunHandle) -> tuple[str, str]:
        return handle.data["namespace"], handle.data["pod"]

    def _remember(self, pod: JSON) -> None:
        meta = pod.get("metadata") or {}
        key = (meta.get("namespace"), meta.get("name"))
        self._pods[key] = pod  # type: ignore[index]

    def _status(self, handle: RunHandle, pod: Mapping[str, Any]) -> RunStatus:
        status = status_from_pod(pod, container=handle.data.get("container") or self.config.container_name,
                                 now=time.time(), startup_timeout=self.config.startup_timeout,
                                 cancelled=self._key(handle) in self._cancelled)
        self._say_why_pending(handle, status)
        return status

    def _say_why_pending(self, handle: RunHandle, status: RunStatus) -> None:
        """Log what a Pending pod waits for (the scheduler's or the kubelet's words) each time it changes.

        A pod can wait for many minutes (a node pool scaling up, an image pulling); the task log says why
        instead of staying silent between "Submitted" and the final error.
        """
        key = self._key(handle)
        if status.state is not RunState.QUEUED:
            self._pending_said.pop(key, None)
            return
        if status.message and self._pending_said.get(key) != status.message:
            self._pending_said[key] = status.message
            log.info("kubernetes: pod %s/%s is pending: %s", key[0], key[1], status.message)

    def _status_gone(self, handle: RunHandle, last: Mapping[str, Any] | None,
                     manifest: Mapping[str, Any] | None = None) -> RunStatus:
        def decide(found: Mapping[str, Any] | None) -> RunStatus:
            return status_after_deletion(last, manifest=found, now=time.time(),
                                         container=handle.data.get("container") or self.config.container_name,
                                         cancelled=self._key(handle) in self._cancelled,
                                         identity=handle.data.get("identity"))

        status = decide(manifest)
        if status.state is RunState.LOST and manifest is None and handle.data.get("manifest_uri"):
            manifest = self._read_manifest(handle)
            if manifest is not None:
                status = decide(manifest)
        return status

    @staticmethod
    def _read_manifest(handle: RunHandle) -> JSON | None:
        try:
            return read_json(handle.data["manifest_uri"])
        except Exception:  # unreadable means the same as absent here: the pod's fate is unknown
            return None

    def _same_pod(self, handle: RunHandle, pod: Mapping[str, Any]) -> bool:
        uid = handle.data.get("uid")
        return not uid or (pod.get("metadata") or {}).get("uid") == uid

    # -- validation -------------------------------------------------------------------------------------------

    def _profile(self, request: StepRequest) -> dict[str, Any]:
        return self.config.profile(request.spec.resources.profile or self.config.default_profile, self.name)

    def validate(self, request: StepRequest) -> None:
        # What kube-apiserver would refuse, from every source, as one ConfigError (see .validation).
        validation.check_sources(self.config, request)
        super().validate(request)
        if not request.spec.image:
            raise ConfigError("image", "is not set: the kubernetes backend needs an image",
                              "set image='python:3.11-slim' (or any image with python3)")
        check_settings("backend_options.kubernetes", request.spec.options_for(self.name), self.option_names)
        # Building the pod once surfaces every remaining value error now rather than at submit.
        validation.check_request(self.config, request, self._profile(request))

    # -- submit and find --------------------------------------------------------------------------------------

    def submit(self, request: StepRequest) -> RunHandle:
        namespace = self.namespace()
        body = build_pod(self.config, request, self._profile(request), namespace)
        name = body["metadata"]["name"]
        try:
            pod = self._json(f"creating pod {name}", self.core.create_namespaced_pod, namespace, body)
        except AlreadyExists:
            # Ours from a try that died after creating it (or a retried create that had reached the server).
            pod = self._json(f"reading pod {name}", self.core.read_namespaced_pod, name, namespace)
            labels = (pod.get("metadata") or {}).get("labels") or {}
            if labels.get(LABEL_STEP_ID) != request.identity.digest or labels.get(LABEL_FINISHED) == "true":
                raise BackendAPIError(self.name, f"a pod named {name!r} exists in {namespace!r} that is not this "
                                      "step's running pod; delete it or let it finish", 409) from None
            log.info("kubernetes: pod %s/%s for %s already exists; attaching to it", namespace, name,
                     request.identity.key)
        except Invalid as exc:
            raise ConfigError("pod", f"the API server refused the pod: {exc}", "fix the setting it names "
                              "(profile, backend_options, pod_template/pod_override)") from None
        self._remember(pod)
        # Watch from the created object's own resourceVersion: no list needed to follow it.
        self._rv[(namespace, name)] = resource_version(pod) or ""
        log.info("kubernetes: created pod %s/%s for %s", namespace, name, request.identity.key)
        return self._handle(pod)

    def find(self, identity: StepIdentity) -> RunHandle | None:
        namespace = self.namespace()
        body = self._json("listing pods", self.core.list_namespaced_pod, namespace,
                          label_selector=f"{LABEL_STEP_ID}={identity.digest},{LABEL_FINISHED}!=true")
        pods = [p for p in body.get("items") or [] if not (p.get("metadata") or {}).get("deletionTimestamp")]
        if not pods:
            return None
        # The deterministic name allows one such pod at a time; should several carry the label anyway (made
        # by hand or by another version), every caller adopts the same one: the oldest, ties broken by name.
        oldest = min(pods, key=lambda p: (parse_time((p.get("metadata") or {}).get("creationTimestamp")) or 0,
                                          (p.get("metadata") or {}).get("name") or ""))
        self._remember(oldest)
        meta = oldest.get("metadata") or {}
        self._rv[(str(meta.get("namespace")), str(meta.get("name")))] = \
            (body.get("metadata") or {}).get("resourceVersion") or ""
        return self._handle(oldest)

    # -- status and waiting -----------------------------------------------------------------------------------

    def _read_pod(self, handle: RunHandle) -> JSON | None:
        namespace, name = self._key(handle)
        try:
            pod = self._json(f"reading pod {name}", self.core.read_namespaced_pod, name, namespace)
        except NotFound:
            return None
        if not self._same_pod(handle, pod):
            return None
        self._remember(pod)
        return pod

    def _relist_one(self, handle: RunHandle) -> tuple[JSON | None, str]:
        """The pod and a resourceVersion to watch it from, in one request.

        One attempt: it is part of following the pod, whose transient errors go to the core's wait loop
        (its backoff and its budget), not into a retry loop of its own that would hide an outage.
        """
        namespace, name = self._key(handle)
        body = self._json(f"listing pod {name}", self.core.list_namespaced_pod, namespace,
                          field_selector=f"metadata.name={name}", attempts=0)
        items = [p for p in body.get("items") or [] if self._same_pod(handle, p)]
        return (items[0] if items else None), (body.get("metadata") or {}).get("resourceVersion") or ""

    def _follower(self, handle: RunHandle) -> PodFollower | None:
        """The live watch of the pod, started on first use; None when the pod is gone.

        It watches from the resourceVersion the create (or find's list) answered with, so following a pod
        just submitted costs the watch alone; only a pod this object never saw is listed first. A follower
        that ended on a transient error is replaced by one resuming from its last resourceVersion (the
        caller then sees whether that one gets through: :meth:`_watching`).
        """
        key = self._key(handle)
        current = self._followers.get(key)
        if current is not None and not current.ended:
            return current
        if current is not None and current.gone:
            return current
        if current is not None and current.error is not None and not isinstance(current.error,
                                                                                TransientBackendError):
            raise current.error
        pod, rv = self._pods.get(key), (current.rv if current is not None else self._rv.get(key))
        if current is not None and current.pod is not None:
            pod = current.pod
        if pod is None or not rv:
            pod, rv = self._relist_one(handle)
            if pod is None:
                return None
            self._remember(pod)
        follower = PodFollower(self.core, key[0], key[1], handle.data.get("uid"), pod, rv,
                               lambda: self._relist_one(handle), self.config.watch_timeout)
        self._followers[key] = follower
        if (pod.get("status") or {}).get("phase") in FINAL_PHASES:
            follower.ended = True  # already over: nothing to watch
            return follower
        return follower.start()

    def _watching(self, handle: RunHandle) -> PodFollower | None:
        """The pod's follower once its watch request has been answered; raises when it cannot be.

        A follower's state is only as current as its watch. Serving the last state while the watch cannot be
        opened would hide an apiserver outage from the core's wait loop: every ``poll``/``wait`` would
        "succeed", reset the transient-error budget, and the task would wait on a stale pod for as long as the
        outage lasts. So a watch that broke is resumed once per call, and this call reports whether that got
        through: it raises :class:`TransientBackendError` when the new request fails or goes unanswered for
        ``request_timeout`` seconds; the core backs off, calls again, and gives up once the streak outlasts
        its budget. A first watch (no error before it) is not waited for: the state it starts from is the
        create's or the list's answer, as current as any.
        """
        previous = self._followers.get(self._key(handle))
        resumed = previous is not None and previous.ended and previous.error is not None
        follower = self._follower(handle)
        if follower is None or (follower.ended and follower.error is None):
            return follower
        if resumed or follower.ended:
            if not follower.wait_answered(self.config.request_timeout):
                raise self._unanswered(follower)
        else:
            unanswered = follower.unanswered(time.monotonic())
            if unanswered is not None and unanswered >= self.config.request_timeout:
                raise self._unanswered(follower)
        if follower.ended and follower.error is not None:
            raise follower.error
        return follower

    def _unanswered(self, follower: PodFollower) -> TransientBackendError:
        return TransientBackendError(self.name, f"watching pod {follower.namespace}/{follower.name}: the API "
                                     f"server has not answered in {self.config.request_timeout:g}s "
                                     "(request_timeout)")

    def _followed_status(self, handle: RunHandle, follower: PodFollower) -> RunStatus:
        key = self._key(handle)
        with follower.cond:
            pod, gone = follower.pod, follower.gone
        self._pods[key] = pod
        if gone:
            return self._status_gone(handle, pod)
        return self._status(handle, pod)

    def poll(self, handle: RunHandle) -> RunStatus:
        """The pod's status as its open watch last told (a list first when this object has not seen the pod).

        Raises :class:`TransientBackendError` when the watch cannot be (re)opened (see :meth:`_watching`).
        """
        follower = self._watching(handle)
        if follower is None:
            return self._status_gone(handle, self._pods.get(self._key(handle)))
        return self._followed_status(handle, follower)

    def wait(self, handle: RunHandle, timeout: float) -> RunStatus:
        """Until the pod ends or ``timeout`` seconds pass, on the pod's one watch (no request of its own).

        Raises :class:`TransientBackendError` as soon as the watch breaks and cannot be resumed, or its
        request goes unanswered for ``request_timeout`` seconds: the core's wait loop, not this method, decides
        how long an outage is borne (see :meth:`_watching`).
        """
        deadline = time.monotonic() + timeout
        follower = self._watching(handle)
        if follower is None:
            return self._status_gone(handle, self._pods.get(self._key(handle)))
        while True:
            version = follower.version
            status = self._followed_status(handle, follower)
            if status.is_terminal:
                return status
            if follower.ended:
                if follower.error is not None:
                    # Broke during this call: the core backs off and calls again, which resumes the watch.
                    raise follower.error
                return status  # stopped by close(): the next call starts a new watch
            now = time.monotonic()
            unanswered = follower.unanswered(now)
            if unanswered is not None and unanswered >= self.config.request_timeout:
                raise self._unanswered(follower)
            remaining = deadline - now
            if remaining <= 0:
                return status
            if unanswered is not None:
                remaining = min(remaining, self.config.request_timeout - unanswered)
            follower.wait_change(version, remaining)

    # -- logs -------------------------------------------------------------------------------------------------

    @staticmethod
    def _log_query(handle: RunHandle, cursor: Any, tail: int | None = None,
                   follow: bool = False) -> list[tuple[str, str]]:
        query = [("container", handle.data.get("container") or "step"), ("timestamps", "true")]
        since = logcursor.since_of(cursor)
        if since:
            # PodLogOptions.sinceTime: in the API, not exposed by the generated client's method.
            query.append(("sinceTime", since))
        if tail is not None:
            query.append(("tailLines", str(tail)))
        if follow:
            query.append(("follow", "true"))
        return query

    def _raw_log(self, handle: RunHandle, query: list[tuple[str, str]], attempts: int | None = None) -> bytes | None:
        """One log read; ``attempts``: transient errors retried here (default ``api_retries``)."""
        namespace, name = self._key(handle)

        def call() -> bytes:
            resp = self.core.api_client.call_api(
                LOG_PATH, "GET", path_params={"namespace": namespace, "name": name}, query_params=query,
                header_params={"Accept": LOG_ACCEPT}, auth_settings=["BearerToken"], _preload_content=False,
                _return_http_data_only=True, _request_timeout=self.config.request_timeout)
            return bytes(resp.data)

        try:
            return call_with_retries(f"reading the log of pod {name}", call,
                                     self.config.api_retries if attempts is None else attempts)
        except NotFound:
            return None
        except BackendAPIError as exc:
            if exc.status_code == 400:  # the container has not started yet ("is waiting to start")
                return None
            raise

    def _log_stream(self, handle: RunHandle, cursor: Any) -> LogFollower:
        namespace, name = self._key(handle)
        query = self._log_query(handle, cursor, follow=True)

        def open_stream() -> Any:
            # No read timeout: a step may print nothing for an hour. stop() shuts the socket down.
            return self.core.api_client.call_api(
                LOG_PATH, "GET", path_params={"namespace": namespace, "name": name}, query_params=query,
                header_params={"Accept": LOG_ACCEPT}, auth_settings=["BearerToken"], _preload_content=False,
                _return_http_data_only=True, _request_timeout=(self.config.request_timeout, None))

        return LogFollower(open_stream, name, logcursor.since_of(cursor)).start()

    def _log_complete(self, handle: RunHandle) -> bool:
        pod = self._pods.get(self._key(handle))
        if pod is None:
            return True
        term = (container_status(pod, handle.data.get("container") or "step").get("state") or {}).get("terminated")
        return bool(term) or self._status(handle, pod).is_terminal

    def _container_state(self, handle: RunHandle) -> JSON:
        pod = self._pods.get(self._key(handle)) or {}
        return container_status(pod, handle.data.get("container") or "step").get("state") or {}

    def read_logs(self, handle: RunHandle, cursor: Any = None) -> LogChunk:
        """New log lines after ``cursor``.

        While the pod's watch is followed, the log is one ``follow=true`` stream opened once the container
        has started (before that there is no log to ask for); otherwise, or when that stream broke, one
        read per call from the cursor's ``sinceTime``.
        """
        key = self._key(handle)
        follower = self._followers.get(key)
        stream = self._logs.get(key)
        if follower is not None and (stream is None or not stream.broken):
            state = self._container_state(handle)
            if stream is None and not state.get("running") and not state.get("terminated"):
                return LogChunk([], cursor)  # not started: the watch will say when it has
            since = logcursor.since_of(cursor)
            if stream is None:
                if state.get("terminated"):
                    stream = None  # over already: one plain read returns it all
                else:
                    stream = self._logs[key] = self._log_stream(handle, cursor)
            if stream is not None and (stream.since or "") <= (since or ""):
                terminated = bool(state.get("terminated")) or follower.gone or \
                    self._status(handle, follower.pod).is_terminal
                if stream.ended and not terminated:
                    stream.premature = True  # ended before the container did, or only just before we heard
                if terminated and not stream.join(self.config.request_timeout):
                    stream.stop()  # the kubelet should have ended it; read the rest the classic way
                if not stream.broken and not (terminated and stream.premature):
                    entries = logcursor.parse_entries(stream.snapshot(), complete=stream.ended)
                    return logcursor.next_chunk(logcursor.entries_since(entries, since), cursor)
        complete = self._log_complete(handle)
        # While the step runs, one attempt: a failed read is retried by the next one from the same cursor,
        # and a retry loop here would hold the core's wait loop (which only logs a log error) for as long as an
        # outage lasts. The read of a finished step's log has no next one: it retries.
        raw = self._raw_log(handle, self._log_query(handle, cursor), attempts=None if complete else 0)
        if raw is None:
            return LogChunk([], cursor)
        return logcursor.next_chunk(logcursor.parse_entries(raw, complete=complete), cursor)

    def log_tail(self, handle: RunHandle, lines: int = TAIL_LINES) -> list[str]:
        stream = self._logs.get(self._key(handle))
        if stream is not None and stream.ended and not stream.since and not stream.premature:
            return [text for _, text in logcursor.parse_entries(stream.snapshot(), complete=True)][-lines:]
        try:
            raw = self._raw_log(handle, self._log_query(handle, None, tail=lines))
        except Exception:  # the tail is a courtesy in an error message; never mask the real error
            return []
        return [text for _, text in logcursor.parse_entries(raw or b"", complete=True)][-lines:]

    # -- cancel, marks, cleanup -------------------------------------------------------------------------------

    def cancel(self, handle: RunHandle) -> None:
        """Mark the pod cancelled (durably, an annotation) and delete it with the grace period.

        A pod that never started is deleted even when its status already reads as failed (ErrImageNeverPull,
        CreateContainerConfigError...): it is still Pending on the cluster and would run, unowned, once its
        cause is fixed.
        """
        key = self._key(handle)
        pod = self._read_pod(handle)
        if pod is None:
            return
        if not never_ran(pod) and status_from_pod(pod, container=handle.data.get("container") or "step",
                                                  now=time.time(), startup_timeout=float("inf")).is_terminal:
            return  # already over: its own outcome stands
        self._cancelled.add(key)
        namespace, name = key
        patch = {"metadata": {"annotations": {ANNOTATION_CANCELLED: f"{time.time():.3f}"}}}
        try:
            self._json(f"marking pod {name} cancelled", self.core.patch_namespaced_pod, name, namespace, patch)
            self._delete(namespace, name, self.config.delete_grace_seconds)
        except NotFound:
            return
        finally:
            follower = self._followers.get(key)
            if follower is None or follower.ended:
                # No watch saw the delete: what this object read before it (a running container) is stale, and
                # a watch resumed from an older resourceVersion would only replay the delete after answering.
                # The next look lists the pod instead (it is Terminating, or gone: cancelled).
                self._followers.pop(key, None)
                self._rv.pop(key, None)
        log.info("kubernetes: cancelled pod %s/%s (grace %ss)", namespace, name, self.config.delete_grace_seconds)

    def _delete(self, namespace: str, name: str, grace: int | None) -> None:
        body = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if grace is not None:
            body["gracePeriodSeconds"] = grace  # type: ignore[assignment]
        try:
            self._json(f"deleting pod {name}", self.core.delete_namespaced_pod, name, namespace, body=body)
        except NotFound:
            pass
        self._deleted.add((namespace, name))

    def _removes(self, status: RunStatus, pod: Mapping[str, Any] | None) -> bool:
        """Whether the pod goes: by the policy, and always when it never ran (nothing in it to debug)."""
        if pod is not None and never_ran(pod):
            return True
        policy = self.config.delete_policy
        return policy == "always" or (policy == "on_success" and status.is_successful)

    def _final_pod(self, handle: RunHandle) -> JSON | None:
        """The pod's last state: the watch's when it already reads Succeeded/Failed (it cannot change), else a GET."""
        pod = self._pods.get(self._key(handle))
        if pod is not None and (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return pod
        return self._read_pod(handle)

    def mark_finished(self, handle: RunHandle) -> None:
        """Label the pod finished (so no later try reattaches); one the policy deletes is deleted instead."""
        key = self._key(handle)
        if key in self._deleted:
            return
        pod = self._final_pod(handle)
        if pod is None:
            return
        namespace, name = key
        status = self._status(handle, pod)
        if status.is_terminal and self._removes(status, pod):
            self._delete(namespace, name, None)
            return
        try:
            self._json(f"marking pod {name} finished", self.core.patch_namespaced_pod, name, namespace,
                       {"metadata": {"labels": {LABEL_FINISHED: "true"}}})
        except NotFound:
            return

    def cleanup(self, handle: RunHandle, status: RunStatus) -> None:
        """Delete the pod as the policy says; a pod that never started is deleted whatever it says.

        A pod that mark_finished already deleted is not deleted again (one DELETE per step).
        """
        key = self._key(handle)
        if key in self._deleted:
            return
        namespace, name = key
        if self._removes(status, self._pods.get(key)):
            self._delete(namespace, name, None)
            return
        if not status.is_successful:
            log.info("kubernetes: keeping pod %s/%s for debugging (delete_policy=%s)", namespace, name,
                     self.config.delete_policy)
        # Only a finish that keeps a pod adds to the pile, so only such a finish lists pods to retire old ones.
        self._retire(handle)

    def _retire(self, handle: RunHandle) -> None:
        """Kept pods (failed ones, delete_policy=never) go when the retention policy retires them."""
        retire_on_finish(self, retention_of(self.config, self.name), keep=handle.job_id,
                         where=json.dumps(self.config_json(), sort_keys=True, default=str))

    # -- jobs (see ._jobs) ------------------------------------------------------------------------------------

    def list_jobs(self, dag_id: str | None = None) -> list[JobInfo]:
        return _jobs.list_jobs(self, dag_id)

    def remove_job(self, job: JobInfo) -> None:
        _jobs.remove(self, job)

    # -- results ----------------------------------------------------------------------------------------------

    def fetch_result(self, handle: RunHandle) -> StepResult:
        """The manifest from the container's termination message when it is whole, else from the artifact store."""
        pod = self._pods.get(self._key(handle))
        if pod is None or not (container_status(pod, handle.data.get("container") or "step").get("state") or {}) \
                .get("terminated"):
            pod = self._read_pod(handle) or pod
        if pod is not None:
            term = (container_status(pod, handle.data.get("container") or "step").get("state") or {}) \
                .get("terminated") or {}
            manifest = termination_manifest(term.get("message"))
            if (manifest and not manifest.get("truncated") and manifest.get("status") == "succeeded"
                    and (handle.data.get("identity") is None or manifest.get("identity") == handle.data["identity"])):
                return result_from_manifest(manifest, handle, handle.data.get("declared_outputs"))
        return super().fetch_result(handle)

    def close(self) -> None:
        for follower in list(self._followers.values()):
            follower.stop()
        for stream in list(self._logs.values()):
            stream.stop()
        self._followers.clear()
        self._logs.clear()
        if self._core is not None and self._owns_core:
            self._core.api_client.close()
            self._core = None

    # -- async: the shared watch ------------------------------------------------------------------------------

    async def _session(self, handle: RunHandle) -> ClusterSession:
        loop = asyncio.get_running_loop()
        namespace = handle.data["namespace"]
        held = self._held.get((id(loop), namespace))
        if held is not None and not held.closed:
            return held
        settings = self._settings if self._settings is not None else await asyncio.to_thread(self.settings)
        options = SessionOptions(watch_timeout=self.config.watch_timeout, log_interval=self.config.log_interval,
                                 max_log_requests_per_second=self.config.max_log_requests_per_second,
                                 linger=self.config.session_linger, api_retries=self.config.api_retries,
                                 stats=self.session_stats)
        session = await acquire_session(settings, namespace, options)
        self._held[(id(loop), namespace)] = session
        return session

    async def _aread_pod(self, session: ClusterSession, handle: RunHandle) -> JSON | None:
        namespace, name = self._key(handle)
        session.stats.gets += 1

        async def call() -> JSON:
            resp = await session.core.read_namespaced_pod(name, namespace, _preload_content=False,
                                                          _request_timeout=self.config.request_timeout)
            await check_response(resp, f"reading pod {name}")
            try:
                return json.loads(await resp.read())
            finally:
                resp.release()

        try:
            pod = await acall_with_retries(f"reading pod {name}", call, self.config.api_retries)
        except NotFound:
            return None
        return pod if self._same_pod(handle, pod) else None

    async def _astatus(self, session: ClusterSession, handle: RunHandle, ask: bool = True) -> RunStatus | None:
        """The status from the shared cache; with ``ask``, one GET when the cache cannot tell yet."""
        key = self._key(handle)
        if not session.synced.is_set():
            # The first list is on its way; it answers for every waiting step at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.synced.wait(), SYNC_WAIT_SECONDS)
        found = session.lookup(key[1])
        if found is not None:
            kind, pod = found
            if kind == "live" and pod is not None and self._same_pod(handle, pod):
                self._pods[key] = pod
                return self._status(handle, pod)
            if kind == "gone" and (pod is None or self._same_pod(handle, pod)):
                status = self._status_gone(handle, pod, manifest={}) if pod is not None else None
                if status is not None and status.state is not RunState.LOST:
                    return status
                return await asyncio.to_thread(self._status_gone, handle, pod)
        if not ask:
            return None
        pod = await self._aread_pod(session, handle)
        if pod is None:
            return await asyncio.to_thread(self._status_gone, handle, self._pods.get(key))
        self._pods[key] = pod
        return self._status(handle, pod)

    def _trusted(self, session: ClusterSession, status: RunStatus) -> RunStatus:
        """``status`` unless it is a running pod's state from a cache the shared watch is not keeping current.

        The twin of :meth:`_watching`: serving the cache through an outage would reset the core's budget at
        every call and wait on a stale pod for as long as the outage lasts. A terminal state cannot go stale.
        """
        if not status.is_terminal and session.synced.is_set():
            trouble = session.trouble(self.config.request_timeout)
            if trouble is not None:
                raise trouble
        return status

    async def apoll(self, handle: RunHandle) -> RunStatus:
        """The pod's status from the shared watch's cache; raises TransientBackendError while it is broken."""
        session = await self._session(handle)
        status = await self._astatus(session, handle)
        assert status is not None
        return self._trusted(session, status)

    async def await_change(self, handle: RunHandle, timeout: float) -> RunStatus:
        """Wait on the shared watch: returns as soon as the pod's status is terminal, or after ``timeout``.

        Raises TransientBackendError as soon as the shared watch breaks, or its request goes unanswered for
        ``request_timeout`` seconds (see :meth:`_trusted`).
        """
        session = await self._session(handle)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        name = self._key(handle)[1]
        status = await self._astatus(session, handle)
        assert status is not None
        while not self._trusted(session, status).is_terminal:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            if session.asking_since is not None:
                remaining = max(0.01, min(remaining, session.asking_since + self.config.request_timeout
                                          - time.monotonic()))
            await session.wait_change(name, remaining)
            # The cache knows the pod, or says it is gone; only a pod it never saw needs a GET.
            status = await self._astatus(session, handle, ask=loop.time() >= deadline) or status
        return status

    async def aread_logs(self, handle: RunHandle, cursor: Any = None) -> LogChunk:
        session = await self._session(handle)
        key = self._key(handle)
        status = await self._astatus(session, handle, ask=False)
        # Only a pod the cache knows to be over gets the unbudgeted final read.
        final = status is not None and status.is_terminal
        # A pending pod has no log yet: asking would only spend a request on a 400.
        if (status is not None and status.state is RunState.QUEUED) or not session.may_read_logs(key[1], final):
            return LogChunk([], cursor)
        namespace, name = key
        query = self._log_query(handle, cursor)

        async def call() -> bytes:
            resp = await session.api.call_api(
                LOG_PATH, "GET", path_params={"namespace": namespace, "name": name}, query_params=query,
                header_params={"Accept": LOG_ACCEPT}, auth_settings=["BearerToken"], _preload_content=False,
                _request_timeout=self.config.request_timeout)
            await check_response(resp, f"reading the log of pod {name}")
            try:
                return await resp.read()
            finally:
                resp.release()

        try:
            raw = await acall_with_retries(f"reading the log of pod {name}", call, self.config.api_retries)
        except NotFound:
            return LogChunk([], cursor)
        except BackendAPIError as exc:
            if exc.status_code == 400:
                return LogChunk([], cursor)
            raise
        return logcursor.next_chunk(logcursor.parse_entries(raw, complete=self._log_complete(handle)), cursor)

    async def acancel(self, handle: RunHandle) -> None:
        session = await self._session(handle)
        key = self._key(handle)
        namespace, name = key
        pod = await self._aread_pod(session, handle)
        if pod is None or (not never_ran(pod) and status_from_pod(
                pod, container=handle.data.get("container") or "step", now=time.time(),
                startup_timeout=float("inf")).is_terminal):
            return
        self._cancelled.add(key)
        patch = {"metadata": {"annotations": {ANNOTATION_CANCELLED: f"{time.time():.3f}"}}}
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": self.config.delete_grace_seconds}

        async def annotate() -> None:
            resp = await session.core.patch_namespaced_pod(name, namespace, patch, _preload_content=False)
            await check_response(resp, f"marking pod {name} cancelled")
            resp.release()

        async def delete() -> None:
            resp = await session.core.delete_namespaced_pod(name, namespace, body=body, _preload_content=False)
            await check_response(resp, f"deleting pod {name}")
            resp.release()

        try:
            await acall_with_retries(f"marking pod {name} cancelled", annotate, self.config.api_retries)
            await acall_with_retries(f"deleting pod {name}", delete, self.config.api_retries)
        except NotFound:
            return
        log.info("kubernetes: cancelled pod %s/%s", namespace, name)

    async def aclose(self) -> None:
        loop_id = id(asyncio.get_running_loop())
        for key in [k for k in self._held if k[0] == loop_id]:
            self._held.pop(key).release()
        await asyncio.to_thread(self.close)

