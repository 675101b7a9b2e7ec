"""The local backend's process side: starting the runtime, reading its job directory, stopping it.

Each job gets a directory named after its identity under ``state_dir``, holding the step's JSON, its log,
the runtime's pid, the step command's process group (``pgid``, written by the runtime) and, once it ends,
its exit code. The runtime runs in its own session, so it outlives a crashed worker and a retry reattaches
to it through that directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any, ClassVar

from airflow_remote_ml import runtime
from airflow_remote_ml.backends.local import _jobs
from airflow_remote_ml.backends.local._config import LocalConfig, step_environment
from airflow_remote_ml.backends.local._logs import LogWatch, read_chunk, tail
from airflow_remote_ml.backends.local._procs import (
    StepProcesses,
    group_leader_matches,
    orphaned_group,
    pidfd,
    stop,
    wait_for_exit,
)
from airflow_remote_ml.backends.local._validation import check_request
from airflow_remote_ml.core.backend import Backend, StepRequest
from airflow_remote_ml.core.errors import ConfigError, TransientBackendError
from airflow_remote_ml.core.identity import StepIdentity
from airflow_remote_ml.core.jobs import JobInfo, retention_of, retire_on_finish
from airflow_remote_ml.core.poll import PollPolicy
from airflow_remote_ml.core.status import LogChunk, RunHandle, RunState, RunStatus

log = logging.getLogger(__name__)

_FILES = ("step.json", "log", "pid", "pgid", "exit_code", "cancelled", "finished")


class LocalBackend(Backend):
    name: ClassVar[str] = "local"
    config_class = LocalConfig
    option_names = frozenset({"cwd"})
    poll_policy = PollPolicy(first_delay=0.05, factor=1.5, cap=2.0)
    # One job directory per identity, and submit() adopts a live process already running in it (the
    # 409 of a deterministic container name, on the file system): a second submit cannot start a second
    # step. There is no ambiguous outcome to settle: the pid file exists before submit() returns.
    idempotent_submit = True
    create_settle_seconds = 0.0
    config: LocalConfig

    def __init__(self, config: LocalConfig) -> None:
        super().__init__(config)
        config.check()
        # Processes started by this object: waiting on them notices the exit at once.
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        # How far each job's log has been read back, for wait() to come back when there is more.
        self._watches: dict[str, LogWatch] = {}

    # -- helpers ----------------------------------------------------------------------------------------

    def _job_dir(self, job_id: str) -> str:
        return os.path.join(self.config.state_dir, job_id)

    def _handle(self, job_id: str, step: dict[str, Any]) -> RunHandle:
        return RunHandle(
            backend=self.name,
            job_id=job_id,
            url=None,
            data={
                "job_dir": self._job_dir(job_id),
                "manifest_uri": step["manifest_uri"],
                "declared_outputs": sorted(step.get("outputs") or {}),
            },
        )

    def validate(self, request: StepRequest) -> None:
        super().validate(request)
        check_request(request)  # backends/local/_validation.py

    def _secret_env(self, request: StepRequest) -> dict[str, str]:
        if not request.spec.secrets:
            return {}
        from airflow_remote_ml.hooks import resolve_secret

        return {env: resolve_secret(ref, source=self.config.secrets_from) for env, ref in request.spec.secrets.items()}

    # -- the interface ------------------------------------------------------------------------------------

    def submit(self, request: StepRequest) -> RunHandle:
        job_id = request.identity.digest
        job_dir = self._job_dir(job_id)
        existing = self.find(request.identity)
        if existing is not None and self._alive(existing):
            log.info("local: step %s is already running; adopting it", request.identity.key)
            return existing
        os.makedirs(job_dir, exist_ok=True)
        self._watches.pop(job_id, None)  # a new log
        for name in _FILES:  # a job directory is only reused for the same identity after a failed start
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(job_dir, name))
        step = request.runtime_config(python_path=list(sys.path) if self.config.inherit_sys_path else [])
        with open(os.path.join(job_dir, "step.json"), "w", encoding="utf-8") as fh:
            json.dump({**step, "identity": request.identity.to_json()}, fh)
        # Python steps' prints reach the log as they happen (a pipe would block-buffer them), unless the
        # spec says otherwise: env={"PYTHONUNBUFFERED": ""} buys a chatty step's speed back.
        spec_env = {"PYTHONUNBUFFERED": "1", **request.spec.env}
        env = step_environment(os.environ, self.config.inherit_env, spec_env, self._secret_env(request), {
            "REMOTE_ML_STEP_FILE": os.path.join(job_dir, "step.json"),
            "REMOTE_ML_EXIT_FILE": os.path.join(job_dir, "exit_code"),
            # The runtime records the command's process group here, so cancel() reaches it too; and
            # escalates to SIGKILL on its own after this grace, should the caller die mid-cancel.
            "REMOTE_ML_PGID_FILE": os.path.join(job_dir, "pgid"),
            "REMOTE_ML_KILL_GRACE": f"{self.config.kill_grace_seconds:g}",
        })
        cwd = request.spec.options_for(self.name).get("cwd") or job_dir
        with open(os.path.join(job_dir, "log"), "ab") as log_file:
            try:
                child = subprocess.Popen(
                    # By file path (works for an interpreter without this package), bytecode cached.
                    runtime.launch_from_file(self.config.python),
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives the worker; a retry reattaches
                )
            except (FileNotFoundError, PermissionError) as exc:
                # Popen raises before anything runs: surely not started, and a retry cannot help.
                raise ConfigError("backend_config[local].python", f"{self.config.python!r} cannot be run "
                                  f"({exc.strerror})", "give the path of a Python 3 interpreter") from None
            except OSError as exc:  # EAGAIN/ENOMEM from fork: not started; the machine may recover
                raise TransientBackendError(self.name, f"could not start the step's process: {exc}") from exc
        self._children[job_id] = child
        with open(os.path.join(job_dir, "pid"), "w", encoding="utf-8") as fh:
            # Just started: no zombie check, one read of /proc/<pid>/stat (a read while the new process is
            # still loading its interpreter took ~0.6 ms each, four of them per step before).
            fh.write(f"{child.pid} {_start_time(child.pid, zombie_check=False)}")
        log.info("local: started step %s as pid %s (log: %s)", request.identity.key, child.pid,
                 os.path.join(job_dir, "log"))
        return self._handle(job_id, step)

    def find(self, identity: StepIdentity) -> RunHandle | None:
        job_id = identity.digest
        step_file = os.path.join(self._job_dir(job_id), "step.json")
        pid_file = os.path.join(self._job_dir(job_id), "pid")
        if not (os.path.exists(step_file) and os.path.exists(pid_file)):
            return None
        with open(step_file, encoding="utf-8") as fh:
            step = json.load(fh)
        return self._handle(job_id, step)

    def poll(self, handle: RunHandle) -> RunStatus:
        job_dir = handle.data["job_dir"]
        child = self._children.get(handle.job_id)
        if child is not None:
            child.poll()  # reap it so it does not linger as a zombie
        exit_file = os.path.join(job_dir, "exit_code")
        code = _read(exit_file)
        if code is None:
            if self._alive(handle):
                return RunStatus(RunState.RUNNING, "running")
            # The runtime writes its exit code (atomically) just before it exits, so one that exited between
            # the read above and the liveness check has written it by now: read it again before calling the
            # job lost. (200 deferred steps ending at once hit this window: a success reported "lost".)
            code = _read(exit_file)
        cancelled = os.path.exists(os.path.join(job_dir, "cancelled"))
        if code is not None:
            exited = int(code)
            if cancelled:
                return RunStatus(RunState.CANCELLED, "cancelled", "cancelled", exited)
            if exited == 0:
                return RunStatus(RunState.SUCCEEDED, "exited", "", 0)
            return RunStatus(RunState.FAILED, "exited", f"the step exited with code {exited}", exited)
        # The process is gone without writing its exit code: killed hard, or the machine restarted.
        exit_code: int | None = None
        if child is not None and child.returncode is not None:
            exit_code = child.returncode if child.returncode >= 0 else 128 - child.returncode
        if cancelled:
            return RunStatus(RunState.CANCELLED, "cancelled", "cancelled", exit_code)
        return RunStatus(RunState.LOST, "gone", "the process ended without reporting an exit code", exit_code)

    def wait(self, handle: RunHandle, timeout: float) -> RunStatus:
        """The status at the step's exit, after ``timeout``, or as soon as its log holds output not read back
        yet (then RUNNING), so the caller reads a chatty step's log while it runs."""
        # The runtime writes its exit file just before exiting: once the process is gone, poll() knows.
        pid = self._waitable_pid(handle)
        # Also back early when the log holds output not read yet: wait_for_completion reads it while the
        # step still runs, rather than a chatty step's whole output after its exit (issue 11).
        if pid is not None and wait_for_exit(pid, timeout, self._watch(handle)) is not None:
            self._reap(handle)
            return self.poll(handle)
        child = self._children.get(handle.job_id)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout)
            return self.poll(handle)
        # Not our child and no pidfd: look at the exit file often, it is a cheap stat().
        deadline = time.monotonic() + timeout
        while True:
            status = self.poll(handle)
            if status.is_terminal or time.monotonic() >= deadline:
                return status
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    async def await_change(self, handle: RunHandle, timeout: float) -> RunStatus:
        """The trigger's wait: the event loop watches the runtime's pidfd, so the exit wakes it at once
        and no thread is held per waiting step."""
        pid = self._waitable_pid(handle)
        fd = pidfd(pid) if pid is not None else None
        if fd is None:
            return await asyncio.to_thread(self.wait, handle, timeout)
        if fd >= 0:
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[None] = loop.create_future()

            def on_exit() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(fd, on_exit)
            try:
                await asyncio.wait_for(exited, timeout)
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(fd)
                os.close(fd)
        self._reap(handle)
        return await self.apoll(handle)

    def _waitable_pid(self, handle: RunHandle) -> int | None:
        child = self._children.get(handle.job_id)
        if child is not None:
            return child.pid if child.returncode is None else None
        return self._pid(handle) if self._alive(handle) else None

    def cancel(self, handle: RunHandle) -> None:
        """SIGTERM, ``kill_grace_seconds`` to end, then SIGKILL of every process of the step.

        Returns once none is left (or after a short bound for processes that cannot die, logged).
        The same call serves the worker and the trigger (``acancel``), from any process.
        """
        job_dir = handle.data["job_dir"]
        if not os.path.isdir(job_dir):
            return  # removed (``jobs gc``, retention): only a terminal job's directory is ever removed
        if _read(os.path.join(job_dir, "exit_code")) is None:
            with open(os.path.join(job_dir, "cancelled"), "w", encoding="utf-8") as fh:
                fh.write(str(time.time()))
        step = self._processes(handle)
        runtime_alive = self._alive(handle)
        # The runtime forwards SIGTERM to the command's group: it arrives there once. Without a runtime
        # the groups get it directly. A finished runtime may leave background processes: killed too.
        term_group = step.runtime_pid if runtime_alive else None
        if not stop(step, self.config.kill_grace_seconds, term_group=term_group,
                    reap=lambda: self._reap(handle)):
            log.warning("local: processes of job %s survived SIGKILL (uninterruptible I/O?)", handle.job_id)
        self._reap(handle)

    def _processes(self, handle: RunHandle) -> StepProcesses:
        runtime_pid = self._pid(handle) if self._alive(handle) else None
        groups = {runtime_pid} if runtime_pid is not None else set()
        recorded = self._pid(handle)
        if runtime_pid is None and recorded is not None and orphaned_group(recorded):
            groups.add(recorded)  # the runtime died; what it left in its group is still the step
        text = _read(os.path.join(handle.data["job_dir"], "pgid"))
        if text:
            pgid_text, _, start = text.partition(" ")
            if group_leader_matches(int(pgid_text), start):
                groups.add(int(pgid_text))
        return StepProcesses(runtime_pid, groups)

    def read_logs(self, handle: RunHandle, cursor: Any = None) -> LogChunk:
        watch = self._watch(handle)
        chunk, looked = read_chunk(watch.path, int(cursor or 0), lambda: self.poll(handle).is_terminal)
        watch.read(looked, chunk.more)
        return chunk

    def log_tail(self, handle: RunHandle, lines: int = 40) -> list[str]:
        try:
            return tail(os.path.join(handle.data["job_dir"], "log"), lines)
        except OSError:  # a courtesy in an error message; never mask the real error
            return []

    def _watch(self, handle: RunHandle) -> LogWatch:
        watch = self._watches.get(handle.job_id)
        if watch is None:
            watch = self._watches[handle.job_id] = LogWatch(os.path.join(handle.data["job_dir"], "log"))
        return watch

    def mark_finished(self, handle: RunHandle) -> None:
        with contextlib.suppress(OSError), open(os.path.join(handle.data["job_dir"], "finished"), "w") as fh:
            fh.write(str(time.time()))

    def cleanup(self, handle: RunHandle, status: RunStatus) -> None:
        """Job directories are kept (the log, for debugging) until the retention policy retires them."""
        retire_on_finish(self, retention_of(self.config, self.name), keep=handle.job_id,
                         where=self.config.state_dir)

    # -- jobs (see ._jobs) ----------------------------------------------------------------------------------

    def list_jobs(self, dag_id: str | None = None) -> list[JobInfo]:
        return _jobs.list_jobs(self, dag_id)

    def remove_job(self, job: JobInfo) -> None:
        _jobs.remove(self, job)

    # -- process bookkeeping -----------------------------------------------------------------------------

    def _pid(self, handle: RunHandle) -> int | None:
        text = _read(os.path.join(handle.data["job_dir"], "pid"))
        return int(text.split()[0]) if text else None

    def _alive(self, handle: RunHandle) -> bool:
        child = self._children.get(handle.job_id)
        if child is not None:
            # Our own child: the kernel's wait status answers, without reading /proc (see submit).
            return child.poll() is None
        text = _read(os.path.join(handle.data["job_dir"], "pid"))
        if not text:
            return False
        pid_text, _, started = text.partition(" ")
        pid = int(pid_text)
        current = _start_time(pid)
        if current is None:
            return False
        # A recycled pid belongs to another process: compare start times.
        return not started or started == "None" or current == started

    def _reap(self, handle: RunHandle) -> None:
        child = self._children.get(handle.job_id)
        if child is not None:
            child.poll()


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return None


def _start_time(pid: int, *, zombie_check: bool = True) -> str | None:
    """The process's start time as a string, or None when no such (non-zombie) process exists."""
    try:
        import psutil

        proc = psutil.Process(pid)
        if zombie_check and proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return f"{proc.create_time():.2f}"
    except ImportError:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return None
        return "None"
    except Exception:  # psutil.NoSuchProcess and friends
        return None
