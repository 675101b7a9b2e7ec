"""The one trigger that waits for any backend's job in the triggerer."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TaskSuccessEvent, TriggerEvent

from airflow_remote_ml.core.errors import ConfigError
from airflow_remote_ml.core.poll import PollPolicy
from airflow_remote_ml.core.registry import create_backend
from airflow_remote_ml.core.status import RunHandle
from airflow_remote_ml.core.wait import await_completion, log_records

CLASSPATH = "airflow_remote_ml.triggers.RemoteStepTrigger"


class RemoteStepTrigger(BaseTrigger):
    """Waits for a remote job to end, streaming its logs into the task log, and fires one event.

    Args:
        backend: the backend's registered name.
        backend_config: plain data that rebuilds the backend (``Backend.config_json()``).
        handle: the job's :class:`RunHandle` as JSON.
        deadline: wall-clock time (epoch seconds) after which the job is cancelled as timed out.
        log_cursor: where log streaming resumes (from the worker, or an earlier trigger run).
        poll_policy: overrides the backend's poll policy (JSON of :class:`PollPolicy`).
        secret_refs: the step's secret references (``{"name", "key", "source"}``, never values): their
            values are resolved here only to be masked in every log line the trigger writes.
        checkpoint_uri: where the log cursor is saved for a restarted trigger (see :func:`checkpoint_uri`);
            by default beside the handle's result manifest, when it has one Airflow can write to.
        end_task: on success, end the task here (``TaskSuccessEvent``): no worker slot, no DAG parse, no
            queue. The result is pushed first, as the task runner would push it (see :meth:`_end_task`).
            Failures, and a success whose result cannot be read or pushed, resume on a worker, whose
            error names the reason.
        push_result: push the result as ``return_value`` when the task ends here (``do_xcom_push``).

    The event payload is ``{"status", "handle", "tail", "cursor", "timed_out", "error"}``.

    A trigger that is restarted (the triggerer died, or moved the trigger to another triggerer) resumes
    the log where it stopped: the cursor is saved next to the step's result manifest before each batch of
    lines is written to the task log (trigger kwargs cannot be updated from inside ``run``).
    """

    def __init__(
        self,
        *,
        backend: str,
        backend_config: dict[str, Any],
        handle: dict[str, Any],
        deadline: float | None = None,
        log_cursor: Any = None,
        poll_policy: dict[str, Any] | None = None,
        secret_refs: list[dict[str, Any]] | None = None,
        checkpoint_uri: str | None = None,
        end_task: bool = False,
        push_result: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(backend, str) or not backend:
            raise ConfigError("backend", f"{backend!r} is not a backend name", "pass the backend's name")
        self.backend_name = backend
        self.backend_config = dict(backend_config or {})
        self.handle = RunHandle.from_json(handle)  # fails now, not in the triggerer, on a bad handle
        self.deadline = float(deadline) if deadline is not None else None
        self.log_cursor = log_cursor
        self.poll_policy = PollPolicy.from_json(poll_policy) if poll_policy else None
        self.secret_refs = [dict(ref) for ref in secret_refs or []]
        self.checkpoint_uri = checkpoint_uri
        self.end_task = bool(end_task)
        self.push_result = bool(push_result)
        self.checkpoint = (CursorCheckpoint.at(checkpoint_uri, self.handle.job_id) if checkpoint_uri
                           else CursorCheckpoint.for_handle(self.handle))

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            CLASSPATH,
            {
                "backend": self.backend_name,
                "backend_config": self.backend_config,
                "handle": self.handle.to_json(),
                "deadline": self.deadline,
                "log_cursor": self.log_cursor,
                "poll_policy": self.poll_policy.to_json() if self.poll_policy else None,
                "secret_refs": self.secret_refs,
                "checkpoint_uri": self.checkpoint_uri,
                "end_task": self.end_task,
                "push_result": self.push_result,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        backend = create_backend(self.backend_name, self.backend_config)
        payload: dict[str, Any] = {"handle": self.handle.to_json(), "timed_out": False, "error": None,
                                   "tail": [], "cursor": self.log_cursor, "status": None}
        ended = False
        try:
            await asyncio.to_thread(_mask_secrets, self.secret_refs)
            deadline = None
            if self.deadline is not None:
                deadline = time.monotonic() + (self.deadline - time.time())
            cursor = self.log_cursor
            if self.checkpoint is not None:
                saved = await asyncio.to_thread(self.checkpoint.load)
                if saved is not None:
                    self.log.info("Resuming the log of job %s where an earlier run of this trigger stopped",
                                  self.handle.job_id)
                    cursor = saved
            outcome = await await_completion(
                backend, self.handle, on_lines=self._log_lines,
                deadline=deadline, cursor=cursor, policy=self.poll_policy,
                on_cursor=self.checkpoint.save if self.checkpoint is not None else None,
            )
            status = outcome.status
            if outcome.timed_out:
                self.log.warning("Deadline reached; cancelling remote job %s", self.handle.job_id)
                await backend.acancel(self.handle)
                status = await backend.apoll(self.handle)
            payload.update(status=status.to_json(), tail=outcome.tail, cursor=outcome.cursor,
                           timed_out=outcome.timed_out)
            if self.end_task and status.is_successful and not outcome.timed_out:
                ended = await self._end_task(backend, status)
        except Exception as exc:  # the task must hear about it, not the triggerer's log only
            self.log.exception("Waiting for remote job %s failed", self.handle.job_id)
            payload["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            await backend.aclose()
        yield TaskSuccessEvent() if ended else TriggerEvent(payload)

    async def _end_task(self, backend: Any, status: Any) -> bool:
        """Push a succeeded job's result for its task; False to let the task resume on a worker instead.

        The result goes through the Task SDK's ``XCom.aset``, the way the task runner pushes a return value
        (serde-serialised, stored as JSON through the execution API). It is not handed to
        ``TaskSuccessEvent(xcoms=...)``: Airflow 3.3's handler of that event pushes through
        ``TaskInstance.xcom_push`` -> ``XComModel.set(serialize=True)``, which ``json.dumps`` the value
        into the JSON column, so a task reading it through the execution API (which returns the column
        as it is, airflow/api_fastapi/execution_api/routes/xcoms.py) gets a JSON *string*: a downstream
        step received ``'"/path/to/dataset"'`` (docs/concepts.md). Only a trigger that a triggerer runs for
        a task instance (``self.task_instance``) can do this; ``dag.test()`` runs triggers without one.
        """
        ti = getattr(self, "task_instance", None)
        if ti is None:
            return False
        try:
            result = await asyncio.to_thread(backend.fetch_result, self.handle)
        except Exception as exc:  # e.g. a declared output is missing: the worker raises it with the details
            self.log.info("The job succeeded but its result is not usable here (%s); resuming on a worker", exc)
            return False
        for name, uri in result.outputs.items():
            self.log.info("Output %s: %s", name, uri)
        if result.metrics:
            self.log.info("Metrics: %s", result.metrics)
        if self.push_result:
            try:
                await _push_return_value(ti, result.to_xcom())
            except Exception:
                self.log.warning("Could not push the result of job %s; resuming on a worker", self.handle.job_id,
                                 exc_info=True)
                return False
        for call in (backend.mark_finished, lambda handle: backend.cleanup(handle, status)):
            try:
                await asyncio.to_thread(call, self.handle)
            except Exception:
                self.log.warning("Cleaning up job %s failed", self.handle.job_id, exc_info=True)
        self.log.info("Job %s succeeded; the task ends in the triggerer", self.handle.job_id)
        return True

    def _log_lines(self, lines: list[str]) -> None:
        for message in log_records(lines):  # lines read together are one record (core/wait.py)
            self.log.info("%s", message)

    async def on_kill(self) -> None:
        """A user killed the deferred task (mark failed/success, clear): stop the remote job too."""
        backend = create_backend(self.backend_name, self.backend_config)
        try:
            self.log.info("Task killed by a user; cancelling remote job %s", self.handle.job_id)
            await backend.acancel(self.handle)
        finally:
            await backend.aclose()


def checkpoint_uri(artifacts: Any, identity: Any) -> str:
    """Where a step's trigger saves its log cursor: in the step's own folder of the artifact store, which
    Airflow reads and writes whatever the backend keeps its outputs in (a Valohai datum, a DBFS path)."""
    return artifacts.manifest_uri(identity).rsplit("/", 1)[0] + "/" + CursorCheckpoint.NAME


async def _push_return_value(ti: Any, value: dict[str, Any]) -> None:
    """Store ``value`` as the task instance's ``return_value``, as the task runner's own push does.

    ``XCom`` is the deployment's XCom backend (``resolve_xcom_backend()``), as for a task; its ``aset``
    sends ``SetXCom`` over the trigger runner's comms to the triggerer, which stores it through the
    execution API (``serialize=False``: the value as JSON, exactly as a worker's push).
    """
    from airflow.sdk.execution_time.xcom import XCom

    map_index = getattr(ti, "map_index", -1)
    await XCom.aset(key="return_value", value=value, dag_id=ti.dag_id, task_id=ti.task_id, run_id=ti.run_id,
                    map_index=-1 if map_index is None else map_index)


class CursorCheckpoint:
    """The trigger's log cursor, saved beside the step's result manifest so a restarted trigger resumes.

    Only where Airflow can really write (a local path or a remote file system fsspec speaks); a root
    that fsspec would map onto the local disk under a foreign scheme (``dbfs:/`` without a mount) gets no
    checkpoint rather than a stray local folder. A failed save is logged and never fails the wait.
    """

    NAME = ".trigger-log-cursor.json"

    def __init__(self, uri: str, job_id: str) -> None:
        self.uri = uri
        self.job_id = job_id
        self._broken = False

    @classmethod
    def for_handle(cls, handle: RunHandle) -> CursorCheckpoint | None:
        manifest = handle.data.get("manifest_uri")
        if not isinstance(manifest, str) or "/" not in manifest:
            return None
        return cls.at(manifest.rsplit("/", 1)[0] + "/" + cls.NAME, handle.job_id)

    @classmethod
    def at(cls, uri: str, job_id: str) -> CursorCheckpoint | None:
        """A checkpoint at ``uri``, or None where Airflow cannot really write (see the class doc)."""
        from fsspec.core import split_protocol
        from fsspec.registry import known_implementations

        protocol, _ = split_protocol(uri)
        if protocol is None:
            if not uri.startswith("/"):
                return None
        elif protocol in ("dbfs", "datum") or protocol not in known_implementations:
            return None
        return cls(uri, job_id)

    def load(self) -> Any:
        try:
            import fsspec

            with fsspec.open(self.uri, "r") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return None
        except Exception as exc:
            _log.warning("Could not read the log checkpoint %s: %s", self.uri, exc)
            return None
        if not isinstance(data, dict) or data.get("job_id") != self.job_id:
            return None  # an earlier generation's job: its cursor means nothing for this one
        return data.get("cursor")

    def save(self, cursor: Any) -> None:
        if self._broken:
            return
        try:
            import fsspec

            payload = json.dumps({"job_id": self.job_id, "cursor": cursor})
            with fsspec.open(self.uri, "w") as fh:
                fh.write(payload)
        except Exception as exc:
            self._broken = True
            _log.warning("Could not save the log checkpoint %s (a restarted trigger will repeat log lines): %s",
                         self.uri, exc)


_log = logging.getLogger(__name__)


def _mask_secrets(refs: list[dict[str, Any]]) -> None:
    """Register the values of the step's secrets with Airflow's masker in this (the triggerer's) process."""
    if not refs:
        return
    from airflow_remote_ml.core.spec import SecretRef
    from airflow_remote_ml.hooks import resolve_secret

    for ref in refs:
        try:
            resolve_secret(SecretRef(ref["name"], ref.get("key")), source=ref.get("source") or "airflow")
        except Exception as exc:  # masking is a courtesy here; the step already has its secrets
            _log.warning("Could not resolve secret %s to mask it in the trigger's log: %s", ref.get("name"), exc)
