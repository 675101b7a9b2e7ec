"""The databricks backend passes the contract suite against the local Jobs API test server.

The server runs each ``spark_python_task`` as a local subprocess, so the step runtime really runs: the
runtime file is uploaded to DBFS through the DBFS API (the cluster cannot read a path on the worker), and
the artifact root is a local directory that the "cluster" and Airflow share the way a Unity Catalog volume
or a mounted bucket is shared in a deployment.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from airflow_remote_ml.backends.databricks import DatabricksBackend
from tests.contract.suite import BackendContract
from tests.fakes.databricks_api import FakeDatabricks

TOKEN = "dapi-contract"
CLUSTER = {"spark_version": "15.4.x-scala2.12", "node_type_id": "i3.xlarge", "num_workers": 1}


@pytest.fixture
def dbx(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDatabricks]:
    with FakeDatabricks(token=TOKEN) as server:
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", server.connection_json())
        yield server


@pytest.mark.integration
@pytest.mark.timeout(300)
class TestDatabricksBackend(BackendContract):
    supports_inputs = True

    @pytest.fixture
    def backend(self, dbx: FakeDatabricks, tmp_path) -> Iterator[DatabricksBackend]:
        backend = DatabricksBackend.from_config({
            "new_cluster": CLUSTER,
            "runtime_dir": "dbfs:/airflow-remote-ml/runtime",
            # Quick checks keep the suite fast; the schedule itself is tested in the unit tests.
            "poll_first_delay": 0.1, "poll_quick_delay": 0.3, "poll_quick_window": 60, "poll_cap": 1.0,
            "retry_delay": 0.1,
        })
        yield backend
        backend.close()

    @pytest.fixture
    def artifact_root(self, tmp_path) -> str:
        return str(tmp_path / "artifacts")

    @pytest.fixture
    def image(self) -> None:
        return None
