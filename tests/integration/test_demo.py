"""`make demo` as a new user runs it: the pipeline on the local backend, then a report that needs no server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[str] = []
        self.points: dict[str, list[str]] = {}
        self._plot = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("data-step"):
            self.rows.append(a["data-step"] or "")
        elif tag == "svg":
            self._plot = a.get("data-title") or ""
            self.points[self._plot] = []
        elif tag == "circle":
            self.points[self._plot].append(a.get("data-label") or "")


def test_demo_runs_the_review_scenarios_and_writes_a_report_with_every_step(tmp_path, monkeypatch) -> None:
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "home"), "REMOTE_ML_ARTIFACT_ROOT": str(tmp_path / "art")}
    env.pop("REMOTE_ML_LOCAL_STATE_DIR", None)
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--scenarios", "review"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Best scenario:" in run.stdout
    match = re.search(r"^Report \(.*\): (.+)$", run.stdout, re.MULTILINE)
    assert match, run.stdout[-2000:]
    report = Path(match.group(1))
    assert report.is_file() and report.parent.parent == tmp_path / "art" / "example_ml_pipeline"

    page = _Page()
    page.feed(report.read_text(encoding="utf-8"))
    # review = three scenarios: prepare, train x3, evaluate x3, pick_best
    assert page.rows == ["prepare", "train[0]", "train[1]", "train[2]", "evaluate[0]", "evaluate[1]",
                         "evaluate[2]", "pick_best"]
    assert len(page.points["evaluate: test_rmse by scenario"]) == 3

    # docs/ui.md's snippet, as written, on this run (its root and run id in place of the page's).
    doc = (REPO / "docs" / "ui.md").read_text(encoding="utf-8")
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "write_report" in b)
    run_id = json.loads(next(report.parent.glob("*/*/*/manifest.json")).read_text())["identity"]["run_id"]
    monkeypatch.setenv("REMOTE_ML_ARTIFACT_ROOT", str(tmp_path / "art"))
    snippet = re.sub(r'"manual__[^"]+"', repr(run_id), snippet)
    report.unlink()
    exec(compile(snippet, "docs/ui.md", "exec"), {})
    assert report.is_file()
