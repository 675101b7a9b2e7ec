"""What `airflow plugins` and `airflow providers get` tell an operator about this provider, as they print it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def _airflow_json(*args: str) -> Any:
    run = subprocess.run([sys.executable, "-m", "airflow", *args, "-o", "json"], capture_output=True, text=True,
                         env=os.environ.copy(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout[run.stdout.index("["):])


def test_airflow_plugins_lists_the_remote_ml_view_from_the_installed_package() -> None:
    plugins = {p["name"]: p for p in _airflow_json("plugins")}
    plugin = plugins["remote_ml"]
    assert "airflow-remote-ml" in plugin["source"]  # the installed distribution's airflow.plugins entry point
    assert plugin["external_views"] == [{"name": "Remote ML", "href": "remote-ml/dags/{DAG_ID}/runs/{RUN_ID}",
                                         "destination": "dag_run", "url_route": "remote-ml"}]


def test_airflow_providers_get_names_the_plugin() -> None:
    (info,) = _airflow_json("providers", "get", "airflow-remote-ml", "--full")
    assert {"name": "remote_ml", "plugin-class": "airflow_remote_ml.ui.plugin.RemoteMLPlugin"} in info["plugins"]
