"""Read the version records a DAG run's steps wrote, and render them as one self-contained HTML page.

Every step's runtime writes a manifest (its version record: outputs with sha256 and size, metrics, code,
image, parameters, inputs) under ``<artifact_root>/<dag>/<run>/<task>/map_<i>/gen_<g>/manifest.json``
(:class:`~airflow_remote_ml.core.artifacts.ArtifactStore`). This module reads only those records, so
the same table and plots serve ``make demo`` (a file next to the artifacts, no server) and the Airflow UI
view (:mod:`airflow_remote_ml.plugins`), and work for any artifact root fsspec can list.

No Airflow import: the core stays usable without it.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_remote_ml.core.artifacts import ArtifactStore, decode_segment, encode_segment, is_local, local_path

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class StepRecord:
    """One step's version record, as its runtime wrote it (the newest generation of a task/map index)."""

    task_id: str
    map_index: int
    generation: int
    manifest: dict[str, Any]
    manifest_uri: str
    backend: str | None = None
    job_url: str | None = None
    airflow_state: str | None = None  # the task instance's state, where Airflow is asked (the UI view)

    @property
    def label(self) -> str:
        return self.task_id if self.map_index < 0 else f"{self.task_id}[{self.map_index}]"

    @property
    def status(self) -> str:
        return str(self.manifest.get("status") or "unknown")

    @property
    def duration(self) -> float | None:
        value = self.manifest.get("duration_seconds")
        return float(value) if isinstance(value, int | float) else None

    @property
    def metrics(self) -> dict[str, Any]:
        metrics = self.manifest.get("metrics")
        return dict(metrics) if isinstance(metrics, dict) else {}

    @property
    def outputs(self) -> dict[str, dict[str, Any]]:
        outputs = self.manifest.get("outputs")
        return {k: v for k, v in outputs.items() if isinstance(v, dict)} if isinstance(outputs, dict) else {}

    @property
    def versions(self) -> dict[str, Any]:
        versions = self.manifest.get("versions")
        return dict(versions) if isinstance(versions, dict) else {}

    @property
    def scenario(self) -> str:
        """What tells mapped steps apart for a person: a ``scenario`` metric or parameter, else the index."""
        for source in (self.metrics, self.versions.get("params") or {}):
            value = source.get("scenario") if isinstance(source, dict) else None
            if isinstance(value, str | int | float) and not isinstance(value, bool):
                return str(value)
        return str(self.map_index) if self.map_index >= 0 else self.task_id

    def numeric_metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "map_index": self.map_index, "generation": self.generation,
                "label": self.label, "scenario": self.scenario, "status": self.status,
                "duration_seconds": self.duration, "metrics": self.metrics, "outputs": self.outputs,
                "versions": self.versions, "error": self.manifest.get("error"),
                "manifest_uri": self.manifest_uri, "backend": self.backend, "job_url": self.job_url,
                "airflow_state": self.airflow_state,
                "finished_at": self.manifest.get("finished_at")}


@dataclass(frozen=True)
class RunReport:
    """Every step of one DAG run that wrote a version record."""

    dag_id: str
    run_id: str
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def finished_at(self) -> float:
        return max((float(s.manifest.get("finished_at") or 0) for s in self.steps), default=0.0)

    def tasks(self) -> list[str]:
        """Task ids in the order their first step finished (the pipeline's order, for a person)."""
        first: dict[str, float] = {}
        for step in self.steps:
            first.setdefault(step.task_id, float(step.manifest.get("finished_at") or 0))
            first[step.task_id] = min(first[step.task_id], float(step.manifest.get("finished_at") or 0))
        return sorted(first, key=lambda t: (first[t], t))

    def series(self, task_id: str, metric: str) -> list[tuple[str, float]]:
        """``(scenario, value)`` of one metric over the mapped steps of one task, by map index."""
        points = []
        for step in sorted((s for s in self.steps if s.task_id == task_id), key=lambda s: s.map_index):
            value = step.numeric_metrics().get(metric)
            if value is not None:
                points.append((step.scenario, value))
        return points

    def plottable(self) -> list[tuple[str, str]]:
        """``(task_id, metric)`` pairs with a numeric value on at least one step."""
        pairs: list[tuple[str, str]] = []
        for task_id in self.tasks():
            names: set[str] = set()
            for step in self.steps:
                if step.task_id == task_id:
                    names.update(step.numeric_metrics())
            pairs.extend((task_id, name) for name in sorted(names))
        return pairs

    def to_json(self) -> dict[str, Any]:
        return {"dag_id": self.dag_id, "run_id": self.run_id, "steps": [s.to_json() for s in ordered_steps(self)]}


# -- reading ---------------------------------------------------------------------------------------------------


def _fs_and_path(uri: str) -> tuple[Any, str]:
    if is_local(uri):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), local_path(uri)
    import fsspec

    return fsspec.core.url_to_fs(uri)


def _join(root: str, *parts: str) -> str:
    return ArtifactStore._join_to(root, *parts)


def _int_after(prefix: str, text: str) -> int | None:
    if not text.startswith(prefix):
        return None
    try:
        return int(text[len(prefix):])
    except ValueError:
        return None


def load_run(artifact_root: str, dag_id: str, run_id: str) -> RunReport:
    """The newest generation of every step of ``run_id`` that wrote a version record (none: empty)."""
    base = _join(artifact_root, encode_segment(dag_id), encode_segment(run_id))
    fs, path = _fs_and_path(base)
    try:
        found = fs.find(path)
    except (FileNotFoundError, NotADirectoryError):
        found = []
    newest: dict[tuple[str, int], tuple[int, str]] = {}
    root = path.rstrip("/")
    for name in found:
        rel = str(name)[len(root):].strip("/").split("/")
        # <task>/map_<i>/gen_<g>/manifest.json; outputs named manifest.json deeper down are not records
        if len(rel) != 4 or rel[3] != MANIFEST_NAME:
            continue
        task_id = decode_segment(rel[0])
        map_index, generation = _int_after("map_", rel[1]), _int_after("gen_", rel[2])
        if task_id is None or map_index is None or generation is None:
            continue
        key = (task_id, map_index)
        if key not in newest or generation > newest[key][0]:
            newest[key] = (generation, str(name))
    steps = []
    for (task_id, map_index), (generation, name) in newest.items():
        try:
            with fs.open(name, "r", encoding="utf-8") as fh:
                manifest = json.load(fh)
        except (OSError, ValueError):
            continue  # a record being written or damaged: the page shows what can be read
        if not isinstance(manifest, dict):
            continue
        uri = name if is_local(artifact_root) else fs.unstrip_protocol(name)
        steps.append(StepRecord(task_id, map_index, generation, manifest, uri))
    steps.sort(key=lambda s: (float(s.manifest.get("finished_at") or 0), s.task_id, s.map_index))
    return RunReport(dag_id, run_id, steps)


def recent_runs(artifact_root: str, dag_id: str, limit: int = 10) -> list[RunReport]:
    """The ``limit`` most recently finished runs of ``dag_id`` under ``artifact_root``, oldest first."""
    fs, path = _fs_and_path(_join(artifact_root, encode_segment(dag_id)))
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    reports = []
    for entry in entries:
        if entry.get("type") != "directory":
            continue
        run_id = decode_segment(os.path.basename(str(entry["name"]).rstrip("/")))
        if run_id is None:
            continue
        report = load_run(artifact_root, dag_id, run_id)
        if report.steps:
            reports.append(report)
    reports.sort(key=lambda r: r.finished_at)
    return reports[-limit:] if limit > 0 else reports


# -- rendering -------------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1f2328}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.succeeded,.success{color:#1a7f37}.failed,.upstream_failed{color:#cf222e}.running,.deferred{color:#9a6700}
code{font-size:12px}
.plots{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0}figcaption{font-weight:600;margin-bottom:4px}
svg text{font:11px system-ui,sans-serif;fill:#57606a}
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _esc(value: Any) -> str:
    return html.escape(_fmt(value), quote=True)


def _link(url: str | None, text: str) -> str:
    if not url:
        return _esc(text)
    return f'<a href="{html.escape(url, quote=True)}">{_esc(text)}</a>'


def _producers(report: RunReport) -> dict[str, str]:
    """Output URI -> ``step.output`` that wrote it, to show each input's lineage by name, not by path."""
    return {str(out.get("uri")): f"{step.label}.{name}" for step in report.steps
            for name, out in step.outputs.items() if out.get("uri")}


def _uri_cell(name: str, uri: str, produced_by: str | None, detail: str = "") -> str:
    shown = produced_by or (uri if len(uri) <= 48 else "…" + uri[-47:])
    return (f'<span title="{html.escape(uri, quote=True)}">{_esc(name)} ← {_esc(shown)}</span>' if produced_by
            else f'<span title="{html.escape(uri, quote=True)}">{_esc(name)}: <code>{_esc(shown)}</code>'
                 f"{detail}</span>")


def ordered_steps(report: RunReport) -> list[StepRecord]:
    """Steps in pipeline order (a task's first finish), mapped steps by index."""
    order = {task: i for i, task in enumerate(report.tasks())}
    return sorted(report.steps, key=lambda s: (order.get(s.task_id, 0), s.map_index))


def steps_table(report: RunReport) -> str:
    """The table of a run's steps: one row per step, ``data-step`` naming it (browser tests read that)."""
    producers = _producers(report)
    rows = []
    for step in ordered_steps(report):
        metrics = "<br>".join(f"{_esc(k)} = {_esc(v)}" for k, v in sorted(step.metrics.items()))
        outputs = "<br>".join(
            _uri_cell(name, str(out.get("uri", "")), None,
                      f" ({_esc(out.get('size', '?'))} B, sha256 {_esc(str(out.get('sha256', ''))[:12])})")
            for name, out in sorted(step.outputs.items()))
        inputs = "<br>".join(_uri_cell(name, str(uri), producers.get(str(uri)))
                             for name, uri in sorted((step.versions.get("inputs") or {}).items()))
        version = "<br>".join(f"{_esc(k)}: {_esc(step.versions.get(k))}"
                              for k in ("code", "code_sha256", "image", "python") if step.versions.get(k))
        duration = "" if step.duration is None else f"{step.duration:.2f} s"
        error = step.manifest.get("error")
        state = _esc(step.airflow_state or step.status) + (f'<br><small>{_esc(error)}</small>' if error else "")
        rows.append(
            f'<tr data-step="{_esc(step.label)}"><td>{_esc(step.label)}</td><td>{_esc(step.backend or "")}</td>'
            f'<td class="state {_esc(step.airflow_state or step.status)}">{state}</td><td class="num">{duration}</td>'
            f"<td>{_link(step.job_url, 'job') if step.job_url else ''}</td><td>{metrics}</td><td>{inputs}</td>"
            f"<td>{outputs}</td><td>{version}</td></tr>")
    head = ("<tr><th>step</th><th>backend</th><th>state</th><th>duration</th><th>remote job</th><th>metrics</th>"
            "<th>inputs (lineage)</th><th>outputs</th><th>version record</th></tr>")
    return f'<table class="steps">{head}{"".join(rows)}</table>'


_COLOURS = ("#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#0550ae", "#bf3989", "#4d2d00")


def svg_plot(title: str, labels: Sequence[str], series: Mapping[str, Sequence[float | None]], *,
             width: int = 440, height: int = 230) -> str:
    """A dot-and-line plot: ``labels`` along x, one line per series (``None`` leaves a gap).

    Each dot is a ``circle.point`` with ``data-series``, ``data-label`` and ``data-value`` and a tooltip,
    so a person can hover it and a browser test can read exactly what is drawn.
    """
    values = [v for line in series.values() for v in line if v is not None]
    if not values or not labels:
        return ""
    left, right, top, bottom, inset = 64, 16, 12, 56, 40  # inset: room for the end labels
    low, high = min(values), max(values)
    if low == high:
        low, high = low - (abs(low) or 1) * 0.1, high + (abs(high) or 1) * 0.1
    span = max(len(labels) - 1, 1)

    def x(i: int) -> float:
        return left + inset + (width - left - right - 2 * inset) * (i / span if len(labels) > 1 else 0.5)

    def y(v: float) -> float:
        return top + (height - top - bottom) * (1 - (v - low) / (high - low))

    base = height - bottom
    parts = [f'<svg class="plot" data-title="{_esc(title)}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="#8c959f"/>',
             f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" stroke="#8c959f"/>',
             f'<text x="{left - 4}" y="{y(high) + 4:.1f}" text-anchor="end">{_esc(high)}</text>',
             f'<text x="{left - 4}" y="{y(low) + 4:.1f}" text-anchor="end">{_esc(low)}</text>']
    for i, label in enumerate(labels):
        short = label if len(label) <= 16 else label[:15] + "…"
        parts.append(f'<text x="{x(i):.1f}" y="{base + 14}" text-anchor="middle">{_esc(short)}</text>')
    for n, (name, line) in enumerate(series.items()):
        colour = _COLOURS[n % len(_COLOURS)]
        drawn = [(i, v) for i, v in enumerate(line) if v is not None]
        if len(drawn) > 1:
            path = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in drawn)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-opacity="0.45"/>')
        for i, v in drawn:
            parts.append(f'<circle class="point" cx="{x(i):.1f}" cy="{y(v):.1f}" r="4" fill="{colour}" '
                         f'data-series="{_esc(name)}" data-label="{_esc(labels[i])}" data-value="{_esc(v)}">'
                         f"<title>{_esc(name)} · {_esc(labels[i])}: {_esc(v)}</title></circle>")
    if len(series) > 1:
        legend = "".join(f'<tspan fill="{_COLOURS[n % len(_COLOURS)]}">● </tspan><tspan>{_esc(name)}  </tspan>'
                         for n, name in enumerate(series))
        parts.append(f'<text x="{left}" y="{height - 8}">{legend}</text>')
    parts.append("</svg>")
    return "".join(parts)


def scenario_plot(report: RunReport, task_id: str, metric: str) -> str:
    """One metric over the mapped scenarios of one task in one run."""
    points = report.series(task_id, metric)
    return svg_plot(f"{task_id}: {metric} by scenario", [label for label, _ in points],
                    {metric: [value for _, value in points]})


def _run_label(run_id: str) -> str:
    """``manual__2026-12-01T17:36:59.322749+00:00`` -> ``12-01 17:36:59``: enough to tell runs apart."""
    text = run_id.split("__", 1)[-1]
    if len(text) >= 19 and text[4] == "-" and text[10] == "T":
        return f"{text[5:10]} {text[11:19]}"
    return run_id


def history_plot(history: Sequence[RunReport], task_id: str, metric: str) -> str:
    """One metric of one task across runs: a line per scenario, a point per run it ran in."""
    labels = [_run_label(r.run_id) for r in history]
    lines: dict[str, list[float | None]] = {}
    for i, report in enumerate(history):
        for scenario, value in report.series(task_id, metric):
            lines.setdefault(scenario, [None] * len(history))[i] = value
    if sum(1 for line in lines.values() for v in line if v is not None) < 2:
        return ""
    return svg_plot(f"{task_id}: {metric} across runs", labels, lines)


def _figure(caption: str, svg: str) -> str:
    return f"<figure><figcaption>{_esc(caption)}</figcaption>{svg}</figure>" if svg else ""


def render_html(report: RunReport, history: Sequence[RunReport] = ()) -> str:
    """One self-contained page: the steps table, a plot per metric across scenarios, and across runs."""
    plots = [_figure(f"{task_id}: {metric} by scenario", scenario_plot(report, task_id, metric))
             for task_id, metric in report.plottable() if len(report.series(task_id, metric)) > 1]
    across = [_figure(f"{task_id}: {metric} across runs", history_plot(history, task_id, metric))
              for task_id, metric in report.plottable()] if len(history) > 1 else []
    across = [figure for figure in across if figure]
    body = [f"<h1>{_esc(report.dag_id)} — run {_esc(report.run_id)}</h1>",
            f"<p>{len(report.steps)} steps with a version record.</p>"]
    if plots:
        body += ["<h2>Metrics across scenarios</h2>", f'<div class="plots">{"".join(plots)}</div>']
    if across:
        body += [f"<h2>Across the last {len(history)} runs</h2>", f'<div class="plots">{"".join(across)}</div>']
    body += ["<h2>Steps</h2>", steps_table(report)]
    return ("<!doctype html><html><head><meta charset=\"utf-8\">"
            f"<title>{_esc(report.dag_id)} {_esc(report.run_id)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>")


def write_report(artifact_root: str, dag_id: str, run_id: str, path: str | None = None,
                 history: int = 10) -> str:
    """Render ``run_id``'s report and write it (default: ``report.html`` in the run's artifact folder)."""
    report = load_run(artifact_root, dag_id, run_id)
    runs = recent_runs(artifact_root, dag_id, history) if history else []
    target = path or _join(artifact_root, encode_segment(dag_id), encode_segment(run_id), "report.html")
    fs, fs_path = _fs_and_path(target)
    parent = fs._parent(fs_path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(fs_path, "w", encoding="utf-8") as fh:
        fh.write(render_html(report, runs))
    return target
