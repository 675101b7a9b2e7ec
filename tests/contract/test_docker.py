"""The docker backend passes the contract suite against a real Docker engine.

Needs the engine and the locally built runner image (``bash .ci/docker-engine.sh && bash
backends/docker/build-images.sh``). Without them the tests fail under CI (``CI`` set) and skip elsewhere.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_remote_ml.backends.docker import DockerBackend
from airflow_remote_ml.core import StepIdentity
from airflow_remote_ml.core.identity import LABEL_STEP_ID
from tests.conftest import RUNNER_IMAGE
from tests.contract.faults import FaultContract
from tests.contract.suite import BackendContract

TEST_LABEL = "org.airflow-remote-ml.test"


@pytest.fixture(scope="module")
def engine(docker_engine):
    return docker_engine


@pytest.mark.docker
@pytest.mark.timeout(300)
class TestDockerBackend(BackendContract):
    @pytest.fixture
    def backend(self, engine) -> Iterator[DockerBackend]:
        run = uuid.uuid4().hex[:12]
        backend = DockerBackend.from_config({
            # Steps need no network, and no test may reach beyond loopback: no pulls, no network.
            "network_mode": "none",
            "pull": "never",
            "stop_timeout": 2,
            "labels": {TEST_LABEL: run},
        })
        yield backend
        backend.close()
        for container in engine.containers.list(all=True, filters={"label": f"{TEST_LABEL}={run}"}):
            container.remove(force=True)

    @pytest.fixture
    def artifact_root(self, tmp_path) -> str:
        # The engine is local, so a pytest tmp_path is bind-mountable at the same path.
        return str(tmp_path / "artifacts")

    @pytest.fixture
    def image(self) -> str:
        return RUNNER_IMAGE


# -- the fault contract's adapter: the real engine ---------------------------------------------------------

#: Container states in which the step's processes run (or are frozen and would resume): "still running".
_RUNNING_STATES = frozenset({"running", "restarting", "paused"})


class DockerService:
    """The real Docker engine, read the way an operator would: containers by their identity label.

    Not in ``supports``: ``slow_create``, ``lost_create``, ``outage`` and ``rate_limit``. The engine here
    answers on a local unix socket, and nothing between client and engine can be made to delay, drop or
    throttle one request without replacing the engine with a double (which would test the double, not
    the engine). The docker backend's handling of those answers (timeouts, 5xx, 409 on a retried create)
    is unit-tested against the engine API double in tests/unit/test_docker_backend.py.
    """

    supports = frozenset({"deleted", "oom"})

    def __init__(self, engine: Any, run_label: str) -> None:
        self.engine = engine
        self.run_label = run_label

    def jobs(self, identity: StepIdentity) -> list[tuple[str, bool]]:
        found = self.engine.api.containers(all=True, filters={"label": f"{LABEL_STEP_ID}={identity.digest}"})
        found.sort(key=lambda c: (c.get("Created") or 0, c["Id"]))  # oldest first, as find() adopts
        return [(c["Id"][:12], c.get("State") in _RUNNING_STATES) for c in found]

    def delete_job(self, job_id: str) -> None:
        """The container vanishes, as after ``docker rm -f`` by someone else."""
        self.engine.api.remove_container(job_id, force=True, v=True)

    def oom_spec(self) -> dict[str, Any]:
        # The engine reports MemoryLimit false without a cgroup memory controller; the kernel here has one
        # (tests/integration/test_docker_backend.py::test_out_of_memory_says_so proves the kill happens).
        return {
            "image": RUNNER_IMAGE,
            "command": ["python3", "-c", "blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))"],
            "resources": {"memory": "64Mi"},
        }

    def slow_create(self, seconds: float) -> None:
        raise NotImplementedError("a local engine socket cannot be slowed for one request")

    def lose_create_response(self) -> None:
        raise NotImplementedError("a local engine socket cannot lose one response")

    def outage(self, seconds: float) -> None:
        raise NotImplementedError("stopping the shared engine would break every other user of it")

    def rate_limit(self, count: int, retry_after: float) -> None:
        raise NotImplementedError("the Docker engine has no rate limit")


@pytest.fixture
def run_label() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
def service(engine, run_label) -> DockerService:
    return DockerService(engine, run_label)


@pytest.fixture
def fault_backend(engine, run_label) -> Iterator[DockerBackend]:
    backend = DockerBackend.from_config({
        "network_mode": "none",
        "pull": "never",
        "stop_timeout": 2,
        "timeout": 1,  # the client's request timeout: short, so a slow answer would exceed it
        "labels": {TEST_LABEL: run_label},
    })
    yield backend
    backend.close()
    for container in engine.containers.list(all=True, filters={"label": f"{TEST_LABEL}={run_label}"}):
        container.remove(force=True)


@pytest.mark.docker
@pytest.mark.timeout(300)
class TestDockerServiceAdapter:
    """The adapter's own knobs do what the fault suite relies on, against the real engine."""

    def request(self, tmp_path, **spec: Any):
        from airflow_remote_ml.core import ArtifactStore, StepRequest, StepSpec

        identity = StepIdentity("contract", "faults", f"run-{uuid.uuid4().hex[:12]}")
        return StepRequest.create(StepSpec.build(**spec), identity, ArtifactStore(str(tmp_path / "artifacts")))

    def test_jobs_lists_by_identity_and_delete_removes(self, service, fault_backend, tmp_path):
        import time

        request = self.request(tmp_path, image=RUNNER_IMAGE, command=["sleep", "300"])
        fault_backend.validate(request)
        handle = fault_backend.submit(request)
        assert service.jobs(request.identity) == [(handle.job_id, True)]
        service.delete_job(handle.job_id)
        assert service.jobs(request.identity) == []
        deadline = time.monotonic() + 60
        while not fault_backend.poll(handle).is_terminal:
            assert time.monotonic() < deadline
            time.sleep(0.1)

    def test_oom_spec_is_killed_for_memory_with_the_engines_reason(self, service, fault_backend, tmp_path):
        import time

        from airflow_remote_ml.core.wait import wait_for_completion

        request = self.request(tmp_path, **service.oom_spec())
        fault_backend.validate(request)
        handle = fault_backend.submit(request)
        outcome = wait_for_completion(fault_backend, handle, deadline=time.monotonic() + 120)
        assert outcome.status.reason == "OOMKilled", outcome.status
        assert service.jobs(request.identity) == [(handle.job_id, False)]


@pytest.mark.docker
class TestDockerFaultContract(FaultContract):
    """The shared fault contract (tests/contract/faults.py) on the real Docker engine."""

    supports = DockerService.supports | {"crash", "kill", "defer", "trigger_restart", "ignores_sigterm"}

    @pytest.fixture
    def artifact_root(self, tmp_path) -> str:
        return str(tmp_path / "artifacts")

    @pytest.fixture
    def image(self) -> str:
        return RUNNER_IMAGE
