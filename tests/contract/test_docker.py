"""The docker backend passes the contract suite against a real Docker engine.

Needs the engine and the locally built runner image (``bash .ci/docker-engine.sh && bash
backends/docker/build-images.sh``). Without them the tests fail under CI (``CI`` set) and skip elsewhere.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from airflow_remote_ml.backends.docker import DockerBackend
from tests.conftest import RUNNER_IMAGE
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
