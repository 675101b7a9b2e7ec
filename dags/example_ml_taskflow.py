"""The example ML pipeline (example_ml_pipeline.py) written with ``@task.remote_ml`` (docs/taskflow.md).

prepare → train (one task per scenario) → evaluate → pick the best → a summary. The steps are the
functions of ``example_ml.steps``, a module without Airflow, so they run by reference in any image that
has the code; ``task.remote_ml(...)(function)`` decorates an imported function. ``summary`` is defined
here, in the DAG file: the step imports this file to call it, so it runs where Airflow is installed
(``backend="local"``, on the worker).

    airflow dags test example_ml_taskflow                                  # local backend, quick set
    airflow dags test example_ml_taskflow -c '{"backend": "docker", "scenario_set": "review"}'

The trained models are published as the Asset ``example_ml_taskflow.train.model``; a DAG scheduled on
it runs whenever a new model lands (docs/assets.md).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Param, task
from example_ml import steps

STEP = {"backend": "{{ params.backend }}", "image": "{{ params.image }}", "retries": 1,
        "retry_delay": timedelta(seconds=5)}

prepare = task.remote_ml(task_id="prepare", outputs=["dataset"], compute={"cpu": 1, "memory": "1Gi"},
                         **STEP)(steps.prepare)
train = task.remote_ml(task_id="train", outputs=["model"], compute={"cpu": 2, "memory": "2Gi"}, assets=True,
                       **STEP)(steps.train)
evaluate = task.remote_ml(task_id="evaluate", outputs=["report"], **STEP)(steps.evaluate)
pick_best = task.remote_ml(task_id="pick_best", outputs=["selection"], **STEP)(steps.pick_best)


@task.remote_ml(backend="local")
def summary(best: dict[str, Any], scenario_set: str) -> dict[str, Any]:
    """One line for people: which scenario won, read from pick_best's result (its function's return value)."""
    line = f"{scenario_set}: {best['result']['best_scenario']} won (test RMSE {best['result']['best_test_rmse']})"
    print(line)
    return {"line": line, "selection": best["outputs"]["selection"]}


with DAG(
    dag_id="example_ml_taskflow",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["example", "remote-ml", "taskflow"],
    doc_md=__doc__,
    params={
        "backend": Param("local", type="string", enum=["local", "docker", "kubernetes", "databricks", "valohai"],
                         description="Where every step runs."),
        "scenario_set": Param("quick", type="string", enum=["quick", "review", "full"],
                              description="quick: one scenario; review: three; full: all of them."),
        "image": Param("airflow-remote-ml/example:latest", type="string",
                       description="Image of the container backends (built by backends/docker/build-images.sh)."),
    },
) as dag:

    @task
    def scenarios(params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return steps.scenario_parameters((params or {}).get("scenario_set", "quick"))

    @task
    def evaluation_inputs(prepared: dict[str, Any], trained: list[dict[str, Any]]) -> list[dict[str, str]]:
        return [{"model": t["outputs"]["model"], "dataset": prepared["outputs"]["dataset"]} for t in trained]

    prepared = prepare(test_fraction=0.25, seed=42)
    # The call's inputs are URIs (here an upstream output); the function receives their local paths.
    trained = train.partial(inputs={"dataset": prepared["outputs"]["dataset"]}).expand_kwargs(scenarios())
    evaluated = evaluate.expand(inputs=evaluation_inputs(prepared, trained))
    best = pick_best(candidates=evaluated)
    summary(best=best, scenario_set="{{ params.scenario_set }}")
