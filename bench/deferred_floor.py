"""Airflow's own floor for bench/bench_deferred.py: the least a trigger-ended deferred task can cost.

``FloorOperator`` starts the bench's step (the same shell lines as ours) as a bare process and defers to
``FloorTrigger``, which waits on the process's pidfd in the triggerer's event loop, pushes one small
``return_value`` through the Task SDK's ``XCom.aset`` (as our trigger pushes the step's result) and ends the
task with ``TaskSuccessEvent``. No runtime, no manifest, no backend: what it measures is the triggerer's
and the metadata database's work per ending task, which no provider can go below on Airflow 3.3
(airflow/jobs/triggerer_job_runner.py serves each trigger's ``SetXCom`` and then each event's
``Trigger.submit_event`` one after another in its supervisor loop).

It lives outside bench/dags/ because the triggerer imports a trigger by its classpath, and the
deployment's processes have the repository (not the DAG bundle) on ``sys.path``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from typing import Any

from airflow.sdk import BaseOperator
from airflow.triggers.base import BaseTrigger, TaskSuccessEvent, TriggerEvent

CLASSPATH = "bench.deferred_floor.FloorTrigger"


class FloorTrigger(BaseTrigger):
    def __init__(self, pid: int, push: bool = True) -> None:
        super().__init__()
        self.pid = int(pid)
        self.push = bool(push)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return CLASSPATH, {"pid": self.pid, "push": self.push}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            fd = -1  # already gone
        if fd >= 0:
            loop = asyncio.get_running_loop()
            exited = loop.create_future()
            loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
            try:
                await exited
            finally:
                loop.remove_reader(fd)
                os.close(fd)
        ti = getattr(self, "task_instance", None)
        if self.push and ti is not None:
            from airflow.sdk.execution_time.xcom import XCom

            map_index = getattr(ti, "map_index", -1)
            await XCom.aset(key="return_value", value={"pid": self.pid}, dag_id=ti.dag_id, task_id=ti.task_id,
                            run_id=ti.run_id, map_index=-1 if map_index is None else map_index)
        yield TaskSuccessEvent()


class FloorOperator(BaseOperator):
    """Run ``command`` with ``sh -c`` as a bare process and defer until it exits."""

    template_fields = ("env",)

    def __init__(self, *, command: str, env: dict[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.command = command
        self.env = env

    def execute(self, context: Any) -> None:
        # Its own session and no handle on the task's stdout/stderr: the task process ends at defer() (the
        # supervisor waits for those pipes to close), the step goes on, reparented and reaped by init.
        proc = subprocess.Popen(["sh", "-c", self.command], env={**os.environ, **self.env},
                                start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        self.defer(trigger=FloorTrigger(proc.pid), method_name="execute_complete")

    def execute_complete(self, context: Any, event: Any = None) -> None:  # never reached: the trigger ends it
        raise RuntimeError("the floor task resumed on a worker")
