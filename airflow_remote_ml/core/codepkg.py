"""The step's code travels with the step: a content-addressed archive of the user's own packages.

A stock image has the libraries (python3, numpy, scikit-learn, ...) but not the pipeline's code. The
operator packs the top-level package that holds the step's callable (and any packages named in
``code=[...]``) from the worker's files into a zip whose bytes depend only on the files' names, modes and
contents, stores it once per sha256 at ``<artifact_root>/_code/<sha256>.zip``, and the in-step runtime
fetches it like an input, checks the sha256, unpacks it and puts it first on ``sys.path`` (and
``PYTHONPATH`` for commands) before it imports anything. Metaflow's code package and Flyte's fast
registration work the same way.

No Airflow import: a backend can be driven, and this module tested, without a scheduler.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import sys
import threading
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_remote_ml.core.artifacts import is_local, local_path
from airflow_remote_ml.core.errors import ArtifactError, ConfigError

#: Folder under the artifact root that holds the archives, one per sha256.
CODE_DIR = "_code"
#: Largest total size of the files packed: a package holding a data set or a model is a mistake the user
#: should hear about (artifacts belong in inputs), not a multi-gigabyte zip built in memory per step.
MAX_PACKAGE_BYTES = 256 * 1024 * 1024
#: Every entry gets this timestamp (the earliest a zip can hold), so the archive's bytes, and so its
#: sha256, do not depend on when the files were checked out.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_SKIP_DIRS = frozenset({"__pycache__"})
#: Changes whenever the archive's layout does, so a disk cache entry of an older layout is never reused.
_FORMAT = 1
_SKIP_SUFFIXES = (".pyc", ".pyo")

_FIX_NAMES = "use e.g. code=['my_pipeline'] (top-level package names), code=True or code=False"


@dataclass(frozen=True)
class CodeRef:
    """Where a step's code archive is, its sha256 and the packages it holds (what the runtime needs)."""

    uri: str
    sha256: str
    packages: tuple[str, ...]
    #: The archive's bytes, on the worker that built it (for backends that upload it themselves); never
    #: serialised.
    archive: bytes | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "sha256": self.sha256, "packages": list(self.packages)}

    @classmethod
    def from_json(cls, data: Any) -> CodeRef:
        return cls(str(data["uri"]), str(data["sha256"]), tuple(data.get("packages") or ()))


@dataclass(frozen=True)
class CodePackage:
    """A built archive: its bytes and sha256, not yet placed anywhere."""

    sha256: str
    packages: tuple[str, ...]
    data: bytes = field(repr=False)
    files: int = 0

    def uri(self, artifact_root: str) -> str:
        """``<artifact_root>/_code/<sha256>.zip``."""
        name = f"{self.sha256}.zip"
        if is_local(artifact_root):
            return os.path.join(local_path(artifact_root), CODE_DIR, name)
        return "/".join([artifact_root.rstrip("/"), CODE_DIR, name])

    def ref(self, artifact_root: str) -> CodeRef:
        return CodeRef(self.uri(artifact_root), self.sha256, self.packages, self.data)


# -- the operator argument --------------------------------------------------------------------------------


def check_code_argument(value: Any, field_name: str = "code") -> bool | tuple[str, ...]:
    """``code=`` as the user wrote it: ``True``, ``False`` or a list of top-level package names."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        raise ConfigError(field_name, f"expected a list of package names, got the string {value!r}",
                          f"use [{value!r}]")
    if not isinstance(value, (list, tuple)):
        raise ConfigError(field_name, f"expected True, False or a list of package names, got "
                          f"{type(value).__name__}", _FIX_NAMES)
    return check_package_names(value, field_name)


def check_package_names(value: Sequence[Any], field_name: str = "code") -> tuple[str, ...]:
    """A list of top-level package names, without repeats."""
    names: list[str] = []
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{field_name}[{i}]", f"{name!r} is not a package name", _FIX_NAMES)
        if "." in name and all(part.isidentifier() for part in name.split(".")):
            top = name.split(".", 1)[0]
            raise ConfigError(f"{field_name}[{i}]", f"{name!r} is a submodule; whole top-level packages are "
                              "shipped", f"use {top!r}")
        if not name.isidentifier():
            raise ConfigError(f"{field_name}[{i}]", f"{name!r} is not an importable name", _FIX_NAMES)
        if name not in names:
            names.append(name)
    return tuple(names)


def packages_to_ship(callable_path: str | None, code: bool | Sequence[str]) -> tuple[str, ...]:
    """The top-level packages a step ships: its callable's (by default) plus the named ones.

    ``code=True`` ships the callable's package; a command ships nothing unless packages are named;
    ``code=False`` ships nothing.
    """
    if code is False:
        return ()
    names: list[str] = []
    if callable_path:
        top = callable_path.partition(":")[0].split(".", 1)[0]
        if top:
            names.append(top)
    named = check_package_names(list(code)) if not isinstance(code, bool) else ()
    names.extend(n for n in named if n not in names)
    return tuple(names)


# -- finding the files on the worker -------------------------------------------------------------------------


def _installed_roots() -> list[str]:
    """Directories whose packages are libraries (the image's business), not the user's code."""
    import site
    import sysconfig

    roots = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        with contextlib.suppress(Exception):
            roots.add(sysconfig.get_paths()[key])
    with contextlib.suppress(Exception):
        roots.update(site.getsitepackages())
    with contextlib.suppress(Exception):
        roots.add(site.getusersitepackages())
    return sorted({os.path.realpath(r) for r in roots if r}, key=len, reverse=True)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def locate(name: str, field_name: str = "code") -> list[tuple[str, str]]:
    """``[(path on this machine, name in the archive)]`` of top-level package or module ``name``.

    Found the way ``import name`` would find it (``importlib.util.find_spec``, which does not run a
    top-level package's code). Refuses, naming the fix, what cannot or should not be shipped: a name that
    is not importable here, the standard library, and installed libraries (site-packages).
    """
    import importlib.util

    if name in sys.builtin_module_names or name in getattr(sys, "stdlib_module_names", ()):
        raise ConfigError(field_name, f"{name!r} is part of Python's standard library, which every image has",
                          f"drop {name!r} from code=[...]")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        spec, problem = None, f" ({exc})"
    else:
        problem = ""
    if spec is None:
        raise ConfigError(
            field_name, f"package {name!r} is not importable on this worker{problem}, so it cannot be shipped",
            "put it next to the DAG file (Airflow puts the DAG folder on sys.path) or on the worker's PYTHONPATH; "
            "or, if the step's image already contains it, set code=False")
    if spec.submodule_search_locations:
        locations = [os.path.realpath(p) for p in spec.submodule_search_locations]
        entries = [(loc, name) for loc in locations]
    elif spec.origin and os.path.isfile(spec.origin):
        locations = [os.path.realpath(spec.origin)]
        entries = [(locations[0], os.path.basename(spec.origin))]
    else:
        raise ConfigError(field_name, f"{name!r} is not a package or module on disk (origin {spec.origin!r})",
                          f"drop {name!r} from code=[...], or set code=False and install it in the image")
    for location in locations:
        if not os.path.exists(location):
            raise ConfigError(field_name, f"{name!r} lives in {location}, which is not a directory or file on "
                              "disk (an egg or zip import?)", "install it in the image and set code=False")
        for root in _installed_roots():
            if _under(location, root):
                raise ConfigError(
                    field_name,
                    f"{name!r} is an installed library ({location} is under {root}); shipping site-packages "
                    "is refused: the image provides libraries, the code package carries your own code",
                    f"install {name!r} in the step's image and drop it from code=[...] (or set code=False); "
                    "if it is your project installed with pip, install it editable (pip install -e) so its "
                    "source is shipped")
    return entries


def _walk(source: str, arcname: str) -> list[tuple[str, str]]:
    """``[(archive name, path)]`` of every file to pack from one location."""
    if os.path.isfile(source):
        return [(arcname, source)]
    files = []
    for root, dirs, names in os.walk(source):
        # Bytecode is rebuilt where it runs, and would make the hash depend on what ran here; hidden
        # folders are tool state (.mypy_cache, .ipynb_checkpoints), not code.
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        rel = os.path.relpath(root, source)
        for file in names:
            if file.endswith(_SKIP_SUFFIXES):
                continue
            parts = [arcname] if rel == "." else [arcname, *rel.split(os.sep)]
            files.append(("/".join([*parts, file]), os.path.join(root, file)))
    return files


# -- building the archive ---------------------------------------------------------------------------------------

_cache: dict[tuple[str, ...], tuple[tuple[Any, ...], CodePackage]] = {}
_published: set[str] = set()
_lock = threading.Lock()


def build(packages: Sequence[str], field_name: str = "code") -> CodePackage:
    """The archive of ``packages`` as they are on this machine now.

    Cached by the files' names, sizes, modes and mtimes (a walk and a stat each, no reads): in the process,
    where the same package object comes back, and on the worker's disk (``$REMOTE_ML_CODE_CACHE``, default
    ``~/.cache/airflow-remote-ml/code``), where the archive is read back instead of zipped again. Airflow 3
    runs each task instance in a process of its own, so the disk cache is what spares a mapped task of a
    thousand steps a thousand zips; a worker whose cache folder is not writable just zips.
    """
    names = tuple(packages)
    files: dict[str, str] = {}
    for name in names:
        for source, arcname in locate(name, field_name):
            for entry, path in _walk(source, arcname):
                files.setdefault(entry, path)  # a namespace package's first portion wins, as for import
    fingerprint_parts = []
    total = 0
    for entry in sorted(files):
        st = os.stat(files[entry])
        total += st.st_size
        fingerprint_parts.append((entry, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode)))
    fingerprint = tuple(fingerprint_parts)
    with _lock:
        cached = _cache.get(names)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
    key = hashlib.sha256(repr((_FORMAT, names, fingerprint)).encode()).hexdigest()
    data = _disk_cache_read(key)
    if data is not None:
        package = CodePackage(hashlib.sha256(data).hexdigest(), names, data, len(fingerprint))
        with _lock:
            _cache[names] = (fingerprint, package)
        return package
    if total > MAX_PACKAGE_BYTES:
        raise ConfigError(field_name, f"the packages {', '.join(names)} hold {total / 2**20:.0f} MiB of files, "
                          f"more than the {MAX_PACKAGE_BYTES // 2**20} MiB a code package may carry",
                          "move data and models out of the package (pass them as inputs), or set code=False "
                          "and bake the code into the image")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for entry, _size, _mtime, mode in fingerprint:
            info = zipfile.ZipInfo(entry, date_time=_ZIP_EPOCH)
            info.create_system = 3  # unix, wherever it was built: the mode bits below mean the same
            info.external_attr = (0o755 if mode & 0o111 else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(files[entry], "rb") as fh:
                archive.writestr(info, fh.read(), compresslevel=6)
    data = buffer.getvalue()
    package = CodePackage(hashlib.sha256(data).hexdigest(), names, data, len(fingerprint))
    _disk_cache_write(key, data)
    with _lock:
        _cache[names] = (fingerprint, package)
    return package


def _disk_cache_dir() -> str:
    return os.environ.get("REMOTE_ML_CODE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "airflow-remote-ml", "code")


def _disk_cache_read(key: str) -> bytes | None:
    try:
        with open(os.path.join(_disk_cache_dir(), f"{key}.zip"), "rb") as fh:
            return fh.read()
    except OSError:
        return None


def _disk_cache_write(key: str, data: bytes) -> None:
    """Keep a built archive for the next process; a cache that cannot be written only costs a zip."""
    folder = _disk_cache_dir()
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"{key}.zip.tmp-{os.getpid()}-{threading.get_ident()}")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, os.path.join(folder, f"{key}.zip"))  # readers never see half an archive
    except OSError:
        pass


def prepare(callable_path: str | None, code: bool | Sequence[str], artifact_root: str,
            on_skip: Callable[[str, ConfigError], None] | None = None) -> CodeRef | None:
    """The code archive a step ships (built, not yet stored), or ``None`` when it ships none.

    A package named in ``code=[...]`` must be shippable (else a ConfigError naming ``code``). The
    callable's own package, shipped by default, is skipped when this worker cannot ship it (not importable
    here, or an installed library): the step's environment then provides it, as before code shipping (a
    Databricks workspace folder on ``python_path``, a Valohai repository commit, a project installed in
    the image). ``on_skip(package, reason)`` hears about each skipped package.
    """
    named = check_package_names(list(code)) if not isinstance(code, bool) else ()
    packages = list(packages_to_ship(callable_path, code))
    for name in [p for p in packages if p not in named]:
        try:
            locate(name)
        except ConfigError as exc:
            packages.remove(name)
            if on_skip is not None:
                on_skip(name, exc)
    if not packages:
        return None
    return build(packages).ref(artifact_root)


# -- storing it once per hash ------------------------------------------------------------------------------------


def publish(ref: CodeRef) -> bool:
    """Store the archive at ``ref.uri`` unless it is there already. True when it was written.

    Local paths are written to a temporary name and renamed, so a step never reads half an archive; other
    URIs go through fsspec (an object store's put is atomic per object).
    """
    if ref.uri in _published:
        return False
    if ref.archive is None:
        raise ArtifactError(f"the code archive for {ref.uri} was not built in this process; cannot store it")
    written = False
    if is_local(ref.uri):
        path = local_path(ref.uri)
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
            with open(tmp, "wb") as fh:
                fh.write(ref.archive)
            os.replace(tmp, path)
            written = True
    else:
        try:
            import fsspec
        except ImportError:
            raise ArtifactError(f"storing the code archive at {ref.uri!r} needs fsspec on the worker; "
                                "pip install fsspec (and e.g. s3fs)") from None
        fs, path = fsspec.core.url_to_fs(ref.uri)
        if not fs.exists(path):
            fs.pipe_file(path, ref.archive)
            written = True
    _published.add(ref.uri)
    return written


def clear_cache() -> None:
    """Forget built and stored archives (tests and benchmarks measure the first build with it)."""
    with _lock:
        _cache.clear()
        _published.clear()
