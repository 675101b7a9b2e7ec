"""Watching pods: one shared watch per (event loop, cluster, namespace) for the triggerer, and a per-pod
watch for a worker.

**The shared watch.** Every step waiting in a triggerer process asks the same question ("has my pod
changed?") of the same API server. Rather than each polling its own pod, one :class:`ClusterSession` per
(event loop, connection, namespace) lists the pods this package manages (label selector
``app.kubernetes.io/managed-by=airflow-remote-ml``) once, then follows a single watch from that list's
``resourceVersion`` and fans each event out to the waiters of that pod. Status questions are answered
from its cache without any request, so the API traffic of waiting is one long-lived watch, whatever
the number of waiting steps. A dropped watch is resumed from the last ``resourceVersion`` seen
(bookmarks keep it fresh); a 410 Gone/Expired means it is too old and the session lists again.

The session also owns the one ``kubernetes_asyncio`` client (one connection pool) every backend object
in that loop uses, and a budget for log reads: log lines are per pod and cannot be shared, so the
session spaces each pod's log reads (``log_interval``) and caps their total rate
(``max_log_requests_per_second``) so log traffic stays bounded too. The final read of a finished pod is
never held back.

Sessions live in a module-level registry; a session closes ``linger`` seconds after its last user
released it (triggers come and go, the watch should not), or when its event loop ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass, field
from typing import Any

from airflow_remote_ml.backends.kubernetes._client import (
    ConnectionSettings,
    Expired,
    TransientBackendError,
    acall_with_retries,
    async_configuration,
    check_response,
    map_exception,
    mapped,
)
from airflow_remote_ml.core.errors import BackendAPIError
from airflow_remote_ml.core.identity import LABEL_MANAGED_BY, MANAGED_BY

log = logging.getLogger(__name__)

JSON = dict[str, Any]
MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
#: How many deleted pods a session remembers (their last state answers later questions).
TOMBSTONES = 10_000
LIST_PAGE = 500


# -- parsing a watch stream ------------------------------------------------------------------------------


def split_lines(buffer: bytearray, chunk: bytes) -> list[bytes]:
    """Append ``chunk`` to ``buffer`` and take every complete line out of it."""
    buffer.extend(chunk)
    lines = []
    start = 0
    while True:
        end = buffer.find(b"\n", start)
        if end < 0:
            break
        if end > start:
            lines.append(bytes(buffer[start:end]))
        start = end + 1
    del buffer[:start]
    return lines


def parse_event(line: bytes) -> tuple[str, JSON]:
    """``(type, object)`` of one watch event line; ERROR events raise our error for their Status."""
    event = json.loads(line)
    kind, obj = event.get("type", ""), event.get("object") or {}
    if kind == "ERROR":
        code = obj.get("code")
        message = f"watch error: {obj.get('message') or obj.get('reason') or obj}"
        if code == 410:
            raise Expired("kubernetes", message, 410)
        if code in (429, 500, 503, 504) or code is None:
            raise TransientBackendError("kubernetes", message, code)
        raise BackendAPIError("kubernetes", message, code)
    return kind, obj


def resource_version(obj: JSON) -> str | None:
    return (obj.get("metadata") or {}).get("resourceVersion")


# -- the sync per-pod watch (worker) ---------------------------------------------------------------------


def watch_pod_events(core: Any, namespace: str, name: str, since: str, timeout: float,
                     on_response: Any = None) -> Generator[tuple[str, JSON], None, None]:
    """Events of pod ``name`` after resourceVersion ``since``, for at most ``timeout`` seconds.

    Ends when the server closes the stream (its ``timeoutSeconds``); raises :class:`Expired` when
    ``since`` is too old, :class:`TransientBackendError` when the stream breaks. ``on_response`` gets
    the open response (so another thread can shut it down).
    """
    server_timeout = max(1, int(timeout + 0.999))
    with mapped(f"watching pod {name}"):
        resp = core.list_namespaced_pod(
            namespace, field_selector=f"metadata.name={name}", watch=True, resource_version=since,
            allow_watch_bookmarks=True, timeout_seconds=server_timeout, _preload_content=False,
            _request_timeout=(10, server_timeout + 15))
    if on_response is not None:
        on_response(resp)
    try:
        buffer = bytearray()
        with mapped(f"watching pod {name}"):
            for chunk in resp.stream(amt=None, decode_content=False):
                for line in split_lines(buffer, chunk):
                    yield parse_event(line)
    finally:
        with contextlib.suppress(Exception):
            resp.release_conn()
            resp.close()


# -- the shared async watch (triggerer) ------------------------------------------------------------------


@dataclass
class SessionStats:
    """What a session asked of the API server (for tests and the benchmark)."""

    lists: int = 0
    watches: int = 0
    events: int = 0
    expired: int = 0
    errors: int = 0
    log_reads: int = 0
    log_skips: int = 0
    gets: int = 0


@dataclass
class SessionOptions:
    watch_timeout: float = 300.0
    log_interval: float = 10.0
    max_log_requests_per_second: float = 5.0
    linger: float = 60.0
    api_retries: int = 5
    stats: SessionStats = field(default_factory=SessionStats)


class ClusterSession:
    """The async client, the shared pod cache and watch, and the log budget of one (loop, cluster, namespace)."""

    def __init__(self, key: tuple[str, str], settings: ConnectionSettings, namespace: str,
                 options: SessionOptions) -> None:
        self.key = key
        self.settings = settings
        self.namespace = namespace
        self.options = options
        self.stats = options.stats
        self.pods: dict[str, JSON] = {}
        self.gone: OrderedDict[str, JSON | None] = OrderedDict()
        self.synced = asyncio.Event()
        self.api: Any = None
        self.core: Any = None
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._rv: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._refs = 0
        self._close_timer: asyncio.TimerHandle | None = None
        self._ready: asyncio.Future[None] | None = None
        self._closed = False
        #: The error the watch last broke with, until a watch (or list) request is answered again.
        self.broken: BackendAPIError | None = None
        #: ``time.monotonic()`` when the list or watch request in flight was sent; None once it was answered.
        self.asking_since: float | None = None
        self._last_log: dict[str, float] = {}
        self._tokens = max(1.0, options.max_log_requests_per_second)
        self._tokens_at = time.monotonic()

    # -- life cycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the client (once) and start the watch task."""
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            try:
                from kubernetes_asyncio import client

                cfg = await async_configuration(self.settings)
                self.api = client.ApiClient(cfg)
                self.core = client.CoreV1Api(self.api)
            except BaseException as exc:
                self._ready.set_exception(exc)
                self._ready.exception()  # retrieved: later callers re-raise it themselves
                raise
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"remote-ml-watch-{self.namespace}")
            self._ready.set_result(None)
        await asyncio.shield(self._ready)

    def acquire(self) -> None:
        self._refs += 1
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None

    def release(self) -> None:
        self._refs = max(0, self._refs - 1)
        if self._refs == 0 and not self._closed:
            loop = asyncio.get_running_loop()
            if self._close_timer is not None:
                self._close_timer.cancel()
            self._close_timer = loop.call_later(self.options.linger, lambda: loop.create_task(self._idle_close()))

    async def _idle_close(self) -> None:
        if self._refs == 0:
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _forget(self)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.api is not None:
            with contextlib.suppress(Exception):
                await self.api.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- what waiters ask -------------------------------------------------------------------------------------

    def lookup(self, name: str) -> tuple[str, JSON | None] | None:
        """``("live", pod)``, ``("gone", last state or None)``, or None when the cache cannot tell."""
        if not self.synced.is_set():
            return None
        if name in self.pods:
            return "live", self.pods[name]
        if name in self.gone:
            return "gone", self.gone[name]
        return None

    async def wait_change(self, name: str, timeout: float) -> bool:
        """Wait until pod ``name`` changes (or the cache is rebuilt), at most ``timeout`` s; True if it did."""
        if timeout <= 0:
            return False
        event = asyncio.Event()
        self._waiters.setdefault(name, set()).add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            waiters = self._waiters.get(name)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[name]

    def trouble(self, limit: float) -> TransientBackendError | None:
        """Why the cache may be stale now: the watch broke and is not back, or its request has gone
        unanswered for ``limit`` seconds. None while the watch is open (its silence means "no change")."""
        if self.broken is not None:
            if isinstance(self.broken, TransientBackendError):
                return self.broken
            return TransientBackendError("kubernetes", str(self.broken), self.broken.status_code)
        since = self.asking_since
        if since is not None and time.monotonic() - since >= limit:
            return TransientBackendError("kubernetes", f"watching pods in {self.namespace}: the API server has "
                                         f"not answered in {limit:g}s (request_timeout)")
        return None

    def may_read_logs(self, name: str, final: bool) -> bool:
        """Whether a log read of pod ``name`` fits the budget now (a final read always does)."""
        now = time.monotonic()
        if not final:
            last = self._last_log.get(name)
            if last is not None and now - last < self.options.log_interval:
                self.stats.log_skips += 1
                return False
            rate = max(0.001, self.options.max_log_requests_per_second)
            self._tokens = min(max(1.0, rate), self._tokens + (now - self._tokens_at) * rate)
            self._tokens_at = now
            if self._tokens < 1.0:
                self.stats.log_skips += 1
                return False
            self._tokens -= 1.0
        self._last_log[name] = now
        self.stats.log_reads += 1
        return True

    def forget_logs(self, name: str) -> None:
        self._last_log.pop(name, None)

    # -- the watch ---------------------------------------------------------------------------------------------

    def _notify(self, name: str | None = None) -> None:
        targets = self._waiters.values() if name is None else [self._waiters.get(name, set())]
        for waiters in list(targets):
            for event in list(waiters):
                event.set()

    def _bury(self, name: str, last: JSON | None) -> None:
        self.pods.pop(name, None)
        self.gone[name] = last
        self.gone.move_to_end(name)
        while len(self.gone) > TOMBSTONES:
            self.gone.popitem(last=False)

    async def _run(self) -> None:
        failures = 0
        try:
            while True:
                try:
                    if self._rv is None:
                        await self._relist()
                    await self._watch()
                    failures = 0
                except Expired:
                    self.stats.expired += 1
                    log.info("kubernetes: the pod watch in %s expired; listing again", self.namespace)
                    self._rv = None
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.stats.errors += 1
                    failures += 1
                    ours = exc if isinstance(exc, BackendAPIError) else map_exception(exc, "watching pods")
                    # Until a request gets through again the cache may be stale: waiters are told (they raise,
                    # so the core's transient-error budget counts the outage) instead of being served from it.
                    self.broken = ours or TransientBackendError("kubernetes", f"watching pods in "
                                                                f"{self.namespace}: {type(exc).__name__}: {exc}")
                    self.asking_since = None
                    self._notify()
                    delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                    retry_after = getattr(ours, "retry_after", None)
                    if retry_after:
                        delay = max(delay, float(retry_after))
                    log.warning("kubernetes: the pod watch in %s broke (%s); resuming in %.1fs",
                                self.namespace, ours or exc, delay)
                    await asyncio.sleep(delay)
        finally:
            self.synced.clear()
            if not self._closed:
                # The event loop is ending (asyncio.run cancels every task left) while the session lingers:
                # close the aiohttp session now, or it is reported "Unclosed client session/connector".
                self._closed = True
                _forget(self)
                if self._close_timer is not None:
                    self._close_timer.cancel()
                if self.api is not None:
                    with contextlib.suppress(Exception):
                        await self.api.close()

    async def _relist(self) -> None:
        items: dict[str, JSON] = {}
        token: str | None = None
        rv: str | None = None
        self.asking_since = time.monotonic()
        while True:
            self.stats.lists += 1
            kwargs: JSON = {"label_selector": MANAGED_SELECTOR, "limit": LIST_PAGE, "_preload_content": False}
            if token:
                kwargs["_continue"] = token
            page = dict(kwargs)
            body = await acall_with_retries(
                f"listing pods in {self.namespace}",
                lambda: self._read_json(self.core.list_namespaced_pod(self.namespace, **page)),  # noqa: B023
                self.options.api_retries)
            for pod in body.get("items") or []:
                items[pod["metadata"]["name"]] = pod
            meta = body.get("metadata") or {}
            rv = rv or meta.get("resourceVersion")
            token = meta.get("continue")
            if not token:
                break
        for name in list(self.pods):
            if name not in items:
                self._bury(name, self.pods[name])
        for name in items:
            self.gone.pop(name, None)
        self.pods = items
        self._rv = rv
        self.broken = None
        self.asking_since = None
        self.synced.set()
        self._notify()

    async def _read_json(self, call: Any) -> JSON:
        resp = await call
        await check_response(resp, f"listing pods in {self.namespace}")
        try:
            return json.loads(await resp.read())
        finally:
            resp.release()

    async def _watch(self) -> None:
        self.stats.watches += 1
        self.asking_since = time.monotonic()
        timeout = max(1, int(self.options.watch_timeout))
        with mapped(f"watching pods in {self.namespace}"):
            resp = await self.core.list_namespaced_pod(
                self.namespace, label_selector=MANAGED_SELECTOR, watch=True, resource_version=self._rv,
                allow_watch_bookmarks=True, timeout_seconds=timeout, _preload_content=False,
                _request_timeout=timeout + 30)
        await check_response(resp, f"watching pods in {self.namespace}")
        self.broken = None
        self.asking_since = None
        try:
            buffer = bytearray()
            with mapped(f"watching pods in {self.namespace}"):
                async for chunk in resp.content.iter_any():
                    for line in split_lines(buffer, chunk):
                        self._apply(*parse_event(line))
        finally:
            resp.release()

    def _apply(self, kind: str, obj: JSON) -> None:
        rv = resource_version(obj)
        if rv:
            self._rv = rv
        if kind == "BOOKMARK":
            return
        self.stats.events += 1
        name = (obj.get("metadata") or {}).get("name")
        if not name:
            return
        if kind == "DELETED":
            self._bury(name, obj)
        else:
            self.gone.pop(name, None)
            self.pods[name] = obj
        self._notify(name)


# -- the registry ----------------------------------------------------------------------------------------

_registry: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], ClusterSession]] = \
    weakref.WeakKeyDictionary()


def _forget(session: ClusterSession) -> None:
    for sessions in list(_registry.values()):
        if sessions.get(session.key) is session:
            del sessions[session.key]


def sessions() -> list[ClusterSession]:
    """The sessions of the running loop (for tests and the benchmark)."""
    with contextlib.suppress(RuntimeError):
        return list(_registry.get(asyncio.get_running_loop(), {}).values())
    return []


@contextlib.asynccontextmanager
async def shared_session(settings: ConnectionSettings, namespace: str,
                         options: SessionOptions) -> AsyncIterator[ClusterSession]:
    """Use (and hold) the session for ``(settings, namespace)`` in this loop, creating it on first use."""
    session = await acquire_session(settings, namespace, options)
    try:
        yield session
    finally:
        session.release()


async def acquire_session(settings: ConnectionSettings, namespace: str, options: SessionOptions) -> ClusterSession:
    """The running loop's session for ``(settings, namespace)``, started and held; call ``release()`` after."""
    loop = asyncio.get_running_loop()
    per_loop = _registry.setdefault(loop, {})
    key = (settings.key(), namespace)
    session = per_loop.get(key)
    if session is None or session.closed:
        session = ClusterSession(key, settings, namespace, options)
        per_loop[key] = session
    session.acquire()
    try:
        await session.start()
    except BaseException:
        session.release()
        if per_loop.get(key) is session:
            del per_loop[key]
        raise
    return session
