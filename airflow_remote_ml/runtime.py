"""The runtime that runs *inside* the remote step. Standard library only; any image with python3 works.

A backend starts it as ``python3 -c <this file's source>`` (see :func:`launch_command`) or
``python3 -m airflow_remote_ml.runtime`` where the package is installed, and hands it the step as JSON in
the ``REMOTE_ML_STEP`` environment variable (or a file named by ``REMOTE_ML_STEP_FILE``). It:

1. resolves the step's inputs and outputs to local paths and tells the step where they are, both as
   environment variables (``REMOTE_ML_INPUT_<NAME>``, ``REMOTE_ML_OUTPUT_<NAME>``, ``REMOTE_ML_PARAMS``, ...)
   and as ``{inputs.name}`` / ``{outputs.name}`` / ``{params.name}`` placeholders in a command's arguments,
   so a step in any language can use them;
2. runs the command (argv, or a shell string when asked) or calls ``package.module:function`` with the
   params as keyword arguments (plus ``inputs``/``outputs`` path mappings when the function asks for them);
3. collects metrics: every stdout line that is a JSON object (the Valohai convention), and the mapping a
   callable returns;
4. checks that every declared output was produced, records its URI, size and sha256, uploads it when the
   artifact root is not a local path, and writes the result manifest (outputs, metrics, and the versions
   that produced them: image, code, params, inputs). A small copy also goes to the container's
   termination message where there is one.

The wire format is versioned by :data:`PROTOCOL_VERSION`; a newer Airflow side refuses nothing older.
"""

from __future__ import annotations

# The runtime's start-up is part of every step's latency, so up front it imports only modules the
# interpreter has already loaded (io, os, sys) or that are built in (time, _signal, _json). Measured in
# the runner image (docs/backends/docker.md, "where time goes"): `json` costs ~6 ms there (it imports
# `re`), `signal` ~4 ms (`enum`), `subprocess` and `contextlib` ~4 ms more; what they wrap, ~1 ms. The
# rest (hashlib, threading, ...) is imported where it is used.
import io
import os
import sys
import time

try:
    import _signal as signal  # type: ignore[import-not-found]  # the C module `signal` wraps, enums aside
except ImportError:  # not CPython
    import signal  # type: ignore[no-redef]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

PROTOCOL_VERSION = 1

#: Exit code of a step whose declared output is missing (the step itself exited 0).
EXIT_MISSING_OUTPUT = 3
#: Exit code of a step stopped by its timeout (as coreutils' timeout).
EXIT_TIMEOUT = 124
#: Exit code of a bad runtime configuration.
EXIT_BAD_CONFIG = 2
#: Where Kubernetes reads a container's termination message by default.
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
#: Kubernetes truncates termination messages to 4096 bytes.
TERMINATION_LOG_LIMIT = 4096

_PREFIX_MAP = (("dbfs:/", "/dbfs/"),)


class StepError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _signal_name(signum: int) -> str | None:
    import signal as signals  # only for a message: the enum costs ~4 ms of every start

    try:
        return signals.Signals(signum).name
    except ValueError:
        return None


# -- JSON, without importing json --------------------------------------------------------------------
#
# The `json` package is a thin layer over the C accelerator `_json` plus regular expressions for its
# pure-Python fallbacks; importing it pulls in `re` (~6 ms of a container's start). The runtime calls
# the accelerator directly, exactly as `json.loads`/`json.dumps` do on CPython (Lib/json/decoder.py
# JSONDecoder.decode, Lib/json/encoder.py JSONEncoder.iterencode with indent=None), and falls back to
# the `json` package where the accelerator is missing or its signature differs (another Python).

_codec: dict[str, Any] = {}


class _ScanContext:
    """The attributes `_json.make_scanner` reads from a JSONDecoder, with json.loads' defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    array_hook = None  # read by Python >= 3.15
    parse_float = float
    parse_int = int
    parse_constant = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.__getitem__


def _loads(text: str) -> Any:
    """``json.loads(text)``."""
    scan: Any = _codec.get("scan")
    if scan is None:
        try:
            from _json import make_scanner

            scan = _codec["scan"] = make_scanner(_ScanContext())  # type: ignore[arg-type]
        except Exception:  # no accelerator, or another version of it: the package does the same
            import json

            scan = _codec["scan"] = False
            _codec["json"] = json
    if scan is False:
        return _codec["json"].loads(text)
    # json.loads skips JSON whitespace around the value and refuses anything after it.
    start = len(text) - len(text.lstrip(" \t\n\r"))
    try:
        value, end = scan(text, start)
    except StopIteration as exc:  # where json.loads says "Expecting value"
        raise ValueError(f"Expecting value: char {exc.value}") from None
    if text[end:].strip(" \t\n\r"):
        raise ValueError(f"Extra data: char {end}")
    return value


def _no_default(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _dumps(value: Any, *, sort_keys: bool = False, separators: tuple[str, str] = (", ", ": "),
           default: Any = None) -> str:
    """``json.dumps(value, sort_keys=..., separators=..., default=...)`` (ensure_ascii, no indent)."""
    make: Any = _codec.get("encode")
    if make is None:
        try:
            from _json import encode_basestring_ascii, make_encoder

            make = _codec["encode"] = lambda sort, seps, dflt: make_encoder(
                {}, dflt, encode_basestring_ascii, None, seps[1], seps[0], sort, False, True)
            make(False, separators, _no_default)  # the signature is the one this code knows
        except Exception:  # see _loads
            import json

            make = _codec["encode"] = False
            _codec["json"] = json
    if make is False:
        return str(_codec["json"].dumps(value, sort_keys=sort_keys, separators=separators, default=default))
    return "".join(make(sort_keys, separators, default or _no_default)(value, 0))


# -- locations ---------------------------------------------------------------------------------------


def _local_of(uri: str) -> str | None:
    """The local path a URI can be read/written at, or None when it needs an fsspec upload/download."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    for prefix, mount in _PREFIX_MAP:
        if uri.startswith(prefix) and os.path.isdir(mount):
            return mount + uri[len(prefix):]
    if "://" in uri or (":" in uri.split("/", 1)[0] and not uri.startswith("/")):
        return None
    return uri


def _fsspec():
    try:
        import fsspec  # type: ignore[import-not-found]
    except ImportError:
        raise StepError(
            "this step reads or writes a non-local URI, which needs fsspec in the image; install fsspec "
            "(and e.g. s3fs) in the step's image, or use an artifact root mounted into the step",
            EXIT_BAD_CONFIG,
        ) from None
    return fsspec


class _Scratch:
    """A temporary directory, made only when a non-local input or output needs one."""

    def __init__(self) -> None:
        self._path: str | None = None

    def __str__(self) -> str:
        if self._path is None:
            import tempfile

            self._path = tempfile.mkdtemp(prefix="remote-ml-")
        return self._path

    def remove(self) -> None:
        if self._path is not None:
            import shutil

            shutil.rmtree(self._path, ignore_errors=True)


def _resolve_inputs(inputs: dict[str, str], scratch: _Scratch) -> dict[str, str]:
    paths = {}
    for name, uri in inputs.items():
        local = _local_of(uri)
        if local is None:
            fs, path = _fsspec().core.url_to_fs(uri)
            local = os.path.join(str(scratch), "inputs", name, os.path.basename(path.rstrip("/")) or name)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get(path, local, recursive=fs.isdir(path))
        paths[name] = local
    return paths


def _resolve_outputs(outputs: dict[str, str], scratch: _Scratch) -> dict[str, str]:
    paths = {}
    for name, uri in outputs.items():
        local = _local_of(uri)
        if local is None:
            local = os.path.join(str(scratch), "outputs", name)
        parent = os.path.dirname(local)
        if parent:
            os.makedirs(parent, exist_ok=True)
        # A leftover from an earlier attempt must never pass for this run's output.
        if os.path.isdir(local) and not os.path.islink(local):
            import shutil

            shutil.rmtree(local)
        elif os.path.lexists(local):
            os.remove(local)
        paths[name] = local
    return paths


def _digest(path: str) -> tuple[int, str]:
    """Size and sha256 of a file, or of a directory (over its sorted relative paths and contents)."""
    import hashlib

    if os.path.isfile(path):
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
                size += len(block)
        return size, h.hexdigest()
    h = hashlib.sha256()
    total = 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            size, digest = _digest(full)
            total += size
            h.update(f"{os.path.relpath(full, path)}\0{digest}\n".encode())
    return total, h.hexdigest()


def _write_json(uri: str, document: dict[str, Any]) -> None:
    data = _dumps(document, sort_keys=True, default=str)
    local = _local_of(uri)
    if local is not None:
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        tmp = f"{local}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(data)
        os.replace(tmp, local)  # readers never see half a manifest
        return
    with _fsspec().open(uri, "w", encoding="utf-8") as fh:
        fh.write(data)


def _termination_log_path() -> str | None:
    path = os.environ.get("REMOTE_ML_TERMINATION_LOG")
    if path:
        return path
    if os.path.exists(DEFAULT_TERMINATION_LOG) and os.access(DEFAULT_TERMINATION_LOG, os.W_OK):
        return DEFAULT_TERMINATION_LOG
    return None


def termination_message(manifest: dict[str, Any]) -> str:
    """The manifest, or a smaller summary of it, within Kubernetes' termination-message limit."""
    text = _dumps(manifest, separators=(",", ":"), sort_keys=True, default=str)
    if len(text.encode()) <= TERMINATION_LOG_LIMIT:
        return text
    small = {
        "protocol_version": manifest["protocol_version"],
        "status": manifest["status"],
        "exit_code": manifest.get("exit_code"),
        "error": (manifest.get("error") or "")[:1000] or None,
        "manifest_uri": manifest.get("manifest_uri"),
        "truncated": True,
    }
    return _dumps(small, separators=(",", ":"), sort_keys=True)


# -- metrics -----------------------------------------------------------------------------------------


class _MetricsCollector:
    def __init__(self) -> None:
        self.metrics: dict[str, Any] = {}

    def line(self, text: str) -> None:
        text = text.strip()
        if not (text.startswith("{") and text.endswith("}")):
            return
        try:
            value = _loads(text)
        except ValueError:
            return
        if isinstance(value, dict):
            self.metrics.update(value)


class _TeeStdout(io.TextIOBase):
    """Forwards writes to the real stdout and hands complete lines to the metrics collector."""

    def __init__(self, target: Any, collector: _MetricsCollector) -> None:
        self._target = target
        self._collector = collector
        self._partial = ""

    def write(self, text: str) -> int:
        self._target.write(text)
        self._partial += text
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            self._collector.line(line)
        return len(text)

    def flush(self) -> None:
        self._target.flush()

    def finish(self) -> None:
        if self._partial:
            self._collector.line(self._partial)
            self._partial = ""


# -- running the step --------------------------------------------------------------------------------


def _substitute(arg: str, values: dict[str, dict[str, Any]]) -> str:
    """Replace ``{inputs.x}``, ``{outputs.x}`` and ``{params.x}``; anything else is left as it is."""
    out = []
    i = 0
    while i < len(arg):
        start = arg.find("{", i)
        if start < 0:
            out.append(arg[i:])
            break
        end = arg.find("}", start)
        if end < 0:
            out.append(arg[i:])
            break
        token = arg[start + 1:end]
        group, _, key = token.partition(".")
        if group in values and key in values[group]:
            out.append(arg[i:start])
            value = values[group][key]
            out.append(value if isinstance(value, str) else _dumps(value))
        else:
            out.append(arg[i:end + 1])
        i = end + 1
    return "".join(out)


def _env_for(step: dict[str, Any], inputs: dict[str, str], outputs: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("REMOTE_ML_STEP", "REMOTE_ML_RUNTIME"):
        env.pop(key, None)
    env["REMOTE_ML_PARAMS"] = _dumps(step.get("params") or {})
    env["REMOTE_ML_INPUTS"] = _dumps(inputs)
    env["REMOTE_ML_OUTPUTS"] = _dumps(outputs)
    for name, path in inputs.items():
        env[f"REMOTE_ML_INPUT_{name.upper()}"] = path
    for name, path in outputs.items():
        env[f"REMOTE_ML_OUTPUT_{name.upper()}"] = path
    return env


#: Bytes per read of the step's output: one system call per 64 KiB, not one per byte.
_CHUNK = 1 << 16
#: How long the relay lets output accumulate after a short read (see _run_command).
_COALESCE_SECONDS = 0.001
#: A line longer than this is relayed but never parsed as metrics, so memory stays bounded.
_MAX_METRICS_LINE = 1 << 20
#: Seconds between SIGTERM and SIGKILL when the runtime itself stops the step (timeout, or a backend that
#: asks for it with REMOTE_ML_KILL_GRACE).
DEFAULT_KILL_GRACE = 5.0


def _kill_grace() -> float:
    try:
        return max(0.0, float(os.environ.get("REMOTE_ML_KILL_GRACE") or DEFAULT_KILL_GRACE))
    except ValueError:
        return DEFAULT_KILL_GRACE


def _proc_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux ``/proc``), "" where unknown.

    Written next to a pid so a reader can tell the process from a later one that reuses the pid.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: fields are counted after the last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    return fields[19].decode() if len(fields) > 19 else ""


def _record_pgid(pid: int) -> None:
    """Tell the backend which process group the step runs in, so a kill reaches all of it."""
    path = os.environ.get("REMOTE_ML_PGID_FILE")
    if not path:
        return
    try:
        with open(f"{path}.tmp", "w", encoding="utf-8") as fh:
            fh.write(f"{pid} {_proc_start(pid)}")
        os.replace(f"{path}.tmp", path)
    except OSError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Relay:
    """Copies the step's output to ours as it arrives and hands complete lines to the metrics collector.

    Holds at most one partial line (bounded by ``_MAX_METRICS_LINE``), never the whole output.
    """

    def __init__(self, collector: _MetricsCollector) -> None:
        self._collector = collector
        self._partial = b""
        self._skipping = False  # inside an over-long line: relayed, not parsed
        self._fd: int | None = None
        try:
            sys.stdout.flush()  # whatever the runtime printed itself goes first
            self._fd = sys.stdout.fileno()
        except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
            pass

    def feed(self, chunk: bytes) -> None:
        if self._fd is not None:
            _write_all(self._fd, chunk)
        else:  # stdout replaced by something without a file descriptor
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        if self._skipping:
            newline = chunk.find(b"\n")
            if newline < 0:
                return
            chunk, self._skipping = chunk[newline + 1:], False
        data = self._partial + chunk if self._partial else chunk
        end = data.rfind(b"\n")
        if end < 0:
            self._keep(data)
            return
        self._keep(data[end + 1:])
        if b"{" in data[:end]:  # most chunks of a chatty step hold no metrics at all: one scan, no split
            for line in data[:end].split(b"\n"):
                self._line(line)

    def _keep(self, partial: bytes) -> None:
        if len(partial) > _MAX_METRICS_LINE:
            self._partial, self._skipping = b"", True
        else:
            self._partial = partial

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if line[:1] == b"{" and line[-1:] == b"}":
            self._collector.line(line.decode(errors="replace"))

    def finish(self) -> None:
        if self._partial and not self._skipping:
            self._line(self._partial)
        self._partial = b""


def _killed_message(code: int) -> str:
    """Plain words for a step that ended by a signal (``code`` as a shell reports it: 128 + signal)."""
    name = _signal_name(code - 128)
    if name is None:
        return f"the step exited with code {code}"
    if code - 128 == signal.SIGKILL:
        return (f"the step's process was killed by SIGKILL (exit {code}; often the kernel's OOM killer when "
                "the step uses more memory than it may: raise compute.memory)")
    return f"the step's process was killed by {name} (exit {code})"


class _Child:
    """The step's command: its own session and process group, stdin from /dev/null, stdout into a pipe.

    Started with ``os.posix_spawnp`` where there is one, which does what ``subprocess.Popen(...,
    start_new_session=True, stdin=DEVNULL, stdout=PIPE)`` does (restore_signals' SIGPIPE/SIGXFSZ reset,
    no inherited descriptors beyond 0-2, exec errors raised as OSError naming the file) without
    importing subprocess (~4 ms of every start in a container, with the selectors and locale it pulls in).
    """

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.returncode: int | None = None
        self._popen: Any = None
        _close_on_exec_beyond_stdio()
        read_end, write_end = os.pipe()
        try:
            spawn = getattr(os, "posix_spawnp", None)
            try:
                if spawn is None:
                    raise NotImplementedError
                self.pid = spawn(argv[0], argv, env, setsid=True, file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, write_end, 1),  # dup2 leaves the copy inheritable
                ], setsigdef=[s for s in (getattr(signal, "SIGPIPE", None), getattr(signal, "SIGXFSZ", None))
                              if s is not None])
            except NotImplementedError:  # no posix_spawn, or no POSIX_SPAWN_SETSID in this libc
                import subprocess

                self._popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=write_end,
                                               start_new_session=True)
                self.pid = self._popen.pid
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self.stdout = read_end

    def wait(self) -> int:
        """The exit code, negative for a signal (as Popen.returncode)."""
        if self._popen is not None:
            self.returncode = int(self._popen.wait())
        else:
            _, status = os.waitpid(self.pid, 0)  # PEP 475: retried after a signal handler runs
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def _close_on_exec_beyond_stdio() -> None:
    """Mark every descriptor above 2 close-on-exec, as Popen's close_fds=True closes them in the child."""
    for listing in ("/proc/self/fd", "/dev/fd"):  # Linux; macOS and the BSDs
        try:
            names = os.listdir(listing)
            break
        except OSError:
            continue
    else:
        return
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the listing's own descriptor, closed by now


def _run_command(step: dict[str, Any], env: dict[str, str], values: dict[str, dict[str, Any]],
                 collector: _MetricsCollector, timeout: float | None) -> int:
    command = step["command"]
    if step.get("shell"):
        argv = ["/bin/sh", "-c", _substitute(command, values)]  # what Popen(shell=True) runs
    else:
        argv = [_substitute(arg, values) for arg in command]
    # The handler is in place before the child exists: a cancel arriving while it starts is not lost.
    started: list[Any] = []
    pending: list[int] = []
    escalation: list[Any] = []

    def kill_group(signum: int) -> None:
        if started[0].returncode is not None:
            return  # reaped: the group id may belong to someone else by now
        try:
            os.killpg(started[0].pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        if not started:
            pending.append(signum)
            return
        kill_group(signum)
        # A step that ignores SIGTERM is killed after the grace, even when whoever cancelled it (a task
        # process that its supervisor SIGKILLs after 5 s) is no longer there to escalate.
        if signum == signal.SIGTERM and not escalation and os.environ.get("REMOTE_ML_KILL_GRACE"):
            import threading

            timer = threading.Timer(_kill_grace(), kill_group, (signal.SIGKILL,))
            timer.daemon = True
            timer.start()
            escalation.append(timer)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        # Its own session and process group (pgid == its pid): the runtime signals the step's whole tree
        # without signalling itself, and records the group so the backend's kill reaches it too.
        child = _Child(argv, env)
    except FileNotFoundError as exc:
        raise StepError(f"command not found: {exc.filename!r}", 127) from None
    except PermissionError as exc:
        raise StepError(f"command is not executable: {exc.filename!r}", 126) from None
    started.append(child)
    _record_pgid(child.pid)
    for signum in pending:
        forward(signum, None)
    timer = None
    timed_out: list[bool] = []
    if timeout:
        import threading

        def expire() -> None:
            timed_out.append(True)
            kill_group(signal.SIGTERM)
            time.sleep(_kill_grace())
            kill_group(signal.SIGKILL)  # a no-op once the step has been reaped

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
    relay = _Relay(collector)
    fd = child.stdout
    # os.read returns as soon as any output is there: a line a minute is relayed at once. A step that
    # writes in small pieces (an unbuffered Python step makes one write per print argument) would wake the
    # relay for each; after a short read it lets the pipe fill for a millisecond, so a chatty step is
    # relayed in large reads (the pipe's own buffer bounds it; a full pipe only makes the step wait).
    while chunk := os.read(fd, _CHUNK):
        relay.feed(chunk)
        if len(chunk) < _CHUNK:
            time.sleep(_COALESCE_SECONDS)
    relay.finish()
    os.close(fd)
    code = child.wait()
    if timer:
        timer.cancel()
    for pending_kill in escalation:
        pending_kill.cancel()
    if timed_out:
        raise StepError(f"the step ran longer than its timeout of {timeout:g}s", EXIT_TIMEOUT)
    if code < 0:  # killed by a signal: report it the way shells do
        code = 128 - code
    if received and code != 0:
        asked = _signal_name(received[0])
        if code == 128 + signal.SIGKILL:
            raise StepError(f"the step was stopped: it did not end within {_kill_grace():g}s of {asked} and was "
                            f"killed by SIGKILL (exit {code})", code)
        raise StepError(f"the step was stopped by {asked} (exit {code})", code)
    return code


def _call(step: dict[str, Any], inputs: dict[str, str], outputs: dict[str, str],
          collector: _MetricsCollector, timeout: float | None) -> int:
    import importlib
    import traceback

    if sys.flags.no_site:
        # Started with -S for a fast start; the step's own code needs site-packages.
        import site

        site.main()
    module_name, _, attr = step["callable"].partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise StepError(f"cannot load callable {step['callable']!r}: {exc}", EXIT_BAD_CONFIG) from None
    import inspect  # only callables need it; a command step starts faster without it

    params = dict(step.get("params") or {})
    kwargs: dict[str, Any] = dict(params)
    accepts: Mapping[str, Any]
    try:
        signature = inspect.signature(target)
        accepts = signature.parameters
        has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepts.values())
    except (TypeError, ValueError):
        accepts, has_var_kw = {}, True
    for name, value in (("inputs", inputs), ("outputs", outputs)):
        if name in accepts:
            kwargs[name] = value
    if not has_var_kw:
        unknown = [k for k in params if k not in accepts]
        if unknown:
            raise StepError(
                f"{step['callable']} takes no parameter(s) {', '.join(map(repr, unknown))}; "
                f"it accepts {', '.join(accepts) or 'none'}", EXIT_BAD_CONFIG)
    # As PID 1 of a container the runtime would ignore SIGTERM without a handler; end cleanly instead.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(128 + signal.SIGTERM))
    if timeout:
        def expire(_signum: int, _frame: Any) -> None:
            raise TimeoutError
        signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    import contextlib

    tee = _TeeStdout(sys.stdout, collector)
    try:
        with contextlib.redirect_stdout(tee):
            result = target(**kwargs)
    except TimeoutError:
        raise StepError(f"the step ran longer than its timeout of {timeout:g}s", EXIT_TIMEOUT) from None
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return code
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    finally:
        tee.finish()
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, 0)
    if isinstance(result, dict):
        collector.metrics.update(result)
    return 0


def run(step: dict[str, Any]) -> int:
    """Run one step and write its manifest. Returns the process exit code."""
    started = time.time()
    version = step.get("protocol_version")
    manifest: dict[str, Any] = {
        "protocol_version": PROTOCOL_VERSION,
        "status": "failed",
        "exit_code": None,
        "error": None,
        "outputs": {},
        "metrics": {},
        "manifest_uri": step.get("manifest_uri"),
        "identity": step.get("identity"),
        "versions": {
            **(step.get("versions") or {}),
            "code": step.get("callable") or step.get("command"),
            "params": step.get("params") or {},
            "inputs": step.get("inputs") or {},
            "python": sys.version.split()[0],
        },
        "started_at": started,
    }
    collector = _MetricsCollector()
    scratch = _Scratch()
    exit_code = 1
    try:
        if not isinstance(version, int) or version > PROTOCOL_VERSION:
            raise StepError(f"step protocol {version!r} is newer than this runtime ({PROTOCOL_VERSION}); "
                            "the runtime is injected by the backend, so upgrade airflow-remote-ml", EXIT_BAD_CONFIG)
        if bool(step.get("command")) == bool(step.get("callable")):
            raise StepError("the step needs exactly one of 'command' and 'callable'", EXIT_BAD_CONFIG)
        inputs = _resolve_inputs(dict(step.get("inputs") or {}), scratch)
        output_uris = dict(step.get("outputs") or {})
        outputs = _resolve_outputs(output_uris, scratch)
        timeout = step.get("timeout")
        if step.get("callable"):
            os.environ.update({k: v for k, v in _env_for(step, inputs, outputs).items()
                               if k.startswith("REMOTE_ML_")})
            exit_code = _call(step, inputs, outputs, collector, timeout)
        else:
            values = {"inputs": inputs, "outputs": outputs, "params": dict(step.get("params") or {})}
            exit_code = _run_command(step, _env_for(step, inputs, outputs), values, collector, timeout)
        manifest["exit_code"] = exit_code
        if exit_code != 0:
            raise StepError(_killed_message(exit_code) if exit_code > 128 else
                            f"the step exited with code {exit_code}", exit_code)
        missing = [name for name, path in outputs.items() if not os.path.exists(path)]
        if missing:
            raise StepError(
                "declared output" + ("s " if len(missing) > 1 else " ")
                + ", ".join(f"{name!r} (expected at {outputs[name]})" for name in missing)
                + " not produced by the step", EXIT_MISSING_OUTPUT)
        for name, path in outputs.items():
            size, digest = _digest(path)
            uri = output_uris[name]
            if _local_of(uri) is None:
                fs, remote = _fsspec().core.url_to_fs(uri)
                fs.put(path, remote, recursive=os.path.isdir(path))
            manifest["outputs"][name] = {"uri": uri, "size": size, "sha256": digest,
                                         "kind": "directory" if os.path.isdir(path) else "file"}
        manifest["status"] = "succeeded"
    except StepError as exc:
        exit_code = exc.exit_code
        manifest["exit_code"] = exit_code
        manifest["error"] = str(exc)
        print(f"remote-ml: {exc}", file=sys.stderr, flush=True)
    except Exception as exc:  # a runtime bug or an I/O failure: report it like a step failure
        import traceback

        exit_code = 1
        manifest["exit_code"] = exit_code
        manifest["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        scratch.remove()
    manifest["metrics"] = collector.metrics
    manifest["finished_at"] = time.time()
    manifest["duration_seconds"] = round(manifest["finished_at"] - started, 3)
    if step.get("manifest_uri"):
        try:
            _write_json(step["manifest_uri"], manifest)
        except Exception as exc:
            print(f"remote-ml: could not write the result manifest: {exc}", file=sys.stderr, flush=True)
            if exit_code == 0:
                exit_code = 1
    termination_log = _termination_log_path()
    if termination_log:
        try:
            with open(termination_log, "w", encoding="utf-8") as fh:
                fh.write(termination_message(manifest))
        except OSError:
            pass
    return exit_code


def load_step() -> dict[str, Any]:
    if os.environ.get("REMOTE_ML_STEP"):
        return _loads(os.environ["REMOTE_ML_STEP"])
    if os.environ.get("REMOTE_ML_STEP_FILE"):
        with open(os.environ["REMOTE_ML_STEP_FILE"], encoding="utf-8") as fh:
            return _loads(fh.read())
    if len(sys.argv) > 1:
        # "@path": the step in a file, for platforms that limit the size of task parameters.
        if sys.argv[1].startswith("@"):
            with open(sys.argv[1][1:], encoding="utf-8") as fh:
                return _loads(fh.read())
        return _loads(sys.argv[1])
    raise StepError("no step given: set REMOTE_ML_STEP (JSON) or REMOTE_ML_STEP_FILE", EXIT_BAD_CONFIG)


def source() -> str:
    """This module's source, to inject into an image that does not have airflow-remote-ml installed."""
    with open(__file__, encoding="utf-8") as fh:
        return fh.read()


def launch_command(python: str = "python3") -> list[str]:
    """argv that runs this runtime in any image with ``python``, nothing installed.

    ``-S`` skips site-packages for a faster start (the runtime needs only the standard library; a
    callable step re-enables them before importing the step's code).
    """
    return [python, "-S", "-c", source()]


def launch_from_file(python: str = "python3", path: str | None = None) -> list[str]:
    """argv that runs this runtime from a file the step's machine has (the local backend's package, or a
    copy :func:`install` put on a mounted artifact root).

    Imported, not run as a script: Python compiles a script on every start but caches an imported module's
    bytecode in ``__pycache__``, which saves the compile (~8 ms in a container) of every step after the
    first. Bytecode is written even where the image says PYTHONDONTWRITEBYTECODE (the runner image does,
    for the step's own code); where the directory is not writable Python just compiles in memory. The
    directory is on ``sys.path`` only for that import, and the module leaves ``sys.modules`` at once, so
    a step's own module of that name is not shadowed.
    """
    path = os.path.abspath(path or __file__)
    directory, module = os.path.split(os.path.splitext(path)[0])
    boot = (f"import sys; _w = sys.dont_write_bytecode; sys.dont_write_bytecode = False; "
            f"sys.path.insert(0, {directory!r}); import {module} as _rt; del sys.path[0]; "
            f"del sys.modules[{module!r}]; sys.dont_write_bytecode = _w; _rt.exit(_rt.main())")
    return [python, "-S", "-c", boot]


def install(directory: str) -> str:
    """Put a copy of this runtime in ``directory`` (once per version of it) and its bytecode next to it.

    Returns the copy's path, for :func:`launch_from_file`. The file is named by its content's hash, so
    steps of different versions side by side each find their own and a copy is never rewritten (a new
    mtime would make the bytecode stale). The bytecode written here is for this interpreter; a step's
    interpreter of another version writes its own on first use when it may.
    """
    import hashlib

    text = source()
    path = os.path.join(directory, f"remote_ml_runtime_{hashlib.sha256(text.encode()).hexdigest()[:16]}.py")
    if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{id(text)}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)  # whole or not at all, whoever else installs it at the same moment
    import importlib.util

    if not os.path.exists(importlib.util.cache_from_source(path)):
        import py_compile

        py_compile.compile(path, doraise=False)  # written atomically; a failure only costs the compile
    return path


def _main() -> int:
    # First thing: as a container's PID 1 the process would ignore SIGTERM without a handler, so a cancel
    # arriving during start-up would wait for SIGKILL. Command steps later forward it to the child.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(128 + signal.SIGTERM))
    # Line-buffered stdout so logs stream while the step runs, whatever the image's defaults.
    try:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        pass
    try:
        step = load_step()
    except (StepError, ValueError) as exc:
        print(f"remote-ml: bad step configuration: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_CONFIG
    # Environment carried in the step itself, for platforms that cannot set a process's environment
    # (a job on an existing cluster); values set by the platform win.
    for key, value in (step.get("env") or {}).items():
        os.environ.setdefault(str(key), str(value))
    if step.get("chdir"):
        os.chdir(step["chdir"])
    for entry in reversed(step.get("python_path") or []):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    _ran["callable"] = bool(step.get("callable"))
    return run(step)


#: Whether the step's own code ran in this interpreter (a callable), for exit().
_ran: dict[str, bool] = {}


def main() -> int:
    code = _main()
    # A supervisor that is not our parent (a worker that restarted) learns the exit code from this file.
    exit_file = os.environ.get("REMOTE_ML_EXIT_FILE")
    if exit_file:
        try:
            with open(f"{exit_file}.tmp", "w", encoding="utf-8") as fh:
                fh.write(str(code))
            os.replace(f"{exit_file}.tmp", exit_file)
        except OSError:
            pass
    return code


def exit(code: int) -> None:  # noqa: A001 - the runtime's own exit, used as _rt.exit by the boot code
    """End the runtime's process with ``code``.

    After a command step none of the step's code ran in this interpreter, so its finalisation (module
    teardown and a last garbage collection, ~1.5 ms of every step) is skipped once our own output is
    flushed. After a callable step it runs, for the step's atexit handlers and non-daemon threads.
    """
    if not _ran.get("callable"):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, ValueError, OSError):
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit(main())
