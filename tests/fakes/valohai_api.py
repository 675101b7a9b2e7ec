"""A local test server that speaks the Valohai v0 REST API and really runs the steps.

The server follows the public API documentation and what the official ``valohai-cli`` client sends
and reads (``valohai_cli/api.py``, ``commands/execution/*``, ``log_manager.py``, ``models/project.py``
and the response fixtures in its test suite). It differs from a pure mock in that an execution's step
command, taken from the commit's ``valohai.yaml`` configuration, runs as a local subprocess with the
documented Valohai environment (``VH_INPUTS_DIR``, ``VH_OUTPUTS_DIR``, ``VH_CONFIG_DIR``,
``VH_REPOSITORY_DIR``, ``VH_EXECUTION_ID`` …), so a real step produces real logs, metadata and outputs.

What it reproduces, and where each behaviour comes from:

* Auth is Django REST framework's ``TokenAuthentication``: ``Authorization: Token <key>``; a missing
  header answers 401 ``{"detail": "Authentication credentials were not provided."}``, a wrong key 401
  ``{"detail": "Invalid token."}``, both with ``WWW-Authenticate: Token``.
* Lists use DRF ``LimitOffsetPagination``: ``{"count", "next", "previous", "results"}`` with absolute
  ``next``/``previous`` links; filters the API does not know are ignored, as django-filter does.
* A refused create answers 400 with DRF field errors in Valohai's verbose form
  ``{"environment": [{"message": "...", "code": "does_not_exist"}]}`` (the shape ``valohai-cli``'s
  error formatter and its ``find_error(..., code="does_not_exist")`` hint expect).
* An execution goes created → queued → started → complete | error, or → stopping → stopped when
  stopped; ``crashed`` and arbitrary unknown statuses are available as test hooks.
* Events come from ``GET /executions/{id}/events/?limit=N``: the *last* N events with ``total`` and
  ``truncated``; ``limit=0`` returns all (``vh execution logs --all``). There is no offset: the CLI
  de-duplicates by hashing ``stream+time+message``.
* Lines a step prints to stdout that are JSON objects become metadata (``metadata`` entries with a
  ``_time`` key, merged into ``cumulative_metadata``); files written to ``VH_OUTPUTS_DIR`` become
  output datums whose ``datum://<id>`` URI can be an input of the next execution.
* ``GET /data/{id}/download/`` answers ``{"url": <short-lived signed URL>}``; the URL is served by
  this server without the API token, like a presigned object-store URL.

Quick use::

    with FakeValohai(token="secret") as vh:
        project = vh.add_project("demo", config=[{"step": {"name": "train", "image": "python:3.11",
                                                           "command": "python train.py {parameters}"}}],
                                 repository="/path/to/code")
        ...  # point the client under test at vh.url with the token "secret"
        vh.wait(execution_id)

Only loopback addresses are ever contacted: an input URL that is not on 127.0.0.0/8 or ::1 fails the
execution the way an unreachable URL fails a real one.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import datetime as dt
import hashlib
import http.server
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

API_PREFIX = "/api/v0/"
STORE_PREFIX = "/_fake_store/"
FILES_PREFIX = "/_fake_files/"

INCOMPLETE_STATUSES = frozenset({"created", "queued", "started", "stopping"})
COMPLETE_STATUSES = frozenset({"complete", "error", "crashed", "stopped"})

DEFAULT_OWNER = "fake-org"

#: DRF's texts for the authentication failures, kept verbatim because clients log or match them.
NOT_AUTHENTICATED = "Authentication credentials were not provided."
INVALID_TOKEN = "Invalid token."
INVALID_TOKEN_HEADER = "Invalid token header. No credentials provided."


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(moment: dt.datetime | None) -> str | None:
    """Format a timestamp the way the API's model fields do (``2017-02-08T11:09:16.120102Z``)."""
    if moment is None:
        return None
    return moment.astimezone(dt.UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _event_time(moment: dt.datetime) -> str:
    """Format an event time like the events API does: naive UTC with microseconds, no ``Z``.

    ``vh execution logs`` slices ``time.split("T")[1][:-4]``, which needs exactly this form.
    """
    return moment.astimezone(dt.UTC).replace(tzinfo=None).isoformat(timespec="microseconds")


def _error(message: str, code: str = "invalid") -> dict[str, str]:
    return {"message": message, "code": code}


class APIError(Exception):
    """An HTTP error answer, raised inside a handler and rendered by the request loop."""

    def __init__(
        self, status: int, body: Any, *, headers: Mapping[str, str] | None = None, content_type: str = "json"
    ) -> None:
        super().__init__(f"{status}: {body!r}")
        self.status = status
        self.body = body
        self.headers = dict(headers or {})
        self.content_type = content_type


class FieldErrors(APIError):
    """A 400 answer with DRF field errors: ``{"field": [{"message", "code"}, ...]}``."""

    def __init__(self, errors: Mapping[str, list[dict[str, str]]]) -> None:
        super().__init__(400, dict(errors))


def _not_found() -> APIError:
    return APIError(404, {"detail": "Not found."})


# --------------------------------------------------------------------------------------------------
# valohai.yaml step handling: parameters, inputs and command interpolation
# --------------------------------------------------------------------------------------------------


def parse_config(config: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Normalise a ``valohai.yaml`` (text or already parsed) into its list-of-mappings form."""
    if config is None:
        return []
    if isinstance(config, str):
        import yaml  # PyYAML ships with Airflow; only needed when a test passes YAML text

        loaded = yaml.safe_load(config)
        return list(loaded or [])
    return copy.deepcopy(list(config))


def config_steps(config: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return the ``step`` mappings of a parsed config by name."""
    steps: dict[str, dict[str, Any]] = {}
    for item in config:
        if isinstance(item, dict) and isinstance(item.get("step"), dict):
            steps[str(item["step"]["name"])] = item["step"]
    return steps


def _listify(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def coerce_parameter(spec: Mapping[str, Any], value: Any) -> tuple[Any, list[str]]:
    """Validate and type-cast one parameter value as ``valohai-yaml``'s ``Parameter.validate`` does."""
    errors: list[str] = []
    ptype = spec.get("type", "string")
    multiple = spec.get("multiple")
    if not multiple and isinstance(value, (list, tuple)):
        return value, ["Only a single value is allowed"]
    out: list[Any] = []
    for atom in _listify(value):
        if ptype == "integer":
            try:
                atom = int(str(atom), 10)
            except ValueError:
                errors.append("No value supplied" if atom == "" else f"{atom} is not an integer")
        elif ptype == "float":
            try:
                atom = float(str(atom))
            except ValueError:
                errors.append("No value supplied" if atom == "" else f"{atom} is not a floating-point number")
        elif ptype == "flag":
            is_text = isinstance(atom, str)
            atom = atom.strip().lower() in ("1", "true", "yes", "on") if is_text else bool(atom)
        if spec.get("min") is not None and isinstance(atom, (int, float)) and atom < spec["min"]:
            errors.append(f"{atom} is less than the minimum allowed ({spec['min']})")
        if spec.get("max") is not None and isinstance(atom, (int, float)) and atom > spec["max"]:
            errors.append(f"{atom} is greater than the maximum allowed ({spec['max']})")
        if spec.get("choices") is not None and atom not in spec["choices"]:
            errors.append(f"{atom} is not among the choices allowed ({spec['choices']!r})")
        out.append(atom)
    if multiple:
        return out, errors
    return (out[0] if out else value), errors


def format_parameter(spec: Mapping[str, Any], value: Any) -> list[str]:
    """Render one parameter as command-line words, per ``pass-as`` and friends.

    Defaults are ``--{name}={value}`` and, for flags, ``--{name}`` when true and nothing when false;
    ``pass-true-as``/``pass-false-as`` override a flag; ``multiple: repeat`` repeats the template,
    ``multiple: separate`` joins the values with ``multiple-separator`` (default ``,``).
    """
    if value is None:
        return []
    name = spec["name"]
    ptype = spec.get("type", "string")
    template: str | None
    if ptype == "flag":
        if spec.get("pass-true-as") or spec.get("pass-false-as"):
            template = (spec.get("pass-true-as") if value else spec.get("pass-false-as")) or None
        else:
            template = (spec.get("pass-as") or "--{name}") if value else None
    else:
        template = spec.get("pass-as") or "--{name}={value}"
    if not template:
        return []
    bits = str(template).split()

    def fmt(atom: Any) -> list[str]:
        env = {"name": name, "value": atom, "v": atom}
        return [bit.format_map(env) for bit in bits]

    multiple = spec.get("multiple")
    if multiple == "repeat":
        return [word for atom in _listify(value) for word in fmt(atom)]
    if multiple == "separate":
        values = _listify(value)
        if not values:
            return []
        return fmt(str(spec.get("multiple-separator") or ",").join(str(v) for v in values))
    return fmt(value)


_INTERPOLABLE = re.compile(r"{(.+?)}")


def build_command(command: str | list[str], parameters: list[dict[str, Any]], values: Mapping[str, Any]) -> list[str]:
    """Interpolate ``{parameters}``, ``{parameter:NAME}`` and ``{parameter-value:NAME}`` into commands.

    This mirrors ``valohai_yaml.commands.build_command``: values are shell-quoted, parameters whose
    value is ``None`` are left out, and unknown ``{...}`` groups are kept as written so shell syntax
    such as ``${HOME}`` survives.
    """
    by_name = {p["name"]: p for p in parameters}

    def all_words() -> list[str]:
        return [w for p in parameters for w in format_parameter(p, values.get(p["name"]))]

    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if key in ("parameters", "params"):
            return " ".join(shlex.quote(w) for w in all_words())
        if key.startswith("parameter:"):
            name = key.split(":", 1)[1]
            if name in by_name:
                words = format_parameter(by_name[name], values.get(name))
                return " ".join(shlex.quote(w) for w in words)
        if key.startswith("parameter-value:"):
            name = key.split(":", 1)[1]
            if name in values:
                return shlex.quote(str(values[name]))
        return match.group(0)

    return [_INTERPOLABLE.sub(replace, line).strip() for line in _listify(command)]


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------


@dataclass
class Fault:
    """An injected error answer for the next matching requests."""

    status: int
    remaining: int
    retry_after: float | None = None
    method: str | None = None
    path: str | None = None

    def matches(self, method: str, path: str) -> bool:
        if self.method and self.method.upper() != method:
            return False
        return not (self.path and not path.startswith(self.path))


@dataclass
class Project:
    id: str
    name: str
    description: str
    owner: str
    ctime: dt.datetime
    repository: str | None
    default_environment: str | None
    counter: int = 0


@dataclass
class Commit:
    id: int
    project_id: str
    identifier: str
    ref: str
    config: list[dict[str, Any]]
    repository: str | None
    commit_time: dt.datetime
    ctime: dt.datetime
    adhoc: bool = False
    fetched: bool = True


@dataclass
class Environment:
    id: str
    slug: str
    name: str
    gpu_spec: str
    ctime: dt.datetime
    #: Memory of the machine in MiB; a step whose processes use more is killed like the kernel's OOM
    #: killer does (None: unlimited).
    memory_mib: int | None = None


@dataclass
class Datum:
    id: str
    name: str
    path: str
    size: int
    ctime: dt.datetime
    project_id: str | None
    output_execution_id: str | None
    sha256: str
    md5: str


@dataclass
class Execution:
    id: str
    counter: int
    project_id: str
    commit_id: int
    step: dict[str, Any]
    environment_id: str
    parameters: dict[str, Any]
    inputs: dict[str, list[str]]
    environment_variables: dict[str, str]
    tags: list[str]
    title: str
    time_limit: int | None
    runtime_config: dict[str, Any]
    image: str
    command: list[str]
    ctime: dt.datetime
    status: str = "created"
    status_detail: str | None = None
    qtime: dt.datetime | None = None
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None
    mtime: dt.datetime | None = None
    events: list[dict[str, str]] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    output_ids: list[str] = field(default_factory=list)
    input_files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    exit_code: int | None = None
    status_override: str | None = None
    stop_requested: threading.Event = field(default_factory=threading.Event)
    crash_message: str | None = None
    oom_killed: str | None = None
    process: subprocess.Popen[bytes] | None = None
    thread: threading.Thread | None = None


# --------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------


Route = tuple[str, "re.Pattern[str]", str, Callable[..., Any]]


class FakeValohai:
    """A Valohai v0 API on 127.0.0.1 with an ephemeral port; executions run locally.

    Args:
        token: The API token clients must send as ``Authorization: Token <token>``; more can be
            added to :attr:`tokens`.
        queue_delay: Seconds an execution spends queued before it starts (0 by default).
        page_size: The default ``limit`` of list endpoints when the client gives none.
        events_limit: How many of the last events ``/events/`` returns without ``limit``.
        time_limit_status: The status an execution ends in when its ``time_limit`` runs out.
        stop_grace: Seconds between SIGTERM and SIGKILL when an execution is stopped.
        owner: The owner name used in display URLs.
    """

    def __init__(
        self,
        token: str = "fake-valohai-token",
        *,
        queue_delay: float = 0.0,
        page_size: int = 100,
        events_limit: int = 100,
        time_limit_status: str = "stopped",
        stop_grace: float = 2.0,
        owner: str = DEFAULT_OWNER,
    ) -> None:
        self.tokens: set[str] = {token}
        self.token = token
        self.queue_delay = queue_delay
        self.page_size = page_size
        self.events_limit = events_limit
        self.time_limit_status = time_limit_status
        self.stop_grace = stop_grace
        self.owner = owner

        self.lock = threading.RLock()
        self.projects: dict[str, Project] = {}
        self.commits: dict[int, Commit] = {}
        self.environments: dict[str, Environment] = {}
        self.executions: dict[str, Execution] = {}
        self.data: dict[str, Datum] = {}
        self.files: dict[str, bytes] = {}
        self.faults: list[Fault] = []
        #: Every request as ``(method, path, query)`` in arrival order (faults and 401s included).
        self.request_log: list[tuple[str, str, dict[str, list[str]]]] = []
        #: Requests per ``"METHOD /api/v0/route/{id}/"`` template.
        self.request_counts: collections.Counter[str] = collections.Counter()
        #: Query parameters that a list endpoint ignored because the real filter set lacks them.
        self.ignored_filters: collections.Counter[str] = collections.Counter()

        #: Pending dispositions of the next ``POST /executions/``: ``("slow", seconds)`` or ``("lost", 0)``.
        self.create_faults: collections.deque[tuple[str, float]] = collections.deque()
        self._outage_until = 0.0
        self._closing = threading.Event()

        self._queue_open = threading.Event()
        self._queue_open.set()
        self._commit_seq = 0
        self._root = tempfile.mkdtemp(prefix="fake-valohai-")
        self._routes: list[Route] = self._build_routes()
        fake = self

        class Handler(_Handler):
            server_fake = fake

        # Bound now so that url is known before start(); requests wait in the backlog until then.
        self._server: http.server.ThreadingHTTPServer | None = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), Handler
        )
        self._server.daemon_threads = True
        self._serve_thread: threading.Thread | None = None

        self.add_environment("default", "The Default Environment")
        self.add_environment("fake-gpu-1x", "Fake GPU machine (1 GPU)", gpu_spec="1x Fake GPU")

    # ----------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> FakeValohai:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Serve 127.0.0.1 on the ephemeral port chosen at construction, in a daemon thread."""
        assert self._server is not None, "FakeValohai was closed"
        self._serve_thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._serve_thread.start()

    def close(self) -> None:
        """Kill running steps, stop serving and delete the working files."""
        self._closing.set()
        self._queue_open.set()
        with self.lock:
            executions = list(self.executions.values())
        for ex in executions:
            ex.stop_requested.set()
            self._kill(ex, signal.SIGKILL)
        for ex in executions:
            if ex.thread is not None:
                ex.thread.join(timeout=10)
        if self._server is not None:
            if self._serve_thread is not None:
                self._server.shutdown()
            self._server.server_close()
            self._server = None
        shutil.rmtree(self._root, ignore_errors=True)

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:41234`` (no trailing slash)."""
        assert self._server is not None, "FakeValohai was closed"
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    @property
    def api_url(self) -> str:
        """``<url>/api/v0/``."""
        return self.url + API_PREFIX

    # ----------------------------------------------------------------------------- test hooks: data

    def add_environment(
        self, slug: str, name: str | None = None, *, gpu_spec: str = "", memory_mib: int | None = None
    ) -> dict[str, Any]:
        """Register an execution environment (machine type) selectable by id or slug.

        ``memory_mib`` gives the machine a memory size that the step's processes together may not
        exceed: the biggest one is then SIGKILLed, as the kernel's OOM killer does in the container.
        """
        env = Environment(id=str(uuid.uuid4()), slug=slug, name=name or slug, gpu_spec=gpu_spec, ctime=_now(),
                          memory_mib=memory_mib)
        with self.lock:
            self.environments[env.id] = env
            return self._environment_json(env)

    def add_project(
        self,
        name: str,
        config: str | list[dict[str, Any]] | None = None,
        *,
        repository: str | os.PathLike[str] | None = None,
        ref: str = "main",
        description: str = "",
        default_environment: str | None = None,
    ) -> dict[str, Any]:
        """Create a project and, when ``config`` is given, its first commit on ``ref``.

        Args:
            name: Project name (the ``name`` filter of ``GET /projects/`` matches it exactly).
            config: The commit's ``valohai.yaml``: YAML text or the parsed list of mappings. Steps
                are ``{"step": {"name", "image", "command", "parameters", "inputs",
                "environment-variables", "time-limit"}}`` as the YAML reference documents them.
            repository: A directory holding the step's code; each execution gets a copy as its
                working directory (``VH_REPOSITORY_DIR``).
            ref: Branch name of the first commit.
            description: Project description.
            default_environment: Environment slug used when a create request names none.
        """
        project = Project(
            id=str(uuid.uuid4()),
            name=name,
            description=description,
            owner=self.owner,
            ctime=_now(),
            repository=os.fspath(repository) if repository is not None else None,
            default_environment=default_environment,
        )
        with self.lock:
            self.projects[project.id] = project
        if config is not None:
            self.add_commit(project.id, config, ref=ref)
        return self._project_json(project)

    def add_commit(
        self,
        project_id: str,
        config: str | list[dict[str, Any]],
        *,
        ref: str = "main",
        identifier: str | None = None,
        repository: str | os.PathLike[str] | None = None,
        fetched: bool = True,
    ) -> dict[str, Any]:
        """Add a commit; with ``fetched=False`` it appears only after ``POST /projects/{id}/fetch/``."""
        with self.lock:
            self._commit_seq += 1
            moment = _now()
            commit = Commit(
                id=self._commit_seq,
                project_id=project_id,
                identifier=identifier or hashlib.sha1(uuid.uuid4().bytes).hexdigest(),
                ref=ref,
                config=parse_config(config),
                repository=os.fspath(repository) if repository is not None else None,
                commit_time=moment,
                ctime=moment,
                fetched=fetched,
            )
            self.commits[commit.id] = commit
            return self._commit_json(commit)

    def add_datum(self, name: str, content: bytes, *, project_id: str | None = None) -> dict[str, Any]:
        """Store a file as a datum (as an upload would) and return its API object."""
        datum = self._store_datum(name, content, project_id=project_id, execution_id=None)
        with self.lock:
            return self._datum_json(datum)

    def serve_file(self, name: str, content: bytes) -> str:
        """Serve ``content`` at a loopback HTTP URL (no auth) usable as an execution input."""
        with self.lock:
            self.files[name] = content
        return self.url + FILES_PREFIX + urllib.parse.quote(name)

    # ----------------------------------------------------------------------------- test hooks: behaviour

    def inject_fault(
        self,
        status: int,
        *,
        count: int = 1,
        retry_after: float | None = None,
        method: str | None = None,
        path: str | None = None,
    ) -> None:
        """Answer the next ``count`` matching API requests with ``status`` instead of serving them.

        429 carries DRF's throttle body and ``Retry-After`` (default 1 s); 500 and 503 carry the
        HTML bodies a Django error page or a load balancer sends. ``path`` matches by prefix.
        """
        if status == 429 and retry_after is None:
            retry_after = 1
        with self.lock:
            self.faults.append(Fault(status, count, retry_after, method, path))

    def pause_queue(self) -> None:
        """Keep new executions ``queued`` until :meth:`resume_queue` (no timing needed in tests)."""
        self._queue_open.clear()

    def resume_queue(self) -> None:
        self._queue_open.set()

    def crash(self, execution_id: str, message: str = "The worker machine was lost.") -> None:
        """Make an execution end as ``crashed``, as when the platform loses the worker."""
        with self.lock:
            ex = self.executions[execution_id]
            ex.crash_message = message
            ex.stop_requested.set()
        self._kill(ex, signal.SIGKILL)
        if ex.thread is not None:
            ex.thread.join(timeout=10)

    def override_status(self, execution_id: str, status: str | None) -> None:
        """Report ``status`` (e.g. a status string the client has never seen) until reset with None."""
        with self.lock:
            self.executions[execution_id].status_override = status

    # ----------------------------------------------------------------------------- test hooks: faults

    def slow_create(self, seconds: float, *, commit_late: bool = False) -> None:
        """The next ``POST /executions/`` answers only after ``seconds``, and takes effect all the same.

        A create that outlasts the client's timeout still takes effect on the server: Django finishes the
        view whether or not the client is still there (a disconnect does not cancel the request). By
        default the execution exists at once and only the answer is late; with ``commit_late`` the
        server is slow *before* the row is committed (a view in one transaction, ``ATOMIC_REQUESTS``),
        so the execution appears only after ``seconds``: a look-up by tag right after the client's
        timeout finds nothing yet (issue 8.1).
        """
        with self.lock:
            self.create_faults.append(("slow-commit" if commit_late else "slow", float(seconds)))

    def lose_create_response(self) -> None:
        """The next ``POST /executions/`` creates the execution, then the connection closes unanswered
        (a load balancer or proxy dropping the connection after the backend did the work)."""
        with self.lock:
            self.create_faults.append(("lost", 0.0))

    def outage(self, seconds: float) -> None:
        """Every API request answers 503 (the load balancer's HTML page) for ``seconds`` from now."""
        with self.lock:
            self._outage_until = time.monotonic() + float(seconds)

    def end_outage(self) -> None:
        with self.lock:
            self._outage_until = 0.0

    def rate_limit(self, count: int, retry_after: float = 1.0) -> None:
        """The next ``count`` API requests answer DRF's 429 with ``Retry-After: retry_after``."""
        self.inject_fault(429, count=count, retry_after=retry_after)

    def revoke_token(self, token: str | None = None) -> None:
        """Delete an API token (default: the main one): DRF then answers 401 ``Invalid token.``."""
        with self.lock:
            self.tokens.discard(token or self.token)

    def delete_execution(self, execution_id: str) -> None:
        """Remove an execution as ``DELETE /executions/{id}/`` does (its process is killed first)."""
        self._delete(execution_id)

    def late_event(self, execution_id: str, stream: str, message: str, *, seconds_ago: float = 1.0) -> None:
        """Record an event stamped ``seconds_ago`` in the past, so it lands among events already served.

        Log lines reach the events API through the worker's log shipping: a line can arrive after later
        ones were already listed, and the list is ordered by event time, so it appears *before* them.
        That is why ``valohai-cli``'s LogManager de-duplicates by event identity and never by position.
        """
        moment = _now() - dt.timedelta(seconds=seconds_ago)
        event = {"stream": stream, "message": message, "time": _event_time(moment)}
        with self.lock:
            ex = self.executions[execution_id]
            ex.events.append(event)
            ex.events.sort(key=lambda e: e["time"])
            ex.mtime = _now()

    def wait(self, execution_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Block until the execution's real status is terminal; return its API object."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                ex = self.executions[execution_id]
                if ex.status in COMPLETE_STATUSES and (ex.thread is None or not ex.thread.is_alive()):
                    return self._execution_json(ex)
            time.sleep(0.02)
        raise TimeoutError(f"execution {execution_id} still {self.executions[execution_id].status}")

    def wait_status(self, execution_id: str, status: str, timeout: float = 30.0) -> None:
        """Block until the execution reaches ``status`` (for tests that act mid-run)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.executions[execution_id].status == status:
                    return
            time.sleep(0.02)
        raise TimeoutError(f"execution {execution_id} never reached {status}")

    def execution(self, execution_id: str) -> dict[str, Any]:
        with self.lock:
            return self._execution_json(self.executions[execution_id])

    def count(self, method: str, route: str) -> int:
        """Requests served for a route template, e.g. ``count("GET", "/api/v0/executions/{id}/")``."""
        return self.request_counts[f"{method.upper()} {route}"]

    # ----------------------------------------------------------------------------- representations

    def _project_json(self, p: Project) -> dict[str, Any]:
        with self.lock:
            counts = collections.Counter(e.status for e in self.executions.values() if e.project_id == p.id)
        summary: dict[str, int] = {"count": sum(counts.values())}
        for status in ("created", "queued", "started", "stopping", "complete", "error", "crashed", "stopped"):
            summary[f"{status}_count"] = counts.get(status, 0)
        return {
            "id": p.id,
            "name": p.name,
            "description": p.description,
            "owner": {"id": 1, "username": p.owner},
            "ctime": _iso(p.ctime),
            "mtime": _iso(p.ctime),
            "url": f"{self.api_url}projects/{p.id}/",
            "urls": {"display": f"{self.url}/p/{p.owner}/{p.name}/"},
            "yaml_path": "valohai.yaml",
            "read_only": False,
            "environment_variables": {},
            "execution_summary": summary,
        }

    def _commit_json(self, c: Commit, *, include_config: bool = False) -> dict[str, Any]:
        project = self.projects[c.project_id]
        data: dict[str, Any] = {
            "id": c.id,
            "repository": project.id,
            "project_id": project.id,
            "identifier": c.identifier,
            "ref": c.ref,
            "ref_names": [c.ref],
            "commit_time": _iso(c.commit_time),
            "ctime": _iso(c.ctime),
            "adhoc": c.adhoc,
            "description": "",
            "yaml_path": "valohai.yaml",
            "has_config": bool(c.config),
            "url": f"{self.api_url}commits/{c.id}/",
            "urls": {"display": f"{self.url}/p/{project.owner}/{project.name}/commits/{c.identifier}/"},
        }
        if include_config:
            data["config"] = copy.deepcopy(c.config)
        return data

    def _environment_json(self, e: Environment) -> dict[str, Any]:
        return {
            "id": e.id,
            "slug": e.slug,
            "name": e.name,
            "description": "",
            "enabled": True,
            "has_gpu": bool(e.gpu_spec),
            "gpu_spec": e.gpu_spec,
            "owner": None,
            "per_hour_price_usd": "0.00000",
            "per_user_queue_quota": 0,
            "unfinished_job_count": sum(
                1 for x in self.executions.values() if x.environment_id == e.id and x.status in INCOMPLETE_STATUSES
            ),
            "type": "vm",
            "ctime": _iso(e.ctime),
            "mtime": _iso(e.ctime),
            "url": f"{self.api_url}environments/{e.id}/",
        }

    def _datum_json(self, d: Datum) -> dict[str, Any]:
        output_execution = None
        ex = self.executions.get(d.output_execution_id) if d.output_execution_id is not None else None
        if ex is not None:
            output_execution = {
                "id": ex.id,
                "counter": ex.counter,
                "url": f"{self.api_url}executions/{ex.id}/",
            }
        project = None
        if d.project_id is not None:
            p = self.projects[d.project_id]
            project = {"id": p.id, "name": p.name}
        return {
            "id": d.id,
            "name": d.name,
            "size": d.size,
            "ctime": _iso(d.ctime),
            "file_ctime": _iso(d.ctime),
            "file_mtime": _iso(d.ctime),
            # The storage location in the project's data store, never a local path: clients are
            # meant to refer to a datum as datum://<id> and download it through the API.
            "uri": f"s3://fake-valohai-store/data/{d.output_execution_id or 'uploads'}/{d.id}/{d.name}",
            "url": f"{self.api_url}data/{d.id}/",
            "checksums": {"sha256": d.sha256, "md5": d.md5},
            "output_execution": output_execution,
            "project": project,
            "purged": False,
            "deleted": False,
        }

    def _execution_json(self, ex: Execution, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
        project = self.projects[ex.project_id]
        commit = self.commits[ex.commit_id]
        display = f"{self.url}/p/{project.owner}/{project.name}/execution/{ex.id}/"
        duration = None
        if ex.start_time is not None:
            duration = ((ex.end_time or _now()) - ex.start_time).total_seconds()
        cumulative: dict[str, Any] = {}
        for entry in ex.metadata:
            cumulative.update({k: v for k, v in entry.items() if k != "_time"})
        data: dict[str, Any] = {
            "id": ex.id,
            "counter": ex.counter,
            "ctime": _iso(ex.ctime),
            "mtime": _iso(ex.mtime or ex.ctime),
            "qtime": _iso(ex.qtime),
            "start_time": _iso(ex.start_time),
            "end_time": _iso(ex.end_time),
            "duration": duration,
            "status": ex.status_override or ex.status,
            "status_detail": ex.status_detail,
            "step": ex.step["name"],
            "title": ex.title,
            "tags": list(ex.tags),
            "project": self._project_json(project),
            "commit": self._commit_json(commit),
            "environment": self._environment_json(self.environments[ex.environment_id]),
            "image": ex.image,
            "command": "\n".join(_listify(ex.step.get("command"))),
            "interpolated_command": "\n".join(ex.command),
            "parameters": dict(ex.parameters),
            "inputs": [
                {"name": name, "urls": list(urls), "files": copy.deepcopy(ex.input_files.get(name, []))}
                for name, urls in ex.inputs.items()
            ],
            "outputs": [self._datum_json(self.data[d]) for d in ex.output_ids],
            "n_outputs": len(ex.output_ids),
            "metadata": copy.deepcopy(ex.metadata),
            "cumulative_metadata": cumulative or None,
            "events": copy.deepcopy(ex.events),
            "environment_variables": dict(ex.environment_variables),
            "runtime_config": dict(ex.runtime_config),
            "time_limit": ex.time_limit,
            "priority": 0,
            "task": None,
            "pipeline": None,
            "deleted": False,
            "creator": {"id": 1, "username": self.owner},
            "url": f"{self.api_url}executions/{ex.id}/",
            "link": f"/p/{project.owner}/{project.name}/execution/{ex.id}/",
            "urls": {
                "display": display,
                "stop": f"{self.api_url}executions/{ex.id}/stop/",
                "copy": f"{self.url}/p/{project.owner}/{project.name}/executions/create/?from={ex.id}",
            },
        }
        for key in exclude:
            data.pop(key, None)
        return data

    # ----------------------------------------------------------------------------- routing

    def _build_routes(self) -> list[Route]:
        uid = r"(?P<key>[^/]+)"
        table: list[tuple[str, str, Callable[..., Any]]] = [
            ("GET", "projects/", self._list_projects),
            ("GET", f"projects/{uid}/", self._get_project),
            ("GET", f"projects/{uid}/commits/", self._project_commits),
            ("POST", f"projects/{uid}/fetch/", self._fetch_project),
            ("GET", "commits/", self._list_commits),
            ("GET", f"commits/{uid}/", self._get_commit),
            ("GET", "environments/", self._list_environments),
            ("GET", f"environments/{uid}/", self._get_environment),
            ("GET", "executions/", self._list_executions),
            ("POST", "executions/", self._create_execution),
            ("GET", f"executions/{uid}/", self._get_execution),
            ("DELETE", f"executions/{uid}/", self._delete_execution),
            ("POST", f"executions/{uid}/stop/", self._stop_execution),
            ("GET", f"executions/{uid}/events/", self._execution_events),
            ("GET", f"executions/{uid}/metadata/", self._execution_metadata),
            ("GET", "data/", self._list_data),
            ("GET", f"data/{uid}/", self._get_datum),
            ("GET", f"data/{uid}/download/", self._download_datum),
            ("GET", "users/me/", self._me),
        ]
        routes: list[Route] = []
        for method, pattern, handler in table:
            template = API_PREFIX + pattern.replace(uid, "{id}")
            routes.append((method, re.compile("^" + re.escape(API_PREFIX) + pattern + "$"), template, handler))
        return routes

    def handle(
        self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """Serve one request; returns ``(status, headers, body)``. Public so tests can call it directly."""
        parsed = urllib.parse.urlsplit(raw_path)
        path = parsed.path
        query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        with self.lock:
            self.request_log.append((method, path, query))
        try:
            if path.startswith(STORE_PREFIX):
                return self._serve_store(path, query)
            if path.startswith(FILES_PREFIX):
                return self._serve_file(path)
            matches = self._match(path)
            if not matches:
                raise _not_found()
            with self.lock:
                self.request_counts[f"{method} {matches[0][1]}"] += 1
                down = time.monotonic() < self._outage_until
            if down:
                # What a load balancer answers while the application servers are gone: an HTML 503.
                raise APIError(503, "<!DOCTYPE html><html><body><h1>503 Service Unavailable</h1></body></html>",
                               content_type="html")
            self._check_fault(method, path)
            # As in DRF's APIView.dispatch: authentication comes before the method check.
            self._authenticate(headers)
            handler, kwargs = self._pick(method, matches)
            payload = self._parse_body(headers, body) if method in ("POST", "PUT", "PATCH") else {}
            disposition: tuple[str, float] | None = None
            if handler == self._create_execution:
                with self.lock:
                    disposition = self.create_faults.popleft() if self.create_faults else None
            if disposition is not None and disposition[0] == "slow-commit":
                self._closing.wait(disposition[1])  # slow before the commit: nothing visible meanwhile
                disposition = None
            status, data = handler(query=query, payload=payload, **kwargs)
            if disposition is not None and status < 400:
                kind, seconds = disposition
                if kind == "lost":
                    raise DropConnection
                self._closing.wait(seconds)  # the work is done; only the answer is late
            return self._json(status, data)
        except APIError as exc:
            if exc.content_type == "html":
                return exc.status, {"Content-Type": "text/html; charset=utf-8", **exc.headers}, exc.body.encode()
            status, hdrs, out = self._json(exc.status, exc.body)
            hdrs.update(exc.headers)
            return status, hdrs, out

    def _match(self, path: str) -> list[tuple[str, str, Callable[..., Any], dict[str, str]]]:
        out = []
        for route_method, regex, template, handler in self._routes:
            match = regex.match(path)
            if match is not None:
                out.append((route_method, template, handler, match.groupdict()))
        return out

    @staticmethod
    def _pick(
        method: str, matches: list[tuple[str, str, Callable[..., Any], dict[str, str]]]
    ) -> tuple[Callable[..., Any], dict[str, str]]:
        for route_method, _, handler, kwargs in matches:
            if route_method == method:
                return handler, kwargs
        allowed = ", ".join(m[0] for m in matches)
        raise APIError(405, {"detail": f'Method "{method}" not allowed.'}, headers={"Allow": allowed})

    def _check_fault(self, method: str, path: str) -> None:
        with self.lock:
            for fault in self.faults:
                if fault.remaining > 0 and fault.matches(method, path):
                    fault.remaining -= 1
                    break
            else:
                return
            self.faults = [f for f in self.faults if f.remaining > 0]
        if fault.status == 429:
            wait = fault.retry_after or 1
            raise APIError(
                429,
                {"detail": f"Request was throttled. Expected available in {int(wait)} seconds."},
                headers={"Retry-After": str(int(wait) if float(wait).is_integer() else wait)},
            )
        if fault.status >= 500:
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            text = {500: "Server Error (500)", 502: "Bad Gateway", 503: "Service Unavailable"}.get(
                fault.status, f"Error {fault.status}"
            )
            raise APIError(
                fault.status,
                f"<!DOCTYPE html><html><body><h1>{text}</h1></body></html>",
                headers=headers,
                content_type="html",
            )
        raise APIError(fault.status, {"detail": f"Injected error {fault.status}."})

    def _authenticate(self, headers: Mapping[str, str]) -> None:
        auth_header = {"WWW-Authenticate": "Token"}
        raw = headers.get("authorization") or ""
        words = raw.split()
        if not words or words[0].lower() != "token":
            raise APIError(401, {"detail": NOT_AUTHENTICATED}, headers=auth_header)
        if len(words) == 1:
            raise APIError(401, {"detail": INVALID_TOKEN_HEADER}, headers=auth_header)
        if len(words) > 2:
            raise APIError(
                401, {"detail": "Invalid token header. Token string should not contain spaces."}, headers=auth_header
            )
        if words[1] not in self.tokens:
            raise APIError(401, {"detail": INVALID_TOKEN}, headers=auth_header)

    @staticmethod
    def _parse_body(headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        ctype = (headers.get("content-type") or "").split(";")[0].strip().lower()
        if not body:
            return {}
        if ctype == "application/x-www-form-urlencoded":
            form = urllib.parse.parse_qs(body.decode(), keep_blank_values=True)
            return {k: (v if k == "tags" else v[-1]) for k, v in form.items()}
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise APIError(400, {"detail": f"JSON parse error - {exc}"}) from exc
        if not isinstance(data, dict):
            raise APIError(400, {"non_field_errors": [_error("Invalid data. Expected a dictionary.")]})
        return data

    @staticmethod
    def _json(status: int, data: Any) -> tuple[int, dict[str, str], bytes]:
        if status == 204:
            return 204, {}, b""
        return status, {"Content-Type": "application/json"}, json.dumps(data).encode()

    # ----------------------------------------------------------------------------- paging helpers

    def _paginate(self, path: str, query: Mapping[str, list[str]], items: list[Any]) -> dict[str, Any]:
        """DRF ``LimitOffsetPagination``: bad numbers fall back to the defaults, as DRF does."""
        limit = _positive_int(query.get("limit", [None])[-1], self.page_size, allow_zero=False)
        offset = _positive_int(query.get("offset", [None])[-1], 0, allow_zero=True)
        page = items[offset : offset + limit]
        base = self.url + path

        def link(new_offset: int | None) -> str:
            params = [(k, v) for k, vs in query.items() for v in vs if k not in ("limit", "offset")]
            params.append(("limit", str(limit)))
            if new_offset:
                params.append(("offset", str(new_offset)))
            return base + "?" + urllib.parse.urlencode(params)

        next_link = link(offset + limit) if offset + limit < len(items) else None
        previous_link = None
        if offset > 0:
            previous_link = link(max(offset - limit, 0))
        return {"count": len(items), "next": next_link, "previous": previous_link, "results": page}

    def _note_ignored(self, query: Mapping[str, list[str]], known: Iterable[str]) -> None:
        known_set = set(known) | {"limit", "offset", "ordering", "format", "no_count"}
        with self.lock:
            for key in query:
                if key not in known_set:
                    self.ignored_filters[key] += 1

    @staticmethod
    def _order(
        items: list[Any], query: Mapping[str, list[str]], fields: Mapping[str, Callable[[Any], Any]], default: str
    ) -> list[Any]:
        """DRF ``OrderingFilter``: unknown fields are dropped; no valid field means the default."""
        terms = [t.strip() for t in ",".join(query.get("ordering", [])).split(",") if t.strip()]
        terms = [t for t in terms if t.lstrip("-") in fields] or [default]
        for term in reversed(terms):
            key = fields[term.lstrip("-")]
            items = sorted(items, key=key, reverse=term.startswith("-"))
        return items

    # ----------------------------------------------------------------------------- handlers: projects

    def _list_projects(self, query: Mapping[str, list[str]], **_: Any) -> tuple[int, Any]:
        self._note_ignored(query, ["name", "owner"])
        with self.lock:
            projects = list(self.projects.values())
            if "name" in query:
                projects = [p for p in projects if p.name == query["name"][-1]]
            projects = self._order(projects, query, {"name": lambda p: p.name, "ctime": lambda p: p.ctime}, "name")
            results = [self._project_json(p) for p in projects]
        return 200, self._paginate(API_PREFIX + "projects/", query, results)

    def _project(self, project_id: str) -> Project:
        project = self.projects.get(project_id)
        if project is None:
            raise _not_found()
        return project

    def _get_project(self, key: str, **_: Any) -> tuple[int, Any]:
        with self.lock:
            return 200, self._project_json(self._project(key))

    def _visible_commits(self, project_id: str | None = None) -> list[Commit]:
        return [c for c in self.commits.values() if c.fetched and (project_id is None or c.project_id == project_id)]

    def _project_commits(self, key: str, **_: Any) -> tuple[int, Any]:
        with self.lock:
            self._project(key)
            commits = sorted(self._visible_commits(key), key=lambda c: c.commit_time, reverse=True)
            return 200, [self._commit_json(c) for c in commits]

    def _fetch_project(self, key: str, **_: Any) -> tuple[int, Any]:
        with self.lock:
            self._project(key)
            new = [c for c in self.commits.values() if c.project_id == key and not c.fetched]
            for commit in new:
                commit.fetched = True
            return 200, {"commits": [self._commit_json(c) for c in new], "errors": []}

    def _list_commits(self, query: Mapping[str, list[str]], **_: Any) -> tuple[int, Any]:
        self._note_ignored(query, ["project", "identifier", "ref", "adhoc"])
        with self.lock:
            commits = self._visible_commits()
            if "project" in query:
                commits = [c for c in commits if c.project_id == query["project"][-1]]
            if "identifier" in query:
                commits = [c for c in commits if c.identifier == query["identifier"][-1]]
            if "ref" in query:
                commits = [c for c in commits if c.ref == query["ref"][-1]]
            if "adhoc" in query:
                wanted = query["adhoc"][-1].lower() in ("true", "1")
                commits = [c for c in commits if c.adhoc == wanted]
            commits = self._order(
                commits, query, {"commit_time": lambda c: c.commit_time, "ctime": lambda c: c.ctime}, "-commit_time"
            )
            results = [self._commit_json(c) for c in commits]
        return 200, self._paginate(API_PREFIX + "commits/", query, results)

    def _get_commit(self, key: str, query: Mapping[str, list[str]], **_: Any) -> tuple[int, Any]:
        include_config = "config" in ",".join(query.get("include", [])).split(",")
        with self.lock:
            for commit in self._visible_commits(query.get("project", [None])[-1]):
                if str(commit.id) == key or commit.identifier == key:
                    return 200, self._commit_json(commit, include_config=include_config)
        raise _not_found()

    def _resolve_commit(self, project_id: str, ref: str) -> Commit | None:
        """A commit identifier, or a branch name meaning that branch's newest commit."""
        commits = self._visible_commits(project_id)
        for commit in commits:
            if commit.identifier == ref:
                return commit
        on_ref = [c for c in commits if c.ref == ref]
        if on_ref:
            return max(on_ref, key=lambda c: (c.commit_time, c.id))
        return None

    # ----------------------------------------------------------------------------- handlers: environments

    def _list_environments(self, query: Mapping[str, list[str]], **_: Any) -> tuple[int, Any]:
        with self.lock:
            envs = sorted(self.environments.values(), key=lambda e: e.name)
            results = [self._environment_json(e) for e in envs]
        return 200, self._paginate(API_PREFIX + "environments/", query, results)

    def _get_environment(self, key: str, **_: Any) -> tuple[int, Any]:
        with self.lock:
            env = self._find_environment(key)
            if env is None:
                raise _not_found()
            return 200, self._environment_json(env)

    def _find_environment(self, key: str) -> Environment | None:
        for env in self.environments.values():
            if key in (env.id, env.slug):
                return env
        return None

    # ----------------------------------------------------------------------------- handlers: executions

    def _find_execution(self, key: str) -> Execution:
        """By UUID, or by ``<project id>:<counter>`` as ``valohai-cli`` addresses executions."""
        ex = self.executions.get(key)
        if ex is None and ":" in key:
            project_id, _, counter = key.rpartition(":")
            for candidate in self.executions.values():
                if candidate.project_id == project_id and str(candidate.counter) == counter:
                    ex = candidate
                    break
            if ex is None and counter == "latest":
                mine = [e for e in self.executions.values() if e.project_id == project_id]
                ex = max(mine, key=lambda e: e.counter) if mine else None
        if ex is None:
            raise _not_found()
        return ex

    def _list_executions(self, query: Mapping[str, list[str]], **_: Any) -> tuple[int, Any]:
        self._note_ignored(query, ["project", "status", "counter", "step", "deleted", "creator", "id"])
        with self.lock:
            items = list(self.executions.values())
            if "project" in query:
                items = [e for e in items if e.project_id == query["project"][-1]]
            if "status" in query:
                wanted: set[str] = set()
                for value in query["status"]:
                    for status in value.split(","):
                        wanted |= set(INCOMPLETE_STATUSES) if status == "incomplete" else {status}
                items = [e for e in items if (e.status_override or e.status) in wanted]
            if "counter" in query:
                counters = {c for v in query["counter"] for c in v.split(",")}
                items = [e for e in items if str(e.counter) in counters]
            if "step" in query:
                items = [e for e in items if e.step["name"] == query["step"][-1]]
            if "id" in query:
                ids = {i for v in query["id"] for i in v.split(",")}
                items = [e for e in items if e.id in ids]
            if query.get("deleted", ["false"])[-1].lower() in ("true", "1"):
                items = []  # nothing is ever deleted here
            items = self._order(items, query, {"counter": lambda e: e.counter, "ctime": lambda e: e.ctime}, "-ctime")
            results = [self._execution_json(e, exclude=("events", "metadata")) for e in items]
        return 200, self._paginate(API_PREFIX + "executions/", query, results)

    def _get_execution(self, key: str, query: Mapping[str, list[str]], **_: Any) -> tuple[int, Any]:
        exclude = [x for v in query.get("exclude", []) for x in v.split(",") if x]
        with self.lock:
            return 200, self._execution_json(self._find_execution(key), exclude=exclude)

    def _execution_events(self, key: str, query: Mapping[str, list[str]], **_: Any) -> tuple[int, Any]:
        limit = _positive_int(query.get("limit", [None])[-1], self.events_limit, allow_zero=True)
        with self.lock:
            events = list(self._find_execution(key).events)
        total = len(events)
        shown = events if limit == 0 else events[-limit:]
        return 200, {"total": total, "truncated": len(shown) < total, "events": copy.deepcopy(shown)}

    def _execution_metadata(self, key: str, **_: Any) -> tuple[int, Any]:
        with self.lock:
            return 200, copy.deepcopy(self._find_execution(key).metadata)

    def _delete_execution(self, key: str, **_: Any) -> tuple[int, Any]:
        # valohai-cli's `vh execution delete` sends DELETE /api/v0/executions/{id}/ and expects 204.
        with self.lock:
            ex = self._find_execution(key)
        self._delete(ex.id)
        return 204, None

    def _delete(self, execution_id: str) -> None:
        with self.lock:
            ex = self.executions[execution_id]
            ex.stop_requested.set()
        self._kill(ex, signal.SIGKILL)
        if ex.thread is not None and ex.thread is not threading.current_thread():
            ex.thread.join(timeout=10)
        with self.lock:
            self.executions.pop(execution_id, None)

    def _stop_execution(self, key: str, **_: Any) -> tuple[int, Any]:
        with self.lock:
            ex = self._find_execution(key)
            if ex.status in ("created", "queued", "started"):
                self._set_status(ex, "stopping", "Stop requested.")
                ex.stop_requested.set()
            status = ex.status
        # Signal outside the lock: the runner thread takes it to record events.
        if status == "stopping":
            self._kill(ex, signal.SIGTERM)
        return 200, {"message": "Stop signal sent.", "status": status}

    def _create_execution(self, payload: dict[str, Any], **_: Any) -> tuple[int, Any]:
        with self.lock:
            ex = self._validate_execution(payload)
            self.executions[ex.id] = ex
            self._event(ex, "status", f"Execution #{ex.counter} created.")
            ex.thread = threading.Thread(target=self._run, args=(ex,), name=f"fake-valohai-{ex.counter}", daemon=True)
            data = self._execution_json(ex)
        ex.thread.start()
        return 201, data

    def _validate_execution(self, payload: dict[str, Any]) -> Execution:
        errors: dict[str, list[dict[str, str]]] = {}

        def fail(field_name: str, message: str, code: str = "invalid") -> None:
            errors.setdefault(field_name, []).append(_error(message, code))

        project: Project | None = None
        project_key = payload.get("project")
        if not project_key:
            fail("project", "This field is required.", "required")
        else:
            project = self.projects.get(str(project_key)) or next(
                (p for p in self.projects.values() if p.name == project_key), None
            )
            if project is None:
                fail("project", f'Invalid pk "{project_key}" - object does not exist.', "does_not_exist")

        commit: Commit | None = None
        commit_key = payload.get("commit")
        if not commit_key:
            fail("commit", "This field is required.", "required")
        elif project is not None:
            commit = self._resolve_commit(project.id, str(commit_key))
            if commit is None:
                fail("commit", f"Commit {commit_key} not found in project {project.name}.", "does_not_exist")

        step: dict[str, Any] | None = None
        step_name = payload.get("step")
        if not step_name:
            fail("step", "This field is required.", "required")
        elif commit is not None:
            step = config_steps(commit.config).get(str(step_name))
            if step is None:
                fail(
                    "step",
                    f'Step "{step_name}" not found in the configuration of commit {commit.identifier}.',
                    "does_not_exist",
                )

        env_key = payload.get("environment") or (project.default_environment if project else None) or "default"
        environment = self._find_environment(str(env_key))
        if environment is None:
            fail("environment", f"Object with slug or primary key {env_key} does not exist.", "does_not_exist")

        parameters = payload.get("parameters") or {}
        if not isinstance(parameters, dict):
            fail("parameters", "Expected a dictionary of items.", "not_a_dict")
            parameters = {}
        inputs = payload.get("inputs") or {}
        if not isinstance(inputs, dict):
            fail("inputs", "Expected a dictionary of items.", "not_a_dict")
            inputs = {}
        env_vars = payload.get("environment_variables") or {}
        if not isinstance(env_vars, dict) or not all(isinstance(k, str) for k in env_vars):
            fail("environment_variables", "Expected a dictionary of items.", "not_a_dict")
            env_vars = {}
        tags = payload.get("tags") or []
        if isinstance(tags, str) or not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            fail(
                "tags",
                'Expected a list of items but got type "str".'
                if isinstance(tags, str)
                else "Each tag must be a string.",
                "not_a_list",
            )
            tags = []
        time_limit = payload.get("time_limit")
        if time_limit in ("", None):
            time_limit = None
        else:
            try:
                time_limit = int(time_limit)
                if time_limit < 0:
                    raise ValueError
            except (TypeError, ValueError):
                fail("time_limit", "A valid integer is required.", "invalid")
                time_limit = None
        runtime_config = payload.get("runtime_config") or {}
        if not isinstance(runtime_config, dict):
            fail("runtime_config", "Expected a dictionary of items.", "not_a_dict")
            runtime_config = {}
        title = payload.get("title") or ""

        values: dict[str, Any] = {}
        input_urls: dict[str, list[str]] = {}
        if step is not None:
            values = self._validate_parameters(step, parameters, fail)
            input_urls = self._validate_inputs(step, inputs, fail)
            if time_limit is None and step.get("time-limit") is not None:
                time_limit = _parse_duration(step["time-limit"])

        if errors:
            raise FieldErrors(errors)
        assert project is not None and commit is not None and step is not None and environment is not None

        step_env = {
            str(v["name"]): str(v["default"])
            for v in step.get("environment-variables", []) or []
            if v.get("default") is not None
        }
        project.counter += 1
        return Execution(
            id=str(uuid.uuid4()),
            counter=project.counter,
            project_id=project.id,
            commit_id=commit.id,
            step=step,
            environment_id=environment.id,
            parameters=values,
            inputs=input_urls,
            environment_variables={**step_env, **{k: str(v) for k, v in env_vars.items()}},
            tags=list(tags),
            title=str(title),
            time_limit=time_limit,
            runtime_config=runtime_config,
            image=str(payload.get("image") or step.get("image") or ""),
            command=build_command(step.get("command") or [], step.get("parameters") or [], values),
            ctime=_now(),
        )

    @staticmethod
    def _validate_parameters(
        step: Mapping[str, Any], given: Mapping[str, Any], fail: Callable[..., None]
    ) -> dict[str, Any]:
        specs = {str(p["name"]): p for p in step.get("parameters", []) or []}
        for name in given:
            if name not in specs:
                fail("parameters", f'Parameter "{name}" is not defined by step "{step["name"]}".')
        values: dict[str, Any] = {}
        for name, spec in specs.items():
            raw = given.get(name, spec.get("default"))
            if raw is None:
                if spec.get("type") == "flag":
                    values[name] = False
                elif not spec.get("optional"):
                    fail("parameters", f'Parameter "{name}" is required.', "required")
                continue
            value, problems = coerce_parameter(spec, raw)
            for problem in problems:
                fail("parameters", f"{name}: {problem}")
            values[name] = value
        return values

    def _validate_inputs(
        self, step: Mapping[str, Any], given: Mapping[str, Any], fail: Callable[..., None]
    ) -> dict[str, list[str]]:
        specs = {str(i["name"]): i for i in step.get("inputs", []) or []}
        for name in given:
            if name not in specs:
                fail("inputs", f'Input "{name}" is not defined by step "{step["name"]}".')
        urls: dict[str, list[str]] = {}
        for name, spec in specs.items():
            raw = given.get(name)
            chosen = _listify(raw) if raw not in (None, [], "") else _listify(spec.get("default"))
            if not all(isinstance(u, str) and u for u in chosen):
                fail("inputs", f'Input "{name}": each value must be a URL string.')
                continue
            if not chosen:
                if not spec.get("optional"):
                    fail("inputs", f'Input "{name}" is required.', "required")
                continue
            for url in chosen:
                problem = _input_url_problem(url)
                if problem is not None:
                    fail("inputs", f'Input "{name}": {problem}', "invalid")
                elif url.startswith("datum://"):
                    datum_id = url[len("datum://") :]
                    if datum_id not in self.data:
                        fail("inputs", f'Input "{name}": datum {datum_id} does not exist.', "does_not_exist")
            urls[name] = list(chosen)
        return urls

    # ----------------------------------------------------------------------------- handlers: data

    def _list_data(self, query: Mapping[str, list[str]], **_: Any) -> tuple[int, Any]:
        self._note_ignored(query, ["output_execution", "project", "deleted", "purged", "name"])
        with self.lock:
            items = list(self.data.values())
            if "output_execution" in query:
                items = [d for d in items if d.output_execution_id == query["output_execution"][-1]]
            if "project" in query:
                items = [d for d in items if d.project_id == query["project"][-1]]
            if "name" in query:
                items = [d for d in items if d.name == query["name"][-1]]
            if query.get("deleted", ["false"])[-1].lower() in ("true", "1"):
                items = []
            items = self._order(
                items, query, {"ctime": lambda d: (d.ctime, d.name), "name": lambda d: d.name}, "-ctime"
            )
            results = [self._datum_json(d) for d in items]
        return 200, self._paginate(API_PREFIX + "data/", query, results)

    def _get_datum(self, key: str, **_: Any) -> tuple[int, Any]:
        with self.lock:
            datum = self.data.get(key)
            if datum is None:
                raise _not_found()
            return 200, self._datum_json(datum)

    def _signature(self, datum_id: str, expires: str) -> str:
        return hashlib.sha256(f"{self.token}:{datum_id}:{expires}".encode()).hexdigest()

    def _download_datum(self, key: str, **_: Any) -> tuple[int, Any]:
        with self.lock:
            datum = self.data.get(key)
            if datum is None:
                raise _not_found()
        expires = str(int(time.time()) + 3600)
        query = urllib.parse.urlencode(
            {"X-Amz-Expires": "3600", "Expires": expires, "X-Amz-Signature": self._signature(datum.id, expires)}
        )
        url = f"{self.url}{STORE_PREFIX}{datum.id}/{urllib.parse.quote(datum.name)}?{query}"
        return 200, {"url": url}

    def _serve_store(self, path: str, query: Mapping[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        """The object store behind signed URLs: no API token, but the signature must match."""
        datum_id = path[len(STORE_PREFIX) :].split("/", 1)[0]
        expires = query.get("Expires", [""])[-1]
        datum = self.data.get(datum_id)
        forbidden = b'<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>'
        if datum is None or query.get("X-Amz-Signature", [""])[-1] != self._signature(datum_id, expires):
            return 403, {"Content-Type": "application/xml"}, forbidden
        if not expires.isdigit() or int(expires) < time.time():
            return 403, {"Content-Type": "application/xml"}, forbidden
        with open(datum.path, "rb") as fh:
            return 200, {"Content-Type": "application/octet-stream"}, fh.read()

    def _serve_file(self, path: str) -> tuple[int, dict[str, str], bytes]:
        name = urllib.parse.unquote(path[len(FILES_PREFIX) :])
        with self.lock:
            content = self.files.get(name)
        if content is None:
            return 404, {"Content-Type": "text/plain"}, b"not found"
        return 200, {"Content-Type": "application/octet-stream"}, content

    def _me(self, **_: Any) -> tuple[int, Any]:
        return 200, {"id": 1, "username": self.owner}

    # ----------------------------------------------------------------------------- the runner

    def _event(self, ex: Execution, stream: str, message: str) -> None:
        with self.lock:
            ex.events.append({"stream": stream, "message": message, "time": _event_time(_now())})
            ex.mtime = _now()

    def _set_status(self, ex: Execution, status: str, message: str | None = None) -> None:
        with self.lock:
            ex.status = status
            ex.mtime = _now()
            if status == "queued":
                ex.qtime = ex.mtime
            if status == "started":
                ex.start_time = ex.mtime
            if status in COMPLETE_STATUSES:
                ex.end_time = ex.mtime
            if message:
                self._event(ex, "status", message)

    def _kill(self, ex: Execution, sig: int) -> None:
        proc = ex.process
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _store_datum(self, name: str, content: bytes, *, project_id: str | None, execution_id: str | None) -> Datum:
        datum_id = str(uuid.uuid4())
        folder = os.path.join(self._root, "store", datum_id)
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        path = os.path.join(folder, name)
        with open(path, "wb") as fh:
            fh.write(content)
        datum = Datum(
            id=datum_id,
            name=name,
            path=path,
            size=len(content),
            ctime=_now(),
            project_id=project_id,
            output_execution_id=execution_id,
            sha256=hashlib.sha256(content).hexdigest(),
            md5=hashlib.md5(content).hexdigest(),
        )
        with self.lock:
            self.data[datum.id] = datum
        return datum

    def _finish_if_stopped(self, ex: Execution) -> bool:
        if ex.crash_message is not None:
            self._set_status(ex, "crashed", f"Execution crashed: {ex.crash_message}")
            return True
        if ex.stop_requested.is_set():
            self._set_status(ex, "stopped", "Execution stopped.")
            return True
        return False

    def _run(self, ex: Execution) -> None:
        """Drive one execution through its life cycle in a background thread."""
        try:
            self._set_status(ex, "queued", "Execution queued.")
            deadline = time.monotonic() + self.queue_delay
            while not ex.stop_requested.is_set():
                if self._queue_open.is_set() and time.monotonic() >= deadline:
                    break
                ex.stop_requested.wait(0.02)
            if self._finish_if_stopped(ex):
                return
            work = os.path.join(self._root, "executions", ex.id)
            dirs = {name: os.path.join(work, name) for name in ("inputs", "outputs", "config", "repository")}
            for folder in dirs.values():
                os.makedirs(folder, exist_ok=True)
            self._set_status(ex, "started", "Execution started.")
            try:
                self._prepare(ex, dirs)
            except _InputError as exc:
                self._event(ex, "stderr", str(exc))
                self._set_status(ex, "error", "Downloading inputs failed.")
                return
            self._execute(ex, dirs)
        except Exception as exc:  # pragma: no cover - a bug in the fake must not hang the test
            self._event(ex, "stderr", f"fake-valohai internal error: {exc!r}")
            self._set_status(ex, "crashed", "Execution crashed.")

    def _prepare(self, ex: Execution, dirs: Mapping[str, str]) -> None:
        commit = self.commits[ex.commit_id]
        source = commit.repository or self.projects[ex.project_id].repository
        if source:
            shutil.copytree(source, dirs["repository"], dirs_exist_ok=True)
        inputs_json: dict[str, Any] = {}
        for name, urls in ex.inputs.items():
            target_dir = os.path.join(dirs["inputs"], name)
            os.makedirs(target_dir, exist_ok=True)
            files = []
            for url in urls:
                self._event(ex, "status", f"Downloading input {name}: {url}")
                file_name, content, datum_id = self._fetch_input(url)
                path = os.path.join(target_dir, file_name)
                with open(path, "wb") as fh:
                    fh.write(content)
                files.append(
                    {
                        "name": file_name,
                        "uri": url,
                        "path": path,
                        "size": len(content),
                        "checksums": {"sha256": hashlib.sha256(content).hexdigest()},
                        "datum_id": datum_id,
                        "metadata": [],
                    }
                )
            with self.lock:
                ex.input_files[name] = [{k: v for k, v in f.items() if k != "path"} for f in files]
            inputs_json[name] = {"input_id": str(uuid.uuid4()), "files": files}
        project = self.projects[ex.project_id]
        env = self.environments[ex.environment_id]
        execution_json = {
            "valohai.commit-identifier": commit.identifier,
            "valohai.environment-id": env.id,
            "valohai.environment-name": env.name,
            "valohai.environment-slug": env.slug,
            "valohai.execution-counter": ex.counter,
            "valohai.execution-ctime": _iso(ex.ctime),
            "valohai.execution-id": ex.id,
            "valohai.execution-image": ex.image,
            "valohai.execution-status": "started",
            "valohai.execution-step": ex.step["name"],
            "valohai.execution-tags": list(ex.tags),
            "valohai.execution-title": ex.title or None,
            "valohai.project-id": project.id,
            "valohai.project-name": f"{project.owner}/{project.name}",
        }
        config_files: dict[str, Any] = {
            "parameters.json": ex.parameters,
            "inputs.json": inputs_json,
            "execution.json": execution_json,
        }
        for file_name, document in config_files.items():
            with open(os.path.join(dirs["config"], file_name), "w", encoding="utf-8") as fh:
                json.dump(document, fh, indent=2)

    def _fetch_input(self, url: str) -> tuple[str, bytes, str | None]:
        """Return ``(file name, content, datum id)`` for a ``datum://`` or loopback ``http(s)`` URL.

        Store URLs (``s3://``, ``gs://``, ``azure://``, ``swift://``) pass validation, as they do on
        Valohai, but this server has no credentials for a store: downloading them fails the execution.
        """
        if url.startswith("datum://"):
            datum = self.data.get(url[len("datum://") :])
            if datum is None:
                raise _InputError(f"Datum {url} does not exist")
            with open(datum.path, "rb") as fh:
                return os.path.basename(datum.name), fh.read(), datum.id
        parsed = urllib.parse.urlsplit(url)
        # Never a local path or file:// URL: the worker machine has no access to the caller's disk.
        if parsed.scheme in ("http", "https"):
            if not _is_loopback(parsed.hostname or ""):
                raise _InputError(f"Could not download {url}: only loopback URLs are reachable from the fake")
            try:
                with urllib.request.urlopen(url, timeout=30) as resp:
                    content = resp.read()
            except OSError as exc:
                raise _InputError(f"Could not download {url}: {exc}") from exc
            name = os.path.basename(urllib.parse.unquote(parsed.path)) or "download"
            return name, content, None
        raise _InputError(f"Could not download {url}: unsupported URL scheme {parsed.scheme!r}")

    def _execute(self, ex: Execution, dirs: Mapping[str, str]) -> None:
        env = dict(os.environ)
        env.update(
            {
                "VH_INPUTS_DIR": dirs["inputs"],
                "VH_OUTPUTS_DIR": dirs["outputs"],
                "VH_CONFIG_DIR": dirs["config"],
                "VH_REPOSITORY_DIR": dirs["repository"],
                "VH_EXECUTION_ID": ex.id,
                "VH_JOB_ID": f"exec-{ex.id}",
                "VH_PROJECT_ID": ex.project_id,
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(ex.environment_variables)
        script = "\n".join(line for line in ex.command if line.strip())
        self._event(ex, "status", "Running command.")
        with self.lock:
            if ex.stop_requested.is_set():
                proc = None
            else:
                proc = subprocess.Popen(
                    ["/bin/sh", "-e", "-c", script],
                    cwd=dirs["repository"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,  # so stop/crash can signal the whole process group
                )
                ex.process = proc
        if proc is None:
            self._finish_if_stopped(ex)
            return
        readers = [
            threading.Thread(target=self._pump, args=(ex, proc.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._pump, args=(ex, proc.stderr, "stderr"), daemon=True),
        ]
        for reader in readers:
            reader.start()
        timed_out = False
        started = time.monotonic()
        killed_at: float | None = None
        memory_mib = self.environments[ex.environment_id].memory_mib
        while proc.poll() is None:
            if memory_mib is not None and ex.oom_killed is None:
                ex.oom_killed = _oom_kill(proc.pid, memory_mib)
            if ex.time_limit and not timed_out and time.monotonic() - started > ex.time_limit:
                timed_out = True
                self._event(ex, "status", f"Time limit of {ex.time_limit} seconds exceeded; stopping.")
                self._kill(ex, signal.SIGTERM)
                killed_at = time.monotonic()
            if ex.stop_requested.is_set() and killed_at is None:
                self._kill(ex, signal.SIGTERM)
                killed_at = time.monotonic()
            if killed_at is not None and time.monotonic() - killed_at > self.stop_grace:
                self._kill(ex, signal.SIGKILL)
            time.sleep(0.02)
        for reader in readers:
            reader.join(timeout=10)
        with self.lock:
            ex.exit_code = proc.returncode
            ex.process = None
        if ex.crash_message is not None:
            self._finish_if_stopped(ex)
            return
        self._collect_outputs(ex, dirs["outputs"])
        if ex.oom_killed is not None:
            # The worker sees the container's OOM kill (Docker's State.OOMKilled) and ends the execution in
            # error, saying so in the status stream; the exit code is the main process's, as Docker reports.
            # Valohai's public docs and valohai-cli do not show the wording of that status event (searched:
            # valohai/docs, valohai/valohai-cli); the text here is this server's own, and clients must not
            # match on more than "out of memory".
            self._event(ex, "status", ex.oom_killed)
            self._set_status(ex, "error", f"Process exited with code {proc.returncode}. Execution failed.")
        elif timed_out:
            with self.lock:
                ex.status_detail = "Time limit exceeded"
            self._set_status(ex, self.time_limit_status, f"Execution {self.time_limit_status}: time limit exceeded.")
        elif ex.stop_requested.is_set():
            self._set_status(ex, "stopped", "Execution stopped.")
        elif proc.returncode == 0:
            self._set_status(ex, "complete", "Process exited with code 0. Execution complete.")
        else:
            self._set_status(ex, "error", f"Process exited with code {proc.returncode}. Execution failed.")

    def _pump(self, ex: Execution, stream: Any, name: str) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self._event(ex, name, line)
            if name == "stdout":
                stripped = line.strip()
                if stripped.startswith("{") and stripped.endswith("}"):
                    try:
                        entry = json.loads(stripped)
                    except ValueError:
                        continue
                    if isinstance(entry, dict):
                        entry.setdefault("_time", _event_time(_now()))
                        with self.lock:
                            ex.metadata.append(entry)
        stream.close()

    def _collect_outputs(self, ex: Execution, outputs_dir: str) -> None:
        found: list[str] = []
        for folder, _, names in os.walk(outputs_dir):
            for file_name in names:
                found.append(os.path.relpath(os.path.join(folder, file_name), outputs_dir))
        for rel in sorted(found):
            with open(os.path.join(outputs_dir, rel), "rb") as fh:
                content = fh.read()
            datum = self._store_datum(rel.replace(os.sep, "/"), content, project_id=ex.project_id, execution_id=ex.id)
            with self.lock:
                ex.output_ids.append(datum.id)
            self._event(ex, "status", f"Uploaded output {datum.name} ({datum.size} bytes).")


class DropConnection(Exception):
    """Raised by :meth:`FakeValohai.handle` after a request took effect: close the connection unanswered."""


class _InputError(Exception):
    """An input could not be fetched; the execution ends in ``error``."""


#: URL schemes Valohai downloads inputs from. The valohai.yaml reference (docs: reference-guides/
#: valohai-yaml/step-inputs.rst) lists HTTP(S), ``s3://`` and ``azure://``; "Inputs with Valohai CLI"
#: (docs: valohai-cli/using-inputs.rst) adds ``datum://<id>``, ``gs://`` and ``swift://``; datasets are
#: addressed as ``dataset://<name>/<version>``. Nothing else: an input is fetched by the worker machine.
INPUT_URL_SCHEMES = frozenset({"http", "https", "s3", "gs", "azure", "swift", "datum", "dataset"})
_UUID_RE = re.compile(r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$", re.I)


def _input_url_problem(url: str) -> str | None:
    """Why Valohai refuses ``url`` as an input, or None.

    A refused input is a 400 field error on ``inputs`` (code ``invalid``), the way the create view
    validates the request before anything runs; an empty ``datum://`` answers "'' is not a valid UUID."
    (valohai/valohai-cli issue #98 quotes ``API Error: * '' is not a valid UUID. (code: invalid)``).
    A local path has no scheme at all: Django's URLValidator says "Enter a valid URL.".
    """
    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.lower()
    if scheme not in INPUT_URL_SCHEMES or (scheme not in ("datum", "dataset") and not parsed.netloc):
        return f"{url!r}: Enter a valid URL."
    if scheme == "datum":
        datum_id = url[len("datum://") :]
        if not _UUID_RE.match(datum_id):
            return f"'{datum_id}' is not a valid UUID."
    return None


def _positive_int(raw: str | None, default: int, *, allow_zero: bool) -> int:
    try:
        value = int(raw) if raw is not None else default
    except ValueError:
        return default
    if value < 0 or (value == 0 and not allow_zero):
        return default
    return value


def _parse_duration(raw: Any) -> int | None:
    """``time-limit`` in seconds, or in the YAML's human form such as ``1h 30m 5s``."""
    if isinstance(raw, (int, float)):
        return int(raw)
    total = 0
    for amount, unit in re.findall(r"(\d+)\s*([hms]?)", str(raw)):
        total += int(amount) * {"h": 3600, "m": 60, "s": 1, "": 1}[unit]
    return total or None


def _oom_kill(root: int, memory_mib: int) -> str | None:
    """SIGKILL the biggest process of the step once together its processes use more than ``memory_mib``.

    The kernel's OOM killer in a memory-limited cgroup picks the process with the highest badness
    (about: the largest resident set) and kills it with SIGKILL; the others live on. The cgroup holds
    every descendant of the step's command, whatever session or process group it started, so the
    processes are found by parent pid. Returns the message the worker reports, or None while memory
    is within bounds.
    """
    page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
    procs: dict[int, tuple[int, int, str]] = {}  # pid -> (ppid, resident KiB, command name)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{entry}/statm") as fh:
                resident = int(fh.read().split()[1]) * page_kib
            fields = stat[stat.rfind(")") + 2 :].split()
            procs[int(entry)] = (int(fields[1]), resident, stat[stat.find("(") + 1 : stat.rfind(")")])
        except (OSError, ValueError, IndexError):
            continue
    tree = {root} if root in procs else set()
    grew = True
    while grew:
        children = {pid for pid, (ppid, _, _) in procs.items() if ppid in tree} - tree
        tree |= children
        grew = bool(children)
    if sum(procs[pid][1] for pid in tree) <= memory_mib * 1024:
        return None
    size, pid, comm = max((procs[p][1], p, procs[p][2]) for p in tree)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    return (f"Out of memory: the kernel killed process {pid} ({comm}, {size // 1024} MiB resident); "
            f"the machine has {memory_mib} MiB. Choose an environment with more memory.")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


class _Handler(http.server.BaseHTTPRequestHandler):
    """Adapts :meth:`FakeValohai.handle` to ``http.server``; HTTP/1.1 keep-alive like a real API."""

    protocol_version = "HTTP/1.1"
    server_fake: FakeValohai

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            status, out_headers, out = self.server_fake.handle(self.command, self.path, headers, body)
        except DropConnection:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        try:
            self.send_response(status)
            for key, value in out_headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(out)
        except OSError:  # the client gave up waiting (its timeout), as after a slow create
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature from the base
        """Stay quiet; :attr:`FakeValohai.request_log` records traffic."""
