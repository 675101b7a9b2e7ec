"""Support for ``example_databricks_pipeline``: where the PySpark feature step's code lives.

The feature step is ``backends/databricks/spark_features.py`` (a deployment asset: on Databricks it is
deployed to a workspace folder or a volume and found through ``python_path``). For the ``local`` backend
the same file must be importable on the worker: this package puts its folder on ``sys.path`` when the
DAG is parsed, and the local backend hands ``sys.path`` to the step. ``EXAMPLE_SPARK_CODE_DIR``
overrides the folder (a deployment that ships the file elsewhere).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: ``callable`` of the feature step (the runtime imports it from ``python_path``).
FEATURES_CALLABLE = "spark_features:build_features"


def spark_code_dir() -> str:
    default = Path(__file__).resolve().parents[2] / "backends" / "databricks"
    return os.environ.get("EXAMPLE_SPARK_CODE_DIR") or str(default)


def make_features_importable() -> bool:
    """Put the feature step's folder on ``sys.path``; False when it is not there (e.g. a DAG-only deploy)."""
    directory = spark_code_dir()
    if not os.path.isfile(os.path.join(directory, "spark_features.py")):
        return False
    if directory not in sys.path:
        sys.path.append(directory)
    return True
