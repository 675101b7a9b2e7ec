"""The PySpark feature step of the example pipeline (``dags/example_databricks_pipeline.py``).

Reads ``train.csv`` and ``test.csv`` of the example data set (scikit-learn's diabetes data, written by
``example_ml.steps.prepare``), standardises every feature with the *training* mean and standard
deviation, adds three interaction features, and writes ``train.csv`` and ``test.csv`` (same layout as
the input, the original column names now standardised) under the ``features`` output, so the example's
training and evaluation steps (``example_ml.steps``) read them unchanged, on any backend.

Two ways to run it on Databricks:

* as a ``callable`` through the step runtime (what the example DAG does): deploy this file to a folder
  the cluster sees (a workspace folder, a volume or ``/dbfs/...``) and list that folder in the step's
  ``backend_options["databricks"]["python_path"]``; the runtime calls :func:`build_features` in the
  driver process, where ``SparkSession.builder.getOrCreate()`` is the cluster's session;
* as a plain ``spark_python_task`` file: ``python_file`` = this file, ``command`` = ``["--dataset",
  "{inputs.dataset}", "--features", "{outputs.features}"]``.

``engine="auto"`` uses Spark on Databricks (``DATABRICKS_RUNTIME_VERSION`` is set there) and plain Python
elsewhere, so the same pipeline runs on a laptop without Spark; ``engine="spark"`` forces Spark (a small
local one off Databricks, or when ``SPARK_FEATURES_LOCAL`` is set, as the tests do).
Both engines write the same numbers (tested in ``tests/integration/test_databricks_spark_step.py``).

Standard library plus ``pyspark`` (only for the Spark engine); never imported by airflow-remote-ml.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import shutil
import statistics
import sys
from typing import Any

FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
#: Interaction features: name → the two standardised columns multiplied.
INTERACTIONS = {"bmi_x_bp": ("bmi", "bp"), "bmi_sq": ("bmi", "bmi"), "bmi_x_s5": ("bmi", "s5")}
SPLITS = ("train", "test")
DIGITS = 10


def build_features(inputs: dict[str, str], outputs: dict[str, str], engine: str = "auto") -> dict[str, Any]:
    """Write standardised and interaction features of both splits under ``outputs["features"]``.

    Returns the step's metrics (row counts, feature count, engine used).
    """
    if engine == "auto":
        engine = "spark" if os.environ.get("DATABRICKS_RUNTIME_VERSION") else "python"
    if engine not in ("spark", "python"):
        raise ValueError(f"engine must be 'auto', 'spark' or 'python', not {engine!r}")
    dataset, target = inputs["dataset"], outputs["features"]
    counts = _with_spark(dataset, target) if engine == "spark" else _with_python(dataset, target)
    metrics = {"engine": engine, "feature_count": len(FEATURES) + len(INTERACTIONS),
               **{f"{split}_rows": n for split, n in counts.items()}}
    print(json.dumps(metrics))
    return metrics


def feature_names() -> list[str]:
    return [*FEATURES, *INTERACTIONS, "target"]


# -- Spark ---------------------------------------------------------------------------------------------


def _spark_path(path: str) -> str:
    """Spark reads DBFS as ``dbfs:/``, not through the ``/dbfs`` FUSE mount the runtime hands over."""
    if path.startswith("/dbfs/"):
        return "dbfs:/" + path[len("/dbfs/"):]
    return path


def _session() -> Any:
    from pyspark.sql import SparkSession

    if os.environ.get("DATABRICKS_RUNTIME_VERSION") and not os.environ.get("SPARK_FEATURES_LOCAL"):
        return SparkSession.builder.getOrCreate()  # the cluster's own session
    # A small local Spark (tests, laptops): one core, no UI, one shuffle partition.
    return (SparkSession.builder.master("local[1]").appName("remote-ml-features")
            .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "1")
            .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
            .getOrCreate())


def _with_spark(dataset: str, target: str) -> dict[str, int]:
    from pyspark.sql import functions as F

    spark = _session()
    frames = {}
    for split in SPLITS:
        source = _spark_path(os.path.join(dataset, f"{split}.csv"))
        frames[split] = spark.read.csv(source, header=True, inferSchema=True).withColumn(
            "row", F.monotonically_increasing_id())
    # Training statistics only: the test split must not leak into its own scaling.
    stats = frames["train"].agg(*[F.mean(c).alias(f"{c}_mean") for c in FEATURES],
                                *[F.stddev_samp(c).alias(f"{c}_std") for c in FEATURES]).first()
    counts = {}
    for split, frame in frames.items():
        scaled = frame.select(
            "row",
            *[((F.col(c) - F.lit(stats[f"{c}_mean"])) / F.lit(stats[f"{c}_std"])).alias(c) for c in FEATURES],
            F.col("target").cast("double").alias("target"),
        )
        for name, (a, b) in INTERACTIONS.items():
            scaled = scaled.withColumn(name, F.col(a) * F.col(b))
        result = scaled.select("row", *[F.round(F.col(c), DIGITS).alias(c) for c in feature_names()])
        staging = os.path.join(target, f"_spark_{split}")
        (result.orderBy("row").drop("row").coalesce(1).write.mode("overwrite")
         .csv(_spark_path(staging), header=True))
        counts[split] = result.count()
        _single_file(staging, os.path.join(target, f"{split}.csv"))
    return counts


def _local(path: str) -> str:
    """File operations go through the FUSE mount on Databricks (``dbfs:/x`` is ``/dbfs/x`` there)."""
    return "/dbfs/" + path[len("dbfs:/"):] if path.startswith("dbfs:/") else path


def _single_file(spark_dir: str, destination: str) -> None:
    """Spark writes a directory of part files; the next step wants one CSV file."""
    parts = sorted(glob.glob(os.path.join(_local(spark_dir), "part-*.csv")))
    if len(parts) != 1:
        raise RuntimeError(f"expected one part file in {spark_dir}, found {len(parts)}")
    shutil.copyfile(parts[0], _local(destination))
    shutil.rmtree(_local(spark_dir), ignore_errors=True)


# -- plain Python (same numbers, no Spark) ---------------------------------------------------------------


def _with_python(dataset: str, target: str) -> dict[str, int]:
    tables = {split: _read(os.path.join(_local(dataset), f"{split}.csv")) for split in SPLITS}
    train = tables["train"]
    means = {c: math.fsum(r[c] for r in train) / len(train) for c in FEATURES}
    stds = {c: statistics.stdev(r[c] for r in train) for c in FEATURES}
    counts = {}
    os.makedirs(_local(target), exist_ok=True)
    for split, rows in tables.items():
        with open(os.path.join(_local(target), f"{split}.csv"), "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(feature_names())
            for row in rows:
                scaled = {c: (row[c] - means[c]) / stds[c] for c in FEATURES}
                scaled.update({name: scaled[a] * scaled[b] for name, (a, b) in INTERACTIONS.items()})
                scaled["target"] = row["target"]
                writer.writerow([round(scaled[c], DIGITS) for c in feature_names()])
        counts[split] = len(rows)
    return counts


def _read(path: str) -> list[dict[str, float]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def read_features(path: str) -> tuple[list[str], list[list[float]]]:
    """Header and rows of a features CSV written by either engine."""
    with open(_local(path), newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        return header, [[float(v) for v in row] for row in reader]


def main(argv: list[str] | None = None) -> int:
    """``spark_python_task`` entry: ``--dataset DIR --features DIR`` (or the backend's JSON convention)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset")
    parser.add_argument("--features")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--inputs", type=json.loads, default={})
    parser.add_argument("--outputs", type=json.loads, default={})
    parser.add_argument("--params", type=json.loads, default={})
    parser.add_argument("--manifest")
    args = parser.parse_args(argv)
    inputs = {"dataset": args.dataset or args.inputs.get("dataset")}
    outputs = {"features": args.features or args.outputs.get("features")}
    if not inputs["dataset"] or not outputs["features"]:
        parser.error("give --dataset and --features")
    build_features(inputs, outputs, engine=args.params.get("engine", args.engine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
