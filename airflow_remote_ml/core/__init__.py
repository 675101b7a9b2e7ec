"""Backend-neutral core of airflow-remote-ml. Never imports Airflow."""

from __future__ import annotations

from airflow_remote_ml.core.artifacts import ArtifactStore, default_artifact_root
from airflow_remote_ml.core.backend import Backend, BackendConfig, StepRequest
from airflow_remote_ml.core.errors import (
    ArtifactError,
    BackendAPIError,
    BackendNotFoundError,
    BackendUnavailableError,
    ConfigError,
    InvalidRequestError,
    RemoteJobLostError,
    RemoteMLError,
    StepCancelledError,
    StepFailedError,
    StepTimeoutError,
    TransientBackendError,
)
from airflow_remote_ml.core.identity import StepIdentity
from airflow_remote_ml.core.poll import PollPolicy
from airflow_remote_ml.core.registry import available_backends, create_backend, get_backend_class
from airflow_remote_ml.core.spec import Resources, SecretRef, StepSpec
from airflow_remote_ml.core.status import LogChunk, RunHandle, RunState, RunStatus, StepResult

__all__ = [
    "ArtifactError",
    "ArtifactStore",
    "Backend",
    "BackendAPIError",
    "BackendConfig",
    "BackendNotFoundError",
    "BackendUnavailableError",
    "ConfigError",
    "InvalidRequestError",
    "LogChunk",
    "PollPolicy",
    "RemoteJobLostError",
    "RemoteMLError",
    "Resources",
    "RunHandle",
    "RunState",
    "RunStatus",
    "SecretRef",
    "StepCancelledError",
    "StepFailedError",
    "StepIdentity",
    "StepRequest",
    "StepResult",
    "StepSpec",
    "StepTimeoutError",
    "TransientBackendError",
    "available_backends",
    "create_backend",
    "default_artifact_root",
    "get_backend_class",
]
