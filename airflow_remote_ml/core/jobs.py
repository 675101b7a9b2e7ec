"""What a backend left behind: listing its jobs by identity, removing them, and the retention policy.

An optional part of the backend interface (:class:`JobAdmin`): ``list_jobs`` answers every job this
provider started on the backend, read from the identity each backend stamps on its jobs (labels, tags,
names, job directories), and ``remove_job`` deletes what a finished job keeps (a job directory, a kept
container or pod). The Airflow CLI (``airflow remote-ml jobs``) and the retention applied as each job
finishes (:func:`retire`) are built on these two calls alone. Never imports Airflow.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from airflow_remote_ml.core.artifacts import MANIFEST_NAME, decode_segment
from airflow_remote_ml.core.errors import ConfigError
from airflow_remote_ml.core.identity import StepIdentity
from airflow_remote_ml.core.status import RunHandle

log = logging.getLogger(__name__)

#: The most jobs one finishing step removes. Retention runs inside the task that just finished; a backlog
#: (429 job directories after an afternoon) is worked off a batch per finish, or at once by ``jobs gc``.
RETIRE_BATCH = 20
#: A finishing job sweeps for retention at most once per this many seconds per backend location and process
#: (:func:`retire_on_finish`): a burst of finishes, e.g. 200 mapped steps ending together in one triggerer,
#: pays for one listing of the jobs, not 200 (each listed every job directory while holding the GIL that the
#: triggerer's event loop needs: bench/bench_deferred.py).
SWEEP_INTERVAL = 30.0

JobState = Literal["running", "terminal"]


def clock() -> float:
    """Seconds since the epoch: what retention measures ages against (tests replace it)."""
    return time.time()


@dataclass(frozen=True)
class JobInfo:
    """One job this provider started, as its backend reports it.

    Attributes:
        backend: the backend's name.
        job_id: the backend's id of the job (the one ``RunHandle.job_id`` carries).
        identity: the step the job belongs to, rebuilt from what the backend stamped on it; ``None`` when
            the stamp cannot be read back whole (then ``dag_id``/``task_id`` may still say whose it is).
        state: ``running`` (queued or running: it still costs something) or ``terminal``.
        remote_state: the backend's own word for the state.
        created, finished: seconds since the epoch, when known.
        marked_finished: Airflow recorded that it is done with the job (``Backend.mark_finished``): no task
            will reattach to it or read it again. Only such jobs are retired as other jobs finish.
        url: the job's page, when the backend has one.
        handle: what ``Backend.cancel`` needs; ``None`` when the job cannot be cancelled from here.
        removable: whether ``remove_job`` deletes something (a job directory, a container, a pod).
        where: a human-readable location (a directory, ``namespace/pod``).
    """

    backend: str
    job_id: str
    identity: StepIdentity | None
    state: JobState
    remote_state: str = ""
    created: float | None = None
    finished: float | None = None
    marked_finished: bool = False
    url: str | None = None
    handle: RunHandle | None = None
    removable: bool = True
    where: str = ""
    dag_id: str | None = None
    task_id: str | None = None

    def __post_init__(self) -> None:
        if self.identity is not None:
            object.__setattr__(self, "dag_id", self.identity.dag_id)
            object.__setattr__(self, "task_id", self.identity.task_id)

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def ended_at(self) -> float | None:
        """When the job ended, else when it was created (a terminal job ended no earlier than that)."""
        return self.finished if self.finished is not None else self.created

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "job_id": self.job_id,
            "identity": self.identity.to_json() if self.identity else None,
            "dag_id": self.dag_id,
            "task_id": self.task_id,
            "state": self.state,
            "remote_state": self.remote_state,
            "created": self.created,
            "finished": self.finished,
            "marked_finished": self.marked_finished,
            "url": self.url,
            "removable": self.removable,
            "where": self.where,
        }


@runtime_checkable
class JobAdmin(Protocol):
    """The optional part of a backend that lists and removes its jobs (see :mod:`.jobs`)."""

    @property
    def name(self) -> str: ...

    def list_jobs(self, dag_id: str | None = None) -> list[JobInfo]:
        """Every job of this provider on the backend (of ``dag_id`` only, when given), newest first."""
        ...

    def remove_job(self, job: JobInfo) -> None:
        """Delete what a terminal job keeps. Idempotent: a job already gone is not an error."""
        ...


# -- retention -------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(value: Any, field: str) -> float:
    """Seconds from ``"7d"``, ``"12h"``, ``"30m"``, ``"45s"``, ``"2w"`` or a plain number of seconds."""
    fix = "use e.g. '7d', '12h', '30m' or a number of seconds"
    if isinstance(value, bool):
        raise ConfigError(field, f"{value!r} is not a duration", fix)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value.lower())):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ConfigError(field, f"{value!r} is not a duration", fix)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(field, f"{value!r} is not a duration of zero or more", fix)
    return seconds


@dataclass(frozen=True)
class Retention:
    """How long finished jobs are kept: at most ``max_age`` seconds after they ended, and at most the
    ``max_count`` newest of them. ``None`` means no limit of that kind. Running jobs are never retired."""

    max_age: float | None = 7 * 86400.0
    max_count: int | None = 100

    @classmethod
    def from_config(cls, value: Any, backend: str) -> Retention:
        """From a backend's ``retention`` setting: ``{"max_age": "7d", "max_count": 100}`` (a key left out keeps
        its default, ``null`` lifts that limit), or ``false`` to keep everything."""
        prefix = f"backend_config[{backend}].retention"
        default = cls()
        if value is None:
            return default
        if value is False:
            return cls(None, None)
        if not isinstance(value, Mapping):
            raise ConfigError(prefix, f"must be a mapping or false, not {type(value).__name__}",
                              'use e.g. {"max_age": "7d", "max_count": 100}, or false to keep every job')
        unknown = sorted(set(value) - {"max_age", "max_count"})
        if unknown:
            raise ConfigError(f"{prefix}.{unknown[0]}", "is not a retention setting", "use max_age and max_count")
        max_age = default.max_age
        if "max_age" in value:
            max_age = None if value["max_age"] is None else parse_duration(value["max_age"], f"{prefix}.max_age")
        max_count = default.max_count
        if "max_count" in value:
            count = value["max_count"]
            if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
                raise ConfigError(f"{prefix}.max_count", f"{count!r} is not a whole number of zero or more",
                                  "use e.g. 100, or null for no limit")
            max_count = count
        return cls(max_age, max_count)

    def select(self, jobs: Iterable[JobInfo], now: float, newest: str | None = None) -> list[JobInfo]:
        """The jobs this policy retires, oldest first: terminal, marked finished by Airflow, removable,
        and either ended more than ``max_age`` ago or beyond the ``max_count`` newest such jobs.

        Age counts from the job's end; a job whose end is unknown is retired by count only (its creation
        says nothing about when a long step ended). Ranks order by end, then creation, newest first;
        ``newest`` (the job that just finished) ranks first whatever its clock says, and is never retired.
        Platforms stamp times to the second: two quick steps often end within the same one."""
        done = [j for j in jobs if not j.running and j.marked_finished and j.removable]

        def order(j: JobInfo) -> tuple[bool, float, float, str]:
            # A job whose times are unknown counts as the newest: never retired on a guess.
            unknown = math.inf
            return (j.job_id == newest, j.ended_at if j.ended_at is not None else unknown,
                    j.created if j.created is not None else unknown, j.job_id)

        done.sort(key=order, reverse=True)
        retired = []
        for rank, job in enumerate(done):
            too_many = self.max_count is not None and rank >= self.max_count
            too_old = (self.max_age is not None and job.finished is not None
                       and now - job.finished > self.max_age)
            if (too_many or too_old) and job.job_id != newest:
                retired.append(job)
        return retired[::-1]


def retention_of(config: Any, backend: str) -> Retention:
    """The retention policy of a backend configuration (its ``retention`` setting)."""
    return Retention.from_config(getattr(config, "retention", None), backend)


def retire(admin: JobAdmin, retention: Retention, *, now: float | None = None, limit: int = RETIRE_BATCH,
           jobs: Sequence[JobInfo] | None = None, keep: str | None = None) -> list[JobInfo]:
    """Remove up to ``limit`` jobs the policy retires (the oldest first); what was removed.

    Called as each job finishes (from a backend's ``cleanup``): one listing and at most ``limit`` removals,
    so a finishing task never pays for a whole backlog. ``keep``: the job that just finished, never retired
    by its own finish (its log is what its user looks at now). A removal that fails is logged and skipped.
    """
    if retention.max_age is None and retention.max_count is None:
        return []
    now = clock() if now is None else now
    try:
        listed = admin.list_jobs(None) if jobs is None else jobs
    except Exception as exc:  # retention is housekeeping: the step's own outcome stands, the next finish retries
        log.warning("%s: could not list jobs for the retention policy: %s", admin.name, exc)
        return []
    removed = remove_jobs(admin, retention.select(listed, now, newest=keep), limit)
    if removed:
        log.info("%s: removed %d finished job(s) by the retention policy (max_age=%s s, max_count=%s)",
                 admin.name, len(removed), retention.max_age, retention.max_count)
    return removed


_last_sweep: dict[tuple[str, str], float] = {}
_sweep_lock = threading.Lock()


def retire_on_finish(admin: JobAdmin, retention: Retention, *, keep: str, where: str) -> list[JobInfo]:
    """:func:`retire` for a job that just finished, at most once per :data:`SWEEP_INTERVAL` seconds for the
    backend location ``where`` (a state directory, an engine, a namespace) in this process.

    Housekeeping, not bookkeeping: a finish inside the interval retires nothing, and the next finish after it
    catches up (at most :data:`RETIRE_BATCH` removals a sweep). ``airflow remote-ml jobs gc`` is unthrottled.
    """
    if retention.max_age is None and retention.max_count is None:
        return []
    key = (admin.name, where)
    now = time.monotonic()
    with _sweep_lock:
        last = _last_sweep.get(key)
        if last is not None and now - last < SWEEP_INTERVAL:
            return []
        _last_sweep[key] = now
    return retire(admin, retention, keep=keep)


def remove_jobs(admin: JobAdmin, jobs: Sequence[JobInfo], limit: int = RETIRE_BATCH) -> list[JobInfo]:
    """Remove the first ``limit`` of ``jobs``; a removal that fails is logged and skipped. What was removed."""
    removed = []
    for job in jobs[:max(0, limit)]:
        try:
            admin.remove_job(job)
        except Exception as exc:  # one stuck job must not stop the others, nor fail the finishing task
            log.warning("%s: could not remove job %s (%s): %s", admin.name, job.job_id, job.where, exc)
            continue
        removed.append(job)
    return removed


# -- identity from what a backend stamped on its job -----------------------------------------------------


def identity_from_manifest_uri(uri: str | None) -> StepIdentity | None:
    """The identity a manifest URI was made for (``.../<dag>/<run>/<task>/map_<i>/gen_<g>/manifest.json``,
    see ``ArtifactStore.step_prefix``); ``None`` when it is not one or a part was cut to a hash."""
    if not uri:
        return None
    parts = re.split(r"[/\\]", str(uri).rstrip("/"))
    if len(parts) < 6 or parts[-1] != MANIFEST_NAME:
        return None
    dag, run, task, map_part, gen_part = parts[-6:-1]
    map_match = re.fullmatch(r"map_(-?\d+)", map_part)
    gen_match = re.fullmatch(r"gen_(\d+)", gen_part)
    values = [decode_segment(dag), decode_segment(run), decode_segment(task)]
    if map_match is None or gen_match is None or any(v is None for v in values):
        return None
    dag_id, run_id, task_id = (str(v) for v in values)
    return StepIdentity(dag_id, task_id, run_id, int(map_match.group(1)), int(gen_match.group(1)))


def identity_from_json(data: Any) -> StepIdentity | None:
    """An identity from its JSON form, or ``None`` for anything else (a hand-made or foreign job)."""
    if not isinstance(data, Mapping):
        return None
    try:
        return StepIdentity.from_json(dict(data))
    except TypeError:
        return None
