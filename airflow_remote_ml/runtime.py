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
#: Exit code of an input or output the object store refused or could not be reached for.
EXIT_TRANSFER = 4
#: Where Kubernetes reads a container's termination message by default.
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
#: Kubernetes truncates termination messages to 4096 bytes.
TERMINATION_LOG_LIMIT = 4096
#: Largest JSON text of a callable's return value kept in the manifest (it travels on as XCom, which lives
#: in Airflow's metadata database: bigger results belong in a declared output).
RETURN_VALUE_LIMIT = 64 * 1024

_PREFIX_MAP = (("dbfs:/", "/dbfs/"),)
#: The name the step's code archive is fetched under, through the same path as every input (so whatever
#: makes an input URI reachable, a mount, fsspec or a signed URL, makes the archive reachable too). Not a
#: valid artifact name, so it never meets one of the step's own inputs.
CODE_INPUT = "__remote_ml_code__"


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


def _resolve_inputs(inputs: dict[str, str], scratch: _Scratch,
                    transfers: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Local paths of ``inputs``: as they are when local, else downloaded into ``scratch``.

    A non-local input named in ``transfers`` (default: the signed URLs of the step being run, see
    :func:`_set_transfers`) is fetched with plain HTTP from its signed URL(s), whatever its name; any
    other non-local input needs fsspec in the image. A local one (a platform that already downloaded it
    rewrote the URI to a path) is used where it is.
    """
    signed = _TRANSFERS.get("inputs") or {} if transfers is None else transfers
    paths = {}
    for name, uri in inputs.items():
        local = _local_of(uri)
        if local is None and name in signed:
            base = os.path.basename(uri.rstrip("/")) or name
            local = os.path.join(str(scratch), "inputs", name, base)
            _download_signed(signed[name], local, f"input {name!r} ({uri})")
        elif local is None:
            fs, path = _fsspec().core.url_to_fs(uri)
            local = os.path.join(str(scratch), "inputs", name, os.path.basename(path.rstrip("/")) or name)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get(path, local, recursive=fs.isdir(path))
            _USED.add("fsspec")
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
    signed = _TRANSFERS.get("manifest") if uri == _TRANSFERS.get("manifest_uri") else None
    if signed:
        body = data.encode()
        _request("PUT", signed["put"], f"the result manifest ({uri})", lambda: [body], len(body),
                 {"Content-Type": "application/json"})
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


def _install_code(step: dict[str, Any], scratch: _Scratch) -> str | None:
    """Fetch the step's code archive like an input, check its sha256, unpack it and put it first on the path.

    First on ``sys.path`` (for a callable) and on ``PYTHONPATH`` (for a command and anything it starts), so
    the shipped code wins over an older copy baked into the image.
    """
    code = step.get("code")
    if not code:
        return None
    uri, expected = str(code.get("uri") or ""), str(code.get("sha256") or "")
    try:
        archive = _resolve_inputs({CODE_INPUT: uri}, scratch)[CODE_INPUT]
    except FileNotFoundError:
        archive = ""
    if not archive or not os.path.isfile(archive):
        raise StepError(
            f"the step's code archive {uri!r} is not reachable from where the step runs; the artifact root must "
            "be mounted at the same path (or be an object store the step can read), or set code=False and bake "
            "the code into the image", EXIT_BAD_CONFIG)
    _size, digest = _digest(archive)
    if digest != expected:
        raise StepError(f"the step's code archive {uri!r} has sha256 {digest}, not {expected}: it changed after "
                        "it was stored; delete it so the next run stores it again", EXIT_BAD_CONFIG)
    target = _unpacked(archive, expected, scratch)
    sys.path.insert(0, target)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = target + (os.pathsep + old if old else "")
    return target


def _code_cache() -> str | None:
    """This user's folder of unpacked code archives on this machine (by sha256), or None if unusable.

    Steps on one machine (the local backend, a reused node) unpack an archive once and import it with its
    bytecode cached; in a fresh container it saves the scratch folder, whose ``tempfile``/``shutil`` imports
    cost a step more than the unpacking. Only a folder this user owns and nobody else may write is used:
    anyone able to plant files there could run code in the step.
    """
    base = os.path.join(os.environ.get("TMPDIR") or "/tmp", f"remote-ml-code-{os.getuid()}")
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    import stat

    info = os.lstat(base)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    return base


def _unpacked(archive: str, sha256: str, scratch: _Scratch) -> str:
    """The folder holding the archive's files: the machine's cached copy, else a fresh unpack."""
    cache = _code_cache()
    if cache is None:
        target = os.path.join(str(scratch), "code")
        _unzip(archive, target)
        return target
    target = os.path.join(cache, sha256)
    if os.path.isdir(target):  # renamed into place only once complete, and named by its verified sha256
        return target
    partial = f"{target}.tmp-{os.getpid()}"
    _unzip(archive, partial)
    try:
        os.rename(partial, target)
    except OSError:  # another step on this machine got there first: use its copy
        _remove_tree(partial)
        if not os.path.isdir(target):
            raise
    return target


def _remove_tree(path: str) -> None:
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.remove(os.path.join(root, name))
        for name in dirs:
            os.rmdir(os.path.join(root, name))
    os.rmdir(path)


def _unzip(archive: str, target: str) -> None:
    """Unpack a zip archive of stored or deflated files into ``target``.

    Reads the central directory with struct and inflates with zlib: ``import zipfile`` alone costs a step
    ~80 ms on a loaded machine (it pulls in shutil, pathlib, bz2, lzma, ...), more than unpacking a
    package. Anything this reader does not handle (ZIP64, other compression) falls back to zipfile.
    """
    import struct
    import zlib

    with open(archive, "rb") as fh:
        data = fh.read()
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 65557))
    if end < 0:
        raise StepError(f"the step's code archive {archive!r} is not a zip file", EXIT_BAD_CONFIG)
    _sig, _disk, _cd_disk, _here, count, _size, offset, _comment = struct.unpack_from("<4sHHHHIIH", data, end)
    members: list[tuple[str, int, int, int, int]] = []
    supported = True
    for _ in range(count):
        fields = struct.unpack_from("<4sHHHHHHIIIHHHHHII", data, offset)
        if fields[0] != b"PK\x01\x02":  # not what the end record promised: let zipfile judge it
            supported = False
            break
        method, csize, usize, name_len, extra_len, comment_len = (fields[4], fields[8], fields[9], fields[10],
                                                                  fields[11], fields[12])
        local_offset, external = fields[16], fields[15]
        name = data[offset + 46:offset + 46 + name_len].decode("utf-8")
        offset += 46 + name_len + extra_len + comment_len
        if method not in (0, 8) or 0xFFFFFFFF in (csize, usize, local_offset) or count == 0xFFFF:
            supported = False
            break
        members.append((name, method, csize, local_offset, external >> 16))
    if not supported:
        import zipfile

        with zipfile.ZipFile(archive) as zf:
            zf.extractall(target)  # zipfile drops absolute paths and '..' in member names
        return
    # A fresh folder of our own holds no symlinks, so a lexical check keeps every member inside it (no
    # realpath: its lstat per path component per member is most of the cost of a many-file package).
    root = os.path.abspath(target)
    made: set[str] = set()
    for name, method, csize, local_offset, mode in members:
        path = os.path.normpath(os.path.join(root, name))
        if name.startswith("/") or "\\" in name or not path.startswith(root + os.sep):
            raise StepError(f"the step's code archive holds an unsafe path {name!r}", EXIT_BAD_CONFIG)
        folder = path if name.endswith("/") else os.path.dirname(path)
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        if name.endswith("/"):
            continue
        name_len, extra_len = struct.unpack_from("<HH", data, local_offset + 26)
        start = local_offset + 30 + name_len + extra_len
        content = data[start:start + csize]
        with open(path, "wb") as out:
            out.write(zlib.decompress(content, -15) if method == 8 else content)
        if mode & 0o111:
            os.chmod(path, 0o755)


def _import_hint(step: dict[str, Any], exc: BaseException) -> str:
    """What to do about a callable that cannot be imported: which code was shipped, which image ran."""
    code = step.get("code") or {}
    image = (step.get("versions") or {}).get("image")
    where = (f"image {image!r}" if image else f"the Python at {sys.executable}") + f" (python {sys.version.split()[0]})"
    # A module that is missing names itself; a missing attribute is the callable's path, not a package.
    missing = str(exc.name or "") if isinstance(exc, ImportError) else ""
    top = missing.split(".", 1)[0]
    if not code:
        return (f"no code was shipped with this step (code=False, or the Airflow worker could not import the "
                f"package either: see the task log), so {where} must contain it; put the package where the worker "
                f"imports it (next to the DAG file) so code=True (the default) ships it, name it in "
                f"code=[{top or 'your_package'!r}], or install it in the image")
    packages = [str(p) for p in code.get("packages") or []]
    shipped = f"the shipped code ({', '.join(packages)}; sha256 {str(code.get('sha256'))[:12]})"
    if top and top not in packages:
        return (f"{missing!r} is not in {shipped}: if it is a library, install it in {where}; if it is your own "
                f"package, add it to code=[...]")
    return f"{shipped} was first on sys.path in {where} but does not define it; check the callable's path"
# -- signed-URL transfers ----------------------------------------------------------------------------
# The worker signs S3 URLs with its credentials (airflow_remote_ml.core.transfer); the step only speaks HTTP.

#: The signed URLs of the step being run (``"transfers"`` of its config) and which transfer paths it used.
_TRANSFERS: dict[str, Any] = {}
_USED: set[str] = set()
#: Outputs whose signed multipart upload was completed or aborted.
_SETTLED: set[str] = set()
#: Bytes per read/write of a transfer: the file is streamed, never held in memory.
_TRANSFER_CHUNK = 1 << 20
#: Attempts of one request that failed with a 5xx, a 429 or a broken connection, and the first back-off.
_TRANSFER_ATTEMPTS = 5
_TRANSFER_BACKOFF = 0.5
#: Seconds without a byte before a transfer request is given up (and retried).
_TRANSFER_SOCKET_TIMEOUT = 120.0


def _set_transfers(step: Mapping[str, Any]) -> None:
    _TRANSFERS.clear()
    _USED.clear()
    _SETTLED.clear()
    _TRANSFERS.update(step.get("transfers") or {})
    _TRANSFERS["manifest_uri"] = step.get("manifest_uri")
    _TRANSFERS["info"] = step.get("transfer") or {}


def _s3_error(body: bytes) -> tuple[str, str]:
    """(Code, Message) of an S3 XML error body, or ("", first bytes of the body)."""
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return "", body[:200].decode(errors="replace")
    values = {child.tag.rsplit("}", 1)[-1]: (child.text or "") for child in root}
    return values.get("Code", ""), values.get("Message", "")


def _refused(what: str, status: int, body: bytes) -> StepError:
    code, message = _s3_error(body)
    reason = f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    info = _TRANSFERS.get("info") or {}
    if status == 403 and ("expired" in message.lower() or code == "ExpiredToken"):
        expires_at = info.get("expires_at")
        when = "?" if expires_at is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at))
        hint = (f"the signed URLs were valid for {info.get('lifetime_seconds', '?')} s, until {when}: the step "
                "started or ran too long after it was submitted; raise the step's timeout or "
                "REMOTE_ML_TRANSFER_MARGIN on the worker, or check the clocks")
    elif status == 403:
        hint = ("the object store refused the worker's signature: the worker's credentials may not allow this, "
                "or were temporary and expired")
    else:
        hint = "the object store refused the request"
    return StepError(f"{what}: {reason} ({hint})", EXIT_TRANSFER)


def _request(method: str, url: str, what: str, body: Any = None, length: int | None = None,
             headers: Mapping[str, str] | None = None, sink: Any = None) -> Any:
    """One HTTP request with retries (5xx, 429, connection errors) and back-off.

    ``body`` is a function returning a fresh iterable of byte chunks (called again for each attempt);
    ``sink(response)`` consumes a successful response (again per attempt, so a download restarts cleanly).
    Returns ``(status, headers, data)``; ``data`` is what ``sink`` returned, else the response body.
    """
    import http.client
    import urllib.error
    import urllib.request

    delay = _TRANSFER_BACKOFF
    for attempt in range(1, _TRANSFER_ATTEMPTS + 1):
        request = urllib.request.Request(url, method=method, data=body() if body else None)
        if body:
            # urllib would label a body as a form (application/x-www-form-urlencoded), which it is not.
            request.add_header("Content-Type", "application/octet-stream")
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        if length is not None:
            request.add_header("Content-Length", str(length))  # an iterable body is not sent chunked
        try:
            with urllib.request.urlopen(request, timeout=_TRANSFER_SOCKET_TIMEOUT) as response:
                data = sink(response) if sink else response.read()
                return response.status, response.headers, data
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            if (exc.code < 500 and exc.code != 429) or attempt == _TRANSFER_ATTEMPTS:
                if exc.code >= 400:
                    raise _refused(what, exc.code, payload) from None
                raise
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            if attempt == _TRANSFER_ATTEMPTS:
                raise StepError(f"{what}: the object store could not be reached after {attempt} attempts: "
                                f"{getattr(exc, 'reason', exc)}", EXIT_TRANSFER) from None
        print(f"remote-ml: {what}: attempt {attempt} failed, retrying in {delay:g}s", file=sys.stderr, flush=True)
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def _file_chunks(path: str, start: int = 0, size: int | None = None) -> Any:
    """The bytes of ``path`` from ``start`` (``size`` of them, or to the end), one chunk at a time."""
    with open(path, "rb") as fh:
        fh.seek(start)
        left = size
        while left is None or left > 0:
            block = fh.read(_TRANSFER_CHUNK if left is None else min(_TRANSFER_CHUNK, left))
            if not block:
                break
            if left is not None:
                left -= len(block)
            yield block


def _save(local: str) -> Any:
    def sink(response: Any) -> int:
        tmp = f"{local}.part"
        total = 0
        with open(tmp, "wb") as fh:
            while block := response.read(_TRANSFER_CHUNK):
                fh.write(block)
                total += len(block)
        os.replace(tmp, local)
        return total
    return sink


def _download_signed(signed: Mapping[str, Any], local: str, what: str) -> None:
    _USED.add("presigned")
    if signed.get("kind") == "directory":
        for relative, url in sorted(signed["files"].items()):
            target = os.path.join(local, *relative.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            _request("GET", url, f"{what}, file {relative!r}", sink=_save(target))
        return
    os.makedirs(os.path.dirname(local), exist_ok=True)
    _request("GET", signed["get"], what, sink=_save(local))


def _post_file(post: Mapping[str, Any], key: str, path: str, size: int, what: str) -> None:
    """Upload one file with a presigned POST policy (multipart/form-data, streamed from the file)."""
    import uuid

    boundary = f"remote-ml-{uuid.uuid4().hex}"
    head = bytearray()
    # S3 reads every form field before the file, and ignores fields after it: the file goes last.
    for name, value in [*post["fields"].items(), ("key", key)]:
        head += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()
    head += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{os.path.basename(path)}\"\r\n"
             "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Any:
        yield bytes(head)
        yield from _file_chunks(path)
        yield tail

    _request("POST", post["url"], what, body, len(head) + size + len(tail),
             {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def _multipart_upload(multipart: Mapping[str, Any], path: str, size: int, what: str) -> None:
    """Upload a large file in parts through the presigned part URLs, then complete the upload."""
    parts = multipart["parts"]
    # Parts may differ in size (only the last may be under the 5 MiB minimum): spread the file over the
    # signed URLs, in whole MiB.
    part_size = max(int(multipart.get("min_part_size") or 5 << 20), -(-size // len(parts)))
    part_size = -(-part_size // (1 << 20)) * (1 << 20)
    if part_size > 5 << 30:
        raise StepError(f"{what}: {size} bytes need parts over S3's 5 GiB limit with {len(parts)} signed part "
                        "URLs; raise REMOTE_ML_MULTIPART_PARTS on the worker", EXIT_TRANSFER)
    etags = []
    try:
        for number, start in enumerate(range(0, size, part_size), start=1):
            length = min(part_size, size - start)
            _, headers, _ = _request("PUT", parts[number - 1], f"{what}, part {number}",
                                     lambda start=start, length=length: _file_chunks(path, start, length), length)
            etags.append(headers["ETag"])
    except BaseException:
        _abort_multipart(multipart)  # the parts uploaded so far would otherwise be stored (and billed)
        raise
    xml = "<CompleteMultipartUpload>" + "".join(
        f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>" for n, etag in enumerate(etags, 1)
    ) + "</CompleteMultipartUpload>"
    data = xml.encode()
    _, _, answer = _request("POST", multipart["complete"], f"{what}, completing the upload", lambda: [data],
                            len(data), {"Content-Type": "application/xml"})
    # S3 may answer CompleteMultipartUpload with 200 and an <Error> body (docs: CompleteMultipartUpload).
    code, message = _s3_error(answer or b"")
    if b"<Error>" in (answer or b""):
        raise StepError(f"{what}: completing the multipart upload failed: {code}: {message}", EXIT_TRANSFER)


def _abort_multipart(multipart: Mapping[str, Any] | None) -> None:
    if multipart:
        try:
            _request("DELETE", multipart["abort"], "aborting an unused multipart upload")
        except Exception:  # best effort: the bucket's lifecycle rule is the backstop (docs/artifacts.md)
            pass


def _upload_signed(signed: Mapping[str, Any], path: str, what: str) -> None:
    """Upload output ``path`` (a file or a directory) to the key its signed POST policy allows."""
    _USED.add("presigned")
    multipart = signed.get("multipart")
    limit = int(signed.get("max_single_upload") or 5 << 30)
    if os.path.isfile(path):
        size = os.path.getsize(path)
        if multipart and size >= int(multipart["threshold"]):
            _multipart_upload(multipart, path, size, what)
            return
        _abort_multipart(multipart)
        if size > limit:
            raise StepError(f"{what}: {size} bytes is more than one upload may carry ({limit}) and no multipart "
                            "upload was signed; set REMOTE_ML_MULTIPART_PARTS on the worker", EXIT_TRANSFER)
        _post_file(signed["post"], signed["key"], path, size, what)
        return
    _abort_multipart(multipart)
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            relative = os.path.relpath(full, path).replace(os.sep, "/")
            size = os.path.getsize(full)
            if size > limit:
                raise StepError(f"{what}: file {relative!r} ({size} bytes) is more than one upload may carry "
                                f"({limit}); only a file output is uploaded in parts", EXIT_TRANSFER)
            _post_file(signed["post"], f"{signed['key']}/{relative}", full, size, f"{what}, file {relative!r}")


def _upload(name: str, uri: str, path: str) -> None:
    signed = (_TRANSFERS.get("outputs") or {}).get(name)
    if signed:
        try:
            _upload_signed(signed, path, f"output {name!r} ({uri})")
        finally:
            _SETTLED.add(name)
        return
    fs, remote = _fsspec().core.url_to_fs(uri)
    fs.put(path, remote, recursive=os.path.isdir(path))
    _USED.add("fsspec")


def _transfer_version(local_only: bool) -> str:
    """What moved the step's artifacts, for the version record."""
    if _USED:
        return "+".join(sorted(_USED))
    if _TRANSFERS.get("info", {}).get("mode"):
        return str(_TRANSFERS["info"]["mode"])
    return "local" if local_only else "none"


# -- metrics -----------------------------------------------------------------------------------------


class _MetricsCollector:
    def __init__(self) -> None:
        self.metrics: dict[str, Any] = {}
        self.returned: Any = None  # what a callable step returned

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
        raise StepError(f"cannot load callable {step['callable']!r}: {exc}; {_import_hint(step, exc)}",
                        EXIT_BAD_CONFIG) from None
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
    collector.returned = result
    return 0


def _return_value(value: Any) -> tuple[Any, str | None]:
    """A callable's return value as the manifest keeps it, or why it cannot (never fails the step itself)."""
    import json  # only a callable that returned something pays for it (a command step never imports json)

    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return None, f"the function returned a {type(value).__name__}, which is not JSON ({exc})"
    if len(text) > RETURN_VALUE_LIMIT:
        return None, (f"the function returned {len(text)} bytes of JSON, more than the {RETURN_VALUE_LIMIT} kept "
                      "as its result; write large results to a declared output")
    return value, None


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
    _set_transfers(step)
    try:
        if not isinstance(version, int) or version > PROTOCOL_VERSION:
            raise StepError(f"step protocol {version!r} is newer than this runtime ({PROTOCOL_VERSION}); "
                            "the runtime is injected by the backend, so upgrade airflow-remote-ml", EXIT_BAD_CONFIG)
        if bool(step.get("command")) == bool(step.get("callable")):
            raise StepError("the step needs exactly one of 'command' and 'callable'", EXIT_BAD_CONFIG)
        _install_code(step, scratch)
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
                _upload(name, uri, path)
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
        # A multipart upload the worker opened for an output that was not uploaded in parts (a failed step,
        # a small file, a directory) is aborted, so no incomplete upload is left in the bucket.
        for name, signed in (_TRANSFERS.get("outputs") or {}).items():
            if name not in _SETTLED:
                _abort_multipart(signed.get("multipart"))
    manifest["metrics"] = collector.metrics
    if collector.returned is not None:
        manifest["return_value"], error = _return_value(collector.returned)
        if error:
            manifest["return_value_error"] = error
    locations = [*(step.get("inputs") or {}).values(), *(step.get("outputs") or {}).values()]
    manifest["versions"]["transfer"] = _transfer_version(all(_local_of(str(u)) is not None for u in locations))
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
