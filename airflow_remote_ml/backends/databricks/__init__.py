"""The ``databricks`` backend: each step runs as one Databricks job run (``runs/submit``).

A package because it outgrew one module: :mod:`._payload` builds the request (pure),
:mod:`._states` reads the answers (pure), :mod:`._errors` maps the hook's failures to ours (one choke
point), :mod:`._storage` reads and writes artifacts (mounts or the DBFS API), :mod:`._backend` talks to the
Jobs API through the provider's ``DatabricksHook``. Importing it needs
``apache-airflow-providers-databricks`` (the ``[databricks]`` extra).
"""

from __future__ import annotations

from airflow_remote_ml.backends.databricks._backend import DatabricksBackend
from airflow_remote_ml.backends.databricks._errors import RetryAfterWait, error_info, map_error
from airflow_remote_ml.backends.databricks._payload import (
    OPTION_NAMES,
    PROFILE_KEYS,
    TASK_TYPES,
    DatabricksConfig,
    build_submit_payload,
    choose_node_type,
    run_name,
)
from airflow_remote_ml.backends.databricks._states import (
    LIFE_CYCLE_STATES,
    RESULT_STATES,
    DatabricksPollPolicy,
    status_from_run,
)

__all__ = [
    "LIFE_CYCLE_STATES",
    "OPTION_NAMES",
    "PROFILE_KEYS",
    "RESULT_STATES",
    "TASK_TYPES",
    "DatabricksBackend",
    "DatabricksConfig",
    "DatabricksPollPolicy",
    "RetryAfterWait",
    "build_submit_payload",
    "choose_node_type",
    "error_info",
    "map_error",
    "run_name",
    "status_from_run",
]
