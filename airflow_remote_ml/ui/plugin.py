"""The Airflow plugin that mounts the "Remote ML" app and shows it as a tab of every DAG run.

Registered through the provider's ``plugins`` (``get_provider_info``), so installing the package is all
it takes; ``airflow plugins`` lists it.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_remote_ml.ui.app import app
from airflow_remote_ml.ui.paths import URL_PREFIX


class RemoteMLPlugin(AirflowPlugin):
    name = "remote_ml"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "Remote ML"}]
    # A tab on the DAG run page; the UI fills {DAG_ID}/{RUN_ID} and frames the page (url_route). The href
    # is relative (no leading slash), so it works under a base URL with a path, as Airflow's docs require.
    external_views = [{
        "name": "Remote ML",
        "href": URL_PREFIX.lstrip("/") + "/dags/{DAG_ID}/runs/{RUN_ID}",
        "destination": "dag_run",
        "url_route": "remote-ml",
    }]
