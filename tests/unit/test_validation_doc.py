"""The tables of what is checked where (docs/validation.md in full, docs/concepts.md in short) are true.

The tables are the user's map of what is checked where; this test keeps them from drifting from the
code. Every row's "proved by" test must exist. Every ``parse`` row's example, evaluated as the
operator's keyword arguments, must raise a ConfigError for exactly the documented field both at parse
time (validate_operator_arguments) and at render time (build_operator_spec); every ``render`` row's
example is what a template rendered to, and must fail the same way at render time. Each row of the short
table in concepts.md is also a row of the full one, so the two cannot disagree.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from airflow_remote_ml.core import ConfigError
from airflow_remote_ml.core.validation import build_operator_spec, check_backend_name, validate_operator_arguments

ROOT = Path(__file__).resolve().parents[2]
FULL = ROOT / "docs" / "validation.md"
SHORT = ROOT / "docs" / "concepts.md"
STAGES = {"parse", "render", "before submit", "remote"}
SPEC_ARGUMENTS = {"image", "command", "callable", "shell", "parameters", "env", "secrets", "inputs", "outputs",
                  "compute", "timeout", "backend_options"}
BASE = {"command": ["python", "train.py"]}


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def rows(doc: Path) -> list[dict[str, str]]:
    lines = doc.read_text(encoding="utf-8").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| field | example |"))
    names = [cell.strip() for cell in lines[header].strip("|").split("|")]
    table = []
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        # Split on the column bars only: a '|' inside backticks would be part of an example.
        cells = [cell.strip() for cell in re.split(r"\s\|\s", line.strip().strip("|").strip())]
        assert len(cells) == len(names), line
        table.append(dict(zip(names, cells, strict=True)))
    return table


def unquote(cell: str) -> str:
    return cell[1:-1] if cell.startswith("`") and cell.endswith("`") else cell


ROWS = [(doc.name, row) for doc in (FULL, SHORT) for row in rows(doc)]
EVALUATED = [(name, row) for name, row in ROWS if row["stage"] in ("parse", "render")]


def ids(items: list[tuple[str, dict[str, str]]]) -> list[str]:
    return [f"{name}: {row['field']} {row['example']}" for name, row in items]


@pytest.mark.parametrize("doc", [FULL, SHORT], ids=lambda d: d.name)
def test_the_table_is_there_and_covers_every_stage(doc):
    table = rows(doc)
    assert {row["stage"] for row in table} == STAGES
    if doc == FULL:
        assert sum(row["stage"] == "parse" for row in table) >= 30


def test_the_short_table_is_a_part_of_the_full_one():
    full = rows(FULL)
    for row in rows(SHORT):
        assert row in full, f"docs/concepts.md row not in docs/validation.md: {row}"


@pytest.mark.parametrize(("doc", "row"), ROWS, ids=ids(ROWS))
def test_each_row_names_a_test_that_exists(doc, row):
    assert row["stage"] in STAGES, row
    path, _, name = unquote(row["proved by"]).partition("::")
    source = (ROOT / path).read_text(encoding="utf-8")
    assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"{path} has no test {name}"


def matches(field: str, documented: str) -> bool:
    return field.startswith(documented[:-1]) if documented.endswith("*") else field == documented


@pytest.mark.parametrize(("doc", "row"), EVALUATED, ids=ids(EVALUATED))
def test_each_parse_and_render_row_fails_as_documented(doc, row):
    documented = unquote(row["field"])
    # The examples are this repository's own text, written as keyword arguments.
    kwargs = eval(f"dict({unquote(row['example'])})", {"nested": nested, "timedelta": timedelta})
    if row["stage"] == "parse":
        with pytest.raises(ConfigError) as parse_time:
            validate_operator_arguments(kwargs, is_templated=lambda _value: False)
        assert matches(parse_time.value.field, documented), parse_time.value
    # Render time: the same value, arriving through a template, fails the same way.
    spec_kwargs = {k: v for k, v in kwargs.items() if k in SPEC_ARGUMENTS}
    if spec_kwargs:
        with pytest.raises(ConfigError) as render_time:
            build_operator_spec({**BASE, **spec_kwargs})
        assert matches(render_time.value.field, documented), render_time.value
    if "backend" in kwargs:
        with pytest.raises(ConfigError) as render_time:
            check_backend_name(kwargs["backend"], ["docker", "kubernetes", "local"])
        assert matches(render_time.value.field, documented), render_time.value
    assert spec_kwargs or "backend" in kwargs or row["stage"] == "parse", "a render row must be checkable"
