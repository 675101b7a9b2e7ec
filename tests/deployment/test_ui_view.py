"""The "Remote ML" view, in a real browser, against the session's real api-server (conftest.py).

Debian's Chromium driven by Playwright: the test opens a DAG run of the example pipeline the way a
person does (logged in, the DAG run page, its "Remote ML" tab) and asserts on what is on the screen:
one table row per step, one plot point per scenario. Screenshots land in ``$REMOTE_ML_SCREENSHOTS``
(default ``artifacts/screenshots``, which CI keeps); ``REMOTE_ML_UPDATE_DOCS=1`` also refreshes the
one in docs/images that docs/ui.md shows.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import IN_CI
from tests.deployment.harness import Deployment

REPO = Path(__file__).resolve().parents[2]
PIPELINE = "example_ml_pipeline"
SCENARIOS = "review"  # three scenarios: prepare, train x3, evaluate x3, pick_best
STEPS = ["prepare", "train[0]", "train[1]", "train[2]", "evaluate[0]", "evaluate[1]", "evaluate[2]", "pick_best"]
#: A real browser and a real api-server on a loaded 2-core machine: generous bounds for each wait for an
#: element (Playwright waits for the element, not for time).
UI_TIMEOUT_MS = 90_000

SHOTS = Path(os.environ.get("REMOTE_ML_SCREENSHOTS") or REPO / "artifacts" / "screenshots")
DOC_SHOT = REPO / "docs" / "images" / "remote-ml-view.png"
TASKFLOW = "example_ml_taskflow"
MODEL_ASSET = "example_ml_taskflow.train.model"


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "Debian's chromium is not installed (as root: bash .ci/browser.sh)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def finished_run(deployment: Deployment) -> str:
    deployment.wait_for_dags([PIPELINE])
    run_id = deployment.trigger(PIPELINE, {"backend": "local", "scenario_set": SCENARIOS})
    state = deployment.wait_for_run(PIPELINE, run_id, timeout=420)
    assert state == "success", deployment.describe_run(PIPELINE, run_id)
    return run_id


def _token(deployment: Deployment) -> str:
    response = httpx.post(f"{deployment.base_url}/auth/token",
                          json={"username": "admin", "password": deployment.password}, timeout=30)
    assert response.status_code == 201, response.text
    return str(response.json()["access_token"])


@pytest.fixture
def page(deployment: Deployment) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(viewport={"width": 1500, "height": 1100})
            # The simple auth manager's UI login ends by setting this cookie (COOKIE_NAME_JWT_TOKEN).
            context.add_cookies([{"name": "_token", "value": _token(deployment), "url": deployment.base_url}])
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def _value(raw: Any) -> Any:
    """An XCom value as the REST API returns it with ``deserialize``: the object, or its JSON/repr text."""
    import ast
    import json

    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return ast.literal_eval(raw)


def _shoot(page: Any, name: str, *, doc: bool = False) -> None:
    """A screenshot for CI's artifacts; with REMOTE_ML_UPDATE_DOCS=1 also docs/images/NAME.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    if doc and os.environ.get("REMOTE_ML_UPDATE_DOCS") == "1":
        DOC_SHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(DOC_SHOT.parent / f"{name}.png"), full_page=True)


def test_the_dag_run_tab_shows_every_step_and_a_point_per_scenario(deployment: Deployment, finished_run: str,
                                                                      page: Any) -> None:
    page.goto(f"{deployment.base_url}/dags/{PIPELINE}/runs/{finished_run}")
    # The plugin's external view is a tab of the DAG run page; Airflow frames the view's page in it.
    page.get_by_text("Remote ML", exact=True).click()
    page.wait_for_url(f"**/dags/{PIPELINE}/runs/{finished_run}/plugin/remote-ml")
    frame = page.frame_locator("iframe").first
    rows = frame.locator("table.steps tr[data-step]")
    rows.first.wait_for()
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.step)") == STEPS
    # What a person reads in a row: the backend, Airflow's state and the metrics the step printed.
    train0 = frame.locator('tr[data-step="train[0]"]')
    cells = train0.locator("td").all_inner_texts()
    assert cells[1] == "local" and cells[2].startswith("success"), cells
    assert "train_rmse" in cells[5] and "scenario" in cells[5], cells
    # Lineage: an evaluate step's inputs name the outputs they came from.
    assert "model ← train[0].model" in frame.locator('tr[data-step="evaluate[0]"]').inner_text()

    plot = frame.locator('svg.plot[data-title="evaluate: test_rmse by scenario"]')
    points = plot.locator("circle.point")
    assert points.count() == 3
    labels = points.evaluate_all("ps => ps.map(p => p.dataset.label)")
    values = points.evaluate_all("ps => ps.map(p => Number(p.dataset.value))")
    api = deployment.api
    for index, (label, value) in enumerate(zip(labels, values, strict=True)):
        result = _value(api.get(f"/dags/{PIPELINE}/dagRuns/{finished_run}/taskInstances/evaluate/xcomEntries/"
                                "return_value", params={"map_index": index, "deserialize": True}).json()["value"])
        metrics = result["metrics"]
        assert (label, value) == (metrics["scenario"], pytest.approx(metrics["test_rmse"], rel=1e-5)), result
    frame.locator("svg.plot").first.scroll_into_view_if_needed()
    _shoot(page, "remote-ml-view", doc=True)


def test_the_view_needs_an_airflow_login(deployment: Deployment, finished_run: str) -> None:
    url = f"{deployment.base_url}/remote-ml/api/dags/{PIPELINE}/runs/{finished_run}"
    assert httpx.get(url, timeout=30).status_code in (401, 403)
    assert httpx.get(url, headers={"Authorization": "Bearer not-a-token"}, timeout=30).status_code in (401, 403)
    ok = httpx.get(url, headers={"Authorization": f"Bearer {_token(deployment)}"}, timeout=30)
    assert ok.status_code == 200, ok.text
    steps = ok.json()["steps"]
    assert [s["label"] for s in steps] == STEPS
    assert {s["backend"] for s in steps} == {"local"}


def test_a_local_steps_remote_job_link_opens_the_view(deployment: Deployment, finished_run: str) -> None:
    """The local backend has no job page: its "Remote job" extra link is the run's view, and it loads."""
    links = deployment.get(f"/dags/{PIPELINE}/dagRuns/{finished_run}/taskInstances/train/links", map_index=0)
    link = links["extra_links"]["Remote job"]
    assert link == f"{deployment.base_url}/remote-ml/dags/{PIPELINE}/runs/{finished_run}", links
    page = httpx.get(link, headers={"Authorization": f"Bearer {_token(deployment)}"}, timeout=30)
    assert page.status_code == 200 and 'data-step="train[0]"' in page.text


@pytest.fixture(scope="module")
def taskflow_run(deployment: Deployment) -> str:
    deployment.wait_for_dags([TASKFLOW])
    run_id = deployment.trigger(TASKFLOW, {"backend": "local", "scenario_set": SCENARIOS})
    state = deployment.wait_for_run(TASKFLOW, run_id, timeout=420)
    assert state == "success", deployment.describe_run(TASKFLOW, run_id)
    return run_id


def test_the_taskflow_twin_shows_its_steps_and_their_return_values(deployment: Deployment, taskflow_run: str,
                                                                   page: Any) -> None:
    """@task.remote_ml tasks are steps like any other in the view (docs/taskflow.md's screenshot)."""
    page.goto(f"{deployment.base_url}/dags/{TASKFLOW}/runs/{taskflow_run}/plugin/remote-ml")
    frame = page.frame_locator("iframe").first
    rows = frame.locator("table.steps tr[data-step]")
    rows.first.wait_for()
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.step)") == [*STEPS, "summary"]
    assert frame.locator('svg.plot[data-title="evaluate: test_rmse by scenario"] circle.point').count() == 3
    _shoot(page, "taskflow-run", doc=True)


def test_the_assets_view_shows_each_model_that_landed(deployment: Deployment, taskflow_run: str,
                                                      page: Any) -> None:
    """Airflow's own Assets view, for the Asset the taskflow twin publishes (docs/assets.md's screenshot)."""
    events = deployment.get("/assets/events", source_dag_id=TASKFLOW, source_run_id=taskflow_run)["asset_events"]
    ours = [e for e in events if e["source_task_id"] == "train"]
    assert sorted(e["source_map_index"] for e in ours) == [0, 1, 2]
    (asset,) = [a for a in deployment.get("/assets", name_pattern=MODEL_ASSET)["assets"] if a["name"] == MODEL_ASSET]
    page.goto(f"{deployment.base_url}/assets/{asset['id']}")
    page.get_by_text(MODEL_ASSET).first.wait_for()
    # One event per trained model of this run (the only run of this DAG in the session's deployment),
    # each with its source DAG, and the producing task in the lineage panel.
    page.get_by_text(f"{len(ours)} Asset Events", exact=True).wait_for()
    page.get_by_text("Producing Tasks").wait_for()
    _shoot(page, "asset-events", doc=True)
