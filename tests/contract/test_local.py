from __future__ import annotations

import pytest

from airflow_remote_ml.backends.local import LocalBackend
from tests.contract.suite import BackendContract


class TestLocalBackend(BackendContract):
    @pytest.fixture
    def backend(self, tmp_path):
        backend = LocalBackend.from_config({"state_dir": str(tmp_path / "state"), "kill_grace_seconds": 2})
        yield backend
        backend.close()

    @pytest.fixture
    def artifact_root(self, tmp_path):
        return str(tmp_path / "artifacts")

    @pytest.fixture
    def image(self):
        return None
