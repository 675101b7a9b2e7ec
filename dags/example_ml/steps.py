"""A small, real regression pipeline on scikit-learn's bundled diabetes data set (no download).

Every function is a step: parameters arrive as keyword arguments, ``inputs``/``outputs`` map artifact
names to local paths, JSON objects printed on stdout (and a returned dict) become the step's metrics.
Models are stored as JSON (coefficients), so any step on any backend and Python version can read them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from typing import Any

#: The scenario-set pattern: one scenario for a quick check, a few for review, all for a release.
SCENARIOS: dict[str, dict[str, Any]] = {
    "ridge-all-a0.1": {"alpha": 0.1, "features": "all"},
    "ridge-all-a1": {"alpha": 1.0, "features": "all"},
    "ridge-all-a10": {"alpha": 10.0, "features": "all"},
    "ridge-core-a0.1": {"alpha": 0.1, "features": "core"},
    "ridge-core-a1": {"alpha": 1.0, "features": "core"},
    "ridge-bmi-a0.1": {"alpha": 0.1, "features": "bmi"},
}
SCENARIO_SETS: dict[str, list[str]] = {
    "quick": ["ridge-all-a1"],
    "review": ["ridge-all-a1", "ridge-core-a1", "ridge-bmi-a0.1"],
    "full": list(SCENARIOS),
}
FEATURE_SETS: dict[str, list[str]] = {
    "all": ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"],
    "core": ["bmi", "bp", "s5"],
    "bmi": ["bmi"],
}


def scenario_parameters(scenario_set: str) -> list[dict[str, Any]]:
    """The parameters of each training step of a scenario set (used by the DAG to expand training)."""
    if scenario_set not in SCENARIO_SETS:
        raise ValueError(f"unknown scenario set {scenario_set!r}; choose one of {sorted(SCENARIO_SETS)}")
    return [{"scenario": name, **SCENARIOS[name]} for name in SCENARIO_SETS[scenario_set]]


def _write_csv(path: str, header: list[str], rows: list[list[float]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def _read_csv(path: str) -> tuple[list[str], list[list[float]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        return header, [[float(v) for v in row] for row in reader]


def prepare(outputs: dict[str, str], test_fraction: float = 0.25, seed: int = 42) -> dict[str, Any]:
    """Split the bundled diabetes data set into train.csv and test.csv under the ``dataset`` output."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    header = [*data.feature_names, "target"]
    rows = [[*map(float, x), float(y)] for x, y in zip(data.data, data.target, strict=True)]
    random.Random(seed).shuffle(rows)
    cut = int(len(rows) * (1 - test_fraction))
    os.makedirs(outputs["dataset"], exist_ok=True)
    _write_csv(os.path.join(outputs["dataset"], "train.csv"), header, rows[:cut])
    _write_csv(os.path.join(outputs["dataset"], "test.csv"), header, rows[cut:])
    print(f"prepared {cut} training and {len(rows) - cut} test rows")
    return {"train_rows": cut, "test_rows": len(rows) - cut}


def _columns(header: list[str], rows: list[list[float]], features: list[str]) -> tuple[list[list[float]], list[float]]:
    index = [header.index(f) for f in features]
    target = header.index("target")
    return [[row[i] for i in index] for row in rows], [row[target] for row in rows]


def train(inputs: dict[str, str], outputs: dict[str, str], scenario: str, alpha: float, features: str) -> None:
    """Fit a ridge regression for one scenario; write the model as JSON under the ``model`` output."""
    from sklearn.linear_model import Ridge

    names = FEATURE_SETS[features]
    header, rows = _read_csv(os.path.join(inputs["dataset"], "train.csv"))
    x, y = _columns(header, rows, names)
    model = Ridge(alpha=alpha).fit(x, y)
    predictions = model.predict(x)
    rmse = math.sqrt(sum((p - t) ** 2 for p, t in zip(predictions, y, strict=True)) / len(y))
    with open(outputs["model"], "w", encoding="utf-8") as fh:
        json.dump({"scenario": scenario, "kind": "ridge", "alpha": alpha, "features": names,
                   "coef": [float(c) for c in model.coef_], "intercept": float(model.intercept_)}, fh, indent=2)
    # Metrics the Valohai way: one JSON object per line on stdout, from any language.
    print(json.dumps({"scenario": scenario, "train_rmse": round(rmse, 4)}))


def evaluate(inputs: dict[str, str], outputs: dict[str, str]) -> dict[str, Any]:
    """Score a model on the held-out rows; write a JSON report under the ``report`` output."""
    with open(inputs["model"], encoding="utf-8") as fh:
        model = json.load(fh)
    header, rows = _read_csv(os.path.join(inputs["dataset"], "test.csv"))
    x, y = _columns(header, rows, model["features"])
    predictions = [sum(c * v for c, v in zip(model["coef"], row, strict=True)) + model["intercept"] for row in x]
    rmse = math.sqrt(sum((p - t) ** 2 for p, t in zip(predictions, y, strict=True)) / len(y))
    mean = sum(y) / len(y)
    r2 = 1 - sum((p - t) ** 2 for p, t in zip(predictions, y, strict=True)) / sum((t - mean) ** 2 for t in y)
    report = {"scenario": model["scenario"], "rmse": round(rmse, 4), "r2": round(r2, 4), "model": inputs["model"]}
    with open(outputs["report"], "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    return {"scenario": model["scenario"], "test_rmse": report["rmse"], "r2": report["r2"]}


def pick_best(outputs: dict[str, str], candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """Choose the scenario with the lowest test RMSE from the evaluation results (XCom metrics + URIs)."""
    if not candidates:
        raise ValueError("no evaluated candidates to choose from")
    best = min(candidates, key=lambda c: c["metrics"]["test_rmse"])
    selection = {
        "scenario": best["metrics"]["scenario"],
        "test_rmse": best["metrics"]["test_rmse"],
        "report": best["outputs"]["report"],
        "ranking": sorted(([c["metrics"]["scenario"], c["metrics"]["test_rmse"]] for c in candidates),
                          key=lambda item: item[1]),
    }
    with open(outputs["selection"], "w", encoding="utf-8") as fh:
        json.dump(selection, fh, indent=2)
    print(f"best scenario: {selection['scenario']} (test RMSE {selection['test_rmse']})")
    return {"best_scenario": selection["scenario"], "best_test_rmse": selection["test_rmse"]}
