"""Every hand-off form docs/concepts.md shows (run by tests/system/test_handoff.py with dag.test())."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

from airflow.sdk import DAG, task

from airflow_remote_ml.operators import RemoteExecutionOperator

WRITE = ("import os, json; open(os.environ['REMOTE_ML_OUTPUT_ROWS'], 'w').write('1\\n2\\n3\\n'); "
         "print(json.dumps({'rmse': 0.25}))")
# Reports what it received as its metrics: the test reads them back from the step's result.
READ = ("import os, json, sys; print(json.dumps({'rows': open(os.environ['REMOTE_ML_INPUT_ROWS']).read().split(), "
        "'arg': sys.argv[1]}))")

with DAG("handoff_forms", start_date=datetime(2026, 1, 1), schedule=None) as dag:
    write = RemoteExecutionOperator(task_id="write", backend="local", command=[sys.executable, "-c", WRITE],
                                    outputs=["rows"])
    # inputs from output["outputs"][name]; parameters from output["metrics"][name] (argv via {params.x})
    RemoteExecutionOperator(
        task_id="by_arg", backend="local", command=[sys.executable, "-c", READ, "{params.rmse}"],
        inputs={"rows": write.output["outputs"]["rows"]}, parameters={"rmse": write.output["metrics"]["rmse"]})
    # the Jinja form in a templated field
    by_template = RemoteExecutionOperator(
        task_id="by_template", backend="local", command=[sys.executable, "-c", READ, "template"],
        inputs={"rows": "{{ ti.xcom_pull(task_ids='write')['outputs']['rows'] }}"})
    by_template.set_upstream(write)
    # a mapped step's results: .map() over its whole output, and a @task taking it
    mapped = RemoteExecutionOperator.partial(task_id="mapped", backend="local", command=[sys.executable, "-c", WRITE],
                                             outputs=["rows"]).expand(parameters=[{"i": 0}, {"i": 1}])

    @task
    def collect(results: Any, rows: Any) -> dict[str, Any]:
        return {"results": [r["outputs"]["rows"] for r in results], "rows": list(rows)}

    collect(mapped.output, mapped.output.map(lambda result: result["outputs"]["rows"]))
