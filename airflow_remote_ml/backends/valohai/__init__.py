"""The ``valohai`` backend: each step is a Valohai execution, created through the v0 REST API.

Valohai versions every execution (code commit, data, parameters, environment, metrics) and launches the
machine a step needs; Airflow keeps the schedule and the data flow. A step runs in one of two modes:

* **a Valohai step** (``backend_options={"valohai": {"step": "train"}}``, or the ``steps`` setting mapping
  the spec's callable / task id to a step name): the execution runs that step of the commit's
  ``valohai.yaml``. Its command comes from the YAML, so the spec's ``command``/``callable`` is not run
  (it still documents the task); ``params`` become the execution's parameters and ``inputs`` its inputs.
* **the generic runtime step** (the ``runtime_step`` setting names a step whose command is
  ``python3 -c "$REMOTE_ML_BOOTSTRAP"``, see ``backends/valohai/valohai.yaml``): the spec's command or
  callable runs under airflow-remote-ml's runtime, injected through environment variables, so any step
  runs on Valohai without a YAML step of its own.

Either way the step's outputs are the files written to ``$VH_OUTPUTS_DIR``, which Valohai stores as
datums; the result carries them as ``datum://<id>`` URIs (never signed download URLs), or, with
``export_outputs``, copies them under the artifact root so a step on another backend can read them.
Metrics are the execution's metadata: the JSON objects the step printed on stdout.

A package because it outgrew one module: :mod:`._client` is the HTTP client (token auth, retries, the one
place errors are mapped), :mod:`._execution` builds the create request and reads the answers (pure, no
I/O), :mod:`._backend` drives executions through the client, and :mod:`._shared` is the list of a
project's unfinished executions that deferred steps share in a triggerer. Airflow is imported only to read a
connection (``conn_id``).
"""

from __future__ import annotations

from airflow_remote_ml.backends.valohai._backend import ValohaiBackend
from airflow_remote_ml.backends.valohai._client import ValohaiAPI
from airflow_remote_ml.backends.valohai._execution import (
    BOOTSTRAP,
    CURSOR_WINDOW,
    DEFAULT_HOST,
    HANDLE_ENV,
    IDENTITY_TAG_PREFIX,
    INCOMPLETE,
    INPUT_URL_SCHEMES,
    MANIFEST_NAME,
    RUNTIME_INPUT_SLOTS,
    LogCursor,
    ValohaiConfig,
    build_execution,
    event_id,
    event_line,
    events_to_fetch,
    explain_failure,
    identity_tags,
    input_url_problem,
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
    "CURSOR_WINDOW",
    "DEFAULT_HOST",
    "HANDLE_ENV",
    "IDENTITY_TAG_PREFIX",
    "INCOMPLETE",
    "INPUT_URL_SCHEMES",
    "MANIFEST_NAME",
    "RUNTIME_INPUT_SLOTS",
    "LogCursor",
    "ValohaiAPI",
    "ValohaiBackend",
    "ValohaiConfig",
    "build_execution",
    "event_id",
    "event_line",
    "events_to_fetch",
    "explain_failure",
    "identity_tags",
    "input_url_problem",
    "input_urls",
    "map_status",
    "match_outputs",
    "new_events",
    "output_uri",
    "param_value",
    "step_mode",
]
