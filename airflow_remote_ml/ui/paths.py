"""Where the "Remote ML" view lives: light enough for a worker to build links to it (no FastAPI import)."""

from __future__ import annotations

from urllib.parse import quote

URL_PREFIX = "/remote-ml"


def run_path(dag_id: str, run_id: str) -> str:
    """The view of one DAG run, relative to the api-server's base URL."""
    return f"{URL_PREFIX}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def run_url(dag_id: str, run_id: str) -> str:
    """The view's absolute URL when ``[api] base_url`` is set (as a deployment sets it), else the path."""
    from airflow.configuration import conf

    base = (conf.get("api", "base_url", fallback="") or "").rstrip("/")
    return base + run_path(dag_id, run_id)
