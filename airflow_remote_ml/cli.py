"""``airflow remote-ml jobs list|cancel|gc``: the jobs this provider started, on every configured backend.

Registered through the provider's ``cli`` entry (``get_provider_info()["cli"]``), which Airflow 3.3's
``ProvidersManager`` imports and its CLI parser adds as command groups (as the Celery and Kubernetes
providers do). The commands run where ``airflow`` runs, with the metadata database: a job whose task
instance no longer runs it is an *orphan* (its worker was killed, the task was marked failed by hand).

Backends inspected: ``--backend NAME`` (with ``--config JSON`` merged over the deployment's settings), or
every backend that ``[remote_ml] backend_config`` configures plus ``[remote_ml] default_backend``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from airflow.cli.cli_config import ARG_OUTPUT, ActionCommand, Arg, GroupCommand, lazy_load_command

if TYPE_CHECKING:
    import argparse

    from airflow_remote_ml.core.backend import Backend
    from airflow_remote_ml.core.jobs import JobInfo

#: Task-instance states in which a task owns its job or is about to reattach to it (a retry finds the job by
#: its identity): a job of such a task is no orphan. Airflow's TaskInstanceState values.
LIVE_TASK_STATES = frozenset({"running", "deferred", "queued", "scheduled", "up_for_retry", "up_for_reschedule",
                              "restarting"})

ARG_BACKEND = Arg(("--backend",), help="Only this backend (default: every configured backend).")
ARG_CONFIG = Arg(("--config",), help="JSON settings of --backend, merged over the deployment's.")
ARG_DAG_ID_OPT = Arg(("--dag-id",), help="Only jobs of this DAG.")
ARG_ORPHANS = Arg(("--orphans",), action="store_true",
                  help="Only jobs whose task instance does not run them (no task instance, or one that ended).")
ARG_OLDER_THAN = Arg(("--older-than",), help="Only jobs that ended (or, when running, started) longer ago, "
                     "e.g. 7d, 12h, 30m; for gc it replaces the backends' retention policy.")
ARG_DRY_RUN = Arg(("--dry-run",), action="store_true", help="Say what would be done, change nothing.")
ARG_JOB_IDS = Arg(("job_ids",), nargs="*", metavar="JOB_ID", help="Jobs to cancel (as `jobs list` shows them).")

_COMMON = (ARG_BACKEND, ARG_CONFIG, ARG_DAG_ID_OPT, ARG_ORPHANS, ARG_OLDER_THAN, ARG_OUTPUT)

JOBS_COMMANDS = (
    ActionCommand(
        name="list",
        help="List the remote jobs this provider started, with the state of their task instances",
        func=lazy_load_command("airflow_remote_ml.cli.jobs_list"),
        args=_COMMON,
    ),
    ActionCommand(
        name="cancel",
        help="Cancel remote jobs: those named, or with --orphans every job no task instance runs",
        func=lazy_load_command("airflow_remote_ml.cli.jobs_cancel"),
        args=(ARG_JOB_IDS, *_COMMON, ARG_DRY_RUN),
    ),
    ActionCommand(
        name="gc",
        help="Remove finished jobs (job directories, kept containers and pods) by the retention policy",
        func=lazy_load_command("airflow_remote_ml.cli.jobs_gc"),
        args=(*_COMMON, ARG_DRY_RUN),
    ),
)


def get_cli_commands() -> list[GroupCommand]:
    """The provider's command groups (``get_provider_info()["cli"]`` points here)."""
    return [
        GroupCommand(
            name="remote-ml",
            help="Remote ML provider: inspect and clean up remote jobs",
            subcommands=(GroupCommand(name="jobs", help="List, cancel and clean up remote jobs",
                                      subcommands=JOBS_COMMANDS),),
        )
    ]


# -- which backends ----------------------------------------------------------------------------------------


def configured_backends(backend: str | None, config: str | None) -> list[tuple[str, dict[str, Any]]]:
    """``(name, settings)`` of the backends to inspect."""
    from airflow_remote_ml import hooks
    from airflow_remote_ml.core.errors import ConfigError
    from airflow_remote_ml.core.registry import available_backends
    from airflow_remote_ml.operators import merge_backend_config

    if config is not None and backend is None:
        raise ConfigError("--config", "needs --backend", "name the backend the settings are for")
    if backend is not None:
        extra: Any = {}
        if config:
            try:
                extra = json.loads(config)
            except ValueError as exc:
                raise ConfigError("--config", f"is not JSON: {exc}", 'use e.g. \'{"state_dir": "/srv/jobs"}\'') \
                    from None
            if not isinstance(extra, Mapping):
                raise ConfigError("--config", "must be a JSON object", 'use e.g. \'{"namespace": "ml"}\'')
        return [(backend, merge_backend_config(backend, hooks.deployment_backend_config(backend), dict(extra)))]
    names = [hooks.default_backend()]
    names += [n for n in available_backends() if n not in names and hooks.deployment_backend_config(n)]
    return [(n, hooks.deployment_backend_config(n)) for n in names]


def _backends(args: argparse.Namespace) -> Iterable[Backend]:
    from airflow_remote_ml.core.errors import BackendUnavailableError
    from airflow_remote_ml.core.jobs import JobAdmin
    from airflow_remote_ml.core.registry import create_backend

    for name, settings in configured_backends(args.backend, args.config):
        try:
            backend = create_backend(name, settings)
        except BackendUnavailableError as exc:
            _note(f"{name}: skipped: {exc}")
            continue
        if not isinstance(backend, JobAdmin):
            _note(f"{name}: skipped: this backend cannot list its jobs")
            backend.close()
            continue
        yield backend


def _note(text: str) -> None:
    print(text, file=sys.stderr)


# -- task instances ----------------------------------------------------------------------------------------


def task_states(jobs: Iterable[JobInfo]) -> dict[tuple[str, str, str, int], dict[str, Any]]:
    """The task instance of each job's identity: its state, host and pid, from the metadata database."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    keys = {(j.identity.dag_id, j.identity.task_id, j.identity.run_id, j.identity.map_index)
            for j in jobs if j.identity is not None}
    found: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    if not keys:
        return found
    with create_session() as session:
        dag_ids = {k[0] for k in keys}
        rows = session.execute(
            select(TaskInstance.dag_id, TaskInstance.task_id, TaskInstance.run_id, TaskInstance.map_index,
                   TaskInstance.state, TaskInstance.hostname, TaskInstance.pid)
            .where(TaskInstance.dag_id.in_(dag_ids), TaskInstance.run_id.in_({k[2] for k in keys}))
        ).all()
    for dag_id, task_id, run_id, map_index, state, hostname, pid in rows:
        key = (dag_id, task_id, run_id, map_index)
        if key in keys:
            found[key] = {"state": str(state.value if hasattr(state, "value") else state) if state else None,
                          "hostname": hostname, "pid": pid}
    return found


def orphan_reason(job: JobInfo, ti: Mapping[str, Any] | None, this_host: str) -> str | None:
    """Why no task instance runs ``job`` (``None``: one does, or may still reattach to it)."""
    if job.identity is None:
        return None  # whose it is cannot be told: never called an orphan on a guess
    if ti is None:
        return "no task instance"
    state = ti.get("state")
    if state not in LIVE_TASK_STATES:
        return f"task instance is {state or 'none'}"
    pid = ti.get("pid")
    if state == "running" and pid and ti.get("hostname") == this_host and not _alive(int(pid)):
        # The task's process is gone from this very host: the scheduler will find it without heartbeat and
        # fail it; until then it runs nothing.
        return f"task process {pid} on {this_host} is gone"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclasses.dataclass
class Row:
    job: JobInfo
    task_state: str | None
    orphan: str | None

    def to_json(self) -> dict[str, Any]:
        j = self.job
        ident = j.identity
        return {
            "backend": j.backend,
            "job_id": j.job_id,
            "state": j.state,
            "dag_id": j.dag_id,
            "task_id": j.task_id,
            "run_id": ident.run_id if ident else None,
            "map_index": ident.map_index if ident else None,
            "task_state": self.task_state,
            "orphan": self.orphan or "",
            "created": _iso(j.created),
            "finished": _iso(j.finished),
            "where": j.where,
            "url": j.url or "",
        }


def _iso(value: float | None) -> str:
    if value is None:
        return ""
    import datetime as dt

    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rows_for(backend: Backend, args: argparse.Namespace, now: float) -> list[Row]:
    """The jobs of one backend that pass the filters, with their task instances' states."""
    from airflow.utils.net import get_hostname

    from airflow_remote_ml.core.jobs import parse_duration

    jobs = backend.list_jobs(args.dag_id)  # type: ignore[attr-defined]
    if args.older_than is not None:
        age = parse_duration(args.older_than, "--older-than")
        jobs = [j for j in jobs if (j.finished if not j.running else j.created) is not None
                and now - (j.finished if not j.running else j.created) > age]
    tis = task_states(jobs)
    host = get_hostname()
    rows = []
    for job in jobs:
        ident = job.identity
        ti = tis.get((ident.dag_id, ident.task_id, ident.run_id, ident.map_index)) if ident else None
        reason = orphan_reason(job, ti, host)
        if args.orphans and reason is None:
            continue
        rows.append(Row(job, ti.get("state") if ti else None, reason))
    return rows


def _each_backend(args: argparse.Namespace, act: Any) -> None:
    """Run ``act(backend, rows)`` per backend; one backend's failure is reported and the others still run."""
    from airflow_remote_ml.core import jobs as core_jobs
    from airflow_remote_ml.core.errors import RemoteMLError

    if args.older_than is not None:  # a bad value is the user's, not a backend's failure: refuse it first
        core_jobs.parse_duration(args.older_than, "--older-than")
    failed = []
    for backend in _backends(args):
        try:
            act(backend, rows_for(backend, args, core_jobs.clock()))
        except Exception as exc:  # one unreachable backend must not hide the others' jobs
            failed.append(backend.name)
            _note(f"{backend.name}: {exc if isinstance(exc, RemoteMLError) else f'{type(exc).__name__}: {exc}'}")
        finally:
            backend.close()
    if failed:
        raise SystemExit(f"failed on: {', '.join(failed)}")


def _print(rows: list[dict[str, Any]], output: str) -> None:
    from airflow.cli.simple_table import AirflowConsole

    if output in ("table", "plain"):  # the long columns stay in json/yaml, so a table fits a terminal
        rows = [{k: v for k, v in row.items() if k not in ("where", "url")} for row in rows]
    AirflowConsole().print_as(data=rows, output=output)


# -- the commands ------------------------------------------------------------------------------------------


def _config_errors(func: Any) -> Any:
    """A ConfigError (bad --config, --older-than, deployment settings) ends the command with its message."""
    import functools

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> None:
        from airflow_remote_ml.core.errors import ConfigError

        try:
            func(args)
        except ConfigError as exc:
            raise SystemExit(f"error: {exc}") from None

    return wrapper


@_config_errors
def jobs_list(args: argparse.Namespace) -> None:
    out: list[dict[str, Any]] = []
    _each_backend(args, lambda backend, rows: out.extend(r.to_json() for r in rows))
    _print(out, args.output)


@_config_errors
def jobs_cancel(args: argparse.Namespace) -> None:
    from airflow_remote_ml.core.errors import ConfigError

    wanted = set(args.job_ids or [])
    if not wanted and not args.orphans:
        raise ConfigError("JOB_ID", "no job named", "name jobs to cancel, or pass --orphans to cancel every orphan")
    out: list[dict[str, Any]] = []

    def act(backend: Backend, rows: list[Row]) -> None:
        for row in rows:
            job = row.job
            if not job.running or (wanted and job.job_id not in wanted) or job.handle is None:
                continue
            result = "would cancel"
            if not args.dry_run:
                backend.cancel(job.handle)
                status = backend.poll(job.handle)
                result = f"cancelled ({status.state.value})"
                if row.orphan and status.is_terminal:
                    # No task will come back for it: record that Airflow is done, so retention may retire it.
                    backend.mark_finished(job.handle)
            wanted.discard(job.job_id)
            out.append({**row.to_json(), "result": result})

    _each_backend(args, act)
    _print(out, args.output)
    if wanted:
        raise SystemExit(f"no running job {', '.join(sorted(wanted))} found")


@_config_errors
def jobs_gc(args: argparse.Namespace) -> None:
    from airflow_remote_ml.core import jobs as core_jobs

    out: list[dict[str, Any]] = []

    def act(backend: Backend, rows: list[Row]) -> None:
        if args.older_than is not None:
            # The filter already kept only jobs that ended longer ago: every such finished job goes.
            retention = core_jobs.Retention(max_age=0.0, max_count=None)
        else:
            retention = core_jobs.retention_of(backend.config, backend.name)
        jobs = []
        for row in rows:
            job = row.job
            if row.orphan is not None and not job.running:
                # Ended, and no task instance will read it again: as good as marked finished.
                job = dataclasses.replace(job, marked_finished=True)
            jobs.append(job)
        chosen = retention.select(jobs, core_jobs.clock())
        by_id = {r.job.job_id: r for r in rows}
        for job in chosen:
            result = "would remove"
            if not args.dry_run:
                backend.remove_job(job)  # type: ignore[attr-defined]
                result = "removed"
            out.append({**by_id[job.job_id].to_json(), "result": result})
        kept = [j for j in jobs if not j.running and not j.removable]
        if kept:
            _note(f"{backend.name}: {len(kept)} finished job(s) keep nothing to remove (the platform's run history)")

    _each_backend(args, act)
    _print(out, args.output)
