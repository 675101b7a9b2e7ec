"""The extra link from a task to its remote job's page (Databricks run, Valohai execution, ...)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

from airflow_remote_ml.ui.paths import run_url

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

#: The one XCom row of the job's page: the key under which Airflow itself stores this link
#: (``BaseOperatorLink.xcom_key``, ``_link_<class name>``). The task runner pushes ``get_link()`` under
#: it when a task ends on a worker (airflow/sdk/execution_time/task_runner.py ``finalize``) and the API
#: server reads the link from it (airflow/serialization/definitions/operatorlink.py ``XComOperatorLink``).
#: The operator pushes the URL there as soon as the job is submitted, so the link works while the job
#: runs, and a task that ends in the triggerer (no ``finalize``) keeps it.
XCOM_JOB_URL_KEY = "_link_RemoteJobLink"


class RemoteJobLink(BaseOperatorLink):
    """Points at the remote job of the task's latest try, when its backend has a page for it."""

    name = "Remote job"

    @property
    def xcom_key(self) -> str:
        # Fixed, not derived from the class name: a subclass reads the row the operator writes.
        return XCOM_JOB_URL_KEY

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        # A backend without a page of its own (local, docker): the run's "Remote ML" view (airflow_remote_ml.ui).
        return XCom.get_value(key=XCOM_JOB_URL_KEY, ti_key=ti_key) or run_url(ti_key.dag_id, ti_key.run_id)
