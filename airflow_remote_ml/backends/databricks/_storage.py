"""Files Airflow reads and writes for a Databricks step: the runtime it places and the manifest it reads.

A ``dbfs:/`` location goes through a ``local_mounts`` directory or the DBFS API (never fsspec: fsspec does not
know ``dbfs:/`` without an instance and a token, and resolves it to a local folder literally named
``dbfs:``); a ``/Volumes`` or workspace path needs a ``local_mounts`` entry; other URIs go to fsspec.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from airflow_remote_ml.core.artifacts import is_local, local_path
from airflow_remote_ml.core.errors import ArtifactError, BackendAPIError, ConfigError

#: The DBFS API's limits (docs.databricks.com/api/workspace/dbfs): ``read`` returns at most 1 MB per call
#: (MAX_READ_SIZE_EXCEEDED beyond), ``put`` takes at most 1 MB of inline ``contents`` and ``add-block`` at
#: most 1 MB per block (MAX_BLOCK_SIZE_EXCEEDED).
DBFS_MAX_BYTES = 1 << 20
#: Paths that only exist inside a workspace: Airflow reaches them through ``local_mounts`` or an API.
WORKSPACE_ONLY = ("/Volumes/", "/Workspace/", "/dbfs/")

#: ``call(endpoint, payload, action)``: the backend's one choke point (the hook plus error mapping).
Call = Callable[[tuple[str, str], dict[str, Any], str], dict[str, Any]]


class NotFound(Exception):
    """The run or file does not exist: 400 "Run N does not exist.", 404, RESOURCE_DOES_NOT_EXIST."""


def mount_of(local_mounts: Mapping[str, str], uri: str) -> str | None:
    """The local path of ``uri`` under the longest matching ``local_mounts`` prefix, if any."""
    for prefix in sorted(local_mounts, key=len, reverse=True):
        if uri.startswith(prefix):
            return os.path.join(local_mounts[prefix], uri[len(prefix) :].lstrip("/"))
    return None


def dbfs_path(uri: str) -> str:
    """``dbfs:/a/b`` → ``/a/b``, the absolute DBFS path the API wants."""
    return "/" + uri[len("dbfs:") :].lstrip("/")


class Storage:
    """Artifact I/O seen from Airflow, for one backend instance (its mounts and its API calls)."""

    def __init__(self, local_mounts: Mapping[str, str], call: Call, backend: str) -> None:
        self.local_mounts = dict(local_mounts)
        self._call = call
        self._backend = backend

    def mount_of(self, uri: str) -> str | None:
        return mount_of(self.local_mounts, uri)

    # -- writing ---------------------------------------------------------------------------------------

    def write(self, uri: str, data: bytes) -> None:
        """Place a file where the cluster reads it: a mount, the DBFS API, a local path or fsspec."""
        target = self.mount_of(uri)
        if target is None and uri.startswith("dbfs:"):
            self._dbfs_write(uri, data)
            return
        if target is None and is_local(uri):
            path = local_path(uri)
            top = "/" + path.lstrip("/").split("/", 1)[0]
            if path.startswith(WORKSPACE_ONLY) and not os.path.isdir(top):
                raise ConfigError(
                    "runtime_dir",
                    f"Airflow cannot write {uri!r}",
                    f"map it with backend_config[{self._backend}].local_mounts, use a dbfs:/ runtime_dir, "
                    "or deploy the runtime there yourself and set upload_runtime=False",
                )
            target = path
        if target is not None:
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            # A unique temporary name: two threads of one worker (a triggerer runs many steps) writing the
            # same runtime file must not truncate each other's half-written copy before the rename.
            fd, tmp = tempfile.mkstemp(prefix=os.path.basename(target) + ".tmp-", dir=os.path.dirname(target) or ".")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cluster's user must read it
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
            return
        import fsspec

        with fsspec.open(uri, "wb") as fh:
            fh.write(data)

    def write_once(self, uri: str, data: bytes) -> None:
        """Place a content-addressed file (the runtime, a code archive: its name is its digest) that steps
        may be reading right now: never rewritten in place, placed once.

        Over the DBFS API an existing file of this size is this file and is left alone (one ``get-status``).
        A new one is uploaded under a temporary name and moved into place: the reference does not say that a
        streaming upload (create, add-block, close) hides the partial file from readers, so re-uploading in
        place could hand a running step a truncated archive. ``dbfs/move`` refuses an existing destination
        (RESOURCE_ALREADY_EXISTS): another worker placed it first, and ours is dropped. Under a mount or a
        local path an existing file of this size is likewise kept; a write goes through :meth:`write`, which
        renames a complete temporary file into place.
        """
        target = self.mount_of(uri)
        if target is None and uri.startswith("dbfs:"):
            self._dbfs_place(uri, data)
            return
        if target is None and is_local(uri):
            target = local_path(uri)
        if target is not None and os.path.isfile(target) and os.path.getsize(target) == len(data):
            return
        self.write(uri, data)

    def _dbfs_place(self, uri: str, data: bytes) -> None:
        path = dbfs_path(uri)
        try:
            status: dict[str, Any] | None = self._call(("GET", "2.0/dbfs/get-status"), {"path": path},
                                                       f"looking up {uri}")
        except NotFound:
            status = None
        if status is not None:
            if not status.get("is_dir") and int(status.get("file_size", -1)) == len(data):
                return
            # Not this file (a partial upload left by an older version of this provider): replace it.
            self._call(("POST", "2.0/dbfs/delete"), {"path": path, "recursive": False}, f"replacing {uri}")
        partial = f"{uri}.part-{uuid.uuid4().hex[:12]}"
        self._dbfs_write(partial, data)
        try:
            self._call(("POST", "2.0/dbfs/move"), {"source_path": dbfs_path(partial), "destination_path": path},
                       f"placing {uri}")
        except BackendAPIError as exc:
            with contextlib.suppress(Exception):
                self._call(("POST", "2.0/dbfs/delete"), {"path": dbfs_path(partial), "recursive": False},
                           f"removing {partial}")
            if "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise

    def _dbfs_write(self, uri: str, data: bytes) -> None:
        path = dbfs_path(uri)
        if len(data) <= DBFS_MAX_BYTES:
            self._call(
                ("POST", "2.0/dbfs/put"),
                {"path": path, "overwrite": True, "contents": base64.b64encode(data).decode()},
                f"uploading {uri}",
            )
            return
        # Larger than an inline put may carry: the streaming upload (create, add-block per MB, close).
        handle = self._call(("POST", "2.0/dbfs/create"), {"path": path, "overwrite": True}, f"uploading {uri}")
        for start in range(0, len(data), DBFS_MAX_BYTES):
            block = base64.b64encode(data[start : start + DBFS_MAX_BYTES]).decode()
            self._call(("POST", "2.0/dbfs/add-block"), {"handle": handle["handle"], "data": block},
                       f"uploading {uri}")
        self._call(("POST", "2.0/dbfs/close"), {"handle": handle["handle"]}, f"uploading {uri}")

    # -- reading ---------------------------------------------------------------------------------------

    def read_json(self, uri: str) -> dict[str, Any] | None:
        text = self.read_text(uri)
        if text is None:
            return None
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ArtifactError(f"the result manifest at {uri!r} is unreadable: {exc}") from exc
        return value if isinstance(value, dict) else None

    def read_text(self, uri: str) -> str | None:
        target = self.mount_of(uri)
        if target is None and uri.startswith("dbfs:"):
            return self._dbfs_read(uri)
        if target is None and is_local(uri):
            target = local_path(uri)
        if target is not None:
            try:
                with open(target, encoding="utf-8") as fh:
                    return fh.read()
            except FileNotFoundError:
                return None
        from airflow_remote_ml.core.artifacts import read_json

        value = read_json(uri)
        return None if value is None else json.dumps(value)

    def _dbfs_read(self, uri: str) -> str | None:
        path = dbfs_path(uri)
        chunks: list[bytes] = []
        offset = 0
        while True:
            try:
                answer = self._call(
                    ("GET", "2.0/dbfs/read"),
                    {"path": path, "offset": offset, "length": DBFS_MAX_BYTES},
                    f"reading {uri}",
                )
            except NotFound:
                return None
            data = base64.b64decode(answer.get("data") or "")
            chunks.append(data)
            offset += len(data)
            if int(answer.get("bytes_read") or 0) < DBFS_MAX_BYTES or not data:
                return b"".join(chunks).decode("utf-8")
