"""The example pipeline's PySpark feature step runs for real: a local Spark, through the databricks backend.

The Jobs API test server runs the step runtime as a ``spark_python_task``; the runtime calls
``spark_features:build_features`` (found through ``python_path``), which starts a local Spark (Java 17)
and writes the features. The plain-Python engine, used when the step runs without Spark, must produce
the same numbers.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_remote_ml.backends.databricks import DatabricksBackend
from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec
from airflow_remote_ml.core.wait import wait_for_completion
from tests.fakes.databricks_api import FakeDatabricks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(autouse=True)
def pyspark_installed() -> None:
    """Fails in CI, skips on a laptop without it: pip install pyspark (and Java 17)."""
    import importlib.util
    import shutil

    from tests.conftest import require_or_skip

    require_or_skip(importlib.util.find_spec("pyspark") is not None and shutil.which("java") is not None,
                    "the Spark step needs pyspark and Java: pip install pyspark")

REPO = Path(__file__).resolve().parents[2]
CODE_DIR = REPO / "backends" / "databricks"
CLUSTER = {"spark_version": "15.4.x-scala2.12", "node_type_id": "i3.xlarge", "num_workers": 0}


@pytest.fixture
def dataset(tmp_path: Path) -> str:
    from example_ml.steps import prepare

    out = tmp_path / "dataset"
    prepare(outputs={"dataset": str(out)}, test_fraction=0.25, seed=42)
    return str(out)


@pytest.fixture
def dbx(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDatabricks]:
    with FakeDatabricks(token="dapi-spark") as server:
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", server.connection_json())
        yield server


def _load(directory: str) -> tuple[list[str], list[list[float]]]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("spark_features", CODE_DIR / "spark_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.read_features(directory)


def test_spark_feature_step_runs_on_the_databricks_backend(dbx: FakeDatabricks, dataset: str,
                                                           tmp_path: Path) -> None:
    backend = DatabricksBackend.from_config({
        "new_cluster": CLUSTER, "runtime_dir": "dbfs:/airflow-remote-ml/runtime", "python_path": [str(CODE_DIR)],
        "poll_first_delay": 0.2, "poll_quick_delay": 0.5, "poll_quick_window": 120,
    })
    spec = StepSpec.build(callable="spark_features:build_features", params={"engine": "spark"},
                          inputs={"dataset": dataset}, outputs=["features"],
                          env={"SPARK_FEATURES_LOCAL": "1"}, timeout=150)
    request = StepRequest.create(spec, StepIdentity("example_databricks", "features", uuid.uuid4().hex),
                                 ArtifactStore(str(tmp_path / "artifacts")))
    backend.validate(request)
    handle = backend.submit(request)
    outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 150)
    assert outcome.status.is_successful, (outcome.status, outcome.tail[-20:])

    result = backend.fetch_result(handle)
    assert result.metrics["engine"] == "spark"
    assert result.metrics["train_rows"] == 331 and result.metrics["test_rows"] == 111
    assert result.metrics["feature_count"] == 13
    features = result.outputs["features"]

    # The same step without Spark writes the same numbers in the same layout.
    import sys
    from importlib import import_module

    sys.path.insert(0, str(CODE_DIR))
    try:
        plain = import_module("spark_features")
        plain.build_features({"dataset": dataset}, {"features": str(tmp_path / "plain")}, engine="python")
    finally:
        sys.path.remove(str(CODE_DIR))
    for split in ("train", "test"):
        header, rows = _load(f"{features}/{split}.csv")
        plain_header, plain_rows = _load(str(tmp_path / "plain" / f"{split}.csv"))
        assert header == plain_header == [*plain.FEATURES, *plain.INTERACTIONS, "target"]
        assert len(rows) == len(plain_rows)
        for got, want in zip(rows, plain_rows, strict=True):
            assert all(math.isclose(a, b, rel_tol=1e-7, abs_tol=1e-8) for a, b in zip(got, want, strict=True))
    # Standardised with the training statistics: the training columns have mean 0.
    header, rows = _load(f"{features}/train.csv")
    assert sorted(Path(features).iterdir()) == [Path(features) / "test.csv", Path(features) / "train.csv"]
    bmi = [row[header.index("bmi")] for row in rows]
    assert abs(sum(bmi) / len(bmi)) < 1e-6
