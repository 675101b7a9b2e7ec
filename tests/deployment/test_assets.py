"""Outputs as Assets in a real deployment: a producer's step lands a model, the scheduler runs the consumer.

The DAGs are in dags/remote_ml_deploy_assets.py. What is asserted is what Airflow itself recorded, read
through the REST API v2: the asset events (``GET /api/v2/assets/events``) with the artifact in their
extra, the DAG run each event created, the Asset's producing and consuming tasks (``GET /api/v2/assets``).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.deployment.dags.remote_ml_deploy_assets import CONSUMER, MODEL, MODEL_DEFERRED, PRODUCER
from tests.deployment.harness import Deployment, wait_for


@pytest.fixture(scope="module")
def live(deployment: Deployment) -> Deployment:
    deployment.wait_for_dags([PRODUCER, CONSUMER])
    return deployment


def _as_the_api_shows(live: Deployment, value: str) -> str:
    """``value`` as the REST API returns it in an event's extra: with the metadata DB password masked.

    The api-server redacts asset event extras (``AssetEventResponse.redact_extra`` in
    airflow/api_fastapi/core_api/datamodels/assets.py runs the secrets masker), and the masker knows the
    database password (.ci/postgres.sh picks one that is no word of a path, but a deployment's may be).
    """
    password = urlsplit(live.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).password
    return value.replace(password, "***") if password else value


def _events(live: Deployment, run_id: str) -> dict[str, dict[str, Any]]:
    body = live.get("/assets/events", source_dag_id=PRODUCER, source_run_id=run_id)
    return {event["source_task_id"]: event for event in body["asset_events"]}


def test_a_landed_model_is_an_asset_event_that_runs_the_consumer(live: Deployment) -> None:
    run_id = live.trigger(PRODUCER)
    state = live.wait_for_run(PRODUCER, run_id)
    assert state == "success", live.describe_run(PRODUCER, run_id)

    events = _events(live, run_id)
    assert sorted(events) == ["train", "train_deferred"], json.dumps(events, indent=1)
    for task_id, asset in (("train", MODEL), ("train_deferred", MODEL_DEFERRED)):
        event, xcom = events[task_id], live.xcom(PRODUCER, run_id, task_id)
        assert (event["name"], event["uri"]) == (asset.name, asset.uri)
        extra = event["extra"]
        # The concrete artifact of this run, as the step's result names it, with its checksum and origin.
        assert extra["uri"] == _as_the_api_shows(live, xcom["outputs"]["model"])
        with open(xcom["outputs"]["model"], "rb") as fh:
            data = fh.read()
        assert json.loads(data) == {"trained_in": run_id}
        assert (extra["sha256"], extra["size"]) == (hashlib.sha256(data).hexdigest(), len(data))
        assert (extra["backend"], extra["job_id"]) == ("local", _as_the_api_shows(live, xcom["job_id"]))
        assert extra["metrics"]["rmse"] == 0.25
        assert xcom["result"] == {"trained_in": run_id}  # the function's return value

    # The scheduler queued the consumer once both Assets had an event; it is the run those events created.
    def consumer_run() -> str | None:
        created = [r["run_id"] for e in _events(live, run_id).values() for r in e["created_dagruns"]
                   if r["dag_id"] == CONSUMER]
        return created[0] if created else None

    consumer_run_id = wait_for(f"a {CONSUMER} run created by the events of {run_id}", consumer_run, 180,
                               interval=0.5, on_timeout=lambda: json.dumps(_events(live, run_id), indent=1))
    assert live.wait_for_run(CONSUMER, consumer_run_id) == "success", live.describe_run(CONSUMER, consumer_run_id)
    assert live.dag_run(CONSUMER, consumer_run_id)["run_type"] == "asset_triggered"
    # Its step read the model of the triggering event through the Asset input.
    report = live.xcom(CONSUMER, consumer_run_id, "score")["outputs"]["report"]
    assert os.path.exists(report)
    with open(report, encoding="utf-8") as fh:
        assert json.load(fh) == {"trained_in": run_id}

    # Lineage as the Assets view shows it: who produces the model, who reads it (an inlet), who is scheduled.
    (asset,) = live.get("/assets", name_pattern=MODEL.name)["assets"]
    assert [(t["dag_id"], t["task_id"]) for t in asset["producing_tasks"]] == [(PRODUCER, "train")]
    assert [(t["dag_id"], t["task_id"]) for t in asset["consuming_tasks"]] == [(CONSUMER, "score")]
    assert [d["dag_id"] for d in asset["scheduled_dags"]] == [CONSUMER]
