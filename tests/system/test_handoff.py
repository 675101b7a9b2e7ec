"""Every hand-off form docs/concepts.md shows resolves, from the one result row of each step."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DAGS = Path(__file__).parent / "dags"


def test_every_documented_hand_off_form_resolves(airflow_db, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    # dag.test() runs a DAG of a configured bundle: add this folder as one, beside the default.
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps([
        {"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle", "kwargs": {}},
        {"name": "system-tests", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
         "kwargs": {"path": str(DAGS)}},
    ]))
    bag = DagBag(dag_folder=str(DAGS / "handoff_forms.py"))
    assert bag.import_errors == {}
    run = bag.dags["handoff_forms"].test()
    assert run.state == "success"

    def rows(task_id: str) -> dict[str, Any]:
        with create_session() as session:
            found = session.query(XComModel).filter(XComModel.run_id == run.run_id,
                                                    XComModel.task_id == task_id).all()
            return {row.key: XComModel.deserialize_value(row) for row in found}

    written = rows("write")
    assert set(written) <= {"return_value", "_link_RemoteJobLink"}  # issue 11: 6 rows before
    assert os.path.exists(written["return_value"]["outputs"]["rows"])
    assert rows("by_arg")["return_value"]["metrics"] == {"rows": ["1", "2", "3"], "arg": "0.25"}
    assert rows("by_template")["return_value"]["metrics"] == {"rows": ["1", "2", "3"], "arg": "template"}
    collected = rows("collect")["return_value"]
    assert collected["results"] == collected["rows"] and len(collected["rows"]) == 2
    assert all(os.path.exists(uri) for uri in collected["rows"])
