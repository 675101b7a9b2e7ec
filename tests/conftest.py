"""Test-wide setup: an isolated Airflow home with a migrated metadata database, and CI strictness."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_HOME = Path(os.environ.get("REMOTE_ML_TEST_AIRFLOW_HOME") or tempfile.mkdtemp(prefix="remote-ml-airflow-"))

# Before anything imports Airflow: a private home, our DAGs folder, no example DAGs.
os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ.setdefault("REMOTE_ML_ARTIFACT_ROOT", str(_HOME / "artifacts"))
os.environ.setdefault("REMOTE_ML_LOCAL_STATE_DIR", str(_HOME / "local-jobs"))
# The worker's cache of code archives (core/codepkg.py) stays in the test home, not the user's ~/.cache.
os.environ.setdefault("REMOTE_ML_CODE_CACHE", str(_HOME / "code-cache"))
# The example steps live in dags/; the local backend hands sys.path to its subprocesses.
if str(REPO / "dags") not in sys.path:
    sys.path.insert(0, str(REPO / "dags"))

IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

RUNNER_IMAGE = "airflow-remote-ml/runner:latest"
HOW_TO_START_DOCKER = "bash .ci/docker-engine.sh && bash backends/docker/build-images.sh"


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated SQLite metadata database (once per session)."""
    marker = _HOME / ".migrated"
    if not marker.exists():
        result = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True,
                                env=os.environ.copy())
        assert result.returncode == 0, result.stderr[-3000:]
        marker.write_text("ok")
    return _HOME


def require_or_skip(available: bool, reason: str) -> None:
    """In CI a missing service is a failure; on a laptop it is a skip with the way to provide it."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def docker_client(*images: str):
    """A client of the running Docker engine that has ``images``; a failure in CI, a skip elsewhere."""
    try:
        import docker

        # version="auto" negotiates down to the daemon's API: Debian's docker.io is 20.10 (API 1.41).
        client = docker.from_env(version="auto", timeout=60)
        client.ping()
    except Exception as exc:  # any failure to reach the daemon means "no engine"
        require_or_skip(False, f"Docker engine unreachable ({type(exc).__name__}: {exc}); "
                               f"start it with: {HOW_TO_START_DOCKER}")
    for image in images:
        try:
            client.images.get(image)
        except Exception:
            client.close()
            require_or_skip(False, f"image {image} is not built; build it with: {HOW_TO_START_DOCKER}")
    return client


@pytest.fixture(scope="session")
def docker_engine():
    """The Docker engine with the runner image (see :func:`docker_client`)."""
    client = docker_client(RUNNER_IMAGE)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _fresh_retention_sweeps():
    """Each test's first finishing job sweeps for retention, whatever earlier tests finished in this process
    (core/jobs.py remembers the last sweep per backend location and process)."""
    from airflow_remote_ml.core import jobs

    jobs._last_sweep.clear()
    yield
