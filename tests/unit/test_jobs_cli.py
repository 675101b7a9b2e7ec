"""The CLI's decisions without a database: which backends it inspects, and what makes a job an orphan."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from airflow_remote_ml import cli
from airflow_remote_ml.core import ConfigError, StepIdentity
from airflow_remote_ml.core.jobs import JobInfo

HOST = "worker-1"
IDENTITY = StepIdentity("dag", "task", "run", -1, 0)


def running_job(identity: StepIdentity | None = IDENTITY) -> JobInfo:
    return JobInfo("local", "job", identity, "running")


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped (Linux hands pids out in sequence: not reused soon)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("state", sorted(cli.LIVE_TASK_STATES - {"running"}))
def test_a_task_that_owns_or_will_reattach_to_its_job_makes_no_orphan(state):
    ti = {"state": state, "hostname": HOST, "pid": dead_pid()}
    assert cli.orphan_reason(running_job(), ti, HOST) is None


@pytest.mark.parametrize("state", ["success", "failed", "upstream_failed", "skipped", "removed", None])
def test_a_task_that_ended_leaves_an_orphan(state):
    reason = cli.orphan_reason(running_job(), {"state": state, "hostname": HOST, "pid": os.getpid()}, HOST)
    assert reason == f"task instance is {state or 'none'}"


def test_no_task_instance_leaves_an_orphan():
    assert cli.orphan_reason(running_job(), None, HOST) == "no task instance"


def test_a_running_task_whose_process_is_gone_from_this_host_leaves_an_orphan():
    pid = dead_pid()
    ti = {"state": "running", "hostname": HOST, "pid": pid}
    assert cli.orphan_reason(running_job(), ti, HOST) == f"task process {pid} on {HOST} is gone"
    # Its process alive, or on another host (which this machine cannot look into): it runs the job.
    assert cli.orphan_reason(running_job(), {**ti, "pid": os.getpid()}, HOST) is None
    assert cli.orphan_reason(running_job(), ti, "worker-2") is None
    assert cli.orphan_reason(running_job(), {**ti, "pid": None}, HOST) is None


def test_a_job_whose_identity_cannot_be_read_is_never_called_an_orphan():
    assert cli.orphan_reason(running_job(None), None, HOST) is None


def test_backends_inspected_are_the_default_and_every_configured_one(monkeypatch):
    monkeypatch.setenv("AIRFLOW__REMOTE_ML__DEFAULT_BACKEND", "local")
    monkeypatch.setenv("AIRFLOW__REMOTE_ML__BACKEND_CONFIG",
                       '{"docker": {"labels": {"team": "ml"}}, "kubernetes": {"namespace": "ml"}}')
    assert cli.configured_backends(None, None) == [
        ("local", {}), ("docker", {"labels": {"team": "ml"}}), ("kubernetes", {"namespace": "ml"})]
    # --backend with --config: the deployment's settings, the given ones over them.
    assert cli.configured_backends("docker", '{"timeout": 5}') == [
        ("docker", {"labels": {"team": "ml"}, "timeout": 5})]


@pytest.mark.parametrize(("backend", "config", "field"), [
    (None, "{}", "--config"), ("docker", "{not json", "--config"), ("docker", "[1]", "--config")])
def test_bad_backend_options_are_config_errors(backend, config, field):
    with pytest.raises(ConfigError) as info:
        cli.configured_backends(backend, config)
    assert info.value.field == field


def test_the_group_is_remote_ml_jobs_with_list_cancel_and_gc():
    [group] = cli.get_cli_commands()
    assert group.name == "remote-ml"
    [jobs] = list(group.subcommands)
    assert jobs.name == "jobs"
    assert sorted(c.name for c in jobs.subcommands) == ["cancel", "gc", "list"]
    from airflow_remote_ml.get_provider_info import get_provider_info

    assert get_provider_info()["cli"] == ["airflow_remote_ml.cli.get_cli_commands"]

