"""The real Docker engine and the locally built runner image work as the docker backend needs.

These talk to a real dockerd over its local socket (no registry: the images are built locally by
``backends/docker/build-images.sh``). When the engine or the image is missing they fail under CI
(``CI`` set) and skip elsewhere, saying how to provide them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import pytest

from tests.conftest import RUNNER_IMAGE, docker_client

BASE_IMAGE = "airflow-remote-ml/base:bookworm"
HASH_LABEL = "org.airflow-remote-ml.build-hash"
TEST_LABEL = "org.airflow-remote-ml.test"

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    cli = docker_client()
    yield cli
    cli.close()


@pytest.fixture(scope="module")
def runner_image(client: Any) -> Any:
    docker_client(RUNNER_IMAGE).close()
    return client.images.get(RUNNER_IMAGE)


@pytest.fixture
def run(client: Any, runner_image: Any) -> Iterator[Any]:
    """Start a detached runner container and wait for it; returns (exit code, stdout, stderr).

    Containers are labelled and force-removed afterwards, whatever the test's outcome.
    """
    started: list[Any] = []

    def _run(command: list[str], **kwargs: Any) -> tuple[int, str, str]:
        container = client.containers.run(
            runner_image.id,
            command,
            detach=True,
            labels={TEST_LABEL: "engine"},
            name=f"arml-engine-test-{uuid.uuid4().hex[:8]}",
            **kwargs,
        )
        started.append(container)
        status = container.wait(timeout=240)
        stdout = container.logs(stdout=True, stderr=False).decode()
        stderr = container.logs(stdout=False, stderr=True).decode()
        return status["StatusCode"], stdout, stderr

    yield _run
    for container in started:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass


def test_engine_answers(client: Any) -> None:
    assert client.ping() is True
    version = client.version()
    assert version["ApiVersion"]
    info = client.info()
    # The storage driver is what makes containers start; an empty one means a half-started daemon.
    assert info["Driver"] in {"overlay2", "fuse-overlayfs", "vfs", "btrfs", "zfs"}


def test_runner_image_is_the_local_build(client: Any, runner_image: Any) -> None:
    config = runner_image.attrs["Config"]
    assert config["Labels"].get(HASH_LABEL), "built by build-images.sh, which labels its recipe hash"
    assert config["WorkingDir"] == "/opt/remote-ml/code"
    assert "PYTHONUNBUFFERED=1" in config["Env"]
    base = client.images.get(BASE_IMAGE)
    assert base.attrs["Config"]["Labels"].get(HASH_LABEL)


def test_runner_runs_sklearn_without_network(run: Any) -> None:
    code = (
        "import sklearn, json, os; "
        "from sklearn.datasets import make_classification; "
        "from sklearn.linear_model import LogisticRegression; "
        "X, y = make_classification(n_samples=200, random_state=0); "
        "score = LogisticRegression().fit(X, y).score(X, y); "
        "print(json.dumps({'sklearn': sklearn.__version__, 'score': score, 'cwd': os.getcwd()}))"
    )
    exit_code, stdout, stderr = run(["python3", "-c", code], network_mode="none")
    assert exit_code == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["sklearn"].split(".")[0].isdigit()
    assert result["score"] > 0.7  # a fitted model, so numpy/scipy/BLAS work, not just the import
    assert result["cwd"] == "/opt/remote-ml/code"


def test_runner_runs_on_the_default_network(run: Any) -> None:
    # Nothing is contacted: this only proves a container starts on the engine's default network.
    code = "import json, sys; print(json.dumps({'ok': sys.version_info >= (3, 11)}))"
    exit_code, stdout, stderr = run(["python3", "-c", code])
    assert exit_code == 0, stderr
    assert json.loads(stdout) == {"ok": True}


def test_failing_command_reports_its_exit_code(run: Any) -> None:
    code = "import sys; print('about to fail', file=sys.stderr); sys.exit(3)"
    exit_code, stdout, stderr = run(["python3", "-c", code], network_mode="none")
    assert exit_code == 3
    assert "about to fail" in stderr
    assert stdout == ""


def test_uncaught_exception_exits_non_zero_with_traceback(run: Any) -> None:
    exit_code, _, stderr = run(["python3", "-c", "import no_such_module"], network_mode="none")
    assert exit_code == 1
    assert "ModuleNotFoundError" in stderr


def test_unprivileged_user_can_write_artifacts(run: Any) -> None:
    command = [
        "sh",
        "-c",
        "echo model > /opt/remote-ml/artifacts/model.txt && cat /opt/remote-ml/artifacts/model.txt && id -u",
    ]
    exit_code, stdout, stderr = run(command, network_mode="none", user="1000")
    assert exit_code == 0, stderr
    assert stdout.split() == ["model", "1000"]
