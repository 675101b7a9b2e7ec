"""Every Python snippet of docs/taskflow.md and docs/assets.md is run (or is verbatim in a file that is).

A snippet headed ``# from <path>`` must appear verbatim in that file (dags/example_ml_taskflow.py runs
with dag.test() in test_decorator_dag.py; the deployment DAGs run in tests/deployment/test_assets.py).
Any other snippet is imported as a module; ``# raises ConfigError: <message>`` says it must fail so, and
``# at run time, without an event: ArtifactError: <message>`` that its ``score`` task fails so when
rendered with no asset event.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from airflow_remote_ml.core.errors import ArtifactError, ConfigError

REPO = Path(__file__).resolve().parents[2]
DOCS = ("taskflow.md", "assets.md")


def snippets() -> list[tuple[str, int, str]]:
    found = []
    for doc in DOCS:
        text = (REPO / "docs" / doc).read_text(encoding="utf-8")
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.S)):
            found.append((doc, i, block))
    return found


def test_each_page_has_snippets() -> None:
    assert {doc for doc, _, _ in snippets()} == set(DOCS)


def _expected(block: str, marker: str) -> str | None:
    match = re.search(rf"^# {re.escape(marker)} (.*)$", block, flags=re.M)
    return match.group(1).removesuffix("...").rstrip(" ,;") if match else None


class _NoEvents(dict):  # context["inlet_events"][asset] of an Asset that has never had an event
    def __getitem__(self, asset: Any) -> list[Any]:
        return []


@pytest.mark.parametrize(("doc", "index", "block"), snippets(), ids=lambda v: str(v)[:20])
def test_the_snippet_runs_as_documented(doc: str, index: int, block: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, airflow_db: Path) -> None:
    first, _, body = block.partition("\n")
    if first.startswith("# from "):
        source = (REPO / first.removeprefix("# from ").strip()).read_text(encoding="utf-8")
        assert body.strip() in source, f"{doc} snippet {index} is not verbatim in {first}"
        return
    name = f"doc_snippet_{Path(doc).stem}_{index}"
    (tmp_path / f"{name}.py").write_text(block, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    config_error = _expected(block, "raises ConfigError:")
    if config_error is not None:
        with pytest.raises(ConfigError) as error:
            importlib.import_module(name)
        assert str(error.value).startswith(config_error)
        return
    module = importlib.import_module(name)
    artifact_error = _expected(block, "at run time, without an event: ArtifactError:")
    assert artifact_error is not None, f"{doc} snippet {index} documents no outcome"
    with pytest.raises(ArtifactError) as raised:
        module.score.render_template_fields({"inlet_events": _NoEvents()})
    assert str(raised.value).startswith(artifact_error)
