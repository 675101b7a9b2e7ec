"""Listing and retiring jobs (core/jobs.py), and the local backend's job directories.

The local backend's "service" is the operating system: its jobs are real processes and real job
directories, looked at through the backend's own listing and from outside (psutil, the file system).
Clocks are injected (``core.jobs.clock`` and ``now=``); no test waits for time to pass.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from airflow_remote_ml.backends.local import LocalBackend
from airflow_remote_ml.core import ArtifactStore, ConfigError, StepIdentity, StepRequest, StepSpec
from airflow_remote_ml.core import jobs as core_jobs
from airflow_remote_ml.core.jobs import (
    RETIRE_BATCH,
    JobInfo,
    Retention,
    identity_from_manifest_uri,
    parse_duration,
    retire,
)
from airflow_remote_ml.core.status import RunState

BOUND = 60.0
DAY = 86400.0


# -- the retention setting ------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [("7d", 7 * DAY), ("12h", 43200.0), ("30m", 1800.0), ("45s", 45.0),
                                                ("2w", 14 * DAY), (90, 90.0), ("1.5h", 5400.0), ("0", 0.0)])
def test_durations(value, seconds):
    assert parse_duration(value, "f") == seconds


@pytest.mark.parametrize("value", ["7x", "", "-1d", True, None, [], float("nan"), "d"])
def test_bad_durations_name_the_field(value):
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "backend_config[local].retention.max_age")
    assert info.value.field == "backend_config[local].retention.max_age"
    assert "7d" in (info.value.fix or "")


def test_retention_defaults_overrides_and_off():
    assert Retention.from_config(None, "local") == Retention(7 * DAY, 100)
    assert Retention.from_config({"max_age": "1d"}, "local") == Retention(DAY, 100)
    assert Retention.from_config({"max_count": None}, "local") == Retention(7 * DAY, None)
    assert Retention.from_config(False, "local") == Retention(None, None)


@pytest.mark.parametrize(("value", "field"), [
    ({"max_age": "soon"}, "backend_config[docker].retention.max_age"),
    ({"max_count": -1}, "backend_config[docker].retention.max_count"),
    ({"max_count": 2.5}, "backend_config[docker].retention.max_count"),
    ({"max_count": True}, "backend_config[docker].retention.max_count"),
    ({"keep": 3}, "backend_config[docker].retention.keep"),
    ("7d", "backend_config[docker].retention"),
])
def test_bad_retention_is_a_config_error_naming_the_field(value, field):
    with pytest.raises(ConfigError) as info:
        Retention.from_config(value, "docker")
    assert info.value.field == field


def test_a_backend_refuses_bad_retention_when_it_is_configured(tmp_path):
    # Before any step is submitted: the setting is checked when the configuration is read.
    with pytest.raises(ConfigError) as info:
        LocalBackend.from_config({"state_dir": str(tmp_path), "retention": {"max_age": "a week"}})
    assert info.value.field == "backend_config[local].retention.max_age"
    backend = LocalBackend.from_config({"state_dir": str(tmp_path), "retention": {"max_age": "1h"}})
    assert core_jobs.retention_of(backend.config, "local") == Retention(3600.0, 100)


# -- which jobs a policy retires ------------------------------------------------------------------------


def job(job_id: str, *, finished: float | None, created: float | None = None, running: bool = False,
        marked: bool = True, removable: bool = True) -> JobInfo:
    return JobInfo("test", job_id, None, "running" if running else "terminal", created=created,
                   finished=None if running else finished, marked_finished=marked, removable=removable)


NOW = 1_000_000.0


def test_age_counts_from_the_end_and_count_keeps_the_newest():
    jobs = [job("a", finished=NOW - 10 * DAY), job("b", finished=NOW - 2 * DAY), job("c", finished=NOW - 1),
            job("d", finished=NOW - 3 * DAY)]
    assert [j.job_id for j in Retention(7 * DAY, None).select(jobs, NOW)] == ["a"]
    assert [j.job_id for j in Retention(None, 2).select(jobs, NOW)] == ["a", "d"]  # oldest first
    assert [j.job_id for j in Retention(2.5 * DAY, 3).select(jobs, NOW)] == ["a", "d"]
    assert Retention(None, None).select(jobs, NOW) == []


def test_running_unmarked_and_unremovable_jobs_are_never_retired():
    jobs = [job("run", finished=None, created=NOW - 30 * DAY, running=True),
            job("unmarked", finished=NOW - 30 * DAY, marked=False),
            job("history", finished=NOW - 30 * DAY, removable=False)]
    assert Retention(0.0, 0).select(jobs, NOW) == []


def test_a_job_whose_end_is_unknown_is_retired_by_count_only():
    # Created long ago says nothing about when a long step ended: no age verdict without the end.
    old_created = job("x", finished=None, created=NOW - 30 * DAY)
    assert Retention(DAY, None).select([old_created], NOW) == []
    newer = job("y", finished=NOW - 1)
    assert [j.job_id for j in Retention(DAY, 1).select([old_created, newer], NOW)] == ["x"]


class Admin:
    name = "fake"

    def __init__(self, jobs: list[JobInfo], fail: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.jobs = jobs
        self.removed: list[str] = []
        self.lists = 0
        self.fail = fail

    def list_jobs(self, dag_id: str | None = None) -> list[JobInfo]:
        self.lists += 1
        return list(self.jobs)

    def remove_job(self, job: JobInfo) -> None:
        if job.job_id in self.fail:
            raise OSError("busy")
        self.removed.append(job.job_id)


def test_one_finish_lists_once_and_removes_at_most_a_batch_oldest_first():
    backlog = [job(f"j{i:03d}", finished=NOW - DAY * 30 - i) for i in range(3 * RETIRE_BATCH)]
    admin = Admin(backlog)
    removed = retire(admin, Retention(7 * DAY, 100), now=NOW)
    assert admin.lists == 1
    assert len(removed) == RETIRE_BATCH
    assert admin.removed == [f"j{i:03d}" for i in range(3 * RETIRE_BATCH - 1, 2 * RETIRE_BATCH - 1, -1)]


def test_a_removal_that_fails_does_not_stop_the_others(caplog):
    admin = Admin([job("a", finished=NOW - 9 * DAY), job("b", finished=NOW - 8 * DAY)], fail={"a"})
    assert [j.job_id for j in retire(admin, Retention(7 * DAY, None), now=NOW)] == ["b"]
    assert "could not remove job a" in caplog.text


def test_retire_with_no_limits_does_not_even_list():
    admin = Admin([job("a", finished=0.0)])
    assert retire(admin, Retention(None, None), now=NOW) == []
    assert admin.lists == 0


# -- identities read back from manifest URIs ------------------------------------------------------------


@pytest.mark.parametrize("root", ["/srv/artifacts", "s3://bucket/ml", "dbfs:/Volumes/main/ml/artifacts"])
@pytest.mark.parametrize("identity", [
    StepIdentity("dag", "train", "manual__2024-01-01T12:00:00+00:00", 3, 1),
    StepIdentity("my.dag", "group.task", "scheduled__x/y", -1, 0),
    StepIdentity("d", "t", "", 0, 7),
    StepIdentity("ünïcode dag", "~task~", "run id with spaces", -1, 2),
])
def test_the_manifest_uri_names_its_whole_identity(root, identity):
    uri = ArtifactStore(root).manifest_uri(identity)
    assert identity_from_manifest_uri(uri) == identity


def test_a_cut_segment_or_a_foreign_uri_names_no_identity():
    long = StepIdentity("d" * 300, "t", "r")
    assert identity_from_manifest_uri(ArtifactStore("/a").manifest_uri(long)) is None
    assert identity_from_manifest_uri("/a/b/manifest.json") is None
    assert identity_from_manifest_uri("/a/d/r/t/map_x/gen_0/manifest.json") is None
    assert identity_from_manifest_uri(None) is None


# -- the local backend: job directories -----------------------------------------------------------------


def make_backend(tmp_path, **config: Any) -> LocalBackend:
    return LocalBackend.from_config({"state_dir": str(tmp_path / "state"), "kill_grace_seconds": 1, **config})


def make_request(tmp_path, dag_id: str = "jobs", **spec: Any) -> StepRequest:
    identity = StepIdentity(dag_id, "step", f"run-{uuid.uuid4().hex[:10]}")
    return StepRequest.create(StepSpec.build(**spec), identity, ArtifactStore(str(tmp_path / "artifacts")))


def wait_terminal(backend: LocalBackend, handle) -> Any:
    deadline = time.monotonic() + BOUND
    while True:
        status = backend.wait(handle, 5.0)
        if status.is_terminal:
            return status
        assert time.monotonic() < deadline, "the step did not end"


def finish(backend: LocalBackend, request: StepRequest):
    """Run a step to its end and let Airflow's finish happen (mark_finished, then cleanup)."""
    handle = backend.submit(request)
    status = wait_terminal(backend, handle)
    backend.mark_finished(handle)
    backend.cleanup(handle, status)
    return handle, status


def test_local_jobs_are_listed_with_identity_state_and_times(tmp_path):
    backend = make_backend(tmp_path)
    done_request = make_request(tmp_path, command=["python3", "-c", "print('hi')"])
    done, _ = finish(backend, done_request)
    running_request = make_request(tmp_path, dag_id="other", command=["sleep", "300"])
    running = backend.submit(running_request)
    try:
        jobs = {j.job_id: j for j in backend.list_jobs()}
        assert set(jobs) == {done.job_id, running.job_id}
        finished, alive = jobs[done.job_id], jobs[running.job_id]
        assert finished.identity == done_request.identity and alive.identity == running_request.identity
        assert (finished.state, finished.marked_finished, finished.remote_state) == ("terminal", True, "succeeded")
        assert finished.finished is not None and finished.created is not None
        assert finished.created <= finished.finished
        assert (alive.state, alive.marked_finished, alive.finished) == ("running", False, None)
        assert alive.where == os.path.join(str(tmp_path / "state"), running.job_id)
        assert [j.job_id for j in backend.list_jobs("other")] == [running.job_id]
        # The listed handle is the backend's own: it cancels the step.
        assert alive.handle is not None
        backend.cancel(alive.handle)
        assert backend.poll(alive.handle).state is RunState.CANCELLED
    finally:
        backend.cancel(running)


def test_remove_deletes_the_job_directory_and_refuses_a_running_job(tmp_path):
    from airflow_remote_ml.core.errors import BackendAPIError

    backend = make_backend(tmp_path)
    handle = backend.submit(make_request(tmp_path, command=["sleep", "300"]))
    try:
        [job_info] = backend.list_jobs()
        with pytest.raises(BackendAPIError, match="still running"):
            backend.remove_job(job_info)
        assert os.path.isdir(job_info.where)
        pid = int(open(os.path.join(job_info.where, "pid")).read().split()[0])
        backend.cancel(handle)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        backend.remove_job(job_info)
        assert not os.path.exists(job_info.where)
        assert backend.list_jobs() == []
        backend.remove_job(job_info)  # idempotent
    finally:
        backend.cancel(handle)


@pytest.fixture
def every_finish_sweeps(monkeypatch):
    """The policy tests below look at what each finish retires: no sweep interval between them."""
    monkeypatch.setattr(core_jobs, "SWEEP_INTERVAL", 0.0)


def test_a_burst_of_finishes_lists_the_jobs_once_and_the_next_sweep_catches_up(tmp_path, monkeypatch):
    backend = make_backend(tmp_path, retention={"max_age": "0s", "max_count": 0})
    listings = []
    real_list = backend.list_jobs
    monkeypatch.setattr(backend, "list_jobs", lambda dag_id=None: listings.append(dag_id) or real_list(dag_id))
    monkeypatch.setattr(core_jobs, "SWEEP_INTERVAL", 3600.0)
    handles = [finish(backend, make_request(tmp_path, command=["python3", "-c", "pass"]))[0] for _ in range(3)]
    assert len(listings) == 1, "every finish of the burst listed the jobs"
    assert all(os.path.isdir(h.data["job_dir"]) for h in handles)  # nothing older than the first to retire
    # Once the interval has passed, the next finish sweeps and retires the backlog (up to a batch).
    monkeypatch.setattr(core_jobs, "SWEEP_INTERVAL", 0.0)
    last, _ = finish(backend, make_request(tmp_path, command=["python3", "-c", "pass"]))
    assert len(listings) == 2
    assert [j.job_id for j in backend.list_jobs()] == [last.job_id]


def test_the_sweep_interval_is_per_backend_location(tmp_path, monkeypatch):
    # Two state directories in one process: a sweep of one does not hold back the other's.
    monkeypatch.setattr(core_jobs, "SWEEP_INTERVAL", 3600.0)
    listed: dict[str, int] = {}
    backends = {}
    for where in ("one", "two"):
        backend = backends[where] = make_backend(tmp_path / where, retention={"max_age": "0s", "max_count": 0})
        real_list = backend.list_jobs

        def counting(dag_id=None, _where=where, _real=real_list):
            listed[_where] = listed.get(_where, 0) + 1
            return _real(dag_id)

        monkeypatch.setattr(backend, "list_jobs", counting)
    for where in ("one", "two", "one"):
        finish(backends[where], make_request(tmp_path / where, command=["python3", "-c", "pass"]))
    assert listed == {"one": 1, "two": 1}


@pytest.mark.usefixtures("every_finish_sweeps")
def test_finishing_a_job_retires_old_job_directories_by_age(tmp_path, monkeypatch):
    backend = make_backend(tmp_path, retention={"max_age": "1d", "max_count": None})
    old, _ = finish(backend, make_request(tmp_path, command=["python3", "-c", "pass"]))
    assert os.path.isdir(old.data["job_dir"])  # just ended: kept
    # Two days later (the clock retention reads), the next step finishes: the old directory goes, the
    # one that just finished stays (its own finish never retires it, whatever the clock says).
    monkeypatch.setattr(core_jobs, "clock", lambda: time.time() + 2 * DAY)
    new, _ = finish(backend, make_request(tmp_path, command=["python3", "-c", "pass"]))
    assert not os.path.exists(old.data["job_dir"])
    assert os.path.isdir(new.data["job_dir"])


@pytest.mark.usefixtures("every_finish_sweeps")
def test_finishing_a_job_keeps_only_the_newest_by_count_and_never_a_running_one(tmp_path):
    backend = make_backend(tmp_path, retention={"max_age": None, "max_count": 2})
    running = backend.submit(make_request(tmp_path, command=["sleep", "300"]))
    try:
        handles = [finish(backend, make_request(tmp_path, command=["python3", "-c", "pass"]))[0] for _ in range(4)]
        left = {j.job_id for j in backend.list_jobs()}
        assert left == {handles[2].job_id, handles[3].job_id, running.job_id}
        assert all(not os.path.exists(h.data["job_dir"]) for h in handles[:2])
    finally:
        backend.cancel(running)


@pytest.mark.usefixtures("every_finish_sweeps")
def test_the_job_that_just_finished_is_kept_even_beyond_the_count(tmp_path):
    backend = make_backend(tmp_path, retention={"max_age": "0s", "max_count": 0})
    first, _ = finish(backend, make_request(tmp_path, command=["python3", "-c", "pass"]))
    assert os.path.isdir(first.data["job_dir"])
    second, _ = finish(backend, make_request(tmp_path, command=["python3", "-c", "pass"]))
    assert not os.path.exists(first.data["job_dir"]) and os.path.isdir(second.data["job_dir"])


@pytest.mark.usefixtures("every_finish_sweeps")
def test_a_job_airflow_has_not_marked_finished_is_kept(tmp_path):
    # A step that ended while its worker was away: a retry will still read its exit code from the directory.
    backend = make_backend(tmp_path, retention={"max_age": "0s", "max_count": 0})
    unmarked = backend.submit(make_request(tmp_path, command=["python3", "-c", "pass"]))
    wait_terminal(backend, unmarked)
    finish(backend, make_request(tmp_path, command=["python3", "-c", "pass"]))
    assert os.path.isdir(unmarked.data["job_dir"])


def test_retention_off_keeps_everything(tmp_path):
    backend = make_backend(tmp_path, retention=False)
    handles = [finish(backend, make_request(tmp_path, command=["python3", "-c", "pass"]))[0] for _ in range(2)]
    assert all(os.path.isdir(h.data["job_dir"]) for h in handles)


def test_the_job_that_just_finished_ranks_newest_even_within_the_same_second():
    # Kubernetes and Docker stamp times to the second: the finishing job may tie with (or, by its clock,
    # trail) the one before it. It is the newest all the same, and never retired by its own finish.
    jobs = [job("zzz-previous", finished=NOW, created=NOW), job("aaa-just-finished", finished=NOW, created=NOW - 1)]
    retired = Retention(None, 1).select(jobs, NOW, newest="aaa-just-finished")
    assert [j.job_id for j in retired] == ["zzz-previous"]
    assert Retention(0.0, 0).select(jobs[1:], NOW + DAY, newest="aaa-just-finished") == []


# -- docs/operations.md says what the code does ----------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_the_documented_retention_settings_are_accepted_and_the_documented_error_is_real(tmp_path):
    text = DOC.read_text()
    example = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    assert Retention.from_config(example["local"]["retention"], "local") == Retention(7 * DAY, 100)
    assert Retention.from_config(example["docker"]["retention"], "docker") == Retention(2 * DAY, 20)
    assert Retention.from_config(example["kubernetes"]["retention"], "kubernetes") == Retention(None, None)
    with pytest.raises(ConfigError) as info:
        LocalBackend.from_config({"state_dir": str(tmp_path), "retention": {"max_age": "a week"}})
    assert f"`{info.value}`" in " ".join(text.split())
    assert f"at most {RETIRE_BATCH} removals" in text


def test_the_documented_scale_settings_are_airflows_own_with_their_defaults():
    # The table of "Thousands of mapped steps": each setting exists in this Airflow with the default shown.
    from airflow.configuration import conf

    text = DOC.read_text()
    for section, key in (("core", "max_map_length"), ("core", "max_active_tasks_per_dag"),
                         ("triggerer", "capacity")):
        default = conf.get_default_value(section, key)
        assert f"`[{section}] {key}` ({default})" in text, (section, key, default)
    # The limit is enforced where the doc says: in the execution API's XCom route, with that reason.
    import airflow.api_fastapi.execution_api.routes.xcoms as route

    source = Path(route.__file__).read_text()
    assert 'conf.getint("core", "max_map_length"' in source and "unmappable_return_value_length" in source
    assert "unmappable_return_value_length" in text


def test_a_listing_that_fails_costs_the_finishing_step_nothing(caplog):
    class Down(Admin):
        def list_jobs(self, dag_id: str | None = None) -> list[JobInfo]:
            raise OSError("engine unreachable")

    assert retire(Down([]), Retention(DAY, 1), now=NOW) == []
    assert "could not list jobs for the retention policy: engine unreachable" in caplog.text
