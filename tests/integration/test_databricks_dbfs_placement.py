"""Content-addressed files Airflow places on DBFS over the API (the runtime, a step's code archive), on the
Jobs API double's DBFS: placed once, never rewritten under a step that reads them.

The DBFS reference does not say that a streaming upload (``create``, ``add-block``, ``close``) hides the file
from readers until ``close``, so the double takes the stricter reading: the file is there, truncated, from
``create`` on. Re-uploading in place under a running step would hand it a cut archive; these tests check that
nothing is ever written at the final path but by ``dbfs/move`` of a complete upload, and that an existing
copy is left alone.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_remote_ml.backends.databricks import DatabricksBackend
from airflow_remote_ml.backends.databricks._storage import DBFS_MAX_BYTES
from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec
from airflow_remote_ml.core.codepkg import CodeRef
from tests.fakes.databricks_api import FakeDatabricks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "dapi-placement"
CLUSTER = {"spark_version": "15.4.x-scala2.12", "node_type_id": "i3.xlarge", "num_workers": 1}
ROOT = "dbfs:/ml/artifacts"


@pytest.fixture
def dbx(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDatabricks]:
    with FakeDatabricks(token=TOKEN) as server:
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", server.connection_json())
        yield server


def archive(size: int) -> bytes:
    """Bytes that do not compress to nothing (a code archive's are already deflated)."""
    return b"".join(hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(size // 32 + 1))[:size]


def code_request(data: bytes) -> StepRequest:
    sha = hashlib.sha256(data).hexdigest()
    ref = CodeRef(uri=f"{ROOT}/_code/{sha}.zip", sha256=sha, packages=("my_pipeline",),
                  archive=data)
    return StepRequest.create(StepSpec.build(callable="my_pipeline.steps:fit"), StepIdentity("d", "t", "r"),
                              ArtifactStore(ROOT), code=ref)


def backend() -> DatabricksBackend:
    return DatabricksBackend.from_config({"new_cluster": CLUSTER, "retry_delay": 0.05})


def final_path_writes(dbx: FakeDatabricks, path: str) -> list[Any]:
    """Requests that wrote at ``path`` itself (put, or create of a stream): only a move may place it."""
    return [r for r in dbx.requests if r.endpoint in ("dbfs/put", "dbfs/create")
            and (r.params or {}).get("path") == path]


@pytest.mark.parametrize("size", [300_000, 2 * DBFS_MAX_BYTES + 123], ids=["inline put", "streamed in 3 blocks"])
def test_a_code_archive_is_uploaded_whole_then_moved_into_place(dbx: FakeDatabricks, size: int) -> None:
    data = archive(size)
    request = code_request(data)
    backend().publish_code(request)
    path = request.code.uri[len("dbfs:"):]
    assert hashlib.sha256(dbx.dbfs_file(path).read_bytes()).hexdigest() == request.code.sha256
    assert final_path_writes(dbx, path) == []
    [(source, destination)] = dbx.dbfs_moves
    assert destination == path and source.startswith(path + ".part-")
    assert not dbx.dbfs_file(source).exists()
    if size > DBFS_MAX_BYTES:
        assert dbx.count("dbfs/add-block") == 3


def test_an_archive_already_there_is_not_uploaded_again_by_another_task(dbx: FakeDatabricks) -> None:
    data = archive(2 * DBFS_MAX_BYTES)
    request = code_request(data)
    backend().publish_code(request)  # the first task of a mapped step
    uploads = dbx.count("dbfs/create") + dbx.count("dbfs/put")
    placed = dbx.dbfs_file(request.code.uri[len("dbfs:"):])
    before = placed.stat().st_mtime_ns
    backend().publish_code(request)  # the next task, another worker process: a fresh backend
    assert dbx.count("dbfs/create") + dbx.count("dbfs/put") == uploads, "the archive was uploaded again"
    assert placed.stat().st_mtime_ns == before and len(dbx.dbfs_moves) == 1


def test_a_worker_losing_the_race_to_place_the_archive_drops_its_copy(dbx: FakeDatabricks,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two tasks publish at once: both find no archive and upload; the other one's move lands first."""
    data = archive(300_000)
    request = code_request(data)
    path = request.code.uri[len("dbfs:"):]
    ours = backend()
    real_call = ours._call

    def call(endpoint: tuple[str, str], payload: dict[str, Any], action: str, **kw: Any) -> dict[str, Any]:
        if endpoint == ("POST", "2.0/dbfs/move"):
            dbx.put_file(f"dbfs:{path}", data)  # the other task's move, just before ours
        return real_call(endpoint, payload, action, **kw)

    monkeypatch.setattr(ours, "_call", call)
    ours.publish_code(request)  # no error: the archive is there, whoever placed it
    assert hashlib.sha256(dbx.dbfs_file(path).read_bytes()).hexdigest() == request.code.sha256
    leftovers = [name for name in os.listdir(dbx.dbfs_file(path).parent) if ".part-" in name]
    assert leftovers == [], "our partial upload was left behind"


def test_a_cut_copy_from_an_older_upload_is_replaced(dbx: FakeDatabricks) -> None:
    data = archive(300_000)
    request = code_request(data)
    path = request.code.uri[len("dbfs:"):]
    dbx.put_file(f"dbfs:{path}", data[:1000])  # what an in-place streaming upload that died left
    backend().publish_code(request)
    assert dbx.dbfs_file(path).read_bytes() == data


def test_the_runtime_file_is_placed_once_across_tasks(dbx: FakeDatabricks, tmp_path: Path) -> None:
    def submit_one(run: str) -> str:
        request = StepRequest.create(StepSpec.build(command=["python3", "-c", "pass"]),
                                     StepIdentity("d", "t", run), ArtifactStore(ROOT))
        b = DatabricksBackend.from_config({"new_cluster": CLUSTER, "runtime_dir": "dbfs:/rml/runtime", "dbfs_fuse": True,
                                           "retry_delay": 0.05})
        b.submit(request)
        b.close()
        return b.runtime_uri(request)

    first = submit_one("r1")
    second = submit_one("r2")
    assert first == second
    assert final_path_writes(dbx, first[len("dbfs:"):]) == []
    assert len([m for m in dbx.dbfs_moves if m[1] == first[len("dbfs:"):]]) == 1
