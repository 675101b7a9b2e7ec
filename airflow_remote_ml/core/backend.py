"""The one small interface every backend implements, and the request it receives.

A backend turns a :class:`StepRequest` into a remote job and answers questions about it. Everything
that needs no I/O (validation, identity, artifact layout, the runtime's wire format, waiting policy,
error building) lives here or elsewhere in ``core`` so that each backend stays "call, check, parse".
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from airflow_remote_ml import runtime
from airflow_remote_ml.core import codepkg, transfer
from airflow_remote_ml.core.artifacts import ArtifactStore, read_json
from airflow_remote_ml.core.errors import ArtifactError, ConfigError
from airflow_remote_ml.core.identity import StepIdentity
from airflow_remote_ml.core.poll import PollPolicy
from airflow_remote_ml.core.spec import StepSpec, reject_unknown_options
from airflow_remote_ml.core.status import LogChunk, RunHandle, RunStatus, StepResult

B = TypeVar("B", bound="Backend")
#: What the signed URLs of a runtime config depend on.
_SIGNED_KEYS = ("inputs", "outputs", "manifest_uri", "timeout")


@dataclass(frozen=True)
class StepRequest:
    """A validated spec bound to its identity and artifact locations: all a backend needs to submit."""

    spec: StepSpec
    identity: StepIdentity
    artifact_root: str
    outputs: dict[str, str]
    manifest_uri: str
    code_version: str | None = None
    extra_labels: dict[str, str] = field(default_factory=dict)
    #: The step's code archive (see :mod:`airflow_remote_ml.core.codepkg`); ``None``: the image has the code.
    code: codepkg.CodeRef | None = None

    @classmethod
    def create(
        cls,
        spec: StepSpec,
        identity: StepIdentity,
        artifacts: ArtifactStore,
        *,
        code_version: str | None = None,
        code: codepkg.CodeRef | None = None,
    ) -> StepRequest:
        return cls(
            spec=spec,
            identity=identity,
            artifact_root=artifacts.root,
            outputs={name: artifacts.output_uri(identity, name) for name in spec.outputs},
            manifest_uri=artifacts.manifest_uri(identity),
            code_version=code_version,
            code=code,
        )

    def runtime_config(self, **overrides: Any) -> dict[str, Any]:
        """The JSON document the in-step runtime reads (see :mod:`airflow_remote_ml.runtime`)."""
        spec = self.spec
        config: dict[str, Any] = {
            "protocol_version": runtime.PROTOCOL_VERSION,
            "identity": self.identity.to_json(),
            "callable": spec.callable,
            "command": list(spec.command) if isinstance(spec.command, tuple) else spec.command,
            "shell": spec.shell,
            "params": dict(spec.params),
            "inputs": dict(spec.inputs),
            "outputs": dict(self.outputs),
            "manifest_uri": self.manifest_uri,
            "timeout": spec.timeout,
            "versions": {"image": spec.image, "code_version": self.code_version,
                         "code_sha256": self.code.sha256 if self.code else None},
        }
        if self.code is not None:
            config["code"] = self.code.to_json()
        config.update(overrides)
        # s3:// locations get short-lived signed URLs (signed here with the worker's credentials), so the
        # stdlib-only runtime reads and writes the store on every backend without credentials of its own.
        # Signed once per request and location set: a submit retried after an ambiguous answer must hand the
        # step the same URLs (and not open another multipart upload per output).
        # Only while a backend submits (transfer.signing): validate() and other builds stay free of I/O.
        if not transfer.active():
            return config
        to_sign = {k: config.get(k) for k in _SIGNED_KEYS}
        if config.get("code"):
            # The code archive is fetched like an input (runtime._install_code), so it is signed like one.
            to_sign["inputs"] = {**(to_sign["inputs"] or {}), runtime.CODE_INPUT: config["code"]["uri"]}
        key = json.dumps([to_sign["inputs"], config.get("outputs"), config.get("manifest_uri"),
                          config.get("timeout")], sort_keys=True, default=str)
        if key not in self._signed:
            self._signed[key] = transfer.attach(to_sign, spec.env)
        signed = self._signed[key]
        config.update({k: signed[k] for k in ("transfers", "transfer") if k in signed})
        return config

    @functools.cached_property
    def _signed(self) -> dict[str, dict[str, Any]]:
        # cached_property writes the instance __dict__ directly, which a frozen dataclass allows.
        return {}

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_json(),
            "identity": self.identity.to_json(),
            "artifact_root": self.artifact_root,
            "outputs": dict(self.outputs),
            "manifest_uri": self.manifest_uri,
            "code_version": self.code_version,
            "extra_labels": dict(self.extra_labels),
            "code": self.code.to_json() if self.code else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StepRequest:
        return cls(
            spec=StepSpec.from_json(data["spec"]),
            identity=StepIdentity.from_json(data["identity"]),
            artifact_root=data["artifact_root"],
            outputs=dict(data["outputs"]),
            manifest_uri=data["manifest_uri"],
            code_version=data.get("code_version"),
            extra_labels=dict(data.get("extra_labels") or {}),
            code=codepkg.CodeRef.from_json(data["code"]) if data.get("code") else None,
        )


@dataclass(frozen=True)
class BackendConfig:
    """Base of every backend's configuration: plain data, built from a mapping, unknown keys refused.

    Subclasses are frozen dataclasses whose fields are the backend's settings (from an Airflow
    connection, from ``backend_config=`` on the operator, or both merged).
    """

    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: How long finished jobs are kept (see :class:`airflow_remote_ml.core.jobs.Retention`): a mapping
    #: ``{"max_age": "7d", "max_count": 100}``, ``false`` to keep all, or unset for those defaults.
    retention: dict[str, Any] | bool | None = None

    #: Whether naming a profile this configuration does not define is an error. Production backends say
    #: yes (a typo must not land a GPU job on the default pool); laptop backends (local, docker) run the
    #: step with its explicit resources instead, so a DAG written for a cluster still runs on a laptop.
    strict_profiles: ClassVar[bool] = True

    @classmethod
    def from_mapping(cls: type[Any], data: Mapping[str, Any], backend: str = "backend") -> Any:
        prefix = f"backend_config[{backend}]"
        if not isinstance(data, Mapping):
            raise ConfigError(prefix, f"must be a mapping of settings, not {type(data).__name__}",
                              "use e.g. {'namespace': 'ml'}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        reject_unknown_options(prefix, data, set(fields))
        for name, value in data.items():
            _check_container_type(f"{prefix}.{name}", value, fields[name])
        if "retention" in data:  # refused here, before anything is submitted, not when a job finishes
            from airflow_remote_ml.core.jobs import Retention

            Retention.from_config(data["retention"], backend)
        return cls(**dict(data))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def profile(self, name: str | None, backend: str) -> dict[str, Any]:
        """The settings of a named resource profile, or a ConfigError listing the known ones."""
        if name is None:
            return {}
        if name not in self.profiles:
            if not self.strict_profiles:
                import logging

                logging.getLogger(__name__).info(
                    "%s: no profile %r is configured; running with the step's own resources", backend, name)
                return {}
            import difflib

            close = difflib.get_close_matches(name, list(self.profiles), n=1)
            hint = f"did you mean {close[0]!r}?" if close else (
                f"known profiles: {', '.join(sorted(self.profiles))}" if self.profiles
                else f"define it in the {backend} backend's 'profiles' setting")
            raise ConfigError("resources.profile", f"{name!r} is not a profile of the {backend} backend", hint)
        return dict(self.profiles[name])


def _check_container_type(field: str, value: Any, spec: dataclasses.Field[Any]) -> None:
    """A setting whose default is a mapping or a list must be one: a backend iterates it while it starts."""
    factory = spec.default_factory
    default = factory() if factory is not dataclasses.MISSING else spec.default
    if isinstance(default, dict) and not isinstance(value, Mapping):
        raise ConfigError(field, f"must be a mapping, not {type(value).__name__}", "use {...}, or leave it out")
    if isinstance(default, (list, tuple)) and (isinstance(value, (str, bytes, Mapping))
                                               or not isinstance(value, (list, tuple))):
        raise ConfigError(field, f"must be a list, not {type(value).__name__}", "use [...], or leave it out")


class Backend(ABC):
    """Runs steps somewhere. Subclasses implement the abstract methods; the rest has sane defaults.

    Sync methods are used by the worker; the ``a``-prefixed twins by the trigger. The defaults of the
    async twins run the sync method in a thread so they never block the triggerer's event loop; a
    backend with a native async client overrides them.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[BackendConfig]] = BackendConfig
    #: ``backend_options`` keys this backend accepts in a step spec.
    option_names: ClassVar[frozenset[str]] = frozenset()
    #: How often to look again when the backend cannot be told about changes.
    poll_policy: ClassVar[PollPolicy] = PollPolicy()
    #: Whether the job has a page worth linking to from the task.
    has_job_page: ClassVar[bool] = False
    #: True when submitting the same identity twice cannot create a second job: the remote side refuses or
    #: dedupes it (a deterministic pod/container name answered with 409, a Databricks idempotency token).
    #: The lifecycle then retries an ambiguous submit at once; otherwise it first looks the job up by
    #: identity for ``create_settle_seconds``.
    idempotent_submit: ClassVar[bool] = False
    #: How long after an ambiguous submit (timeout, 5xx, dropped connection) a job created by it may still
    #: become visible to :meth:`find`. Must exceed the slowest create the remote side is known to take.
    create_settle_seconds: ClassVar[float] = 60.0

    def __init__(self, config: BackendConfig) -> None:
        self.config = config

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Every backend's submit signs the s3:// locations of the runtime config it builds (see
        # core/transfer.py), without each backend having to ask for it.
        submit = cls.__dict__.get("submit")
        if submit is not None and not getattr(submit, "_signs_transfers", False):
            @functools.wraps(submit)
            def signed_submit(self: Backend, request: StepRequest) -> RunHandle:
                with transfer.signing():
                    return submit(self, request)

            signed_submit._signs_transfers = True  # type: ignore[attr-defined]
            cls.submit = signed_submit  # type: ignore[method-assign]

    @classmethod
    def from_config(cls: type[B], config: Mapping[str, Any]) -> B:
        return cls(cls.config_class.from_mapping(config, cls.name))

    def config_json(self) -> dict[str, Any]:
        """Plain data that rebuilds this backend in another process (the triggerer)."""
        return self.config.to_json()

    # -- the interface -------------------------------------------------------------------------------

    def validate(self, request: StepRequest) -> None:
        """Refuse a request this backend cannot run, before anything is submitted."""
        reject_unknown_options(f"backend_options.{self.name}", request.spec.options_for(self.name),
                               set(self.option_names))
        self.config.profile(request.spec.resources.profile, self.name)

    @abstractmethod
    def submit(self, request: StepRequest) -> RunHandle:
        """Start the job. Must carry ``request.identity`` so :meth:`find` can see it.

        Raise :class:`TransientBackendError` when the outcome is unknown (timeout, dropped connection,
        5xx: the job may exist) or the request was refused for now (429); raise
        :class:`BackendAPIError` only when the job surely was not created (a 4xx refusal).
        """

    @abstractmethod
    def find(self, identity: StepIdentity) -> RunHandle | None:
        """The job started for exactly this identity, if there is one (running or not).

        When the remote side holds several (a non-idempotent create that was retried), return the
        oldest, deterministically, so every caller adopts the same one.
        """

    @abstractmethod
    def poll(self, handle: RunHandle) -> RunStatus:
        """The job's status now."""

    @abstractmethod
    def cancel(self, handle: RunHandle) -> None:
        """Stop the job. Idempotent: cancelling a finished or vanished job is not an error."""

    def read_logs(self, handle: RunHandle, cursor: Any = None) -> LogChunk:
        """Log lines after ``cursor`` (``None``: from the start) and the cursor for the next call."""
        return LogChunk([], cursor)

    def wait(self, handle: RunHandle, timeout: float) -> RunStatus:
        """Return the status once the job is terminal or ``timeout`` seconds have passed.

        The default sleeps and polls; backends that can be told when a job ends (a container wait, a
        watch) override this so completion is noticed at once.
        """
        time.sleep(timeout)
        return self.poll(handle)

    def mark_finished(self, handle: RunHandle) -> None:
        """Record on the remote side that Airflow is done with this job (so nothing reattaches to it)."""

    def publish_code(self, request: StepRequest) -> None:
        """Place the step's code archive where the step will fetch it, once per sha256.

        The default writes it under the artifact root (a local path the step mounts, or an fsspec URI);
        a backend whose steps read another store (DBFS, a platform's inputs) overrides this.
        """
        if request.code is not None:
            codepkg.publish(request.code)

    def cleanup(self, handle: RunHandle, status: RunStatus) -> None:
        """Remove what a finished job left behind, following the backend's removal policy."""

    def fetch_result(self, handle: RunHandle) -> StepResult:
        """Outputs and metrics of a succeeded job, from the result manifest the runtime wrote."""
        manifest_uri = handle.data.get("manifest_uri")
        if not manifest_uri:
            raise ArtifactError(f"job {handle.job_id} has no manifest location; was it started by this backend?")
        manifest = self.read_manifest(manifest_uri)
        if manifest is None:
            raise ArtifactError(
                f"the step finished but wrote no result manifest at {manifest_uri!r}; "
                "check that the artifact root is shared between Airflow and the step"
            )
        return result_from_manifest(manifest, handle, handle.data.get("declared_outputs"))

    def read_manifest(self, uri: str) -> dict[str, Any] | None:
        """The result manifest at ``uri`` (``None`` if absent). Backends with their own storage access
        (DBFS, volumes) override this; the default reads local paths and fsspec URIs."""
        return read_json(uri)

    def log_tail(self, handle: RunHandle, lines: int = 40) -> list[str]:
        try:
            return self.read_logs(handle, None).lines[-lines:]
        except Exception:  # the tail is a courtesy in an error message; never mask the real error
            return []

    def close(self) -> None:
        """Release clients and connections."""

    # -- async twins for the trigger ------------------------------------------------------------------

    async def apoll(self, handle: RunHandle) -> RunStatus:
        return await asyncio.to_thread(self.poll, handle)

    async def acancel(self, handle: RunHandle) -> None:
        await asyncio.to_thread(self.cancel, handle)

    async def aread_logs(self, handle: RunHandle, cursor: Any = None) -> LogChunk:
        return await asyncio.to_thread(self.read_logs, handle, cursor)

    async def await_change(self, handle: RunHandle, timeout: float) -> RunStatus:
        """Async :meth:`wait`: the status once terminal or after ``timeout`` seconds."""
        await asyncio.sleep(timeout)
        return await self.apoll(handle)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)


def result_from_manifest(
    manifest: Mapping[str, Any], handle: RunHandle, declared: list[str] | None = None
) -> StepResult:
    """Turn a runtime manifest into a :class:`StepResult`, refusing one that lacks a declared output."""
    if manifest.get("protocol_version", 0) > runtime.PROTOCOL_VERSION:
        raise ArtifactError(
            f"the result manifest speaks protocol {manifest.get('protocol_version')}, newer than this "
            f"airflow-remote-ml ({runtime.PROTOCOL_VERSION}); upgrade airflow-remote-ml on the workers"
        )
    outputs_meta = manifest.get("outputs") or {}
    outputs = {name: meta["uri"] for name, meta in outputs_meta.items()}
    for name in declared or []:
        if name not in outputs:
            raise ArtifactError(f"declared output {name!r} was not produced by the step (job {handle.job_id})")
    return StepResult(
        outputs=outputs,
        metrics=dict(manifest.get("metrics") or {}),
        backend=handle.backend,
        job_id=handle.job_id,
        url=handle.url,
        manifest=dict(manifest),
    )
