"""The ``valohai`` backend: each step is a Valohai execution (see :mod:`._backend`)."""

from __future__ import annotations

from airflow_remote_ml.backends.valohai._backend import (
    BOOTSTRAP,
    DEFAULT_HOST,
    HANDLE_ENV,
    IDENTITY_TAG_PREFIX,
    INCOMPLETE,
    MANIFEST_NAME,
    RUNTIME_INPUT_SLOTS,
    ValohaiAPI,
    ValohaiBackend,
    ValohaiConfig,
    build_execution,
    event_line,
    identity_tags,
    input_urls,
    map_status,
    match_outputs,
    new_events,
    output_uri,
    param_value,
    step_mode,
)

__all__ = [
    "BOOTSTRAP",
    "DEFAULT_HOST",
    "HANDLE_ENV",
    "IDENTITY_TAG_PREFIX",
    "INCOMPLETE",
    "MANIFEST_NAME",
    "RUNTIME_INPUT_SLOTS",
    "ValohaiAPI",
    "ValohaiBackend",
    "ValohaiConfig",
    "build_execution",
    "event_line",
    "identity_tags",
    "input_urls",
    "map_status",
    "match_outputs",
    "new_events",
    "output_uri",
    "param_value",
    "step_mode",
]
