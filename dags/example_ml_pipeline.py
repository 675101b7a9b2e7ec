"""Example ML pipeline: prepare → train (one task per scenario) → evaluate → pick the best.

Every step is a RemoteExecutionOperator whose backend comes from the ``backend`` DAG param, so the same
pipeline runs as subprocesses (``local``, the default), in containers (``docker``), as pods
(``kubernetes``), ... Outputs move between steps as URIs; XCom holds only URIs and metrics.

    airflow dags test example_ml_pipeline                                  # local backend, quick set
    airflow dags test example_ml_pipeline -c '{"backend": "docker", "scenario_set": "full"}'

``train_backend`` runs only the training steps elsewhere, e.g. on Valohai (the valohai.yaml step ``train``,
whose model is copied back under the artifact root for evaluation). The other steps' outputs must then be
where that platform can fetch them: an object-store ``[remote_ml] artifact_root`` such as ``s3://...``
(a local path is refused before submit). With ``backend=valohai`` every step runs on Valohai and outputs
pass from execution to execution as ``datum://`` URIs.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Param, task

from airflow_remote_ml.operators import RemoteExecutionOperator

with DAG(
    dag_id="example_ml_pipeline",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["example", "remote-ml"],
    doc_md=__doc__,
    params={
        "backend": Param("local", type="string", enum=["local", "docker", "kubernetes", "databricks", "valohai"],
                         description="Where every step runs."),
        "train_backend": Param("", type="string", enum=["", "local", "docker", "kubernetes", "databricks", "valohai"],
                               description="Where training runs, if not on the 'backend' of the other steps."),
        "scenario_set": Param("quick", type="string", enum=["quick", "review", "full"],
                              description="quick: one scenario; review: three; full: all of them."),
        "image": Param("airflow-remote-ml/example:latest", type="string",
                       description="Image of the container backends (built by backends/docker/build-images.sh)."),
    },
) as dag:
    step = {"backend": "{{ params.backend }}", "image": "{{ params.image }}", "retries": 1,
            "retry_delay": timedelta(seconds=5)}

    prepare = RemoteExecutionOperator(
        task_id="prepare",
        callable="example_ml.steps:prepare",
        parameters={"test_fraction": 0.25, "seed": 42},
        outputs=["dataset"],
        compute={"cpu": 1, "memory": "1Gi"},
        **step,
    )

    @task
    def scenarios(params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        from example_ml.steps import scenario_parameters

        return scenario_parameters((params or {}).get("scenario_set", "quick"))

    train = RemoteExecutionOperator.partial(
        task_id="train",
        callable="example_ml.steps:train",
        inputs={"dataset": prepare.output["outputs"]["dataset"]},
        outputs=["model"],
        compute={"cpu": 2, "memory": "2Gi"},
        # On Valohai, run the valohai.yaml step "train" (backends/valohai/valohai.yaml). When evaluation runs
        # elsewhere, copy the model back under the artifact root so it can read it; when it stays on Valohai,
        # hand it the model's datum:// URI (Valohai downloads inputs from URLs, never a worker's disk).
        backend_options={"valohai": {"step": "train", "export_outputs": "{{ params.backend != 'valohai' }}"}},
        **{**step, "backend": "{{ params.train_backend or params.backend }}"},
    ).expand(parameters=scenarios())

    @task
    def evaluation_inputs(prepared: dict[str, Any], trained: list[dict[str, Any]]) -> list[dict[str, str]]:
        return [{"model": t["outputs"]["model"], "dataset": prepared["outputs"]["dataset"]} for t in trained]

    evaluate = RemoteExecutionOperator.partial(
        task_id="evaluate",
        callable="example_ml.steps:evaluate",
        outputs=["report"],
        **step,
    ).expand(inputs=evaluation_inputs(prepare.output, train.output))

    pick_best = RemoteExecutionOperator(
        task_id="pick_best",
        callable="example_ml.steps:pick_best",
        parameters={"candidates": evaluate.output},
        outputs=["selection"],
        **step,
    )
