"""The run report reads only the version records the steps wrote, and shows what they say."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from typing import Any

import fsspec
import pytest

from airflow_remote_ml.core.artifacts import ArtifactStore
from airflow_remote_ml.core.identity import StepIdentity
from airflow_remote_ml.core.report import load_run, recent_runs, render_html, write_report

DAG = "pipeline"


def _write(root: str, run_id: str, task: str, map_index: int, generation: int, **manifest: Any) -> str:
    store = ArtifactStore(root)
    identity = StepIdentity(DAG, task, run_id, map_index, generation)
    uri = store.manifest_uri(identity)
    outputs = {name: {"uri": store.output_uri(identity, name), "size": 3, "sha256": "ab" * 32, "kind": "file"}
               for name in manifest.pop("outputs", [])}
    document = {"status": "succeeded", "metrics": {}, "outputs": outputs, "versions": {}, "finished_at": 0.0,
                "duration_seconds": 1.0, **manifest}
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as fh:
        json.dump(document, fh)
    return uri


def _pipeline(root: str, run_id: str, rmse: list[float], start: float = 0.0) -> None:
    _write(root, run_id, "prepare", -1, 0, outputs=["dataset"], finished_at=start + 1)
    dataset = ArtifactStore(root).output_uri(StepIdentity(DAG, "prepare", run_id, -1, 0), "dataset")
    for i, value in enumerate(rmse):
        _write(root, run_id, "train", i, 0, outputs=["model"], finished_at=start + 2 + i,
               metrics={"scenario": f"s{i}", "rmse": value}, versions={"inputs": {"dataset": dataset}})


class _Points(HTMLParser):
    """What a person sees in the plots: each dot's series, x label and value."""

    def __init__(self) -> None:
        super().__init__()
        self.plots: dict[str, list[tuple[str, str, float]]] = {}
        self._plot: str | None = None
        self.rows: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "svg":
            self._plot = a["data-title"]
            self.plots[self._plot] = []
        elif tag == "circle" and self._plot:
            self.plots[self._plot].append((a["data-series"] or "", a["data-label"] or "", float(a["data-value"] or 0)))
        elif tag == "tr" and "data-step" in a:
            self.rows.append(a["data-step"] or "")


def _parse(page: str) -> _Points:
    parser = _Points()
    parser.feed(page)
    return parser


def test_a_run_shows_every_step_in_pipeline_order_and_its_newest_generation(tmp_path) -> None:
    root = str(tmp_path)
    _pipeline(root, "manual__1", [3.0, 1.0, 2.0])
    # A retry wrote generation 1 of train[1]: the report shows that one, not the failed first try.
    _write(root, "manual__1", "train", 1, 1, status="succeeded", metrics={"scenario": "s1", "rmse": 0.5},
           finished_at=9.0)
    _write(root, "manual__1", "train", 1, 0, status="failed", error="boom", finished_at=3.0)
    report = load_run(root, DAG, "manual__1")
    assert [(s.label, s.generation) for s in report.steps] == [
        ("prepare", 0), ("train[0]", 0), ("train[2]", 0), ("train[1]", 1)]
    assert report.series("train", "rmse") == [("s0", 3.0), ("s1", 0.5), ("s2", 2.0)]
    assert report.plottable() == [("train", "rmse")]

    parsed = _parse(render_html(report))
    assert parsed.rows == ["prepare", "train[0]", "train[1]", "train[2]"]
    assert parsed.plots["train: rmse by scenario"] == [("rmse", "s0", 3.0), ("rmse", "s1", 0.5), ("rmse", "s2", 2.0)]


def test_inputs_are_shown_by_the_step_output_that_produced_them(tmp_path) -> None:
    _pipeline(str(tmp_path), "manual__1", [1.0])
    page = render_html(load_run(str(tmp_path), DAG, "manual__1"))
    assert "dataset ← prepare.dataset" in page


def test_an_output_named_manifest_json_is_not_taken_for_a_version_record(tmp_path) -> None:
    root = str(tmp_path)
    _pipeline(root, "r", [1.0])
    stray = ArtifactStore(root).output_uri(StepIdentity(DAG, "prepare", "r", -1, 0), "manifest.json")
    import os

    os.makedirs(os.path.dirname(stray), exist_ok=True)
    with open(stray, "w") as fh:
        fh.write("not json")
    assert [s.label for s in load_run(root, DAG, "r").steps] == ["prepare", "train[0]"]


def test_history_plots_each_scenario_across_runs_in_the_order_they_finished(tmp_path) -> None:
    root = str(tmp_path)
    _pipeline(root, "manual__2026-12-01T10:00:00+00:00", [3.0, 2.0], start=100)
    _pipeline(root, "manual__2026-12-01T09:00:00+00:00", [4.0, 5.0], start=10)
    runs = recent_runs(root, DAG)
    assert [r.run_id for r in runs] == ["manual__2026-12-01T09:00:00+00:00", "manual__2026-12-01T10:00:00+00:00"]
    parsed = _parse(render_html(runs[-1], runs))
    assert parsed.plots["train: rmse across runs"] == [
        ("s0", "12-01 09:00:00", 4.0), ("s0", "12-01 10:00:00", 3.0),
        ("s1", "12-01 09:00:00", 5.0), ("s1", "12-01 10:00:00", 2.0)]
    assert [r.run_id for r in recent_runs(root, DAG, limit=1)] == ["manual__2026-12-01T10:00:00+00:00"]


def test_text_from_a_step_is_escaped(tmp_path) -> None:
    _write(str(tmp_path), "r", "t", -1, 0, metrics={"note": "<script>alert(1)</script>"}, status="failed",
           error="<b>bad</b>")
    page = render_html(load_run(str(tmp_path), DAG, "r"))
    assert "<script>" not in page and "<b>bad" not in page
    assert "&lt;script&gt;" in page


def test_a_missing_run_is_an_empty_report_not_an_error(tmp_path) -> None:
    assert load_run(str(tmp_path), DAG, "nope").steps == []
    assert recent_runs(str(tmp_path), DAG) == []


@pytest.mark.parametrize("root", ["memory://reports/root"])
def test_an_object_store_root_is_read_through_fsspec(root: str) -> None:
    _pipeline(root, "run", [1.0, 2.0])
    report = load_run(root, DAG, "run")
    assert [s.label for s in report.steps] == ["prepare", "train[0]", "train[1]"]
    assert all(s.manifest_uri.startswith("memory://") for s in report.steps)
    target = write_report(root, DAG, "run")
    assert target.startswith(root) and re.search(r"/report\.html$", target)
    with fsspec.open(target, "r") as fh:
        assert "train: rmse by scenario" in fh.read()
