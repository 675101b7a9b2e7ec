"""The extra link from a task to its remote job's page (Databricks run, Valohai execution, ...)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

XCOM_JOB_URL_KEY = "remote_job_url"


class RemoteJobLink(BaseOperatorLink):
    """Points at the remote job of the task's latest try, when its backend has a page for it."""

    name = "Remote job"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        return XCom.get_value(key=XCOM_JOB_URL_KEY, ti_key=ti_key) or ""
