"""``list_jobs``/``remove_job`` on every backend, against the real Docker engine and the API doubles.

One abstract suite (:class:`JobsContract`) that each backend runs with the fixtures its contract module
already builds (the Kubernetes API double, the Jobs API server, the Valohai API server, the engine); then
what only the backends that keep something do: retention as jobs finish. Every wait polls a condition.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_remote_ml.core import ArtifactStore, RunState, StepIdentity, StepRequest, StepSpec
from airflow_remote_ml.core import jobs as core_jobs
from airflow_remote_ml.core.backend import Backend
from airflow_remote_ml.core.jobs import JobInfo
from airflow_remote_ml.core.status import RunHandle
from airflow_remote_ml.core.wait import wait_for_completion
from tests.contract.test_databricks import CLUSTER, QUICK, RUNTIME_DIR, dbx  # noqa: F401 - fixture
from tests.contract.test_docker import TEST_LABEL, engine  # noqa: F401 - fixture
from tests.contract.test_kubernetes import artifact_root as k8s_root  # noqa: F401 - fixture
from tests.contract.test_kubernetes import k8s  # noqa: F401 - fixture
from tests.contract.test_valohai import TOKEN as VALOHAI_TOKEN
from tests.contract.test_valohai import valohai  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
BOUND = 120.0
SLEEP = ["python3", "-c", "import time; print('started', flush=True); time.sleep(300)"]
QUICK_STEP = ["python3", "-c", "print('done')"]


def wait_state(backend: Backend, handle: RunHandle, states: set[RunState]) -> None:
    deadline = time.monotonic() + BOUND
    while backend.poll(handle).state not in states:
        assert time.monotonic() < deadline, f"job never reached {states}"
        time.sleep(0.1)


class JobsContract:
    """What every backend's job listing does. Subclasses give ``backend``, ``artifact_root`` and ``image``."""

    removable = True

    def request(self, artifact_root: str, image: str | None, dag_id: str, **spec: Any) -> StepRequest:
        spec.setdefault("image", image)
        identity = StepIdentity(dag_id, spec.pop("task_id", "step"), f"run-{uuid.uuid4().hex[:10]}")
        return StepRequest.create(StepSpec.build(**spec), identity, ArtifactStore(artifact_root))

    def finished(self, backend: Backend, request: StepRequest) -> RunHandle:
        backend.validate(request)
        handle = backend.submit(request)
        outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + BOUND)
        assert not outcome.timed_out and outcome.status.is_terminal, outcome
        backend.mark_finished(handle)
        return handle

    def mine(self, backend: Backend, dag_id: str) -> dict[str, JobInfo]:
        return {j.job_id: j for j in backend.list_jobs(dag_id)}  # type: ignore[attr-defined]

    def test_running_and_finished_jobs_are_listed_by_identity(self, backend, artifact_root, image):
        dag_id = f"jobs-{uuid.uuid4().hex[:8]}"
        done_request = self.request(artifact_root, image, dag_id, task_id="quick", command=QUICK_STEP)
        done = self.finished(backend, done_request)
        running_request = self.request(artifact_root, image, dag_id, task_id="long", command=SLEEP)
        backend.validate(running_request)
        running = backend.submit(running_request)
        try:
            wait_state(backend, running, {RunState.RUNNING})
            jobs = self.mine(backend, dag_id)
            assert set(jobs) == {done.job_id, running.job_id}
            finished, alive = jobs[done.job_id], jobs[running.job_id]
            assert finished.identity == done_request.identity
            assert alive.identity == running_request.identity
            assert (finished.state, alive.state) == ("terminal", "running")
            assert finished.created is not None and finished.finished is not None
            assert finished.created <= finished.finished + 1  # platforms round to seconds or milliseconds
            assert alive.finished is None
            assert finished.removable is self.removable
            # Another DAG's filter sees none of them.
            assert self.mine(backend, f"{dag_id}-other") == {}
            # The listed handle is one the backend cancels with.
            assert alive.handle is not None
            backend.cancel(alive.handle)
            wait_state(backend, running, {RunState.CANCELLED, RunState.FAILED, RunState.LOST})
            after = self.mine(backend, dag_id).get(running.job_id)
            assert after is None or after.state == "terminal"  # a cancelled pod is deleted: gone, or going
        finally:
            backend.cancel(running)

    def test_remove_deletes_what_a_finished_job_keeps(self, backend, artifact_root, image):
        dag_id = f"jobs-{uuid.uuid4().hex[:8]}"
        handle = self.finished(backend, self.request(artifact_root, image, dag_id, command=QUICK_STEP))
        job = self.mine(backend, dag_id)[handle.job_id]
        backend.remove_job(job)  # type: ignore[attr-defined]
        deadline = time.monotonic() + BOUND
        if self.removable:
            while handle.job_id in self.mine(backend, dag_id):  # a pod's delete takes effect asynchronously
                assert time.monotonic() < deadline, "the job was not removed"
                time.sleep(0.1)
        else:
            assert handle.job_id in self.mine(backend, dag_id)  # the platform's history stays
        backend.remove_job(job)  # type: ignore[attr-defined] # idempotent


class TestDockerJobs(JobsContract):
    @pytest.fixture
    def backend(self, engine) -> Iterator[Any]:  # noqa: F811
        from airflow_remote_ml.backends.docker import DockerBackend

        run = uuid.uuid4().hex[:12]
        # The test's own label scopes listing and retention to this test's containers on a shared engine.
        backend = DockerBackend.from_config({"network_mode": "none", "pull": "never", "stop_timeout": 2,
                                             "removal_policy": "never", "labels": {TEST_LABEL: run}})
        yield backend
        backend.close()
        for container in engine.containers.list(all=True, filters={"label": f"{TEST_LABEL}={run}"}):
            container.remove(force=True)

    @pytest.fixture
    def artifact_root(self, tmp_path) -> str:
        return str(tmp_path / "artifacts")

    @pytest.fixture
    def image(self) -> str:
        from tests.conftest import RUNNER_IMAGE

        return RUNNER_IMAGE

    def test_finishing_a_container_retires_the_oldest_kept_ones_by_count(self, engine, artifact_root,  # noqa: F811
                                                                          image):
        from airflow_remote_ml.backends.docker import DockerBackend

        run = uuid.uuid4().hex[:12]
        backend = DockerBackend.from_config({"network_mode": "none", "pull": "never", "removal_policy": "never",
                                             "labels": {TEST_LABEL: run}, "retention": {"max_count": 1}})
        try:
            dag_id = f"jobs-{uuid.uuid4().hex[:8]}"
            handles = []
            for _ in range(3):
                handle = self.finished(backend, self.request(artifact_root, image, dag_id, command=QUICK_STEP))
                backend.cleanup(handle, backend.poll(handle))
                handles.append(handle)
            left = {c.id[:12] for c in engine.containers.list(all=True, filters={"label": f"{TEST_LABEL}={run}"})}
            # Each finish retired the one before it (created within the same second, ordered by inspect).
            assert left == {handles[2].job_id}
        finally:
            backend.close()
            for container in engine.containers.list(all=True, filters={"label": f"{TEST_LABEL}={run}"}):
                container.remove(force=True)


    def test_finishing_a_container_retires_kept_ones_that_ended_long_ago(self, engine, artifact_root, image,  # noqa: F811
                                                                         monkeypatch):
        from airflow_remote_ml.backends.docker import DockerBackend
        from airflow_remote_ml.core import jobs as core_jobs

        run = uuid.uuid4().hex[:12]
        backend = DockerBackend.from_config({"network_mode": "none", "pull": "never", "removal_policy": "never",
                                             "labels": {TEST_LABEL: run},
                                             "retention": {"max_age": "1h", "max_count": None}})
        try:
            dag_id = f"jobs-{uuid.uuid4().hex[:8]}"
            old = self.finished(backend, self.request(artifact_root, image, dag_id, command=QUICK_STEP))
            backend.cleanup(old, backend.poll(old))
            assert old.job_id in self.mine(backend, dag_id)  # ended just now: kept
            # Two hours later by the clock retention reads: the old container ended (State.FinishedAt) too long ago.
            monkeypatch.setattr(core_jobs, "clock", lambda: time.time() + 7200)
            new = self.finished(backend, self.request(artifact_root, image, dag_id, command=QUICK_STEP))
            backend.cleanup(new, backend.poll(new))
            assert set(self.mine(backend, dag_id)) == {new.job_id}
        finally:
            backend.close()
            for container in engine.containers.list(all=True, filters={"label": f"{TEST_LABEL}={run}"}):
                container.remove(force=True)


class TestKubernetesJobs(JobsContract):
    @pytest.fixture
    def backend(self, k8s, k8s_root):  # noqa: F811
        from tests.integration.kubernetes_support import make_backend

        # Kept pods, so a finished one is there to list (on_success deletes it as it is marked finished).
        backend = make_backend(k8s, k8s_root, delete_policy="never")
        yield backend
        backend.close()

    @pytest.fixture
    def artifact_root(self, k8s_root):  # noqa: F811
        return k8s_root

    @pytest.fixture
    def image(self) -> str:
        return "python:3.11-slim"

    def test_finishing_a_pod_retires_kept_pods_by_count(self, k8s, k8s_root, monkeypatch):  # noqa: F811
        # What each finish retires: no sweep interval between the finishes (core/jobs.py SWEEP_INTERVAL).
        monkeypatch.setattr(core_jobs, "SWEEP_INTERVAL", 0.0)
        from tests.integration.kubernetes_support import make_backend

        backend = make_backend(k8s, k8s_root, delete_policy="never", retention={"max_count": 1})
        try:
            dag_id = f"jobs-{uuid.uuid4().hex[:8]}"
            handles = []
            for _ in range(3):
                handle = self.finished(backend, self.request(k8s_root, "python:3.11-slim", dag_id,
                                                             command=QUICK_STEP))
                backend.cleanup(handle, backend.poll(handle))
                handles.append(handle)

            def names() -> set[str]:
                return {j.job_id for j in backend.list_jobs(dag_id)}

            deadline = time.monotonic() + BOUND
            while handles[0].job_id in names() or handles[1].job_id in names():
                assert time.monotonic() < deadline, f"kept pods were not retired: {names()}"
                time.sleep(0.1)
            assert names() == {handles[2].job_id}
        finally:
            backend.close()


class TestDatabricksJobs(JobsContract):
    removable = False

    @pytest.fixture
    def backend(self, dbx):  # noqa: F811
        from airflow_remote_ml.backends.databricks import DatabricksBackend

        backend = DatabricksBackend.from_config({"new_cluster": CLUSTER, "runtime_dir": RUNTIME_DIR, **QUICK})
        yield backend
        backend.close()

    @pytest.fixture
    def artifact_root(self, tmp_path) -> str:
        return str(tmp_path / "artifacts")

    @pytest.fixture
    def image(self) -> None:
        return None


class TestValohaiJobs(JobsContract):
    removable = False

    @pytest.fixture
    def backend(self, valohai):  # noqa: F811
        from airflow_remote_ml.backends.valohai import ValohaiBackend

        backend = ValohaiBackend.from_config({"host": valohai.url, "token": VALOHAI_TOKEN, "project": "contract",
                                              "branch": "main", "runtime_step": "remote-ml-runtime"})
        yield backend
        backend.close()

    @pytest.fixture
    def artifact_root(self, tmp_path) -> str:
        return str(tmp_path / "artifacts")

    @pytest.fixture
    def image(self) -> None:
        return None
