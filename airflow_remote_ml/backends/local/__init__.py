"""The ``local`` backend: a subprocess on the worker. The embedded default; needs no service.

A package of named parts: :mod:`._config` (settings and the step's minimal environment), :mod:`._procs`
(which processes make up a step, and stopping all of them) and :mod:`._backend` (the backend itself).
The entry point ``airflow_remote_ml.backends.local:LocalBackend`` is this package's re-export.
"""

from __future__ import annotations

from airflow_remote_ml.backends.local._backend import LocalBackend
from airflow_remote_ml.backends.local._config import (
    BASE_ENV,
    BASE_ENV_PREFIXES,
    DEFAULT_KILL_GRACE,
    LocalConfig,
    default_state_dir,
    step_environment,
)

__all__ = [
    "BASE_ENV",
    "BASE_ENV_PREFIXES",
    "DEFAULT_KILL_GRACE",
    "LocalBackend",
    "LocalConfig",
    "default_state_dir",
    "step_environment",
]
