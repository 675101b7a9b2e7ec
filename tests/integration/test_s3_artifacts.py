"""An ``s3://`` artifact root against an S3 server on loopback (moto's server app, see s3_support).

Real clients on both sides: the worker signs with boto3 and reads manifests with s3fs; the step's stdlib
runtime moves the bytes with urllib through the signed URLs and never gets a credential (the docker and
Kubernetes steps have no AWS variable at all). The example pipeline runs end to end on local and docker,
a Kubernetes step reads a docker step's output from the store, a large output goes up in parts, and an
expired or forged URL fails the step with the store's own reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec, transfer
from airflow_remote_ml.core.status import RunState
from airflow_remote_ml.core.wait import wait_for_completion
from tests.conftest import RUNNER_IMAGE
from tests.integration.s3_support import S3Server, s3_server

REPO = Path(__file__).resolve().parents[2]
BUCKET = "ml-artifacts"

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def s3(monkeypatch) -> Iterator[S3Server]:
    yield from s3_server(monkeypatch, BUCKET)


def _root() -> str:
    return f"s3://{BUCKET}/runs-{uuid.uuid4().hex[:8]}"


def _read(s3: S3Server, uri: str) -> bytes:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def _keys(s3: S3Server, prefix: str) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents") or []]


def _open_uploads(s3: S3Server) -> list[Any]:
    return s3.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads") or []


def _request(root: str, task: str = "step", **spec: Any) -> StepRequest:
    identity = StepIdentity("s3-it", task, f"run-{uuid.uuid4().hex[:10]}")
    return StepRequest.create(StepSpec.build(**spec), identity, ArtifactStore(root))


def _signed(request: StepRequest, **overrides: Any) -> dict[str, Any]:
    """The runtime config a backend's submit builds: with signed URLs (signing happens only there)."""
    with transfer.signing():
        return request.runtime_config(**overrides)


def _run(backend: Any, request: StepRequest) -> Any:
    backend.validate(request)
    handle = backend.submit(request)
    outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 240)
    return handle, outcome.status


# -- the example pipeline, end to end --------------------------------------------------------------------


def _pipeline_run(dagbag: Any, s3: S3Server, monkeypatch: Any, root: str, conf: dict[str, Any]) -> Any:
    monkeypatch.setenv("AIRFLOW__REMOTE_ML__ARTIFACT_ROOT", root)
    run = dagbag.dags["example_ml_pipeline"].test(run_conf=conf)
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        states = {f"{ti.task_id}[{ti.map_index}]": ti.state for ti in session.query(TaskInstance).filter(
            TaskInstance.dag_id == run.dag_id, TaskInstance.run_id == run.run_id)}
    assert run.state == "success", states
    prefix = root[len(f"s3://{BUCKET}/"):]
    keys = _keys(s3, prefix)
    manifests = [json.loads(_read(s3, f"s3://{BUCKET}/{k}")) for k in keys if k.endswith("/manifest.json")]
    # prepare, train, evaluate, pick_best: each step's manifest is in the store, moved through signed URLs.
    assert len(manifests) == 4, keys
    assert {m["versions"]["transfer"] for m in manifests} == {"presigned"}
    selection = [k for k in keys if k.endswith("/outputs/selection")]
    assert len(selection) == 1
    assert json.loads(_read(s3, f"s3://{BUCKET}/{selection[0]}"))["scenario"] == "ridge-all-a1"
    # The dataset is a directory output: each of its files is an object under the output's key.
    assert any(k.endswith("/outputs/dataset/train.csv") for k in keys)
    assert _open_uploads(s3) == []  # every multipart upload opened for an output was completed or aborted
    return run


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_example_pipeline_on_local_with_an_s3_root(dagbag, s3, monkeypatch):
    _pipeline_run(dagbag, s3, monkeypatch, _root(), {"backend": "local", "scenario_set": "quick"})


@pytest.mark.docker
def test_example_pipeline_on_docker_with_an_s3_root(dagbag, s3, monkeypatch):
    from tests.conftest import docker_client

    docker_client("airflow-remote-ml/example:latest").close()
    # Host networking: the container reaches the loopback server at the address the worker signed for
    # (the signature covers the Host header, so the step must use exactly that address).
    monkeypatch.setenv("AIRFLOW__REMOTE_ML__BACKEND_CONFIG", json.dumps({"docker": {"network_mode": "host"}}))
    _pipeline_run(dagbag, s3, monkeypatch, _root(),
                  {"backend": "docker", "scenario_set": "quick", "image": "airflow-remote-ml/example:latest"})


# -- across backends: a Kubernetes step reads a docker step's output -------------------------------------

WRITE = ("import os, json; os.makedirs(os.environ['REMOTE_ML_OUTPUT_TABLE']); "
         "open(os.path.join(os.environ['REMOTE_ML_OUTPUT_TABLE'], 'rows.json'), 'w').write(json.dumps([1, 2, 3])); "
         "print(json.dumps({'aws_env': sorted(k for k in os.environ if k.startswith('AWS_'))}))")
READ = ("import os, json; rows = json.load(open(os.path.join(os.environ['REMOTE_ML_INPUT_TABLE'], 'rows.json'))); "
        "open(os.environ['REMOTE_ML_OUTPUT_TOTAL'], 'w').write(str(sum(rows))); "
        "print(json.dumps({'aws_env': sorted(k for k in os.environ if k.startswith('AWS_'))}))")


@pytest.mark.docker
def test_a_kubernetes_step_reads_a_docker_steps_output_from_the_store(s3, docker_engine):
    from airflow_remote_ml.backends.docker import DockerBackend
    from airflow_remote_ml.backends.kubernetes import KubernetesBackend
    from tests.fakes.kubernetes_api import FakeKubernetes

    root = _root()
    docker = DockerBackend.from_config({"network_mode": "host", "pull": "never", "removal_policy": "always"})
    try:
        produced = _request(root, "produce", image=RUNNER_IMAGE, command=["python3", "-c", WRITE], outputs=["table"])
        handle, status = _run(docker, produced)
        assert status.state is RunState.SUCCEEDED, status
        result = docker.fetch_result(handle)
    finally:
        docker.close()
    assert result.outputs["table"].startswith(f"{root}/")
    assert result.metrics["aws_env"] == []  # the container got URLs, not credentials
    with FakeKubernetes() as k8s:
        kube = KubernetesBackend.from_config({"kubeconfig_path": str(k8s.kubeconfig_path), "delete_grace_seconds": 1})
        try:
            consumed = _request(root, "consume", image="python:3.11-slim", command=["python3", "-c", READ],
                                inputs={"table": result.outputs["table"]}, outputs=["total"])
            handle, status = _run(kube, consumed)
            assert status.state is RunState.SUCCEEDED, (status, kube.log_tail(handle))
            total = kube.fetch_result(handle)
        finally:
            kube.close()
    assert _read(s3, total.outputs["total"]) == b"6"
    assert total.metrics["aws_env"] == []
    assert total.manifest["versions"]["transfer"] == "presigned"


# -- large outputs, failures -------------------------------------------------------------------------------


def _runtime(step: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run the runtime as a step's machine would: its own process, stdlib only, no AWS settings."""
    path = tmp_path / "step.json"
    path.write_text(json.dumps(step))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["REMOTE_ML_STEP_FILE"] = str(path)
    return subprocess.run([sys.executable, "-S", "-c", "import runpy, sys; sys.argv = ['runtime']; "
                           f"runpy.run_path({str(REPO / 'airflow_remote_ml' / 'runtime.py')!r}, run_name='__main__')"],
                          env=env, capture_output=True, text=True, timeout=240)


# Writes `size` random bytes in 1 MiB blocks, printing their sha256; ru_maxrss of the runtime goes to stdout.
BIG = ("import hashlib, json, os, sys; size = int(sys.argv[1]); h = hashlib.sha256(); "
       "f = open(os.environ['REMOTE_ML_OUTPUT_BLOB'], 'wb')\n"
       "while size > 0:\n    b = os.urandom(min(size, 1 << 20)); h.update(b); f.write(b); size -= len(b)\n"
       "f.close(); print(json.dumps({'sha256': h.hexdigest()}))")


def test_a_large_output_is_streamed_up_in_parts(s3, monkeypatch, tmp_path):
    monkeypatch.setenv("REMOTE_ML_MULTIPART_THRESHOLD", str(8 << 20))
    monkeypatch.setenv("REMOTE_ML_MULTIPART_PARTS", "4")
    size = (96 << 20) + 12345
    request = _request(_root(), command=["python3", "-c", BIG, str(size)], outputs=["blob"], timeout=600)
    step = _signed(request)
    # The runtime's peak resident memory, from the kernel's VmHWM: getrusage's ru_maxrss read 100-600 MB for
    # the same runs (it can carry a child's usage over fork/exec), so it says nothing about the runtime.
    # The runtime ends a command step with os._exit (no interpreter teardown), so the probe reports from there.
    probe = ("import os, runpy, sys; sys.argv = ['runtime']\n"
             "def report():\n    print('maxrss_kib', [l.split()[1] for l in open('/proc/self/status') "
             "if l.startswith('VmHWM')][0], flush=True)\n"
             "real_exit = os._exit\n"
             "def _exit(code):\n    report()\n    real_exit(code)\n"
             "os._exit = _exit\ntry:\n"
             f"    runpy.run_path({str(REPO / 'airflow_remote_ml' / 'runtime.py')!r}, run_name='__main__')\n"
             "finally:\n    report()")
    path = tmp_path / "step.json"
    path.write_text(json.dumps(step))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["REMOTE_ML_STEP_FILE"] = str(path)
    done = subprocess.run([sys.executable, "-S", "-c", probe], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads(_read(s3, request.manifest_uri))
    blob = manifest["outputs"]["blob"]
    head = s3.client().head_object(Bucket=BUCKET, Key=blob["uri"].split(f"{BUCKET}/", 1)[1])
    assert head["ContentLength"] == size == blob["size"]
    # A multipart object's ETag ends in "-<number of parts>": 4 signed URLs carry the ~96 MiB in 4 parts.
    assert head["ETag"].strip('"').endswith("-4")
    assert hashlib.sha256(_read(s3, blob["uri"])).hexdigest() == blob["sha256"] == manifest["metrics"]["sha256"]
    # Streamed: the runtime's own peak memory stays far below the file it uploaded.
    maxrss_kib = int(done.stdout.rsplit("maxrss_kib", 1)[1].split()[0])
    assert maxrss_kib * 1024 < size / 2, maxrss_kib
    assert _open_uploads(s3) == []


def test_an_expired_url_fails_the_step_with_the_stores_reason(s3, tmp_path):
    client = s3.client()
    client.put_object(Bucket=BUCKET, Key="data/in.csv", Body=b"a,b\n")
    request = _request(_root(), command=["python3", "-c", "print('never runs')"], inputs={"table": f"s3://{BUCKET}/data/in.csv"},
                       outputs=["out"], timeout=60)
    step = _signed(request)
    lifetime = step["transfer"]["lifetime_seconds"]
    assert lifetime == 60 + 3600  # the timeout plus the default margin
    s3.check.clock_offset = lifetime + 1  # the step starts after its URLs expired (queued too long)
    done = _runtime(step, tmp_path)
    assert done.returncode == 4, done.stderr
    assert "never runs" not in done.stdout
    assert (f"input 'table' (s3://{BUCKET}/data/in.csv): HTTP 403 AccessDenied: Request has expired "
            f"(the signed URLs were valid for {lifetime} s") in done.stderr
    assert "REMOTE_ML_TRANSFER_MARGIN" in done.stderr
    assert "expired" in s3.check.refused


def test_throttled_requests_are_retried_until_they_pass(s3, tmp_path):
    s3.client().put_object(Bucket=BUCKET, Key="data/in.csv", Body=b"a,b\n1,2\n")
    request = _request(_root(), command=["python3", "-c", "import os; print(open(os.environ['REMOTE_ML_INPUT_TABLE']).read())"],
                       inputs={"table": f"s3://{BUCKET}/data/in.csv"}, outputs=[])
    step = _signed(request)
    s3.check.fail_next(2)
    done = _runtime(step, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "a,b\n1,2" in done.stdout
    assert "attempt 1 failed, retrying" in done.stderr and "attempt 2 failed, retrying" in done.stderr
    assert s3.check.refused == ["slowdown", "slowdown"]
    assert json.loads(_read(s3, request.manifest_uri))["status"] == "succeeded"


def test_a_forged_url_is_refused_with_the_stores_reason(s3, tmp_path):
    client = s3.client()
    client.put_object(Bucket=BUCKET, Key="data/in.csv", Body=b"a,b\n")
    client.put_object(Bucket=BUCKET, Key="data/secret.csv", Body=b"no")
    request = _request(_root(), command=["python3", "-c", "print('never runs')"], inputs={"table": f"s3://{BUCKET}/data/in.csv"})
    step = _signed(request)
    # A step that edits its URL to reach another object: the signature covers the path, so S3 refuses it.
    step["transfers"]["inputs"]["table"]["get"] = step["transfers"]["inputs"]["table"]["get"].replace("in.csv", "secret.csv")
    done = _runtime(step, tmp_path)
    assert done.returncode == 4
    assert "HTTP 403 SignatureDoesNotMatch" in done.stderr
    assert "signature" in s3.check.refused


def test_a_post_outside_the_outputs_key_is_refused(s3, tmp_path):
    from airflow_remote_ml import runtime

    request = _request(_root(), command=["true"], outputs=["model"])
    signed = _signed(request)["transfers"]["outputs"]["model"]
    path = tmp_path / "x"
    path.write_bytes(b"x")
    with pytest.raises(runtime.StepError) as raised:
        runtime._post_file(signed["post"], "elsewhere/model", str(path), 1, "output 'model'")
    assert raised.value.exit_code == runtime.EXIT_TRANSFER
    assert "HTTP 403 AccessDenied: Invalid according to Policy: Policy Condition failed" in str(raised.value)
    assert _keys(s3, "elsewhere") == []


def test_a_missing_input_is_a_config_error_and_starts_nothing(s3, tmp_path):
    from airflow_remote_ml.backends.local import LocalBackend
    from airflow_remote_ml.core import ConfigError

    backend = LocalBackend.from_config({"state_dir": str(tmp_path / "jobs")})
    request = _request(_root(), command=["true"], inputs={"table": f"s3://{BUCKET}/nothing/here"})
    backend.validate(request)  # checking a step does no I/O: signing belongs to submit
    with pytest.raises(ConfigError) as raised:
        backend.submit(request)
    assert raised.value.field == "inputs.table"
    assert "nothing exists at" in str(raised.value)
    assert backend.find(request.identity) is None


def test_a_worker_without_credentials_or_bucket_gets_a_config_error(s3, monkeypatch):
    from airflow_remote_ml.core import ConfigError

    request = _request(f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/ml", command=["true"], outputs=["model"])
    with pytest.raises(ConfigError) as raised:
        _signed(request)
    assert raised.value.field == "outputs.model"
    assert "NoSuchBucket" in str(raised.value)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to find on a test machine
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(ConfigError) as raised:
        _signed(_request(_root(), command=["true"], outputs=["model"]))
    assert "no usable AWS credentials" in str(raised.value)


def test_an_unreachable_store_is_transient(s3, monkeypatch):
    from airflow_remote_ml.core import TransientBackendError

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(TransientBackendError) as raised:
        _signed(_request(_root(), command=["true"], outputs=["model"]))
    assert "could not be reached" in str(raised.value)


def test_validate_signs_nothing_and_a_retried_submit_signs_once(s3):
    request = _request(_root(), command=["true"], outputs=["a"])
    assert "transfers" not in request.runtime_config()  # a build outside submit: no I/O, no credentials
    assert _open_uploads(s3) == []
    first = _signed(request)
    second = _signed(request, python_path=["/x"])
    assert first["transfers"] == second["transfers"]
    assert len(_open_uploads(s3)) == 1  # one multipart upload opened for output 'a', not one per build


# -- the page's example ------------------------------------------------------------------------------------


def test_the_documented_dag_runs_both_transfer_modes(airflow_db, s3, tmp_path):
    import re

    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    page = (REPO / "docs" / "artifacts.md").read_text()
    source = next(block for block in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "s3_artifacts_demo" in block)
    # As a user would: the block is a DAG file, loaded by a DagBag (dag.test() needs a parsed DAG).
    (tmp_path / "s3_artifacts_demo.py").write_text(source)
    bag = DagBag(dag_folder=str(tmp_path / "s3_artifacts_demo.py"))
    assert bag.import_errors == {}
    # What the DAG processor does with a file it parsed (dag.test() syncs only the configured bundles).
    from airflow.dag_processing.bundles.manager import DagBundlesManager

    DagBundlesManager().sync_bundles_to_db()
    sync_bag_to_db(bag, "dags-folder", None)
    run = bag.dags["s3_artifacts_demo"].test()
    assert run.state == "success"
    keys = _keys(s3, "demo/")
    manifests = {k.split("/")[3]: json.loads(_read(s3, f"s3://{BUCKET}/{k}")) for k in keys if k.endswith("manifest.json")}
    assert manifests["write"]["versions"]["transfer"] == "presigned"
    assert manifests["read"]["versions"]["transfer"] == "fsspec"
    assert manifests["read"]["status"] == "succeeded"
    table = next(k for k in keys if k.endswith("/outputs/table"))
    assert _read(s3, f"s3://{BUCKET}/{table}") == b"a,b\n1,2\n"


# -- a Databricks dbfs:/ output, read by a docker step through the store ---------------------------------


@pytest.mark.docker
def test_a_docker_step_reads_a_databricks_dbfs_output_through_the_store(s3, docker_engine, monkeypatch):
    import fsspec

    from airflow_remote_ml.backends.docker import DockerBackend
    from tests.fakes.databricks_api import FakeDatabricks

    with FakeDatabricks(token="dapi-s3", tls=True) as dbx, dbx.trust_ca():
        # The output as a Databricks step leaves it in DBFS (the double gives its task processes no /dbfs
        # mount, so the file is placed there directly); read back over the DBFS API, as on a workspace.
        table = "dbfs:/ml/dbx-run/outputs/table"
        dbx.put_file(f"{table}/rows.json", "[1, 2, 3]")
        dbx.put_file(f"{table}/part-0001.bin", b"\x00" * (3 << 20))  # more than one 1 MB DBFS read
        # The worker's fsspec configuration for DBFS (what FSSPEC_DBFS_INSTANCE/_TOKEN set).
        monkeypatch.setitem(fsspec.config.conf, "dbfs", {"instance": dbx.host, "token": "dapi-s3"})
        docker = DockerBackend.from_config({"network_mode": "host", "pull": "never", "removal_policy": "always"})
        try:
            request = _request(_root(), "consume", image=RUNNER_IMAGE, inputs={"table": table}, outputs=["total"],
                               command=["python3", "-c", READ + "; assert os.path.getsize(os.path.join("
                                        "os.environ['REMOTE_ML_INPUT_TABLE'], 'part-0001.bin')) == 3 << 20"])
            handle, status = _run(docker, request)
            assert status.state is RunState.SUCCEEDED, (status, docker.log_tail(handle))
            result = docker.fetch_result(handle)
        finally:
            docker.close()
    assert _read(s3, result.outputs["total"]) == b"6"
    assert result.metrics["aws_env"] == []
    # The copy sits in the consuming step's own prefix; the version record keeps the dbfs:/ URI.
    staged = [k for k in _keys(s3, "") if "/inputs/table/" in k]
    assert sorted(k.rsplit("/", 1)[1] for k in staged) == ["part-0001.bin", "rows.json"]
    assert result.manifest["versions"]["inputs"] == {"table": table}
