"""docs/deployment.md shows what the deployment tests run: the same settings, the same commands."""

from __future__ import annotations

import re
from pathlib import Path

from tests.deployment.harness import COMPONENTS, REPO, settings

DOC = REPO / "docs" / "deployment.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_documented_settings_are_the_harness_settings() -> None:
    """Every ``export`` of the settings block is one of the harness's settings, with the same value."""
    block = next(b for b in _blocks("bash") if "export AIRFLOW_HOME=" in b)
    documented = dict(re.findall(r"^export (\w+)=(.*)$", block, flags=re.M))
    # The page's paths and ports in place of the tests' temporary ones; the secret as the shell variable.
    expected = settings(Path("/srv/airflow"), Path("/srv/airflow/dags"),
                        "postgresql+psycopg2://remote_ml:rml-pg-7c41@127.0.0.1:5433/airflow_remote_ml", 8080,
                        "$AIRFLOW_SECRET", (8793, 8794))
    assert documented == expected
    assert "secrets.token_urlsafe(32)" in block  # what the harness generates the secret with


def test_the_documented_commands_are_the_ones_the_harness_starts() -> None:
    block = next(b for b in _blocks("bash") if "airflow db migrate" in b)
    commands = [line.strip() for line in block.splitlines() if line.strip()]
    assert commands == ["airflow db migrate", *(" ".join(argv) for argv in COMPONENTS.values())]


def test_the_documented_postgres_setup_is_the_script() -> None:
    script = (REPO / ".ci" / "postgres.sh").read_text()
    assert "CREATE ROLE $PG_USER LOGIN PASSWORD '$PG_PASSWORD'" in script
    assert "CREATE DATABASE $DATABASE OWNER $PG_USER" in script
    sql = _blocks("sql")[0]
    assert "CREATE ROLE remote_ml LOGIN PASSWORD 'rml-pg-7c41';" in sql
    assert "CREATE DATABASE airflow_remote_ml OWNER remote_ml;" in sql
