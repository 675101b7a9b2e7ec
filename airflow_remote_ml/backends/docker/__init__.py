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
returns the moment the container stops. A container this object starts is followed over its attach stream
(:mod:`._attach`), its log read back only where the stream cannot be trusted.

A package because it outgrew one module: :mod:`._config` holds the settings and reads the Airflow connection,
:mod:`._containers` builds the container request and reads the engine's answers (pure, no I/O), and
:mod:`._backend` talks to the engine through the docker SDK's ``APIClient``. Importing it needs the ``docker``
package (the ``[docker]`` extra).
"""

from __future__ import annotations

from airflow_remote_ml.backends.docker._backend import DockerBackend
from airflow_remote_ml.backends.docker._config import (
    DEFAULT_SOCKET,
    LABEL_MANIFEST,
    LABEL_OUTPUTS,
    MARK_CANCELLED,
    MARK_FINISHED,
    OPTION_NAMES,
    PROFILE_NAMES,
    PULL_POLICIES,
    REMOVAL_POLICIES,
    DockerConfig,
    read_connection,
    settings_from_connection,
)
from airflow_remote_ml.backends.docker._containers import (
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

__all__ = [
    "DEFAULT_SOCKET",
    "LABEL_MANIFEST",
    "LABEL_OUTPUTS",
    "MARK_CANCELLED",
    "MARK_FINISHED",
    "OPTION_NAMES",
    "PROFILE_NAMES",
    "PULL_POLICIES",
    "REMOVAL_POLICIES",
    "DockerBackend",
    "DockerConfig",
    "container_request",
    "demux",
    "is_count_cursor",
    "lines_after_counts",
    "marks",
    "next_log_chunk",
    "parse_log_entries",
    "parse_mount",
    "read_connection",
    "settings_from_connection",
    "status_after_removal",
    "status_from_inspect",
]
