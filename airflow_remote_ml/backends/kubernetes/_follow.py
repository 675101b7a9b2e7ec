"""Following one pod from a worker: its watch and its log stream, each one long request in a thread.

A sync step used to cost a request per question ("how is the pod?", "any new log lines?") every few
seconds. Here each of the two questions is asked once and answered as the cluster speaks:

* :class:`PodFollower` holds one watch of the pod (field selector on its name) from the resourceVersion
  the create (or the reattaching list) answered with, and keeps the pod's latest state. ``poll`` and
  ``wait`` read that state; they are as current as the watch. The follower ends when the pod reaches
  Succeeded/Failed or is deleted (nothing more to learn), on ``stop()``, or on an API error. It also
  tells how long its current watch (or relist) request has gone unanswered, so ``wait``/``poll`` can
  say "the apiserver is not answering" instead of serving a stale state as if it were current. The
  backend resumes a watch that broke transiently once per call, from the last resourceVersion, and
  raises if that fails too (see ``KubernetesBackend.wait``).
* :class:`LogFollower` holds one ``follow=true`` log request of the step's container and keeps every
  timestamped line it sent. The kubelet ends the stream when the container exits, so the final read of a
  finished step is already in hand. A stream that breaks early is reported ``broken``; the backend then
  reads the log the classic way (one request per read, ``sinceTime`` from the cursor).

This is kubectl's own pattern (``kubectl run -i``/``logs -f``: one watch, one log follow), and the reason
a no-op step needs four requests: create, watch, log, delete.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from airflow_remote_ml.backends.kubernetes._client import Expired, mapped
from airflow_remote_ml.backends.kubernetes._watch import resource_version, watch_pod_events
from airflow_remote_ml.core.errors import BackendAPIError, TransientBackendError

log = logging.getLogger(__name__)

JSON = dict[str, Any]
FINAL_PHASES = ("Succeeded", "Failed")


def _shutdown(resp: Any) -> None:
    """Unblock a thread reading ``resp`` (urllib3 >= 2.3 ``shutdown``; else close the connection)."""
    with contextlib.suppress(Exception):
        if hasattr(resp, "shutdown"):
            resp.shutdown()
        else:
            resp.close()


class _StreamThread:
    """A daemon thread reading one streaming response; ``stop()`` cuts the stream and joins the thread."""

    _stopping: bool
    _resp: Any
    _thread: threading.Thread

    def stop(self) -> None:
        self._stopping = True
        resp = self._resp
        if resp is not None:
            _shutdown(resp)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)


class PodFollower(_StreamThread):
    """One pod's watch, followed in a daemon thread; its latest state under a condition variable."""

    def __init__(self, core: Any, namespace: str, name: str, uid: str | None, pod: JSON, rv: str,
                 relist: Callable[[], tuple[JSON | None, str]], watch_timeout: float) -> None:
        self.core = core
        self.namespace = namespace
        self.name = name
        self.uid = uid
        self.pod = pod
        self.rv = rv
        self.relist = relist
        self.watch_timeout = watch_timeout
        self.gone = False
        self.ended = False
        self.error: BackendAPIError | None = None
        #: Bumped on every change a waiter may care about: a new pod state, a request sent or answered.
        self.version = 0
        #: ``time.monotonic()`` when the request now in flight (a watch, or the relist after a 410) was sent;
        #: None while a watch is open (its response arrived) and once the follower ended.
        self.asking_since: float | None = None
        self.cond = threading.Condition()
        self._stopping = False
        self._resp: Any = None
        self._thread = threading.Thread(target=self._run, name=f"remote-ml-watch-{name}", daemon=True)

    def start(self) -> PodFollower:
        self._asking()  # before the thread runs: a caller must not read the old state as the watch's
        self._thread.start()
        return self

    def wait_change(self, version: int, timeout: float) -> None:
        """Return once the state is newer than ``version``, the follower ended, or ``timeout`` passed."""
        with self.cond:
            self.cond.wait_for(lambda: self.version != version or self.ended, timeout)

    def unanswered(self, now: float) -> float | None:
        """Seconds the request in flight has gone unanswered at ``now`` (None: a watch is open, or it ended)."""
        with self.cond:
            since = self.asking_since
        return None if since is None else max(0.0, now - since)

    def wait_answered(self, limit: float) -> bool:
        """Wait until the request in flight is answered (or the follower ended), at most until it has gone
        unanswered for ``limit`` seconds; False when it still has no answer then."""
        with self.cond:
            while self.asking_since is not None and not self.ended:
                left = self.asking_since + limit - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def _publish(self, pod: JSON, gone: bool = False) -> None:
        with self.cond:
            self.pod = pod
            self.gone = gone
            self.version += 1
            self.cond.notify_all()

    def _asking(self) -> None:
        with self.cond:
            self.asking_since = time.monotonic()
            self.version += 1
            self.cond.notify_all()

    def _answered(self) -> None:
        with self.cond:
            self.asking_since = None
            self.version += 1
            self.cond.notify_all()

    def _keep(self, resp: Any) -> None:
        self._resp = resp
        self._answered()  # the watch's response arrived: from here on its silence means "no change"
        if self._stopping:
            _shutdown(resp)

    def _run(self) -> None:
        rv = self.rv
        try:
            while not self._stopping:
                self._asking()  # a new watch: the first, one after a relist, or one resuming after timeoutSeconds
                try:
                    for kind, obj in watch_pod_events(self.core, self.namespace, self.name, rv, self.watch_timeout,
                                                      on_response=self._keep):
                        rv = resource_version(obj) or rv
                        self.rv = rv
                        if kind == "BOOKMARK" or (self.uid and (obj.get("metadata") or {}).get("uid") != self.uid):
                            continue
                        if kind == "DELETED":
                            self._publish(obj, gone=True)
                            return
                        self._publish(obj)
                        if (obj.get("status") or {}).get("phase") in FINAL_PHASES:
                            return  # its final state: nothing more to learn from this pod
                except Expired:
                    self._asking()
                    pod, rv = self.relist()  # too old: one list, and watch from its resourceVersion
                    self.rv = rv
                    if pod is None:
                        self._publish(self.pod, gone=True)
                        return
                    self._publish(pod)
                # else: the server ended the watch (timeoutSeconds); resume from the last resourceVersion
        except BackendAPIError as exc:
            if not self._stopping:
                self.error = exc
        except Exception as exc:  # a stream cut by stop() or a broken connection
            if not self._stopping:
                self.error = TransientBackendError("kubernetes", f"watching pod {self.name}: {type(exc).__name__}: "
                                                   f"{exc}")
        finally:
            with self.cond:
                self.ended = True
                self.asking_since = None
                self.version += 1
                self.cond.notify_all()


class LogFollower(_StreamThread):
    """One ``follow=true`` log stream of a container, read in a daemon thread into a buffer."""

    def __init__(self, open_stream: Callable[[], Any], name: str, since: str | None) -> None:
        self.open_stream = open_stream
        self.name = name
        #: The ``sinceTime`` the stream was asked from (None: the whole log).
        self.since = since
        self.data = bytearray()
        self.ended = False
        self.broken = False
        #: The stream ended before the watch said the container had: check the end with one plain read.
        self.premature = False
        self.error: BackendAPIError | None = None
        self.lock = threading.Lock()
        self._done = threading.Event()
        self._stopping = False
        self._resp: Any = None
        self._thread = threading.Thread(target=self._run, name=f"remote-ml-log-{name}", daemon=True)

    def start(self) -> LogFollower:
        self._thread.start()
        return self

    def snapshot(self) -> bytes:
        with self.lock:
            return bytes(self.data)

    def join(self, timeout: float) -> bool:
        """Wait for the stream's end (the container's exit); True when it ended."""
        return self._done.wait(timeout)

    def _run(self) -> None:
        try:
            with mapped(f"following the log of pod {self.name}"):
                resp = self.open_stream()
                self._resp = resp
                if self._stopping:
                    _shutdown(resp)
                try:
                    for chunk in resp.stream(amt=None, decode_content=False):
                        with self.lock:
                            self.data.extend(chunk)
                finally:
                    with contextlib.suppress(Exception):
                        resp.release_conn()
            self.ended = True
        except BackendAPIError as exc:
            self.error = exc
            self.broken = True
        except Exception as exc:  # a stream cut by stop() or a broken connection: read the classic way
            log.debug("kubernetes: the log stream of pod %s broke: %s", self.name, exc)
            self.broken = True
        finally:
            self._done.set()
