"""docs/validation.md's table of checks is true: each parse-time example fails as documented.

The table is the user's map of what is checked where; this test keeps it from drifting from the
code. Every row's "proved by" test must exist; every ``parse`` row's example, evaluated as the
operator's keyword arguments, must raise a ConfigError for exactly the documented field both at
parse time (validate_operator_arguments) and at render time (build_operator_spec).
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
DOC = ROOT / "docs" / "validation.md"
SPEC_ARGUMENTS = {"image", "command", "callable", "shell", "parameters", "env", "secrets", "inputs", "outputs",
                  "compute", "timeout", "backend_options"}
BASE = {"command": ["python", "train.py"]}


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def rows() -> list[dict[str, str]]:
    lines = DOC.read_text(encoding="utf-8").splitlines()
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


ROWS = rows()
PARSE_ROWS = [row for row in ROWS if row["stage"] == "parse"]


def test_the_table_is_there_and_covers_every_stage():
    assert len(PARSE_ROWS) >= 30
    assert {row["stage"] for row in ROWS} == {"parse", "before submit", "remote"}


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['field']} {r['example']}" for r in ROWS])
def test_each_row_names_a_test_that_exists(row):
    path, _, name = unquote(row["proved by"]).partition("::")
    source = (ROOT / path).read_text(encoding="utf-8")
    assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"{path} has no test {name}"


def matches(field: str, documented: str) -> bool:
    return field.startswith(documented[:-1]) if documented.endswith("*") else field == documented


@pytest.mark.parametrize("row", PARSE_ROWS, ids=[r["example"] for r in PARSE_ROWS])
def test_each_parse_row_fails_as_documented(row):
    documented = unquote(row["field"])
    # The examples are this repository's own text, written as keyword arguments.
    kwargs = eval(f"dict({unquote(row['example'])})", {"nested": nested, "timedelta": timedelta})
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
