"""A real Airflow deployment on loopback, as an operator of this provider would run it.

PostgreSQL (Debian's package, started by ``.ci/postgres.sh``), ``airflow db migrate``, then
``airflow scheduler`` (LocalExecutor), ``airflow dag-processor``, ``airflow triggerer`` and
``airflow api-server`` as subprocesses with one environment. Tests talk to it only through the REST
API v2, with a JWT from ``POST /auth/token`` (the simple auth manager). Every wait polls a condition
with a bound; nothing sleeps a fixed time and then asserts.

docs/deployment.md shows these same settings; ``SETTINGS`` below is the single list of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]
TEST_DAGS = Path(__file__).resolve().parent / "dags"
POSTGRES_SH = REPO / ".ci" / "postgres.sh"
#: Each session's own database: remote_ml_deploy_<pid of the test process>.
DATABASE_PREFIX = "remote_ml_deploy_"

#: The components, in start order, and the command that runs each (the same as in docs/deployment.md).
COMPONENTS: dict[str, list[str]] = {
    "api-server": ["airflow", "api-server"],
    "scheduler": ["airflow", "scheduler"],
    "dag-processor": ["airflow", "dag-processor"],
    "triggerer": ["airflow", "triggerer"],
}
#: Which health entry of ``GET /api/v2/monitor/health`` tells that a component is up.
HEALTH_KEYS = {"scheduler": ("scheduler", "latest_scheduler_heartbeat"),
               "dag-processor": ("dag_processor", "latest_dag_processor_heartbeat"),
               "triggerer": ("triggerer", "latest_triggerer_heartbeat")}

#: Bounds of the waits (generous: CI is a loaded 2-core machine). A wait that runs out fails the test
#: with what it was waiting for; it never passes.
POSTGRES_TIMEOUT = 240.0
MIGRATE_TIMEOUT = 240.0
READY_TIMEOUT = 150.0
STOP_TIMEOUT = 30.0

#: Task instance states after which nothing happens without a user (a retry is "up_for_retry").
FINAL_TASK_STATES = frozenset({"success", "failed", "upstream_failed", "skipped", "removed"})

T = TypeVar("T")


class DeploymentError(AssertionError):
    """The deployment did not come up, or a wait ran out (an AssertionError: pytest shows it plainly)."""


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.25,
             on_timeout: Callable[[], str] | None = None) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:  # not up yet; keep polling
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
            extra = f"\n{on_timeout()}" if on_timeout else ""
            raise DeploymentError(f"timed out after {timeout:.0f} s waiting for {what}{detail}{extra}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 80) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def postgres(*args: str) -> str:
    """Run .ci/postgres.sh; its last stdout line is the SQLAlchemy URL. Fails clearly, never hangs."""
    try:
        result = subprocess.run(["bash", str(POSTGRES_SH), *args], capture_output=True, text=True,
                                timeout=POSTGRES_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        # TimeoutExpired carries bytes even with text=True (CPython keeps what it had read raw).
        partial = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise DeploymentError(f"PostgreSQL could not be started: .ci/postgres.sh {' '.join(args)} did not finish "
                              f"in {POSTGRES_TIMEOUT:.0f} s\n{partial[-4000:]}") from None
    if result.returncode != 0:
        raise DeploymentError(f"PostgreSQL could not be started: .ci/postgres.sh {' '.join(args)} exited "
                              f"{result.returncode}\n{result.stderr[-4000:]}")
    return result.stdout.strip().splitlines()[-1]


def drop_stale_databases(url: str) -> None:
    """Drop the databases of earlier test sessions that died before their teardown (their pid is gone)."""
    try:
        import psycopg2
    except ImportError:
        raise DeploymentError("psycopg2 is not installed: pip install -e '.[postgres]' (the dev extra has it)") from None

    server = url.replace("postgresql+psycopg2://", "postgresql://").rsplit("/", 1)[0] + "/postgres"
    with contextlib.closing(psycopg2.connect(server)) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (DATABASE_PREFIX + "%",))
        names = [row[0] for row in cursor.fetchall()]
    for name in names:
        pid = name[len(DATABASE_PREFIX):]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            postgres("--drop", name)


def settings(home: Path, dags_folder: Path, sql_alchemy_conn: str, api_port: int, secret: str,
             log_ports: tuple[int, int]) -> dict[str, str]:
    """The deployment's configuration as ``AIRFLOW__SECTION__KEY`` variables.

    docs/deployment.md shows exactly this (tests/deployment/test_docs.py renders it and compares).
    """
    return {
        "AIRFLOW_HOME": str(home),
        # The metadata database: PostgreSQL through psycopg2; Airflow derives the async URL (asyncpg).
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql_alchemy_conn,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
        # Workers (the LocalExecutor's task supervisors) report to the API server's execution API.
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
        "AIRFLOW__API__WORKERS": "1",
        # One secret for every component: the scheduler signs the workers' tokens, the API server checks them.
        "AIRFLOW__API_AUTH__JWT_SECRET": secret,
        "AIRFLOW__API__SECRET_KEY": secret,
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        # Each machine's log servers on their own ports (other Airflows may run on this machine).
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(log_ports[0]),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(log_ports[1]),
        # A dead triggerer's triggers move to a live one after this many seconds without a heartbeat.
        "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "15",
        # The provider: where artifacts go and where the local backend keeps its job directories.
        "AIRFLOW__REMOTE_ML__ARTIFACT_ROOT": str(home / "artifacts"),
        "REMOTE_ML_LOCAL_STATE_DIR": str(home / "local-jobs"),
    }


@dataclass
class Component:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    env: dict[str, str] = field(default_factory=dict)  # what this component got on top of the deployment's

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Deployment:
    """A running deployment; see the module docstring. Create with :meth:`start`, end with :meth:`stop`."""

    home: Path
    database: str
    api_port: int
    env: dict[str, str]
    password: str
    components: dict[str, Component] = field(default_factory=dict)
    _client: httpx.Client | None = None

    # -- life ------------------------------------------------------------------------------------------

    @classmethod
    def start(cls, home: Path, extra_dags: Path | None = None) -> Deployment:
        """Start a deployment in ``home``; ``extra_dags`` adds a DAG bundle (bench/bench_deferred.py's DAGs)."""
        database = f"{DATABASE_PREFIX}{os.getpid()}"
        url = postgres("--database", database)
        drop_stale_databases(url)
        api_port = free_port()
        secret = secrets.token_urlsafe(32)
        # Nothing of the test process's own (SQLite) Airflow or provider settings leaks in.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "REMOTE_ML_"))}
        env.update(settings(home, REPO / "dags", url, api_port, secret, (free_port(), free_port())))
        # The repository's code (this worktree) wins over an installed copy; the example steps import
        # from dags/ the way the DAG folder is on sys.path in any Airflow process.
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "dags")])
        # Every process of this deployment carries this mark, so teardown finds each one, orphans too.
        env["REMOTE_ML_DEPLOYMENT_TEST"] = str(home)
        # Two DAG bundles: the repository's dags/ and the test-only DAGs next to this file.
        bundles = [
            {"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
             "kwargs": {}},
            {"name": "deployment-tests", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
             "kwargs": {"path": str(TEST_DAGS)}},
        ]
        if extra_dags is not None:
            bundles.append({"name": "extra", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
                            "kwargs": {"path": str(extra_dags)}})
        env["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"] = json.dumps(bundles)
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        home.mkdir(parents=True, exist_ok=True)
        (home / "logs").mkdir(exist_ok=True)
        password = secrets.token_urlsafe(16)
        (home / "passwords.json").write_text(json.dumps({"admin": password}))
        deployment = cls(home=home, database=database, api_port=api_port, env=env, password=password)
        try:
            deployment._migrate()
            for name in COMPONENTS:
                deployment.start_component(name)
            deployment.wait_ready()
        except BaseException:
            deployment.stop()
            raise
        return deployment

    def _migrate(self) -> None:
        log_path = self.home / "logs" / "db-migrate.log"
        with open(log_path, "wb") as out:
            try:
                code = subprocess.run(["airflow", "db", "migrate"], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, timeout=MIGRATE_TIMEOUT).returncode
            except subprocess.TimeoutExpired:
                raise DeploymentError(f"airflow db migrate did not finish in {MIGRATE_TIMEOUT:.0f} s\n"
                                      f"{tail(log_path)}") from None
        if code != 0:
            raise DeploymentError(f"airflow db migrate exited {code}\n{tail(log_path)}")

    def start_component(self, name: str, extra_env: dict[str, str] | None = None) -> Component:
        component = self.components.get(name) or Component(name, COMPONENTS[name], self.home / "logs" / f"{name}.log")
        assert not component.running, f"{name} is already running"
        with open(component.log_path, "ab") as out:
            out.write(f"\n===== starting {name} at {datetime.now().isoformat()} =====\n".encode())
            out.flush()
            # Own session: stopping the component reaches its children (executor workers, trigger runner),
            # never the steps, which the local backend starts in sessions of their own.
            component.process = subprocess.Popen(component.argv, env={**self.env, **(extra_env or {})}, stdout=out,
                                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                 start_new_session=True, preexec_fn=_die_with_parent)
        component.started_at = time.time()
        component.env = dict(extra_env or {})
        self.components[name] = component
        return component

    def kill_component(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to the component's whole process group and wait until its leader is gone."""
        component = self.components[name]
        assert component.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(component.process.pid, sig)
        try:
            component.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(component.process.pid, signal.SIGKILL)
            component.process.wait(STOP_TIMEOUT)
        # The group's other members (a trigger runner, executor workers) must be gone too.
        wait_for(f"every process of {name} to exit", lambda: not _group_alive(component.process.pid),  # type: ignore[union-attr]
                 STOP_TIMEOUT)

    def restart_component(self, name: str, extra_env: dict[str, str] | None = None) -> None:
        """Stop ``name`` (SIGTERM, as a service manager does) and start it again; wait until it is healthy."""
        self.kill_component(name, signal.SIGTERM)
        self.start_component(name, extra_env)
        self.wait_ready([name])

    def set_default_deferrable(self, value: bool) -> None:
        """``[operators] default_deferrable`` on the workers: restart the scheduler (it runs them) if it changes."""
        wanted = str(value)
        current = self.components["scheduler"].env.get("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", "False")
        if current != wanted:
            self.restart_component("scheduler", {"AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": wanted})

    def wait_ready(self, names: list[str] | None = None) -> None:
        """Wait until the API answers and each component has heartbeated since it (re)started."""
        names = names or list(COMPONENTS)

        def healthy() -> bool:
            for name in names:
                component = self.components[name]
                if not component.running:
                    raise DeploymentError(f"{name} exited with {component.process.returncode if component.process else '?'}"
                                          f"\n{tail(component.log_path)}")
            response = httpx.get(f"{self.base_url}/api/v2/monitor/health", timeout=10)
            if response.status_code != 200:
                return False
            health = response.json()
            if health["metadatabase"]["status"] != "healthy":
                return False
            for name in names:
                if name not in HEALTH_KEYS:
                    continue
                key, beat_key = HEALTH_KEYS[name]
                beat = health[key].get(beat_key)
                # A heartbeat from before the (re)start belongs to the previous process.
                if health[key]["status"] != "healthy" or not beat \
                        or datetime.fromisoformat(beat).timestamp() < self.components[name].started_at - 1:
                    return False
            return True

        wait_for(f"{', '.join(names)} to be healthy at {self.base_url}/api/v2/monitor/health", healthy,
                 READY_TIMEOUT, interval=0.5, on_timeout=self.log_tails)

    def stop(self) -> None:
        """Stop every component, then any process left with this deployment's mark; drop the database."""
        if self._client is not None:
            self._client.close()
        # SIGTERM to all first, then wait for each: their graceful shutdowns overlap.
        for component in self.components.values():
            if component.running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(component.process.pid, signal.SIGTERM)  # type: ignore[union-attr]
        for name, component in self.components.items():
            if component.process is not None:
                with contextlib.suppress(Exception):
                    self.kill_component(name, signal.SIGTERM)
        kill_marked_processes(str(self.home))
        with contextlib.suppress(DeploymentError):
            postgres("--drop", self.database)

    # -- the REST API ----------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def api(self) -> httpx.Client:
        """A client of ``/api/v2`` with a JWT from ``POST /auth/token`` (the simple auth manager's login)."""
        if self._client is None:
            response = httpx.post(f"{self.base_url}/auth/token", json={"username": "admin", "password": self.password},
                                  timeout=30)
            assert response.status_code == 201, f"POST /auth/token: {response.status_code} {response.text}"
            token = response.json()["access_token"]
            self._client = httpx.Client(base_url=f"{self.base_url}/api/v2", timeout=30,
                                        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
        return self._client

    def get(self, path: str, **params: Any) -> Any:
        response = self.api.get(path, params=params)
        response.raise_for_status()
        return response.json()

    def wait_for_dags(self, dag_ids: list[str]) -> None:
        def parsed() -> bool:
            return all(self.api.get(f"/dags/{dag_id}").status_code == 200 for dag_id in dag_ids)

        def import_errors() -> str:
            with contextlib.suppress(Exception):
                return "import errors: " + json.dumps(self.get("/importErrors"), indent=1)[:4000]
            return ""

        wait_for(f"DAGs {dag_ids} to be parsed", parsed, READY_TIMEOUT, interval=0.5, on_timeout=import_errors)

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        run_id = f"test_{secrets.token_hex(4)}"
        response = self.api.post(f"/dags/{dag_id}/dagRuns",
                                 json={"dag_run_id": run_id, "logical_date": None, "conf": conf or {}})
        assert response.status_code == 200, f"trigger {dag_id}: {response.status_code} {response.text}"
        return run_id

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return dict(self.get(f"/dags/{dag_id}/dagRuns/{run_id}"))

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 240.0) -> str:
        """Wait until the run ends; return its state (``success`` or ``failed``)."""
        def ended() -> str | None:
            state = self.dag_run(dag_id, run_id)["state"]
            return state if state in ("success", "failed") else None

        return wait_for(f"run {dag_id}/{run_id} to end", ended, timeout, interval=0.5,
                        on_timeout=lambda: self.describe_run(dag_id, run_id))

    def task_instance(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, Any]:
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
        if map_index >= 0:
            path += f"/{map_index}"
        return dict(self.get(path))

    def wait_for_task(self, dag_id: str, run_id: str, task_id: str, condition: Callable[[dict[str, Any]], bool],
                      what: str, timeout: float = 180.0) -> dict[str, Any]:
        """Wait until the task instance satisfies ``condition``; fail at once if it ends without doing so."""
        def check() -> dict[str, Any] | None:
            ti = self.task_instance(dag_id, run_id, task_id)
            if condition(ti):
                return ti
            if ti["state"] in FINAL_TASK_STATES:
                raise DeploymentError(f"{dag_id}/{run_id}/{task_id} ended {ti['state']} (try {ti['try_number']}) "
                                      f"while waiting for: {what}\n{self.describe_run(dag_id, run_id)}")
            return None

        return wait_for(f"{dag_id}/{run_id}/{task_id}: {what}", check, timeout, interval=0.5,
                        on_timeout=lambda: self.describe_run(dag_id, run_id))

    def set_task_state(self, dag_id: str, run_id: str, task_id: str, state: str) -> None:
        response = self.api.patch(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}",
                                  json={"new_state": state})
        assert response.status_code == 200, f"PATCH task instance: {response.status_code} {response.text}"

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        entry = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
                         map_index=map_index)
        return entry["value"]

    def xcom_keys(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[str]:
        """The keys of every XCom row of one task instance (``GET .../xcomEntries``)."""
        body = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries",
                        map_index=map_index, limit=100)
        return sorted(entry["key"] for entry in body["xcom_entries"])

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> list[str]:
        """The task's log as the lines a person reads (``GET .../logs/{try}`` with ``Accept: application/json``):
        an event of several lines (a step's lines read together are one record, core/wait.py) is split."""
        body = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                        full_content="true", map_index=map_index)
        events = [item["event"] if isinstance(item, dict) else str(item) for item in body["content"]]
        return [line for event in events for line in str(event).split("\n")]

    def task_log_json(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        """The task's whole log as JSON text: each event with its fields (an error's ``error_detail`` too)."""
        body = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                        full_content="true", map_index=map_index)
        return json.dumps(body["content"])

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Every task instance of a run, page by page (the API serves at most 100 per page, 50 by default)."""
        found: list[dict[str, Any]] = []
        while True:
            page = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=100, offset=len(found))
            found.extend(page["task_instances"])
            if not page["task_instances"] or len(found) >= page["total_entries"]:
                return found

    def describe_run(self, dag_id: str, run_id: str) -> str:
        """The task instances of a run, with the log of their latest try: what a failure report needs.

        Every page of them (the API serves 50 by default, so a failed map index 194 was left out), the ones
        that did not succeed first, and the logs of at most ``20`` succeeded ones."""
        parts: list[str] = []
        with contextlib.suppress(Exception):
            tis = self.task_instances(dag_id, run_id)
            tis.sort(key=lambda ti: ti["state"] == "success")
            succeeded_shown = 0
            for ti in tis:
                if ti["state"] == "success":
                    succeeded_shown += 1
                    if succeeded_shown > 20:
                        parts.append(f"-- ... and {len(tis) - tis.index(ti)} more succeeded task instances")
                        break
                parts.append(f"-- {ti['task_id']}[{ti['map_index']}] state={ti['state']} try={ti['try_number']}")
                with contextlib.suppress(Exception):
                    lines = self.task_log(dag_id, run_id, ti["task_id"], max(1, ti["try_number"]), ti["map_index"])
                    parts.extend("   " + line for line in lines[-40:])
        return "\n".join(parts)

    def log_tails(self) -> str:
        paths = [self.home / "logs" / "db-migrate.log"] + [c.log_path for c in self.components.values()]
        return "\n".join(f"===== {path.name} (last lines) =====\n{tail(path)}" for path in paths)

    # -- processes -------------------------------------------------------------------------------------

    def task_runner(self, ti_id: str) -> psutil.Process | None:
        """The task runner process of a task instance: the Task SDK names it ``airflow worker -- <ti id>``.

        Searched among all processes: setproctitle reuses the memory of the process's environment for a
        long title, so this process no longer shows the deployment's mark in /proc/PID/environ.
        """
        title = f"airflow worker -- {ti_id}"
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if " ".join(proc.cmdline()).strip() == title and proc.status() != psutil.STATUS_ZOMBIE:
                    return proc
        return None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by SIGKILL (Linux prctl).

    Teardown stops everything normally; this covers a test run that is itself killed hard.
    """
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _group_alive(pgid: int) -> bool:
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


def marked_processes(mark: str) -> Iterator[psutil.Process]:
    """Every live process started (directly or not) by the deployment marked ``mark``."""
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE \
                    and proc.environ().get("REMOTE_ML_DEPLOYMENT_TEST") == mark:
                yield proc


def processes_with_env(name: str, value: str) -> list[psutil.Process]:
    """Live processes whose environment has ``name=value`` (a step's processes carry its control dir)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(name) == value:
                found.append(proc)
    return found


def kill_marked_processes(mark: str) -> None:
    """SIGKILL whatever the deployment left behind (a step a test expected to be gone, an orphan)."""
    for proc in list(marked_processes(mark)):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    with contextlib.suppress(DeploymentError):
        wait_for("processes of the deployment to exit", lambda: not list(marked_processes(mark)), STOP_TIMEOUT)
