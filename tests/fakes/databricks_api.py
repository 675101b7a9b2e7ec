"""A local test server that speaks the Databricks Jobs REST API (2.1 and 2.2 paths).

It exists so that the Databricks provider's real ``DatabricksHook`` (sync ``requests`` and async
``aiohttp`` paths) and our Databricks backend can be exercised end to end without a workspace, and so
that a benchmark can count exactly which API calls an operator makes.

What it does, following the public Jobs API reference:

* ``POST jobs/runs/submit`` validates the request (multi-task ``tasks[]`` and the legacy single-task
  top-level form), honours ``idempotency_token`` (<= 64 characters; the same token returns the same
  ``run_id`` for as long as the run exists) and starts the run.
* A ``spark_python_task`` really runs: ``sys.executable <python_file> <parameters...>`` in a
  subprocess with the cluster's ``spark_env_vars``; stdout and stderr become the task's ``logs``
  (the last 5 MB, like the real service); a non-zero exit fails the task with ``error`` and
  ``error_trace`` taken from the Python traceback; ``timeout_seconds`` kills it (``TIMEDOUT``).
  Other task types are simulated (see :meth:`FakeDatabricks.simulate`).
* ``GET jobs/runs/get`` / ``get-output`` / ``list``, ``POST jobs/runs/cancel`` / ``delete``,
  ``GET clusters/get`` and ``clusters/spark-versions`` answer with the documented shapes. GET
  parameters are read from the query string *and* from a JSON body, because the provider's async
  hook sends GET requests with a JSON body.
* Errors use the documented body ``{"error_code": ..., "message": ...}``; a missing credential is a
  401 and an unknown token a 403 (``"Invalid access token."``), as the real service answers.
* ``POST /oidc/v1/token`` issues OAuth M2M tokens for registered service principals. The hook always
  sends that request to ``https://<host>/oidc/v1/token``, so it needs ``tls=True`` (see
  :meth:`FakeDatabricks.trust_ca`).
* Every request is recorded (:attr:`FakeDatabricks.requests`, :meth:`FakeDatabricks.count`) and
  faults can be injected (:meth:`FakeDatabricks.fail_next`), e.g. a 429 with ``Retry-After``.

Typical use::

    with FakeDatabricks(token="dapi-test") as dbx:
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", dbx.connection_json())
        hook = DatabricksHook(retry_args={"stop": stop_after_attempt(3), "wait": wait_none()})
        run_id = hook.submit_run({...})
        dbx.wait_until_terminal(run_id)
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import ipaddress
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

#: The Jobs API versions served under ``/api/<version>/jobs/...``.
JOBS_API_VERSIONS = ("2.1", "2.2")
#: The Clusters API versions served under ``/api/<version>/clusters/...``.
CLUSTERS_API_VERSIONS = ("2.0", "2.1")

#: Terminal ``life_cycle_state`` values (the provider's ``RunState.is_terminal``).
TERMINAL_LIFE_CYCLE_STATES = frozenset({"TERMINATED", "SKIPPED", "INTERNAL_ERROR"})
#: Task types that the Jobs API accepts in a submitted task; only ``spark_python_task`` is executed.
TASK_TYPES = (
    "spark_python_task",
    "python_wheel_task",
    "notebook_task",
    "spark_jar_task",
    "spark_submit_task",
    "sql_task",
    "dbt_task",
    "pipeline_task",
    "run_job_task",
    "condition_task",
    "for_each_task",
)
LIBRARY_KINDS = ("jar", "egg", "whl", "pypi", "maven", "cran", "requirements")

MAX_IDEMPOTENCY_TOKEN_LENGTH = 64
#: DBFS API limits (docs.databricks.com/api/workspace/dbfs): ``read`` "length ... has a limit of 1 MB"
#: (MAX_READ_SIZE_EXCEEDED), ``add-block`` "data ... has a limit of 1 MB" (MAX_BLOCK_SIZE_EXCEEDED), and
#: ``put`` "The amount of data that can be passed ... using the contents parameter is limited to 1 MB"
#: (MAX_BLOCK_SIZE_EXCEEDED). ``read`` defaults to 0.5 MB.
DBFS_MAX_BYTES = 1 << 20
DBFS_DEFAULT_READ = 1 << 19
#: The prefixes of the workspace file tree (``/Workspace`` and its aliases) and of Unity Catalog volumes:
#: an absolute ``python_file`` is looked up there, never on some machine's local disk.
WORKSPACE_ROOTS = ("/Workspace/", "/Users/", "/Shared/", "/Repos/", "/Volumes/")
#: Cloud file URIs ``SparkPythonTask.python_file`` accepts ("Cloud file URIs (such as dbfs:/, s3:/, adls:/,
#: gcs:/) and workspace paths are supported", Jobs API reference).
CLOUD_URI_PREFIXES = ("dbfs:/", "s3:/", "s3a:/", "adls:/", "abfss:/", "gs:/", "gcs:/", "wasbs:/")
#: How Databricks reports a driver that was killed (its JVM or Python process ran out of memory): the run
#: page's "The spark driver has stopped unexpectedly and is restarting." with termination code DRIVER_ERROR
#: (``TerminationCodeCode``: "DRIVER_ERROR: The run encountered an error while communicating with the
#: Spark Driver").
MSG_DRIVER_OOM = (
    "The spark driver has stopped unexpectedly and is restarting. Your notebook will be automatically "
    "reattached."
)
MAX_TASKS_PER_RUN = 100
#: "Databricks restricts this API to return the last 5 MB of these logs" (RunOutput.logs).
DEFAULT_LOGS_LIMIT_BYTES = 5 * 1024 * 1024
#: ``runs/get`` in 2.2 returns at most 100 entries of ``tasks`` per page.
DEFAULT_TASKS_PAGE_SIZE = 100
MAX_LIST_LIMIT = 25

# Texts the real service returns, as observed in public bug reports and the SDKs' error mappings.
MSG_NO_CREDENTIAL = "Credential was not sent or was of an unsupported type for this API."
MSG_INVALID_TOKEN = "Invalid access token."
MSG_MULTI_TASK_OUTPUT = (
    "Retrieving the output of runs with multiple tasks is not supported. "
    "Please retrieve the output of each individual task run instead."
)
MSG_TASK_FAILED = "Workload failed, see run output for details"

DEFAULT_ERROR_CODES = {
    400: "INVALID_PARAMETER_VALUE",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "RESOURCE_DOES_NOT_EXIST",
    409: "RESOURCE_CONFLICT",
    429: "REQUEST_LIMIT_EXCEEDED",
    500: "INTERNAL_ERROR",
    503: "TEMPORARILY_UNAVAILABLE",
}

# result_state -> (termination_details.code, termination_details.type) of the 2.2 ``status`` object.
_TERMINATION = {
    "SUCCESS": ("SUCCESS", "SUCCESS"),
    "SUCCESS_WITH_FAILURES": ("SUCCESS_WITH_FAILURES", "SUCCESS"),
    "FAILED": ("RUN_EXECUTION_ERROR", "CLIENT_ERROR"),
    # TerminationCodeCode.CANCELED: "canceled during execution by the platform; for example, if the
    # maximum run duration was exceeded".
    "TIMEDOUT": ("CANCELED", "CLIENT_ERROR"),
    "CANCELED": ("USER_CANCELED", "SUCCESS"),
    "UPSTREAM_FAILED": ("SKIPPED", "CLIENT_ERROR"),
    "UPSTREAM_CANCELED": ("SKIPPED", "SUCCESS"),
    "EXCLUDED": ("SKIPPED", "SUCCESS"),
}
# life_cycle_state -> status.state (RunLifecycleStateV2State has no SKIPPED/INTERNAL_ERROR).
_V2_STATE = {
    "QUEUED": "QUEUED",
    "PENDING": "PENDING",
    "RUNNING": "RUNNING",
    "TERMINATING": "TERMINATING",
    "TERMINATED": "TERMINATED",
    "SKIPPED": "TERMINATED",
    "INTERNAL_ERROR": "TERMINATED",
    "BLOCKED": "BLOCKED",
    "WAITING_FOR_RETRY": "WAITING",
}

_TASK_KEY_RE = re.compile(r"^[\w\-]{1,100}$")
_ENDPOINT_RE = re.compile(r"^/api/(\d+\.\d+)/(.+?)/?$")


class ApiError(Exception):
    """An error answered with the documented ``{"error_code", "message"}`` body."""

    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code if error_code is not None else DEFAULT_ERROR_CODES.get(status, "UNKNOWN")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error_code": self.error_code, "message": self.message}


def _invalid(message: str) -> ApiError:
    return ApiError(400, message, "INVALID_PARAMETER_VALUE")


@dataclass(frozen=True)
class RequestRecord:
    """One request the server received (for counting API calls)."""

    method: str
    path: str
    #: API version from the path (``"2.2"``), or ``""`` for non-API paths such as the OIDC endpoint.
    version: str
    #: The path without ``/api/<version>/`` (``"jobs/runs/get"``), or the raw path.
    endpoint: str
    status: int
    params: dict[str, Any]
    timestamp: float


@dataclass
class SimulatedOutcome:
    """How a task that the fake does not execute (notebook, wheel, JAR, ...) ends."""

    result_state: str = "SUCCESS"
    seconds: float = 0.0
    error: str | None = None
    error_trace: str | None = None
    logs: str | None = None
    notebook_result: str | None = None


@dataclass
class _Fault:
    endpoint: str
    status: int
    remaining: int
    error_code: str | int | None
    message: str | None
    retry_after: float | None
    method: str | None


@dataclass
class _Forced:
    life_cycle_state: str
    result_state: str | None
    state_message: str
    status_state: str | None


@dataclass
class _Cluster:
    cluster_id: str
    state: str
    spec: dict[str, Any]
    state_message: str = ""
    ephemeral: bool = False


@dataclass
class _TaskRun:
    run_id: int
    task_key: str
    kind: str
    settings: dict[str, Any]
    depends_on: list[str]
    run_if: str
    timeout_seconds: int
    life_cycle_state: str = "BLOCKED"
    result_state: str | None = None
    state_message: str = ""
    user_cancelled_or_timedout: bool = False
    start_time: int = 0
    exec_start: int = 0
    exec_end: int = 0
    end_time: int = 0
    cluster_id: str | None = None
    spark_context_id: str | None = None
    logs: bytearray = field(default_factory=bytearray)
    logs_total: int = 0
    error: str | None = None
    error_trace: str | None = None
    notebook_result: str | None = None
    #: "CANCELED", "TIMEDOUT" or "FORCED" once the task has been told to stop.
    stop_reason: str | None = None
    forced: _Forced | None = None
    process: subprocess.Popen[bytes] | None = None
    thread: threading.Thread | None = None
    exit_code: int | None = None
    #: ``status.termination_details`` when the platform, not the result state, says why the task ended
    #: (a driver killed for memory is ``DRIVER_ERROR``, not ``RUN_EXECUTION_ERROR``).
    termination: tuple[str, str, str] | None = None


@dataclass
class _Run:
    run_id: int
    job_id: int
    run_name: str
    request: dict[str, Any]
    api_version: str
    tasks: list[_TaskRun]
    timeout_seconds: int
    idempotency_token: str | None
    start_time: int
    cancel_requested: bool = False
    timed_out: bool = False
    forced: _Forced | None = None
    released: bool = False


def _now_ms() -> int:
    return int(time.time() * 1000)


def _as_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    # The provider's operators send every number as a string ("Databricks can tolerate either numeric
    # or string types"), so accept both, but never a bool.
    if isinstance(value, bool):
        raise _invalid(f"Invalid value for {name}: expected an integer, got {json.dumps(value)}")
    if isinstance(value, int):
        result = value
    elif isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        result = int(value.strip())
    else:
        raise _invalid(f"Invalid value for {name}: expected an integer, got {json.dumps(value)}")
    if minimum is not None and result < minimum:
        raise _invalid(f"Invalid value for {name}: {result} must be at least {minimum}")
    return result


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _invalid(f"Invalid value for {name}: expected true or false, got {json.dumps(value)}")


def _as_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _invalid(f"Invalid value for {name}: expected a string, got {json.dumps(value)}")
    return value


def _str_map(value: Any, name: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _invalid(f"Invalid value for {name}: expected an object of string keys and string values")
    return value


def _str_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(f"Invalid value for {name}: expected an array of strings")
    return value


def _encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def _decode_token(token: str, name: str = "page_token") -> int:
    try:
        return int(json.loads(base64.urlsafe_b64decode(token.encode()))["offset"])
    except Exception as exc:
        raise _invalid(f"Invalid {name}: {token!r}") from exc


def generate_self_signed_cert(directory: Path, hostnames: tuple[str, ...] = ("localhost",)) -> tuple[Path, Path]:
    """Write a self-signed certificate for loopback (127.0.0.1, ::1 and ``hostnames``).

    The certificate is its own CA (``basicConstraints CA:TRUE``) so that clients can trust it by
    adding the certificate file to their trust store.

    Returns:
        The paths of the PEM certificate and the PEM private key.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-databricks.localhost")])
    now = datetime.datetime.now(datetime.UTC)
    san = [x509.DNSName(h) for h in hostnames] + [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / "fake-databricks.crt"
    key_path = directory / "fake-databricks.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class FakeDatabricks:
    """A Databricks workspace on loopback that serves the Jobs API and runs Python tasks locally.

    Args:
        token: The personal access token the server accepts (``Authorization: Bearer <token>``).
        tls: Serve HTTPS with a generated self-signed certificate (needed for OAuth M2M, whose token
            URL the hook always builds with ``https://``). See :meth:`trust_ca`.
        pending_seconds: How long each task stays ``PENDING`` (the cluster start) before it runs.
        queued_seconds: If > 0, each task is first ``QUEUED`` for this long.
        terminating_seconds: How long a finished task stays ``TERMINATING``.
        hold_pending: Keep tasks ``PENDING`` until :meth:`release` is called (deterministic tests).
        service_principals: OAuth M2M ``{client_id: client_secret}`` accepted by ``/oidc/v1/token``.
        invalid_token_status: Status for a wrong token; the real service answers 403
            ``"Invalid access token."``; some gateways answer 401.
        logs_limit_bytes: How much of the end of a task's output ``get-output`` returns.
        tasks_page_size: Entries of ``tasks`` per page of a 2.2 ``runs/get`` response.
        serverless: Accept tasks without any compute (``existing_cluster_id``, ``new_cluster``,
            ``job_cluster_key`` or ``environment_key``), as a workspace with serverless jobs does.
        python_executable: The interpreter that runs ``spark_python_task`` files.
        inherit_env: Start task subprocesses with this process's environment (plus
            ``spark_env_vars``). Default False, as on a cluster: a task sees only ``PATH``, the
            cluster's ``spark_env_vars`` and what Databricks sets (``DATABRICKS_RUNTIME_VERSION``),
            never the environment of whoever submitted it.
        cancel_seconds: How long a cancelled (or timed-out) task stays ``TERMINATING`` before it is
            ``TERMINATED``/``CANCELED``: ``runs/cancel`` "cancels a job run or a task run. The run is
            canceled asynchronously, so it may still be running when this request completes."
        driver_memory_mb: The driver's memory. A task whose processes together hold more resident
            memory is killed, and the run ends ``TERMINATED/FAILED`` with termination code
            ``DRIVER_ERROR`` and the message Databricks shows for a driver OOM.
        workspace_id: The ``?o=`` organisation id in ``run_page_url``.
        user_name: ``creator_user_name`` of every run.
    """

    def __init__(
        self,
        token: str = "dapi-fake-token",
        *,
        tls: bool = False,
        pending_seconds: float = 0.0,
        queued_seconds: float = 0.0,
        terminating_seconds: float = 0.0,
        hold_pending: bool = False,
        service_principals: dict[str, str] | None = None,
        invalid_token_status: int = 403,
        logs_limit_bytes: int = DEFAULT_LOGS_LIMIT_BYTES,
        tasks_page_size: int = DEFAULT_TASKS_PAGE_SIZE,
        serverless: bool = False,
        python_executable: str = sys.executable,
        inherit_env: bool = False,
        cancel_seconds: float = 0.5,
        driver_memory_mb: float | None = None,
        workspace_id: int = 1234567890123456,
        user_name: str = "fake.user@example.com",
    ) -> None:
        self.tokens: set[str] = {token}
        self.token = token
        self.tls = tls
        self.pending_seconds = pending_seconds
        self.queued_seconds = queued_seconds
        self.terminating_seconds = terminating_seconds
        self.hold_pending = hold_pending
        self.service_principals: dict[str, str] = dict(service_principals or {})
        self.invalid_token_status = invalid_token_status
        self.logs_limit_bytes = logs_limit_bytes
        self.tasks_page_size = tasks_page_size
        self.serverless = serverless
        self.python_executable = python_executable
        self.inherit_env = inherit_env
        self.cancel_seconds = cancel_seconds
        self.driver_memory_mb = driver_memory_mb
        self.workspace_id = workspace_id
        self.user_name = user_name

        self._cond = threading.Condition(threading.RLock())
        self._runs: dict[int, _Run] = {}
        self._task_index: dict[int, tuple[_Run, _TaskRun]] = {}
        self._tokens_to_runs: dict[str, int] = {}
        self._deleted_tokens: set[str] = set()
        self._clusters: dict[str, _Cluster] = {}
        self._path_mappings: list[tuple[str, Path]] = []
        self._outcomes: dict[str, SimulatedOutcome] = {}
        self._faults: list[_Fault] = []
        #: endpoint -> [(seconds, drop)]: answer the next matching request late, or not at all, *after*
        #: serving it (the request takes effect either way).
        self._late: dict[str, list[tuple[float, bool]]] = {}
        self._outage_until = 0.0
        self._dbfs_handles: dict[int, tuple[str, bytearray]] = {}
        #: Every ``dbfs/move`` served, (source, destination): what a test asserts placement by.
        self.dbfs_moves: list[tuple[str, str]] = []
        self._handle_ids = itertools.count(1)
        self._requests: list[RequestRecord] = []
        # Real run ids are large (above 2**31); using such values catches int32 assumptions.
        self._ids = itertools.count(700_000_000_000_000 + random.randint(0, 10_000) * 1000)
        self._job_ids = itertools.count(900_000_000_000_000)
        self._oauth_counter = itertools.count(1)
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._tmp: Path | None = None
        self.ca_file: Path | None = None
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeDatabricks:
        """Start serving on an ephemeral loopback port; returns self."""
        self._tmp = Path(tempfile.mkdtemp(prefix="fake-databricks-"))
        ssl_context = None
        if self.tls:
            cert, key = generate_self_signed_cert(self._tmp / "tls")
            self.ca_file = cert
            ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ssl_context.load_cert_chain(cert, key)
        self._server = _Server(("127.0.0.1", 0), _Handler, self, ssl_context)
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._serve_thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, kill every task subprocess and remove temporary files."""
        with self._cond:
            self._closing = True
            tasks = [t for run in self._runs.values() for t in run.tasks]
            for task in tasks:
                if task.life_cycle_state not in TERMINAL_LIFE_CYCLE_STATES and task.stop_reason is None:
                    task.stop_reason = "CANCELED"
            self._cond.notify_all()
        for task in tasks:
            _kill(task.process)
            if task.thread is not None:
                task.thread.join(timeout=10)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> FakeDatabricks:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ addressing

    @property
    def port(self) -> int:
        assert self._server is not None, "FakeDatabricks is not started"
        return self._server.server_address[1]

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``: the value for the connection's *host* field (leave *port* empty).

        The port must be part of the host because the hook builds the OAuth token URL from the host
        alone (``https://<host>/oidc/v1/token``).
        """
        return f"127.0.0.1:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT``."""
        return f"{self.scheme}://{self.host}"

    def connection_json(self, *, oauth_client_id: str | None = None, token: str | None = None) -> str:
        """The JSON form of an Airflow connection that points the provider's hook at this server.

        Put it in ``AIRFLOW_CONN_<CONN_ID>``. Plain HTTP is selected with the connection's *schema*
        field (the hook uses ``schema or "https"``); with ``tls=True`` the schema is left empty.

        Args:
            oauth_client_id: Use OAuth M2M (``service_principal_oauth``) with this registered client
                instead of the PAT; requires ``tls=True``.
            token: Use this PAT instead of the server's (e.g. a wrong one).
        """
        conn: dict[str, Any] = {"conn_type": "databricks", "host": self.host}
        if not self.tls:
            conn["schema"] = "http"
        if oauth_client_id is not None:
            if not self.tls:
                raise ValueError("OAuth M2M needs tls=True: the hook always requests https://<host>/oidc/v1/token")
            conn["login"] = oauth_client_id
            conn["password"] = self.service_principals[oauth_client_id]
            conn["extra"] = {"service_principal_oauth": True}
        else:
            conn["password"] = token if token is not None else self.token
        return json.dumps(conn)

    def env(self, conn_id: str = "databricks_default", **kwargs: Any) -> dict[str, str]:
        """``{"AIRFLOW_CONN_<CONN_ID>": connection_json(**kwargs)}`` for ``monkeypatch.setenv``."""
        return {f"AIRFLOW_CONN_{conn_id.upper()}": self.connection_json(**kwargs)}

    @contextlib.contextmanager
    def trust_ca(self) -> Iterator[None]:
        """Make ``requests`` and ``aiohttp`` in this process trust the self-signed certificate.

        ``requests`` reads ``REQUESTS_CA_BUNDLE``; ``aiohttp`` builds its verifying SSL context once at
        import time, so the certificate is added to that shared context (it stays trusted for the
        rest of the process, which is harmless: the key is throw-away and only serves loopback).
        """
        if self.ca_file is None:
            raise RuntimeError("trust_ca() needs FakeDatabricks(tls=True) and a started server")
        old = os.environ.get("REQUESTS_CA_BUNDLE")
        os.environ["REQUESTS_CA_BUNDLE"] = str(self.ca_file)
        try:
            from aiohttp import connector

            verified = getattr(connector, "_SSL_CONTEXT_VERIFIED", None)
            if isinstance(verified, ssl.SSLContext):
                verified.load_verify_locations(cafile=str(self.ca_file))
        except ImportError:
            pass
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("REQUESTS_CA_BUNDLE", None)
            else:
                os.environ["REQUESTS_CA_BUNDLE"] = old

    # ------------------------------------------------------------------ configuration helpers

    def map_path(self, prefix: str, host_dir: str | os.PathLike[str]) -> None:
        """Resolve ``python_file`` values starting with ``prefix`` under ``host_dir``.

        E.g. ``map_path("dbfs:/", tmp / "dbfs")`` runs ``dbfs:/jobs/step.py`` from
        ``tmp/dbfs/jobs/step.py``; ``map_path("/Volumes/", tmp / "vol")`` likewise.
        """
        with self._cond:
            self._path_mappings.append((prefix, Path(host_dir)))
            self._path_mappings.sort(key=lambda item: len(item[0]), reverse=True)

    def simulate(self, match: str, outcome: SimulatedOutcome | None = None, **kwargs: Any) -> None:
        """Set how a non-executed task ends; ``match`` is a ``task_key`` or a task type name.

        ``task_key`` matches win over task types; unmatched simulated tasks succeed at once. A
        ``spark_python_task`` is simulated instead of executed only when its ``task_key`` matches.
        """
        with self._cond:
            self._outcomes[match] = outcome if outcome is not None else SimulatedOutcome(**kwargs)

    def add_cluster(self, cluster_id: str, state: str = "RUNNING", **spec: Any) -> None:
        """Register an existing (all-purpose) cluster for ``clusters/get``."""
        with self._cond:
            self._clusters[cluster_id] = _Cluster(cluster_id, state, dict(spec))

    def add_service_principal(self, client_id: str, client_secret: str) -> None:
        with self._cond:
            self.service_principals[client_id] = client_secret

    def fail_next(
        self,
        endpoint: str = "*",
        status: int = 503,
        *,
        times: int = 1,
        error_code: str | int | None = None,
        message: str | None = None,
        retry_after: float | None = None,
        method: str | None = None,
    ) -> None:
        """Answer the next ``times`` matching requests with an error instead of serving them.

        Args:
            endpoint: ``"jobs/runs/get"`` (any API version), ``"/oidc/v1/token"`` or ``"*"``.
            status: HTTP status; ``0`` closes the connection without an answer (a reset).
            error_code: Defaults by status (429 ``REQUEST_LIMIT_EXCEEDED``, 503
                ``TEMPORARILY_UNAVAILABLE``, ...).
            retry_after: Value of the ``Retry-After`` header (seconds), if any.
            method: Only match this HTTP method.
        """
        with self._cond:
            self._faults.append(_Fault(endpoint, status, times, error_code, message, retry_after, method))

    def release(self, run_id: int | None = None) -> None:
        """Let runs held ``PENDING`` by ``hold_pending=True`` start (all runs when ``run_id`` is None)."""
        with self._cond:
            for run in self._runs.values():
                if run_id is None or run.run_id == run_id or any(t.run_id == run_id for t in run.tasks):
                    run.released = True
            self._cond.notify_all()

    def force_state(
        self,
        run_id: int,
        life_cycle_state: str,
        result_state: str | None = None,
        state_message: str = "",
        *,
        status_state: str | None = None,
    ) -> None:
        """Report a chosen state for a run or task run until :meth:`clear_forced_state`.

        Use it for states the fake does not reach by itself: ``SKIPPED``, ``INTERNAL_ERROR``,
        ``BLOCKED``, ``WAITING_FOR_RETRY``, ``SUCCESS_WITH_FAILURES`` or a state string that does not
        exist yet. A terminal ``life_cycle_state`` also stops the run's execution.

        Args:
            status_state: The 2.2 ``status.state``; by default derived from ``life_cycle_state``
                (an unknown life cycle state is reported unchanged).
        """
        with self._cond:
            run, task = self._lookup(run_id)
            forced = _Forced(life_cycle_state, result_state, state_message, status_state)
            targets = [task] if task is not None else list(run.tasks)
            if task is None:
                run.forced = forced
            else:
                task.forced = forced
            if life_cycle_state in TERMINAL_LIFE_CYCLE_STATES:
                for t in targets:
                    if task is None and t.forced is None:
                        t.forced = forced
                    if t.life_cycle_state not in TERMINAL_LIFE_CYCLE_STATES and t.stop_reason is None:
                        t.stop_reason = "FORCED"
            self._cond.notify_all()

    def clear_forced_state(self, run_id: int) -> None:
        with self._cond:
            run, task = self._lookup(run_id)
            if task is None:
                run.forced = None
            else:
                task.forced = None

    def revoke_token(self, token: str | None = None) -> None:
        """Make a token invalid from now on (expiry, or revoked by an admin mid-run).

        Every later request with it is answered as the service answers an unknown token: 403
        ``"Invalid access token."`` (``invalid_token_status``). Runs already started go on.
        """
        with self._cond:
            self.tokens.discard(token if token is not None else self.token)

    # ------------------------------------------------------------------ faults of a real network

    def slow_next(self, endpoint: str, seconds: float) -> None:
        """Serve the next ``endpoint`` request at once (it takes effect), but answer it ``seconds`` late.

        A client with a shorter timeout gives up on a request that did happen: a submit that created
        its run although the caller saw a timeout.
        """
        with self._cond:
            self._late.setdefault(endpoint, []).append((seconds, False))

    def drop_response_next(self, endpoint: str) -> None:
        """Serve the next ``endpoint`` request (it takes effect), then close the connection unanswered."""
        with self._cond:
            self._late.setdefault(endpoint, []).append((0.0, True))

    def outage(self, seconds: float) -> None:
        """Answer every request 503 ``TEMPORARILY_UNAVAILABLE`` for ``seconds`` from now.

        The documented body of a workspace that is down for maintenance or overloaded; nothing is served,
        running tasks go on.
        """
        with self._cond:
            self._outage_until = time.monotonic() + seconds

    @property
    def outage_active(self) -> bool:
        return time.monotonic() < self._outage_until

    def end_outage(self) -> None:
        """End an :meth:`outage` now (a test ends it once it has seen what it waits for, not after a guess)."""
        with self._cond:
            self._outage_until = 0.0

    def rate_limit(self, count: int, retry_after: float) -> None:
        """Answer the next ``count`` requests 429 ``REQUEST_LIMIT_EXCEEDED`` with ``Retry-After``."""
        self.fail_next("*", 429, times=count, retry_after=retry_after)

    def delete_run(self, run_id: int, timeout: float = 30.0) -> None:
        """Delete a run remotely, the way a user does it: cancel it, wait until it is over, delete it.

        (``runs/delete`` refuses an active run, so the UI and CLI cancel first.)
        """
        self.cancel(run_id)
        self.wait_until_terminal(run_id, timeout=timeout)
        with self._cond:
            self._delete("2.2", {"run_id": run_id})

    # ------------------------------------------------------------------ DBFS seen from the tests

    @property
    def dbfs_root(self) -> Path:
        """The directory behind ``dbfs:/``: a ``map_path("dbfs:/", ...)`` directory, or the server's own."""
        with self._cond:
            for prefix, directory in self._path_mappings:
                if prefix == "dbfs:/":
                    return directory
        assert self._tmp is not None, "FakeDatabricks is not started"
        return self._tmp / "dbfs"

    def idempotency_token(self, run_id: int) -> str | None:
        """The ``idempotency_token`` a run was submitted with (None without one)."""
        with self._cond:
            run, _ = self._lookup(run_id)
            return run.idempotency_token

    def dbfs_file(self, path: str) -> Path:
        """The local file behind a DBFS path (``dbfs:/x`` or ``/x``)."""
        path = path[len("dbfs:") :] if path.startswith("dbfs:") else path
        return self.dbfs_root / path.lstrip("/")

    def put_file(self, path: str, data: bytes | str) -> str:
        """Place a file in DBFS (``dbfs:/...``) or in a mapped workspace path, as an upload would; returns path."""
        raw = data.encode() if isinstance(data, str) else data
        target = self.dbfs_file(path) if path.startswith("dbfs:") else self._resolve_mapped(path)
        if target is None:
            raise ValueError(f"{path} is neither dbfs:/ nor under a map_path() prefix")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(raw)
        return path

    # ------------------------------------------------------------------ inspection

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request received so far, in order."""
        with self._cond:
            return list(self._requests)

    @property
    def calls(self) -> Counter[str]:
        """Request counts per endpoint (``"jobs/runs/get"``), all API versions and statuses together."""
        with self._cond:
            return Counter(r.endpoint for r in self._requests)

    def count(
        self,
        endpoint: str | None = None,
        *,
        method: str | None = None,
        version: str | None = None,
        status: int | None = None,
    ) -> int:
        """Number of requests matching all the given filters."""
        with self._cond:
            return sum(
                1
                for r in self._requests
                if (endpoint is None or r.endpoint == endpoint)
                and (method is None or r.method == method)
                and (version is None or r.version == version)
                and (status is None or r.status == status)
            )

    def reset_counts(self) -> None:
        with self._cond:
            self._requests.clear()

    @property
    def run_ids(self) -> list[int]:
        """Ids of the (parent) runs, oldest first."""
        with self._cond:
            return sorted(self._runs)

    def task_run_ids(self, run_id: int) -> dict[str, int]:
        """``{task_key: task run id}`` of a run."""
        with self._cond:
            run, _ = self._lookup(run_id)
            return {t.task_key: t.run_id for t in run.tasks}

    def get_run(self, run_id: int, api_version: str = "2.2") -> dict[str, Any]:
        """The ``runs/get`` answer for a run or task run, without going through HTTP."""
        with self._cond:
            run, task = self._lookup(run_id)
            if task is not None:
                return self._task_as_run_json(run, task)
            return self._run_json(run, api_version, tasks=run.tasks)

    def life_cycle_state(self, run_id: int) -> str:
        return str(self.get_run(run_id)["state"]["life_cycle_state"])

    def wait_until(self, run_id: int, *life_cycle_states: str, timeout: float = 30.0) -> dict[str, Any]:
        """Block until the run reports one of ``life_cycle_states``; returns the run."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                run = self.get_run(run_id)
                if run["state"]["life_cycle_state"] in life_cycle_states:
                    return run
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"run {run_id} is {run['state']['life_cycle_state']}, not in {life_cycle_states}"
                    )
                self._cond.wait(min(remaining, 0.1))

    def wait_until_terminal(self, run_id: int, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_until(run_id, *TERMINAL_LIFE_CYCLE_STATES, timeout=timeout)

    def process_of(self, run_id: int) -> subprocess.Popen[bytes] | None:
        """The subprocess of a ``spark_python_task`` run (a single-task run or a task run id)."""
        with self._cond:
            run, task = self._lookup(run_id)
            if task is None:
                task = run.tasks[0]
            return task.process

    # ------------------------------------------------------------------ HTTP dispatch

    def _record(self, method: str, path: str, version: str, endpoint: str, status: int, params: Any) -> None:
        with self._cond:
            self._requests.append(
                RequestRecord(
                    method,
                    path,
                    version,
                    endpoint,
                    status,
                    params if isinstance(params, dict) else {},
                    time.time(),
                )
            )

    def _take_fault(self, endpoint: str, method: str) -> _Fault | None:
        with self._cond:
            for fault in self._faults:
                if fault.endpoint in ("*", endpoint) and (fault.method is None or fault.method == method):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _take_late(self, endpoint: str) -> tuple[float, bool] | None:
        with self._cond:
            queue = self._late.get(endpoint)
            return queue.pop(0) if queue else None

    def _authenticate(self, headers: Any) -> None:
        auth = headers.get("Authorization")
        if not auth or not auth.startswith("Bearer "):
            # Basic auth (user name and password) is not accepted by workspaces any more.
            raise ApiError(401, MSG_NO_CREDENTIAL, 401)
        if auth[len("Bearer ") :].strip() not in self.tokens:
            raise ApiError(self.invalid_token_status, MSG_INVALID_TOKEN, self.invalid_token_status)

    def handle(
        self, method: str, raw_path: str, headers: Any, body: bytes
    ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        """Serve one request: returns (status, JSON body or None to drop the connection, headers)."""
        split = urlsplit(raw_path)
        path = split.path
        match = _ENDPOINT_RE.match(path)
        version, endpoint = (match.group(1), match.group(2)) if match else ("", path)
        params: Any = {}
        try:
            if path == "/oidc/v1/token":
                status, answer, extra = self._oidc_token(method, headers, body)
                self._record(method, path, version, endpoint, status, {})
                return status, answer, extra
            with self._cond:
                down = time.monotonic() < self._outage_until
            if down:
                raise ApiError(503, "The service is temporarily unavailable. Please try again later.",
                               "TEMPORARILY_UNAVAILABLE")
            self._authenticate(headers)
            params = self._params(method, split.query, body)
            handler = self._route(method, version, endpoint)
            fault = self._take_fault(endpoint, method)
            if fault is not None:
                self._record(method, path, version, endpoint, fault.status, params)
                if fault.status == 0:
                    return 0, None, {}
                err = ApiError(fault.status, fault.message or f"Injected {fault.status} error", fault.error_code)
                if fault.status == 429 and fault.message is None:
                    err.message = "Too many requests. Please wait a moment and try again."
                extra_headers = {}
                if fault.retry_after is not None:
                    extra_headers["Retry-After"] = f"{fault.retry_after:g}"
                return fault.status, err.body(), extra_headers
            answer = handler(version, params)
            self._record(method, path, version, endpoint, 200, params)
            late = self._take_late(endpoint)
            if late is not None:
                seconds, drop = late
                time.sleep(seconds)  # the request took effect; only its answer is late (or lost)
                if drop:
                    return 0, None, {}
            return 200, answer, {}
        except ApiError as err:
            self._record(method, path, version, endpoint, err.status, params)
            return err.status, err.body(), err.headers
        except Exception as exc:  # a bug in the fake must still answer like a server would
            log.exception("fake Databricks failed on %s %s", method, raw_path)
            self._record(method, path, version, endpoint, 500, params)
            return 500, {"error_code": "INTERNAL_ERROR", "message": f"{type(exc).__name__}: {exc}"}, {}

    @staticmethod
    def _params(method: str, query: str, body: bytes) -> dict[str, Any]:
        params: dict[str, Any] = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        if body.strip():
            try:
                decoded = json.loads(body)
            except ValueError as exc:
                raise ApiError(400, f"Could not parse request object: {exc}", "MALFORMED_REQUEST") from exc
            if not isinstance(decoded, dict):
                raise ApiError(400, "Could not parse request object: expected a JSON object", "MALFORMED_REQUEST")
            # The provider's async hook sends GET parameters as a JSON body; a body wins over the query.
            params.update(decoded)
        return params

    def _route(self, method: str, version: str, endpoint: str) -> Any:
        routes = {
            ("POST", "jobs/runs/submit"): self._submit,
            ("GET", "jobs/runs/get"): self._get,
            ("GET", "jobs/runs/get-output"): self._get_output,
            ("GET", "jobs/runs/list"): self._list,
            ("POST", "jobs/runs/cancel"): self._cancel_endpoint,
            ("POST", "jobs/runs/delete"): self._delete,
            ("GET", "clusters/get"): self._cluster_get,
            ("GET", "clusters/spark-versions"): self._spark_versions,
            # The DBFS API (2.0 only): docs.databricks.com/api/workspace/dbfs.
            ("GET", "dbfs/get-status"): self._dbfs_get_status,
            ("GET", "dbfs/read"): self._dbfs_read,
            ("GET", "dbfs/list"): self._dbfs_list,
            ("POST", "dbfs/put"): self._dbfs_put,
            ("POST", "dbfs/create"): self._dbfs_create,
            ("POST", "dbfs/add-block"): self._dbfs_add_block,
            ("POST", "dbfs/close"): self._dbfs_close,
            ("POST", "dbfs/mkdirs"): self._dbfs_mkdirs,
            ("POST", "dbfs/delete"): self._dbfs_delete,
            ("POST", "dbfs/move"): self._dbfs_move,
        }
        handler = routes.get((method, endpoint))
        if endpoint.startswith("clusters/"):
            versions: tuple[str, ...] = CLUSTERS_API_VERSIONS
        elif endpoint.startswith("dbfs/"):
            versions = ("2.0",)
        else:
            versions = JOBS_API_VERSIONS
        if handler is None or version not in versions:
            raise ApiError(404, f"No API found for '{method} /{endpoint}'", "ENDPOINT_NOT_FOUND")
        return handler

    # ------------------------------------------------------------------ OAuth M2M

    def _oidc_token(self, method: str, headers: Any, body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        if method != "POST":
            return 405, {"error": "invalid_request", "error_description": "POST required"}, {}
        form = {k: v[-1] for k, v in parse_qs(body.decode(errors="replace")).items()}
        auth = headers.get("Authorization", "")
        client_id = client_secret = None
        if auth.startswith("Basic "):
            with contextlib.suppress(ValueError):
                client_id, _, client_secret = base64.b64decode(auth[6:]).decode().partition(":")
        else:
            client_id, client_secret = form.get("client_id"), form.get("client_secret")
        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type", "error_description": "grant_type"}, {}
        with self._cond:
            known = client_id is not None and self.service_principals.get(client_id) == client_secret
            if not known:
                return (
                    401,
                    {"error": "invalid_client", "error_description": "Client authentication failed"},
                    {},
                )
            token = f"dapi-oauth-{next(self._oauth_counter)}-{random.getrandbits(64):016x}"
            self.tokens.add(token)
        return (
            200,
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": 3600,
                "scope": form.get("scope", "all-apis"),
            },
            {},
        )

    # ------------------------------------------------------------------ runs/submit

    def _submit(self, version: str, body: dict[str, Any]) -> dict[str, Any]:
        token = body.get("idempotency_token")
        if token is not None:
            token = _as_str(token, "idempotency_token")
            if len(token) > MAX_IDEMPOTENCY_TOKEN_LENGTH:
                raise _invalid(
                    f"Idempotency token must have at most {MAX_IDEMPOTENCY_TOKEN_LENGTH} characters, got {len(token)}"
                )
            with self._cond:
                if token in self._tokens_to_runs:
                    return {"run_id": self._tokens_to_runs[token]}
                if token in self._deleted_tokens:
                    raise _invalid(f"The run with idempotency token {token} has been deleted")
        tasks_json = self._tasks_from_request(body)
        run_name = body.get("run_name", "Untitled")
        run_name = _as_str(run_name, "run_name")
        timeout = _as_int(body.get("timeout_seconds", 0), "timeout_seconds", minimum=0)
        job_clusters = self._job_clusters(body.get("job_clusters"))
        environments = {e.get("environment_key") for e in body.get("environments") or [] if isinstance(e, dict)}
        validated = [self._validate_task(t, i, job_clusters, environments) for i, t in enumerate(tasks_json)]
        keys = [t["task_key"] for t in validated]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise _invalid(f"Task keys must be unique within a run; duplicated: {', '.join(dupes)}")
        for t in validated:
            for dep in t.get("depends_on", []):
                if dep["task_key"] not in keys:
                    raise _invalid(
                        f"Task {t['task_key']} depends on {dep['task_key']}, which is not a task of this run"
                    )
        with self._cond:
            # Re-check under the lock: two concurrent submits with one token must make one run.
            if token is not None and token in self._tokens_to_runs:
                return {"run_id": self._tokens_to_runs[token]}
            run_id = next(self._ids)
            run = _Run(
                run_id=run_id,
                job_id=next(self._job_ids),
                run_name=run_name,
                request=body,
                api_version=version,
                tasks=[],
                timeout_seconds=timeout,
                idempotency_token=token,
                start_time=_now_ms(),
            )
            for t in validated:
                task = _TaskRun(
                    run_id=next(self._ids),
                    task_key=t["task_key"],
                    kind=next(k for k in TASK_TYPES if k in t),
                    settings=t,
                    depends_on=[d["task_key"] for d in t.get("depends_on", [])],
                    run_if=t.get("run_if", "ALL_SUCCESS"),
                    timeout_seconds=_as_int(t.get("timeout_seconds", 0), "timeout_seconds", minimum=0),
                )
                if self.queued_seconds > 0 and not task.depends_on:
                    # With queueing, a submitted run is QUEUED from the first read on ("QUEUED: the run
                    # is queued", Jobs API RunLifeCycleState), never PENDING before it: set at creation,
                    # not when the executor thread gets to it.
                    task.life_cycle_state = "QUEUED"
                run.tasks.append(task)
                self._task_index[task.run_id] = (run, task)
            self._runs[run_id] = run
            if token is not None:
                self._tokens_to_runs[token] = run_id
            for task in run.tasks:
                task.thread = threading.Thread(
                    target=self._task_worker,
                    args=(run, task),
                    name=f"fake-dbx-task-{task.run_id}",
                    daemon=True,
                )
                task.thread.start()
        return {"run_id": run_id}

    @staticmethod
    def _tasks_from_request(body: dict[str, Any]) -> list[dict[str, Any]]:
        if "tasks" in body:
            tasks = body["tasks"]
            if not isinstance(tasks, list) or not tasks:
                raise _invalid("tasks must be a non-empty array of task settings")
            if len(tasks) > MAX_TASKS_PER_RUN:
                raise _invalid(f"A run can have at most {MAX_TASKS_PER_RUN} tasks, got {len(tasks)}")
            if not all(isinstance(t, dict) for t in tasks):
                raise _invalid("tasks must be an array of objects")
            return tasks
        # The legacy (Jobs API 2.0) single-task form, which the provider's operators still send when a
        # task type is given as a top-level field: the service turns it into a one-task run.
        kinds = [k for k in TASK_TYPES if k in body]
        if not kinds:
            raise _invalid("One of the following fields must be set: tasks, " + ", ".join(TASK_TYPES[:5]))
        task: dict[str, Any] = {"task_key": _legacy_task_key(body.get("run_name"))}
        # timeout_seconds stays on the run: in this form it limits the whole run.
        for name in (*TASK_TYPES, "existing_cluster_id", "new_cluster", "libraries"):
            if name in body:
                task[name] = body[name]
        return [task]

    def _job_clusters(self, value: Any) -> set[str]:
        if value is None:
            return set()
        if not isinstance(value, list):
            raise _invalid("job_clusters must be an array")
        keys = set()
        for i, jc in enumerate(value):
            if not isinstance(jc, dict) or "job_cluster_key" not in jc or "new_cluster" not in jc:
                raise _invalid(f"job_clusters[{i}] needs job_cluster_key and new_cluster")
            self._validate_new_cluster(jc["new_cluster"], f"job_clusters[{i}].new_cluster")
            keys.add(jc["job_cluster_key"])
        return keys

    def _validate_task(
        self, task: dict[str, Any], index: int, job_clusters: set[str], environments: set[Any]
    ) -> dict[str, Any]:
        where = f"tasks[{index}]"
        key = task.get("task_key")
        if key is None:
            raise _invalid(f"Missing required field: {where}.task_key")
        if not isinstance(key, str) or not _TASK_KEY_RE.match(key):
            raise _invalid(f"Invalid {where}.task_key {key!r}: use 1-100 letters, digits, underscores or hyphens")
        kinds = [k for k in TASK_TYPES if k in task]
        if len(kinds) != 1:
            raise _invalid(
                f"Task {key} must set exactly one task type ({', '.join(TASK_TYPES[:5])}, ...); got {kinds or 'none'}"
            )
        kind = kinds[0]
        spec = task[kind]
        if not isinstance(spec, dict):
            raise _invalid(f"{where}.{kind} must be an object")
        required = {
            "spark_python_task": "python_file",
            "python_wheel_task": "package_name",
            "notebook_task": "notebook_path",
            "pipeline_task": "pipeline_id",
            "run_job_task": "job_id",
        }.get(kind)
        if required is not None and not spec.get(required):
            raise _invalid(f"Missing required field: {where}.{kind}.{required}")
        if kind == "python_wheel_task" and not spec.get("entry_point"):
            raise _invalid(f"Missing required field: {where}.python_wheel_task.entry_point")
        if kind == "spark_jar_task" and not (spec.get("main_class_name") or spec.get("jar_uri")):
            raise _invalid(f"Missing required field: {where}.spark_jar_task.main_class_name")
        if kind in ("spark_python_task", "spark_submit_task", "spark_jar_task") and "parameters" in spec:
            _str_list(spec["parameters"], f"{where}.{kind}.parameters")
        if kind == "spark_python_task":
            _as_str(spec["python_file"], f"{where}.spark_python_task.python_file")
            source = spec.get("source", "WORKSPACE")
            if source not in ("WORKSPACE", "GIT"):
                raise _invalid(f"Invalid {where}.spark_python_task.source {source!r}: use WORKSPACE or GIT")
            _check_python_file(spec["python_file"], source, where)
        if kind == "python_wheel_task" and "parameters" in spec:
            _str_list(spec["parameters"], f"{where}.python_wheel_task.parameters")
        if kind == "notebook_task" and "base_parameters" in spec:
            _str_map(spec["base_parameters"], f"{where}.notebook_task.base_parameters")

        computes = [
            c for c in ("existing_cluster_id", "new_cluster", "job_cluster_key", "environment_key") if c in task
        ]
        if len(computes) > 1:
            raise _invalid(f"Task {key} sets more than one of {', '.join(computes)}; choose one")
        needs_compute = kind not in ("condition_task", "run_job_task", "pipeline_task", "sql_task")
        if not computes and needs_compute and not self.serverless:
            raise _invalid(
                f"Task {key} needs compute: set existing_cluster_id, new_cluster or job_cluster_key "
                "(this workspace has no serverless jobs)"
            )
        if "existing_cluster_id" in task:
            _as_str(task["existing_cluster_id"], f"{where}.existing_cluster_id")
        if "new_cluster" in task:
            self._validate_new_cluster(task["new_cluster"], f"{where}.new_cluster")
        if "job_cluster_key" in task and task["job_cluster_key"] not in job_clusters:
            raise _invalid(f"Task {key} refers to job_cluster_key {task['job_cluster_key']!r}, not in job_clusters")
        if "environment_key" in task and environments and task["environment_key"] not in environments:
            raise _invalid(f"Task {key} refers to environment_key {task['environment_key']!r}, not in environments")
        if "libraries" in task:
            libs = task["libraries"]
            if not isinstance(libs, list):
                raise _invalid(f"{where}.libraries must be an array")
            for i, lib in enumerate(libs):
                if not isinstance(lib, dict) or len([k for k in LIBRARY_KINDS if k in lib]) != 1:
                    raise _invalid(f"{where}.libraries[{i}] must set exactly one of {', '.join(LIBRARY_KINDS)}")
                if "pypi" in lib and not (isinstance(lib["pypi"], dict) and lib["pypi"].get("package")):
                    raise _invalid(f"Missing required field: {where}.libraries[{i}].pypi.package")
                if "maven" in lib and not (isinstance(lib["maven"], dict) and lib["maven"].get("coordinates")):
                    raise _invalid(f"Missing required field: {where}.libraries[{i}].maven.coordinates")
        if "timeout_seconds" in task:
            _as_int(task["timeout_seconds"], f"{where}.timeout_seconds", minimum=0)
        deps = task.get("depends_on", [])
        if not isinstance(deps, list) or not all(isinstance(d, dict) and "task_key" in d for d in deps):
            raise _invalid(f'{where}.depends_on must be an array of {{"task_key": ...}} objects')
        run_if = task.get("run_if", "ALL_SUCCESS")
        if run_if not in (
            "ALL_SUCCESS",
            "ALL_DONE",
            "NONE_FAILED",
            "AT_LEAST_ONE_SUCCESS",
            "ALL_FAILED",
            "AT_LEAST_ONE_FAILED",
        ):
            raise _invalid(f"Invalid {where}.run_if {run_if!r}")
        return task

    @staticmethod
    def _validate_new_cluster(spec: Any, where: str) -> None:
        if not isinstance(spec, dict):
            raise _invalid(f"{where} must be an object")
        if not spec.get("spark_version"):
            raise _invalid(f"Missing required field: {where}.spark_version")
        _as_str(spec["spark_version"], f"{where}.spark_version")
        if not (spec.get("node_type_id") or spec.get("instance_pool_id") or spec.get("policy_id")):
            raise _invalid(f"Missing required field: {where}.node_type_id (or instance_pool_id)")
        if "num_workers" in spec:
            _as_int(spec["num_workers"], f"{where}.num_workers", minimum=0)
        if "autoscale" in spec:
            auto = spec["autoscale"]
            if not isinstance(auto, dict) or "min_workers" not in auto or "max_workers" not in auto:
                raise _invalid(f"{where}.autoscale needs min_workers and max_workers")
            low = _as_int(auto["min_workers"], f"{where}.autoscale.min_workers", minimum=0)
            high = _as_int(auto["max_workers"], f"{where}.autoscale.max_workers", minimum=1)
            if low > high:
                raise _invalid(f"{where}.autoscale.min_workers ({low}) must not exceed max_workers ({high})")
        if "spark_conf" in spec:
            _str_map(spec["spark_conf"], f"{where}.spark_conf")
        if "spark_env_vars" in spec:
            _str_map(spec["spark_env_vars"], f"{where}.spark_env_vars")

    # ------------------------------------------------------------------ runs/get, get-output, list

    def _lookup(self, run_id: int) -> tuple[_Run, _TaskRun | None]:
        if run_id in self._runs:
            return self._runs[run_id], None
        if run_id in self._task_index:
            return self._task_index[run_id]
        # The real service answers 400 INVALID_PARAMETER_VALUE "Run <id> does not exist." (the SDKs remap
        # exactly this to ResourceDoesNotExist), not a 404.
        raise _invalid(f"Run {run_id} does not exist.")

    @staticmethod
    def _run_id_param(params: dict[str, Any]) -> int:
        if "run_id" not in params:
            raise _invalid("Missing required field: run_id")
        return _as_int(params["run_id"], "run_id")

    def _get(self, version: str, params: dict[str, Any]) -> dict[str, Any]:
        run_id = self._run_id_param(params)
        with self._cond:
            run, task = self._lookup(run_id)
            if task is not None:
                return self._task_as_run_json(run, task)
            tasks = run.tasks
            answer_extra: dict[str, Any] = {}
            if version == "2.2":
                offset = _decode_token(params["page_token"]) if params.get("page_token") else 0
                tasks = run.tasks[offset : offset + self.tasks_page_size]
                if offset + self.tasks_page_size < len(run.tasks):
                    answer_extra["next_page_token"] = _encode_token(offset + self.tasks_page_size)
                if offset:
                    answer_extra["prev_page_token"] = _encode_token(max(0, offset - self.tasks_page_size))
            answer = self._run_json(run, version, tasks=tasks)
            answer.update(answer_extra)
            if _as_bool(params.get("include_history", False), "include_history"):
                state, status = self._parent_state(run)
                answer["repair_history"] = [
                    {
                        "type": "ORIGINAL",
                        "start_time": run.start_time,
                        "end_time": self._run_end_time(run),
                        "state": state,
                        "status": status,
                        "task_run_ids": [t.run_id for t in run.tasks],
                    }
                ]
            return answer

    def _get_output(self, version: str, params: dict[str, Any]) -> dict[str, Any]:
        run_id = self._run_id_param(params)
        with self._cond:
            run, task = self._lookup(run_id)
            if task is None:
                # Since Jobs API 2.1 every run is a multi-task run, even with a single task.
                raise _invalid(MSG_MULTI_TASK_OUTPUT)
            answer: dict[str, Any] = {"metadata": self._task_as_run_json(run, task)}
            if task.kind in ("spark_python_task", "python_wheel_task", "spark_jar_task") or task.logs_total:
                answer["logs"] = task.logs[-self.logs_limit_bytes :].decode("utf-8", errors="replace")
                answer["logs_truncated"] = task.logs_total > self.logs_limit_bytes
            if task.kind == "notebook_task" and task.life_cycle_state in TERMINAL_LIFE_CYCLE_STATES:
                answer["notebook_output"] = (
                    {"result": task.notebook_result, "truncated": False} if task.notebook_result is not None else {}
                )
            if task.error is not None:
                answer["error"] = task.error
            if task.error_trace is not None:
                answer["error_trace"] = task.error_trace
            return answer

    def _list(self, version: str, params: dict[str, Any]) -> dict[str, Any]:
        """``GET jobs/runs/list``, as the Jobs API reference (ListRunsRequest / ListRunsResponse) describes it."""
        active_only = _as_bool(params.get("active_only", False), "active_only")
        completed_only = _as_bool(params.get("completed_only", False), "completed_only")
        # "active_only ... This field cannot be true when completed_only is true" (and vice versa).
        if active_only and completed_only:
            raise _invalid("active_only and completed_only cannot both be true")
        expand = _as_bool(params.get("expand_tasks", False), "expand_tasks")
        # limit: "This value must be greater than 0 and less or equal to 25. The default value is 25" (2.1);
        # 2.2: "The default value is 20". "If a request specifies a limit of 0, the service instead uses the
        # maximum limit." Anything else is refused: 400 INVALID_PARAMETER_VALUE.
        default_limit = 20 if version == "2.2" else 25
        limit = _as_int(params.get("limit", default_limit), "limit", minimum=0)
        if limit > MAX_LIST_LIMIT:
            raise _invalid(f"limit must be between 0 and {MAX_LIST_LIMIT}, got {limit}")
        limit = limit or MAX_LIST_LIMIT
        # page_token: "Use next_page_token or prev_page_token returned from the previous request to list the
        # next or previous page of runs"; offset: "Deprecated since June 2023", still honoured without a token.
        # The double's tokens are offsets into the current list (opaque to clients, like the real ones), so a
        # run that ends between two pages shifts the next page, as an offset-paged service may.
        if params.get("page_token"):
            offset = _decode_token(params["page_token"])
        else:
            offset = _as_int(params.get("offset", 0), "offset", minimum=0)
        # run_type: "JOB_RUN", "WORKFLOW_RUN" or "SUBMIT_RUN" (RunType); every run here is a one-time submit.
        run_type = params.get("run_type")
        if run_type is not None and run_type not in ("JOB_RUN", "WORKFLOW_RUN", "SUBMIT_RUN"):
            raise _invalid(f"Invalid run_type {run_type!r}: use JOB_RUN, WORKFLOW_RUN or SUBMIT_RUN")
        job_id = _as_int(params["job_id"], "job_id") if "job_id" in params else None
        start_from = _as_int(params["start_time_from"], "start_time_from") if "start_time_from" in params else None
        start_to = _as_int(params["start_time_to"], "start_time_to") if "start_time_to" in params else None
        with self._cond:
            # "List runs in descending order by start time" ("from most recently started to least").
            runs = sorted(self._runs.values(), key=lambda r: (r.start_time, r.run_id), reverse=True)
            selected = []
            for run in runs:
                state, _ = self._parent_state(run)
                # "If active_only is true, only active runs are included": every life cycle state but the
                # terminal ones (QUEUED, PENDING, RUNNING, TERMINATING, BLOCKED, WAITING_FOR_RETRY).
                # "completed_only": only runs in a terminal state. A deleted run is in neither.
                terminal = state["life_cycle_state"] in TERMINAL_LIFE_CYCLE_STATES
                if (active_only and terminal) or (completed_only and not terminal):
                    continue
                if run_type is not None and run_type != "SUBMIT_RUN":
                    continue
                if job_id is not None and run.job_id != job_id:
                    continue
                # start_time_from / start_time_to: "Show runs that started at or after / at or before".
                if start_from is not None and run.start_time < start_from:
                    continue
                if start_to is not None and run.start_time > start_to:
                    continue
                selected.append(run)
            page = selected[offset : offset + limit]
            # has_more: "If true, additional runs matching the provided filter are available for listing";
            # always present, next_page_token only when there is a next page, prev_page_token after the first.
            answer: dict[str, Any] = {"has_more": offset + limit < len(selected)}
            if page:
                answer["runs"] = [self._list_entry(r, version, expand) for r in page]
            if answer["has_more"]:
                answer["next_page_token"] = _encode_token(offset + limit)
            if offset > 0:
                answer["prev_page_token"] = _encode_token(max(0, offset - limit))
            return answer

    def _list_entry(self, run: _Run, version: str, expand: bool) -> dict[str, Any]:
        """One run of a list: expand_tasks "Whether to include task and cluster details in the response.
        Note that only the first 100 elements will be shown" (runs/get pages through the rest). Without it
        an entry has no ``tasks``: a client must not need them to read a run's state."""
        return self._run_json(run, version, tasks=run.tasks[: self.tasks_page_size] if expand else None)

    # ------------------------------------------------------------------ runs/cancel, runs/delete

    def _cancel_endpoint(self, version: str, params: dict[str, Any]) -> dict[str, Any]:
        self.cancel(self._run_id_param(params))
        return {}

    def cancel(self, run_id: int) -> None:
        """Cancel a run or task run as ``runs/cancel`` does (idempotent; asynchronous like the real one)."""
        with self._cond:
            run, task = self._lookup(run_id)
            targets = [task] if task is not None else run.tasks
            if task is None and not self._run_is_terminal(run):
                run.cancel_requested = True
            for t in targets:
                if t.life_cycle_state not in TERMINAL_LIFE_CYCLE_STATES and t.stop_reason is None:
                    t.stop_reason = "CANCELED"
            self._cond.notify_all()

    def _delete(self, version: str, params: dict[str, Any]) -> dict[str, Any]:
        run_id = self._run_id_param(params)
        with self._cond:
            run, task = self._lookup(run_id)
            if task is not None:
                raise _invalid(f"Run {run_id} is a task run; delete its parent run {run.run_id} instead.")
            if not self._run_is_terminal(run):
                raise ApiError(400, f"Run {run_id} is active and cannot be deleted; cancel it first.", "INVALID_STATE")
            del self._runs[run_id]
            for t in run.tasks:
                self._task_index.pop(t.run_id, None)
            if run.idempotency_token is not None:
                self._tokens_to_runs.pop(run.idempotency_token, None)
                self._deleted_tokens.add(run.idempotency_token)
        return {}

    # ------------------------------------------------------------------ DBFS API 2.0

    def _dbfs_target(self, params: dict[str, Any]) -> tuple[str, Path]:
        path = _as_str(params.get("path", ""), "path")
        # "The path of the file or directory. The path should be the absolute DBFS path."
        if not path.startswith("/"):
            raise _invalid(f"Path must be absolute: {path}")
        root = self.dbfs_root
        target = (root / path.lstrip("/")).resolve()
        if target != root.resolve() and root.resolve() not in target.parents:
            raise _invalid(f"Invalid path: {path}")
        return path, target

    @staticmethod
    def _not_found(path: str) -> ApiError:
        # "If the file or directory does not exist, this call throws an exception with RESOURCE_DOES_NOT_EXIST."
        return ApiError(404, f"No file or directory exists on path {path}.", "RESOURCE_DOES_NOT_EXIST")

    @staticmethod
    def _decode_b64(value: Any, name: str) -> bytes:
        try:
            return base64.b64decode(_as_str(value, name), validate=True)
        except (ValueError, TypeError) as exc:
            raise _invalid(f"Invalid base64 in {name}") from exc

    def _file_info(self, path: str, target: Path) -> dict[str, Any]:
        stat = target.stat()
        return {
            "path": path,
            "is_dir": target.is_dir(),
            "file_size": 0 if target.is_dir() else stat.st_size,
            "modification_time": int(stat.st_mtime * 1000),
        }

    def _dbfs_get_status(self, version: str, params: dict[str, Any]) -> dict[str, Any]:
        path, target = self._dbfs_target(params)
        if not target.exists():
            raise self._not_found(path)
        return self._file_info(path, target)

    def _dbfs_list(self, version: str, params: dict[str, Any]) -> dict[str, Any]:
        path, target = self._dbfs_target(params)
        if not target.exists():
            raise self._not_found(path)
        if not target.is_dir():
            return {"files": [self._file_info(path, target)]}
        base = path.rstrip("/")
        return {"files": [self._file_info(f"{base}/{child.name}", child) for child in sorted(target.iterdir())]}

    def _dbfs_read(self, version: str, params: dict[str, Any]) -> dict[str, Any]:
        path, target = self._dbfs_target(params)
        offset = _as_int(params.get("offset", 0), "offset")
        length = _as_int(params.get("length", DBFS_DEFAULT_READ), "length")
        if not target.exists():
            raise self._not_found(path)
        # "If the path is a directory, the read length is negative, or if the offset is negative, this call
        # throws an exception with INVALID_PARAMETER_VALUE. If the read length exceeds 1 MB, this call throws
        # an exception with MAX_READ_SIZE_EXCEEDED."
        if target.is_dir() or length < 0 or offset < 0:
            raise _invalid(f"Cannot read {path} at offset {offset} with length {length}")
        if length > DBFS_MAX_BYTES:
            raise ApiError(400, f"Cannot read more than {DBFS_MAX_BYTES} bytes at once, got {length}",
                           "MAX_READ_SIZE_EXCEEDED")
        with target.open("rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        return {"bytes_read": len(data), "data": base64.b64encode(data).decode()}

    def _dbfs_write(self, path: str, target: Path, data: bytes, overwrite: bool) -> None:
        if target.is_dir():
            raise _invalid(f"Path {path} is a directory")
        if target.exists() and not overwrite:
            # "If the file already exists and overwrite is false, this call throws RESOURCE_ALREADY_EXISTS."
            raise ApiError(400, f"File {path} already exists.", "RESOURCE_ALREADY_EXISTS")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part-{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def _dbfs_put(self, version: str, params: dict[str, Any]) -> dict[str, Any]:
        path, target = self._dbfs_target(params)
        data = self._decode_b64(params.get("contents", ""), "contents")
        # "The amount of data that can be passed (when not streaming) using the contents parameter is limited
        # to 1 MB. MAX_BLOCK_SIZE_EXCEEDED is thrown if this limit is exceeded."
        if len(data) > DBFS_MAX_BYTES:
            raise ApiError(400, f"The contents exceed the {DBFS_MAX_BYTES} byte limit of an inline put; "
                           "use create, add-block and close", "MAX_BLOCK_SIZE_EXCEEDED")
        self._dbfs_write(path, target, data, _as_bool(params.get("overwrite", False), "overwrite"))
        return {}

    def _dbfs_create(self, version: str, params: dict[str, Any]) -> dict[str, Any]:
        path, target = self._dbfs_target(params)
        overwrite = _as_bool(params.get("overwrite", False), "overwrite")
        if target.exists() and not overwrite:
            raise ApiError(400, f"File {path} already exists.", "RESOURCE_ALREADY_EXISTS")
        if target.is_dir():
            raise _invalid(f"Path {path} is a directory")
        # The reference does not say that a reader is kept from a file while a stream writes it ("Opens a
        # stream to write to a file"), so the stricter reading: the file is there, truncated, from create on,
        # and each add-block appends to what readers see; close only ends the stream.
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"")
        with self._cond:
            handle = next(self._handle_ids)
            self._dbfs_handles[handle] = (path, bytearray())
        return {"handle": handle}

    def _dbfs_add_block(self, version: str, params: dict[str, Any]) -> dict[str, Any]:
        handle = _as_int(params.get("handle", -1), "handle")
        data = self._decode_b64(params.get("data", ""), "data")
        if len(data) > DBFS_MAX_BYTES:
            raise ApiError(400, f"The block exceeds {DBFS_MAX_BYTES} bytes", "MAX_BLOCK_SIZE_EXCEEDED")
        with self._cond:
            if handle not in self._dbfs_handles:
                raise ApiError(404, f"No stream with handle {handle}", "RESOURCE_DOES_NOT_EXIST")
            path, written = self._dbfs_handles[handle]
            written.extend(data)
        _, target = self._dbfs_target({"path": path})
        with target.open("ab") as fh:
            fh.write(data)
        return {}

    def _dbfs_close(self, version: str, params: dict[str, Any]) -> dict[str, Any]:
        handle = _as_int(params.get("handle", -1), "handle")
        with self._cond:
            if handle not in self._dbfs_handles:
                raise ApiError(404, f"No stream with handle {handle}", "RESOURCE_DOES_NOT_EXIST")
            self._dbfs_handles.pop(handle)
        return {}

    def _dbfs_move(self, version: str, params: dict[str, Any]) -> dict[str, Any]:
        # "If the source file does not exist, this call throws an exception with RESOURCE_DOES_NOT_EXIST. If a
        # file already exists in the destination path, this call throws an exception with
        # RESOURCE_ALREADY_EXISTS." (docs.databricks.com/api/workspace/dbfs/move)
        source, source_target = self._dbfs_target({"path": params.get("source_path", "")})
        destination, destination_target = self._dbfs_target({"path": params.get("destination_path", "")})
        with self._cond:
            if not source_target.exists():
                raise self._not_found(source)
            if destination_target.exists():
                raise ApiError(400, f"A file or directory already exists at {destination}.",
                               "RESOURCE_ALREADY_EXISTS")
            destination_target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(source_target, destination_target)
        self.dbfs_moves.append((source, destination))
        return {}

    def _dbfs_mkdirs(self, version: str, params: dict[str, Any]) -> dict[str, Any]:
        path, target = self._dbfs_target(params)
        if target.is_file():
            raise ApiError(400, f"A file exists at {path}", "RESOURCE_ALREADY_EXISTS")
        target.mkdir(parents=True, exist_ok=True)
        return {}

    def _dbfs_delete(self, version: str, params: dict[str, Any]) -> dict[str, Any]:
        path, target = self._dbfs_target(params)
        recursive = _as_bool(params.get("recursive", False), "recursive")
        # The reference documents only IO_ERROR ("if the path is a non-empty directory and recursive is set
        # to false"); a missing path is not documented as an error, so it is none here.
        if not target.exists():
            return {}
        if target.is_dir():
            if any(target.iterdir()) and not recursive:
                raise ApiError(400, f"Directory {path} is not empty; use recursive", "IO_ERROR")
            shutil.rmtree(target)
        else:
            target.unlink()
        return {}

    # ------------------------------------------------------------------ clusters

    def _cluster_get(self, version: str, params: dict[str, Any]) -> dict[str, Any]:
        cluster_id = params.get("cluster_id")
        if not cluster_id:
            raise _invalid("Missing required field: cluster_id")
        with self._cond:
            cluster = self._clusters.get(str(cluster_id))
            if cluster is None:
                raise _invalid(f"Cluster {cluster_id} does not exist")
            answer = {
                "cluster_id": cluster.cluster_id,
                "cluster_name": cluster.spec.get("cluster_name", f"job-cluster-{cluster.cluster_id}"),
                "state": cluster.state,
                "state_message": cluster.state_message,
                "spark_version": cluster.spec.get("spark_version", "15.4.x-scala2.12"),
                "node_type_id": cluster.spec.get("node_type_id", "i3.xlarge"),
                "cluster_source": "JOB" if cluster.ephemeral else "UI",
            }
            for key in ("num_workers", "autoscale", "spark_conf", "spark_env_vars"):
                if key in cluster.spec:
                    answer[key] = cluster.spec[key]
            return answer

    def _spark_versions(self, version: str, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "versions": [
                {"key": "15.4.x-scala2.12", "name": "15.4 LTS (includes Apache Spark 3.5.0, Scala 2.12)"},
                {"key": "16.4.x-scala2.12", "name": "16.4 LTS (includes Apache Spark 3.5.2, Scala 2.12)"},
            ]
        }

    def _cluster_for(self, task: _TaskRun) -> str | None:
        settings = task.settings
        if "existing_cluster_id" in settings:
            cluster_id = settings["existing_cluster_id"]
            if cluster_id not in self._clusters:
                self._clusters[cluster_id] = _Cluster(cluster_id, "RUNNING", {})
            return cluster_id
        spec = settings.get("new_cluster")
        if spec is None and "job_cluster_key" in settings:
            run, _ = self._task_index[task.run_id]
            for jc in run.request.get("job_clusters", []):
                if jc.get("job_cluster_key") == settings["job_cluster_key"]:
                    spec = jc["new_cluster"]
        if spec is None:
            return None
        stamp = time.strftime("%m%d-%H%M%S", time.gmtime())
        cluster_id = f"{stamp}-{random.getrandbits(32):08x}"
        self._clusters[cluster_id] = _Cluster(cluster_id, "PENDING", dict(spec), "Starting Spark", ephemeral=True)
        return cluster_id

    def _set_cluster_state(self, cluster_id: str | None, state: str, message: str = "") -> None:
        cluster = self._clusters.get(cluster_id or "")
        if cluster is not None and cluster.ephemeral:
            cluster.state, cluster.state_message = state, message

    # ------------------------------------------------------------------ JSON views

    def _state_json(
        self,
        life_cycle_state: str,
        result_state: str | None,
        message: str,
        ucot: bool,
        forced: _Forced | None,
        termination: tuple[str, str, str] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        status_state = None
        if forced is not None:
            life_cycle_state, result_state, message = (
                forced.life_cycle_state,
                forced.result_state,
                forced.state_message,
            )
            status_state = forced.status_state
        state: dict[str, Any] = {
            "life_cycle_state": life_cycle_state,
            "state_message": message,
            "user_cancelled_or_timedout": ucot,
        }
        # "result_state: This field is only available for terminal lifecycle states."
        if result_state is not None:
            state["result_state"] = result_state
        if life_cycle_state == "QUEUED":
            state["queue_reason"] = "Queued due to reaching the workspace limit of active task runs."
        status: dict[str, Any] = {"state": status_state or _V2_STATE.get(life_cycle_state, life_cycle_state)}
        if life_cycle_state == "QUEUED":
            status["queue_details"] = {"code": "ACTIVE_RUNS_LIMIT_REACHED", "message": state["queue_reason"]}
        if status["state"] in ("TERMINATING", "TERMINATED"):
            if life_cycle_state == "INTERNAL_ERROR":
                code, kind = "INTERNAL_ERROR", "INTERNAL_ERROR"
            elif life_cycle_state == "SKIPPED":
                code, kind = "SKIPPED", "SUCCESS"
            elif termination is not None and status["state"] == "TERMINATED":
                code, kind, message = termination
            else:
                code, kind = _TERMINATION.get(result_state or "", ("SUCCESS", "SUCCESS"))
            status["termination_details"] = {"code": code, "type": kind, "message": message}
        return state, status

    def _task_state(self, task: _TaskRun) -> tuple[dict[str, Any], dict[str, Any]]:
        return self._state_json(
            task.life_cycle_state,
            task.result_state,
            task.state_message,
            task.user_cancelled_or_timedout,
            task.forced,
            task.termination,
        )

    def _run_is_terminal(self, run: _Run) -> bool:
        state, _ = self._parent_state(run)
        return state["life_cycle_state"] in TERMINAL_LIFE_CYCLE_STATES

    def _run_end_time(self, run: _Run) -> int:
        if all(t.life_cycle_state in TERMINAL_LIFE_CYCLE_STATES for t in run.tasks):
            return max((t.end_time for t in run.tasks), default=0)
        return 0

    def _parent_state(self, run: _Run) -> tuple[dict[str, Any], dict[str, Any]]:
        tasks = run.tasks
        lcs = [t.life_cycle_state for t in tasks]
        results = [t.result_state for t in tasks]
        result: str | None = None
        message = ""
        ucot = run.cancel_requested or run.timed_out or any(t.user_cancelled_or_timedout for t in tasks)
        if all(s in TERMINAL_LIFE_CYCLE_STATES for s in lcs):
            life = "TERMINATED"
            failed = [t for t in tasks if t.result_state in ("FAILED", "TIMEDOUT", "UPSTREAM_FAILED")]
            if run.cancel_requested or "CANCELED" in results:
                result, message = "CANCELED", "Run cancelled."
            elif run.timed_out or "TIMEDOUT" in results:
                result = "TIMEDOUT"
                message = f"Run timed out after {run.timeout_seconds or max(t.timeout_seconds for t in tasks)} seconds."
            elif "INTERNAL_ERROR" in lcs:
                life, result = "INTERNAL_ERROR", "FAILED"
                message = next(t.state_message for t in tasks if t.life_cycle_state == "INTERNAL_ERROR")
            elif failed:
                dependents = {d for t in tasks for d in t.depends_on}
                leaves = [t for t in tasks if t.task_key not in dependents]
                leaves_ok = all(t.result_state == "SUCCESS" for t in leaves)
                result = "SUCCESS_WITH_FAILURES" if leaves_ok else "FAILED"
                first = next((t for t in failed if t.result_state != "UPSTREAM_FAILED"), failed[0])
                message = (
                    f"Task {first.task_key} failed with message: {first.state_message}. "
                    "This caused all downstream tasks to get skipped."
                )
            elif all(s == "SKIPPED" for s in lcs):
                life, result = "SKIPPED", None
            else:
                result = "SUCCESS"
        elif "RUNNING" in lcs or any(s in TERMINAL_LIFE_CYCLE_STATES for s in lcs):
            if all(s in TERMINAL_LIFE_CYCLE_STATES or s == "TERMINATING" for s in lcs):
                life = "TERMINATING"
            else:
                life = "RUNNING"
        elif "TERMINATING" in lcs:
            life = "TERMINATING"
        elif "PENDING" in lcs or "BLOCKED" in lcs:
            life = "PENDING"
        elif "QUEUED" in lcs:
            life = "QUEUED"
        else:
            life = lcs[0]
        # A one-task run reports its task's termination details (what ended the run is what ended the task).
        termination = next((t.termination for t in tasks if t.termination is not None), None)
        return self._state_json(life, result, message, ucot, run.forced, termination)

    def _durations(self, task: _TaskRun) -> dict[str, int]:
        now = _now_ms()
        started = task.start_time
        setup = ((task.exec_start or (task.end_time or now)) - started) if started else 0
        execution = ((task.exec_end or task.end_time or now) - task.exec_start) if task.exec_start else 0
        cleanup = ((task.end_time or now) - task.exec_end) if task.exec_end else 0
        return {
            "setup_duration": max(setup, 0),
            "execution_duration": max(execution, 0),
            "cleanup_duration": max(cleanup, 0),
        }

    def _page_url(self, job_id: int, run_id: int) -> str:
        return f"{self.url}/?o={self.workspace_id}#job/{job_id}/run/{run_id}"

    def _task_json(self, run: _Run, task: _TaskRun) -> dict[str, Any]:
        state, status = self._task_state(task)
        answer: dict[str, Any] = {
            "run_id": task.run_id,
            "task_key": task.task_key,
            "state": state,
            "status": status,
            "start_time": task.start_time,
            "end_time": task.end_time,
            **self._durations(task),
            "run_duration": ((task.end_time or _now_ms()) - task.start_time) if task.start_time else 0,
            "attempt_number": 0,
            "run_page_url": self._page_url(run.job_id, task.run_id),
            "run_if": task.run_if,
        }
        for key in (
            task.kind,
            "existing_cluster_id",
            "new_cluster",
            "job_cluster_key",
            "environment_key",
            "libraries",
            "timeout_seconds",
            "depends_on",
            "description",
        ):
            if key in task.settings:
                answer[key] = task.settings[key]
        if task.cluster_id is not None:
            instance = {"cluster_id": task.cluster_id}
            if task.spark_context_id is not None:
                instance["spark_context_id"] = task.spark_context_id
            answer["cluster_instance"] = instance
        return answer

    def _task_as_run_json(self, run: _Run, task: _TaskRun) -> dict[str, Any]:
        answer = self._task_json(run, task)
        answer.update(
            {
                "job_id": run.job_id,
                "run_name": run.run_name,
                "run_type": "SUBMIT_RUN",
                "number_in_job": task.run_id,
                "creator_user_name": self.user_name,
                "original_attempt_run_id": task.run_id,
                "parent_run_id": run.run_id,
            }
        )
        return answer

    def _run_json(self, run: _Run, version: str, *, tasks: list[_TaskRun] | None) -> dict[str, Any]:
        state, status = self._parent_state(run)
        end_time = self._run_end_time(run)
        answer: dict[str, Any] = {
            "job_id": run.job_id,
            "run_id": run.run_id,
            "number_in_job": run.run_id,
            "original_attempt_run_id": run.run_id,
            "creator_user_name": self.user_name,
            "run_name": run.run_name,
            "run_type": "SUBMIT_RUN",
            "run_page_url": self._page_url(run.job_id, run.run_id),
            "state": state,
            "status": status,
            "start_time": run.start_time,
            "end_time": end_time,
            "run_duration": (end_time or _now_ms()) - run.start_time,
            "attempt_number": 0,
            "format": "MULTI_TASK",
        }
        if len(run.tasks) == 1:
            # A one-task run reports its task's durations and cluster; multi-task runs report 0.
            only = run.tasks[0]
            answer.update(self._durations(only))
            if only.cluster_id is not None:
                answer["cluster_instance"] = self._task_json(run, only)["cluster_instance"]
        else:
            answer.update({"setup_duration": 0, "execution_duration": 0, "cleanup_duration": 0})
        if tasks is not None:
            answer["tasks"] = [self._task_json(run, t) for t in tasks]
            if version == "2.2" and len(run.tasks) > len(tasks):
                answer["has_more"] = True
        if run.request.get("job_clusters"):
            answer["job_clusters"] = run.request["job_clusters"]
        return answer

    # ------------------------------------------------------------------ execution

    def _set(self, task: _TaskRun, life_cycle_state: str, **changes: Any) -> None:
        """Change a task's state (caller holds the lock) and wake every waiter."""
        task.life_cycle_state = life_cycle_state
        for name, value in changes.items():
            setattr(task, name, value)
        self._cond.notify_all()

    def _check_deadlines(self, run: _Run, task: _TaskRun) -> None:
        """Mark timed-out tasks (caller holds the lock)."""
        now = _now_ms()
        if run.timeout_seconds and now >= run.start_time + run.timeout_seconds * 1000 and not run.timed_out:
            run.timed_out = True
            for t in run.tasks:
                if t.life_cycle_state not in TERMINAL_LIFE_CYCLE_STATES and t.stop_reason is None:
                    t.stop_reason = "TIMEDOUT"
            self._cond.notify_all()
        if (
            task.timeout_seconds
            and task.exec_start
            and task.stop_reason is None
            and now >= task.exec_start + task.timeout_seconds * 1000
        ):
            task.stop_reason = "TIMEDOUT"

    def _wait(self, run: _Run, task: _TaskRun, seconds: float, *, until_released: bool = False) -> bool:
        """Wait (lock held) for ``seconds`` or a release; False if the task was told to stop."""
        deadline = time.monotonic() + seconds
        while True:
            self._check_deadlines(run, task)
            if task.stop_reason is not None:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0 and (not until_released or run.released):
                return True
            self._cond.wait(0.05 if remaining <= 0 else min(remaining, 0.05))

    def _task_worker(self, run: _Run, task: _TaskRun) -> None:
        try:
            self._execute(run, task)
        except Exception as exc:  # a fault in the fake shows up as the documented INTERNAL_ERROR state
            log.exception("fake Databricks task %s failed internally", task.run_id)
            with self._cond:
                self._set(task, "INTERNAL_ERROR", state_message=f"{type(exc).__name__}: {exc}", end_time=_now_ms())

    def _execute(self, run: _Run, task: _TaskRun) -> None:
        with self._cond:
            # BLOCKED on upstream tasks.
            while True:
                self._check_deadlines(run, task)
                if task.stop_reason is not None:
                    return self._finish_stopped(run, task, ran=False)
                upstream = [t for t in run.tasks if t.task_key in task.depends_on]
                if all(t.life_cycle_state in TERMINAL_LIFE_CYCLE_STATES for t in upstream):
                    break
                self._cond.wait(0.05)
            if not _run_if_satisfied(task.run_if, [t.result_state for t in upstream]):
                cancelled = any(t.result_state == "CANCELED" for t in upstream)
                self._set(
                    task,
                    "TERMINATED",
                    result_state="UPSTREAM_CANCELED" if cancelled else "UPSTREAM_FAILED",
                    state_message="Upstream task(s) did not succeed.",
                    end_time=_now_ms(),
                )
                return None
            task.start_time = _now_ms()
            if self.queued_seconds > 0:
                self._set(task, "QUEUED")
                if not self._wait(run, task, self.queued_seconds):
                    return self._finish_stopped(run, task, ran=False)
            task.cluster_id = self._cluster_for(task)
            self._set(task, "PENDING", state_message="Waiting for cluster" if task.cluster_id else "")
            if not self._wait(run, task, self.pending_seconds, until_released=self.hold_pending):
                self._set_cluster_state(task.cluster_id, "TERMINATED", "Job run ended")
                return self._finish_stopped(run, task, ran=False)
            self._set_cluster_state(task.cluster_id, "RUNNING")
            task.spark_context_id = str(random.getrandbits(62))
            outcome = self._outcomes.get(task.task_key)
            if outcome is None and task.kind != "spark_python_task":
                outcome = self._outcomes.get(task.kind, SimulatedOutcome())
            if outcome is not None:
                self._set(task, "RUNNING", state_message="In run", exec_start=_now_ms())
        if outcome is None:
            result, error, trace = self._run_python(run, task)
        else:
            result, error, trace = self._run_simulated(run, task, outcome)
        with self._cond:
            if result is None:
                return self._finish_stopped(run, task, ran=True)
            self._set(task, "TERMINATING", exec_end=_now_ms(), error=error, error_trace=trace)
            self._wait(run, task, self.terminating_seconds)
            self._set_cluster_state(task.cluster_id, "TERMINATED", "Job run ended")
            message = "" if result == "SUCCESS" else MSG_TASK_FAILED
            if task.termination is not None:
                message = task.termination[2]
            self._set(task, "TERMINATED", result_state=result, state_message=message, end_time=_now_ms())
        return None

    def _finish_stopped(self, run: _Run, task: _TaskRun, *, ran: bool) -> None:
        """End a task that was cancelled, timed out or forced (lock held)."""
        reason = task.stop_reason
        now = _now_ms()
        if ran:
            task.exec_end = task.exec_end or now
        if reason in ("CANCELED", "TIMEDOUT") and self.cancel_seconds > 0:
            # "The run is canceled asynchronously, so it may still be running when this request completes"
            # (runs/cancel): the cluster and execution context are torn down while the task is TERMINATING.
            self._set(task, "TERMINATING")
            deadline = time.monotonic() + self.cancel_seconds
            while not self._closing and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(min(remaining, 0.05))
            now = _now_ms()
        if reason == "FORCED" and task.forced is not None:
            forced = task.forced
            self._set(
                task,
                forced.life_cycle_state,
                result_state=forced.result_state,
                state_message=forced.state_message,
                end_time=now,
            )
        elif reason == "TIMEDOUT":
            limit = task.timeout_seconds if not run.timed_out else run.timeout_seconds
            self._set(
                task,
                "TERMINATED",
                result_state="TIMEDOUT",
                user_cancelled_or_timedout=True,
                state_message=f"Task timed out after {limit} seconds.",
                end_time=now,
            )
        else:
            self._set(
                task,
                "TERMINATED",
                result_state="CANCELED",
                user_cancelled_or_timedout=True,
                state_message="Run cancelled.",
                end_time=now,
            )
        self._set_cluster_state(task.cluster_id, "TERMINATED", "Job run ended")

    def _resolve_mapped(self, path: str) -> Path | None:
        for prefix, directory in self._path_mappings:
            if path.startswith(prefix):
                return directory / path[len(prefix) :].lstrip("/")
        return None

    def _resolve_python_file(self, python_file: str) -> Path | None:
        """Where the cluster reads ``python_file``: DBFS, or a mapped workspace/volume path; never the
        machine's own disk (submit already refused anything else)."""
        mapped = self._resolve_mapped(python_file)
        if mapped is not None:
            return mapped
        if python_file.startswith("dbfs:/"):
            return self.dbfs_file(python_file)
        return None

    def _run_python(self, run: _Run, task: _TaskRun) -> tuple[str | None, str | None, str | None]:
        spec = task.settings["spark_python_task"]
        python_file = spec["python_file"]
        with self._cond:
            local = None if spec.get("source") == "GIT" else self._resolve_python_file(python_file)
            cluster = self._clusters.get(task.cluster_id or "")
            cluster_spec = cluster.spec if cluster is not None else {}
        if local is None or not local.is_file():
            with self._cond:
                self._set(task, "RUNNING", state_message="In run", exec_start=_now_ms())
            error = f"Cannot read the python file {python_file}. Please check driver logs for more details."
            return "FAILED", error, None
        # A cluster's driver knows nothing of whoever submitted the run: the task gets the cluster's
        # spark_env_vars and what the runtime sets (DATABRICKS_RUNTIME_VERSION), not our environment.
        env = dict(os.environ) if self.inherit_env else {"PATH": os.environ.get("PATH", "")}
        env.update(cluster_spec.get("spark_env_vars", {}))
        spark_version = str(cluster_spec.get("spark_version", "15.4.x-scala2.12"))
        env["DATABRICKS_RUNTIME_VERSION"] = ".".join(spark_version.split(".")[:2])
        env["PYTHONUNBUFFERED"] = "1"
        assert self._tmp is not None
        workdir = self._tmp / "runs" / str(task.run_id)
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [self.python_executable, str(local), *spec.get("parameters", [])]
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=workdir,
            start_new_session=True,  # so cancel can kill the whole process group
        )
        reader = threading.Thread(target=self._pump, args=(process, task), daemon=True)
        with self._cond:
            # RUNNING is reported only once the process exists, so a cancel always has something to kill.
            task.process = process
            self._set(task, "RUNNING", state_message="In run", exec_start=_now_ms())
        reader.start()
        limit = int(self.driver_memory_mb * 1024 * 1024) if self.driver_memory_mb else None
        while process.poll() is None:
            with self._cond:
                self._check_deadlines(run, task)
                stop = task.stop_reason is not None
                if not stop:
                    self._cond.wait(0.05)
            if stop:
                _kill(process)
                reader.join(timeout=5)
                return None, None, None
            if limit is not None and _tree_rss(process.pid) > limit:
                # The driver dies with everything it started, at once (no SIGTERM grace): the node's OOM
                # handling, then Databricks restarts the driver and the run fails with DRIVER_ERROR.
                _kill_tree(process.pid)
                process.wait()
                reader.join(timeout=5)
                with self._cond:
                    task.exit_code = process.returncode
                    task.termination = ("DRIVER_ERROR", "CLIENT_ERROR", MSG_DRIVER_OOM)
                return "FAILED", MSG_DRIVER_OOM, None
        reader.join(timeout=5)
        code = process.returncode
        with self._cond:
            task.exit_code = code
            if task.stop_reason is not None:
                return None, None, None
            if code == 0:
                return "SUCCESS", None, None
            text = task.logs.decode("utf-8", errors="replace")
        return ("FAILED", *_error_from_output(text, code))

    def _pump(self, process: subprocess.Popen[bytes], task: _TaskRun) -> None:
        stdout = process.stdout
        assert isinstance(stdout, io.BufferedReader)
        keep = max(self.logs_limit_bytes, 1) * 2
        # read1 hands over whatever is available, so logs grow while the task runs.
        for chunk in iter(lambda: stdout.read1(65536), b""):
            with self._cond:
                task.logs.extend(chunk)
                task.logs_total += len(chunk)
                if len(task.logs) > keep:
                    del task.logs[: len(task.logs) - self.logs_limit_bytes]
        stdout.close()

    def _run_simulated(
        self, run: _Run, task: _TaskRun, outcome: SimulatedOutcome
    ) -> tuple[str | None, str | None, str | None]:
        with self._cond:
            if not self._wait(run, task, outcome.seconds):
                return None, None, None
            if outcome.logs is not None:
                data = outcome.logs.encode()
                task.logs.extend(data)
                task.logs_total += len(data)
            task.notebook_result = outcome.notebook_result
            error = outcome.error
            if outcome.result_state == "FAILED" and error is None:
                error = "Simulated failure"
            return outcome.result_state, error, outcome.error_trace


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        fake: FakeDatabricks,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.fake = fake
        self.ssl_context = ssl_context
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake happens here, in the per-connection thread, so a slow client cannot block
        # the accept loop.
        if self.ssl_context is not None:
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return
        super().finish_request(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("fake Databricks: " + format, *args)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(data)
                data.extend(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        body = self._body()
        status, answer, headers = self.server.fake.handle(self.command, self.path, self.headers, body)
        if answer is None:  # an injected connection reset
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        payload = json.dumps(answer).encode()
        # A client that gave up on a slow answer has closed its end: nothing to tell it any more.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve


def _check_python_file(python_file: str, source: str, where: str) -> None:
    """``SparkPythonTask.python_file`` as the Jobs API reference states it: "Cloud file URIs (such as dbfs:/,
    s3:/, adls:/, gcs:/) and workspace paths are supported. For python files stored in the Databricks
    workspace, the path must be absolute and begin with /. For files stored in a remote repository, the path
    must be relative." A path on the submitting machine (``/tmp/x.py``, ``file:/...``) names nothing the
    cluster can read: 400 INVALID_PARAMETER_VALUE at submit.
    """
    name = f"{where}.spark_python_task.python_file"
    if source == "GIT":
        if python_file.startswith("/") or ":" in python_file.split("/", 1)[0]:
            raise _invalid(f"Invalid {name} {python_file!r}: a file in a Git repository has a relative path")
        return
    if python_file.startswith(CLOUD_URI_PREFIXES):
        return
    if python_file.startswith(WORKSPACE_ROOTS):
        return
    raise _invalid(
        f"Invalid {name} {python_file!r}: use a workspace path (/Workspace/..., /Users/...), a Unity Catalog "
        "volume path (/Volumes/...), a cloud URI (dbfs:/, s3:/, abfss:/, gs:/) or, with source GIT, a path "
        "relative to the repository"
    )


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc: a step's runtime starts its command in a new session,
    so the process group alone misses it)."""
    found, todo = [], [pid]
    try:
        while todo:
            current = todo.pop()
            found.append(current)
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children", encoding="ascii") as fh:
                    todo.extend(int(child) for child in fh.read().split())
        return found
    except FileNotFoundError:  # the process is gone, or the kernel has no children files
        if not os.path.exists(f"/proc/{pid}/task"):
            return found
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _tree_rss(pid: int) -> int:
    total = 0
    for member in _descendants(pid):
        try:
            with open(f"/proc/{member}/statm", encoding="utf-8") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total


def _kill_tree(pid: int) -> None:
    for member in _descendants(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, signal.SIGKILL)


def _kill(process: subprocess.Popen[bytes] | None) -> None:
    """Terminate a task's process group, then kill it if it does not exit."""
    if process is None or process.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _legacy_task_key(run_name: Any) -> str:
    if isinstance(run_name, str):
        key = re.sub(r"[^\w\-]", "_", run_name)[:100]
        if key:
            return key
    return "task"


def _run_if_satisfied(run_if: str, upstream: list[str | None]) -> bool:
    if not upstream:
        return True
    ok = [r in ("SUCCESS", "SUCCESS_WITH_FAILURES") for r in upstream]
    failed = [r in ("FAILED", "TIMEDOUT", "UPSTREAM_FAILED") for r in upstream]
    return {
        "ALL_SUCCESS": all(ok),
        "ALL_DONE": True,
        "NONE_FAILED": not any(failed),
        "AT_LEAST_ONE_SUCCESS": any(ok),
        "ALL_FAILED": all(failed),
        "AT_LEAST_ONE_FAILED": any(failed),
    }.get(run_if, all(ok))


def _error_from_output(text: str, exit_code: int) -> tuple[str, str | None]:
    """``error`` and ``error_trace`` of a failed Python task, from its combined output."""
    start = text.rfind("Traceback (most recent call last):")
    if start < 0:
        return f"Python process exited with exit code {exit_code}.", None
    trace = text[start:].rstrip()
    lines = [line for line in trace.splitlines() if line.strip()]
    # The exception line ends the traceback; anything printed afterwards is not part of it.
    last = next(
        (
            i
            for i in range(len(lines) - 1, 0, -1)
            if not lines[i].startswith(" ") and re.match(r"^[\w.]+(:|$)", lines[i])
        ),
        len(lines) - 1,
    )
    return lines[last].strip(), "\n".join(lines[: last + 1])
