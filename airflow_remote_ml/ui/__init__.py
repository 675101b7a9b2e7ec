"""The "Remote ML" view in the Airflow UI: a FastAPI app the api-server mounts, and the plugin that registers it.

``app`` serves one DAG run's steps (backend, state, duration, remote-job link, metrics, version record,
lineage) and its metric plots, read from the version records the steps wrote and the tasks' XComs
(:mod:`airflow_remote_ml.core.report` renders them). ``plugin`` makes it a tab of every DAG run.
"""
