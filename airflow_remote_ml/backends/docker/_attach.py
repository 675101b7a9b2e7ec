"""A container's output followed live over the engine's attach stream, the way ``docker run`` reads it.

Why: reading the log back after the container ended (``GET /containers/{id}/logs?timestamps=1``) makes the
engine decode its json-file log entry by entry and send one frame per line, which we parse again; for a
step printing 200k lines that read-back was most of the wait. The attach stream carries the same bytes
while the step runs, in the chunks the step wrote them, and nothing is read back after the exit.

The engine behaviour this relies on (moby; Docker Engine API "Attach to a container"):

* ``POST /containers/{id}/attach?stream=1&stdout=1&stderr=1`` hijacks the connection and streams what
  the container writes from then on; made before ``start`` it sees the container's first byte, which is
  how the docker CLI's ``docker run`` reads a container's output (``cli/command/container/run.go`` calls
  ``attachContainer`` before ``ContainerStart``).
* Without a TTY the stream is multiplexed: frames of an 8-byte header (stream 1 = stdout, 2 = stderr,
  three zero bytes, a big-endian uint32 size) and the payload (``pkg/stdcopy``, the same framing as the
  log endpoint's).
* The engine ends the stream when the container exits (``daemon/monitor.go`` ``handleContainerExit``:
  ``c.StreamConfig.Wait(ctx)`` lets the copy of the container's stdio finish, for up to 2 s, then
  ``c.Reset`` closes the streams and only then ``SetStopped`` marks the container stopped). The reader
  here only buffers, so it never holds that copy up; the end of the stream can come a moment before an
  inspect shows the container stopped, which is why :meth:`DockerBackend.wait` asks the wait API after it.

The cursor this hands out counts the lines relayed per stream, ``{"stdout": n, "stderr": m}``. Whenever
the stream cannot be trusted (our side closed it, the read failed, nobody drained it), the backend falls
back to the engine's log and skips the first ``n`` stdout and ``m`` stderr lines
(:func:`._containers.lines_after_counts`): per stream the log holds the same lines in the same order.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from typing import Any

log = logging.getLogger(__name__)

#: Buffered lines that make a waiting :meth:`AttachedOutput.wait` return early, so the worker relays them
#: instead of holding a long stretch of output in memory.
HIGH_WATER_LINES = 20_000
#: Buffered lines or bytes at which the reader gives the stream up (the log keeps everything, so the
#: fallback loses nothing) rather than grow without bound while nobody relays them.
LIMIT_LINES = 500_000
LIMIT_BYTES = 64 * 1024 * 1024
#: Bytes asked for per read: the step's writes arrive in chunks of up to 64 KiB.
READ_SIZE = 256 * 1024

_HEADER = struct.Struct(">BxxxI")
_STREAMS = {1: "stdout", 2: "stderr"}


class AttachedOutput:
    """One container's stdout and stderr, read by a daemon thread from a hijacked attach socket.

    Lines are buffered in arrival order until :meth:`take` hands them out with the counts cursor. The
    stream's state is one of: live, ``ended`` (the engine closed it: all output is in) or ``broken``
    (anything else: the caller must fall back to the log, from the counts it was handed).
    """

    def __init__(self, sock: Any, label: str) -> None:
        self.label = label
        self._sock = sock
        # The socket the SDK hands back is a SocketIO (unix, plain TCP) or an SSLSocket (TLS): read the
        # socket itself where there is one, with recv_into into one reused buffer.
        self._raw = getattr(sock, "_sock", sock)
        self._cond = threading.Condition()
        self._lines: list[str] = []
        self._bytes = 0
        self._read = {"stdout": 0, "stderr": 0}  # lines read per stream, handed out or buffered
        self._handed = {"stdout": 0, "stderr": 0}  # lines handed out per stream: the cursor
        self._partial = {1: b"", 2: b""}
        self.eof = False  # the engine ended the stream
        self.ended = False  # ... and the container had stopped: nothing more will come
        self.broken: str | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"docker-attach-{label}", daemon=True)
        self._thread.start()

    # -- the reader thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        buffer = bytearray(READ_SIZE)
        view = memoryview(buffer)
        pending = b""
        try:
            while True:
                got = self._recv(view)
                if not got:
                    break
                data = pending + bytes(view[:got]) if pending else bytes(view[:got])
                rest = self._frames(data)
                if rest is None:  # given up (over the limit, or closed): the log has it all
                    return
                pending = rest
            self._finish(pending)
        except Exception as exc:  # whatever ends the read (a closed socket, an SSH error), the log has the rest
            self._break(f"reading the attach stream failed: {exc}")

    def _recv(self, view: memoryview) -> int:
        raw = self._raw
        if hasattr(raw, "recv_into"):
            return int(raw.recv_into(view))
        if hasattr(raw, "readinto"):
            return int(raw.readinto(view) or 0)
        data = raw.recv(len(view))  # an SSH channel (paramiko) has only recv
        view[:len(data)] = data
        return len(data)

    def _frames(self, data: bytes) -> bytes | None:
        """Split the complete frames of ``data`` into lines; the torn tail of the last frame is returned."""
        at, end = 0, len(data)
        unpack = _HEADER.unpack_from
        new: list[tuple[str, list[str]]] = []
        while at + 8 <= end:
            stream, size = unpack(data, at)
            if at + 8 + size > end:
                break
            payload = data[at + 8:at + 8 + size]
            at += 8 + size
            if stream not in self._partial:
                continue  # stdin (0) is never sent to a reader; anything else is not ours
            joined = self._partial[stream] + payload if self._partial[stream] else payload
            cut = joined.rfind(b"\n")
            if cut < 0:
                self._partial[stream] = joined
                continue
            self._partial[stream] = joined[cut + 1:]
            new.append((_STREAMS[stream], _split(joined[:cut])))
        if new:
            with self._cond:
                if self.broken is not None:
                    return None
                for name, lines in new:
                    self._lines.extend(lines)
                    self._read[name] += len(lines)
                    self._bytes += sum(map(len, lines))
                if len(self._lines) >= LIMIT_LINES or self._bytes >= LIMIT_BYTES:
                    self._break_locked("nobody relayed the buffered output; reading the rest from the log")
                    return None
                if len(self._lines) >= HIGH_WATER_LINES:
                    self._cond.notify_all()
        return data[at:]

    def _finish(self, torn: bytes) -> None:
        with self._cond:
            if self._closing or torn:
                # We closed it, or the engine's stream ended inside a frame: not the end of the output.
                self._break_locked("the attach stream was closed" if self._closing
                                   else "the attach stream ended inside a frame")
                return
            # The engine ends the stream when the container's stdio closes; a dropped connection looks the
            # same from here, so the end counts only once the backend saw the container stopped
            # (confirm_end) and is a break if it still runs (lost).
            self.eof = True
            self._cond.notify_all()
        self._close_socket()

    def confirm_end(self) -> None:
        """The stream ended and the container has stopped: all of its output is in."""
        with self._cond:
            if self.broken is not None or self.ended:
                return
            # A last line without its newline is a line all the same (the log driver stores it as one,
            # with a newline added: daemon/logger/jsonfilelog marshalMessage).
            for stream, rest in self._partial.items():
                if rest:
                    self._lines.extend(_split(rest))
                    self._read[_STREAMS[stream]] += 1
            self._partial = {1: b"", 2: b""}
            self.ended = True

    def lost(self, reason: str) -> None:
        """The stream ended but the container did not: the connection broke; the log has the rest."""
        self._break(reason)

    def _break(self, reason: str) -> None:
        with self._cond:
            self._break_locked(reason)

    def _break_locked(self, reason: str) -> None:
        if self.ended:
            return
        if self.broken is None:
            self.broken = reason
            if not self._closing:
                log.info("docker: container %s: %s; following its log instead", self.label, reason)
        self._lines.clear()  # never handed out: the log fallback reads them from the handed-out counts
        self._bytes = 0
        self._cond.notify_all()
        self._closing = True
        self._close_socket()  # a shutdown wakes a read blocked in the reader thread; it never blocks

    def _close_socket(self) -> None:
        for close in (lambda: self._raw.shutdown(socket.SHUT_RDWR), self._raw.close, self._sock.close):
            try:
                close()
            except (OSError, AttributeError, ValueError):
                pass

    # -- the waiting side -----------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.broken is None

    def cursor(self) -> dict[str, int]:
        with self._cond:
            return dict(self._handed)

    def matches(self, cursor: Any) -> bool:
        """Whether ``cursor`` is where this stream's hand-outs stand (None: nothing handed out yet)."""
        with self._cond:
            if cursor is None or cursor == {}:
                return self._handed == {"stdout": 0, "stderr": 0}
            return isinstance(cursor, dict) and cursor == self._handed

    @property
    def live(self) -> bool:
        return not self.eof and self.broken is None

    def wait(self, timeout: float) -> None:
        """Block until the stream ended or broke, enough lines wait to be relayed, or ``timeout`` passed."""
        with self._cond:
            self._cond.wait_for(lambda: self.eof or self.broken is not None
                                or len(self._lines) >= HIGH_WATER_LINES, timeout)

    @property
    def backlog(self) -> int:
        with self._cond:
            return len(self._lines)

    def drain(self, timeout: float) -> bool:
        """Wait for the engine to end the stream (the container has stopped); False if it did not."""
        with self._cond:
            self._cond.wait_for(lambda: self.eof or self.broken is not None, timeout)
            return self.eof and self.broken is None

    def take(self) -> tuple[list[str], dict[str, int]]:
        """The buffered lines and the cursor after them."""
        with self._cond:
            if self.broken is not None:
                return [], dict(self._handed)
            # Every buffered line goes, so the counts handed out become the counts read.
            lines, self._lines, self._bytes = self._lines, [], 0
            self._handed = dict(self._read)
            return lines, dict(self._handed)

    def close(self) -> None:
        """Stop reading (the container keeps running: closing an attach only detaches from it)."""
        with self._cond:
            if self.eof or self.broken is not None:
                return
            self._closing = True
        self._close_socket()
        self._thread.join(5.0)
        self._break("the attach stream was closed")


def _split(chunk: bytes) -> list[str]:
    """Lines of ``chunk`` (newline-separated, no trailing newline) as the log path decodes them."""
    text = chunk.decode("utf-8", errors="replace")
    lines = text.split("\n")
    if "\r" in text:
        lines = [line.rstrip("\r") for line in lines]
    return lines
