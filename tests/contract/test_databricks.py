"""The databricks backend passes the contract suite against the local Jobs API test server.

The server runs each ``spark_python_task`` as a local subprocess, so the step runtime really runs: the
runtime file is uploaded to DBFS through the DBFS API (the cluster cannot read a path on the worker), and
the artifact root is a local directory that the "cluster" and Airflow share the way a Unity Catalog volume
or a mounted bucket is shared in a deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_remote_ml.backends.databricks import DatabricksBackend
from airflow_remote_ml.core import (
    ArtifactStore,
    RunState,
    StepIdentity,
    StepRequest,
    StepSpec,
    TransientBackendError,
)
from airflow_remote_ml.core.wait import failure_error, wait_for_completion
from tests.contract.faults import FaultContract
from tests.contract.suite import BackendContract
from tests.fakes.databricks_api import TERMINAL_LIFE_CYCLE_STATES, FakeDatabricks

TOKEN = "dapi-contract"
CLUSTER = {"spark_version": "15.4.x-scala2.12", "node_type_id": "i3.xlarge", "num_workers": 1}
RUNTIME_DIR = "dbfs:/airflow-remote-ml/runtime"
#: The fake driver's memory: far above a python3 step's, far below what ``oom_spec`` allocates.
DRIVER_MEMORY_MB = 128
QUICK = {"poll_first_delay": 0.1, "poll_quick_delay": 0.3, "poll_quick_window": 60, "poll_cap": 1.0,
         "retry_delay": 0.1}


@pytest.fixture
def dbx(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDatabricks]:
    with FakeDatabricks(token=TOKEN, driver_memory_mb=DRIVER_MEMORY_MB) as server:
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", server.connection_json())
        yield server


class DatabricksFaults:
    """The fault contract's ``FaultyService`` for Databricks, on the Jobs API double.

    ``jobs`` reads the double's own state: every run whose name ends with the identity's token (the way
    ``find`` matches, see ``_payload.run_name``) or that was submitted with its idempotency token.
    """

    supports = frozenset({"slow_create", "lost_create", "outage", "rate_limit", "deleted", "oom",
                          "token_revoked"})

    def __init__(self, server: FakeDatabricks) -> None:
        self.server = server

    def jobs(self, identity: StepIdentity) -> list[tuple[str, bool]]:
        token = identity.idempotency_token
        found = []
        for run_id in self.server.run_ids:  # oldest first
            try:
                run = self.server.get_run(run_id)
                submitted = self.server.idempotency_token(run_id)
            except Exception:  # deleted between the listing and the read
                continue
            if str(run.get("run_name", "")).endswith(f" {token}") or submitted == token:
                running = run["state"]["life_cycle_state"] not in TERMINAL_LIFE_CYCLE_STATES
                found.append((str(run_id), running))
        return found

    def slow_create(self, seconds: float) -> None:
        self.server.slow_next("jobs/runs/submit", seconds)

    def lose_create_response(self) -> None:
        self.server.drop_response_next("jobs/runs/submit")

    def outage(self, seconds: float) -> None:
        self.server.outage(seconds)

    def rate_limit(self, count: int, retry_after: float) -> None:
        self.server.rate_limit(count, retry_after)

    def delete_job(self, job_id: str) -> None:
        self.server.delete_run(int(job_id))

    def revoke_token(self) -> None:
        """"token_revoked": the connection's token stops working (403 "Invalid access token.")."""
        self.server.revoke_token(TOKEN)

    def oom_spec(self) -> dict[str, Any]:
        # The whole driver dies (runtime included), as a driver OOM does: DRIVER_ERROR, no manifest.
        hog = f"import time; print('allocating', flush=True); hog = b'x' * ({3 * DRIVER_MEMORY_MB} << 20); " \
              "time.sleep(120)"
        return {"command": ["python3", "-c", hog]}


@pytest.fixture
def service(dbx: FakeDatabricks) -> DatabricksFaults:
    return DatabricksFaults(dbx)


@pytest.fixture
def fault_backend(dbx: FakeDatabricks) -> Iterator[DatabricksBackend]:
    """A 1 s client request timeout, so ``slow_create(3)`` outlasts it; few retries, so faults show."""
    backend = DatabricksBackend.from_config({"new_cluster": CLUSTER, "runtime_dir": RUNTIME_DIR, **QUICK,
                                             "request_timeout": 1, "retry_limit": 2, "max_retry_after": 5})
    yield backend
    backend.close()


@pytest.mark.integration
@pytest.mark.timeout(300)
class TestDatabricksBackend(BackendContract):
    supports_inputs = True

    @pytest.fixture
    def backend(self, dbx: FakeDatabricks, tmp_path) -> Iterator[DatabricksBackend]:
        # Quick checks keep the suite fast; the schedule itself is tested in the unit tests.
        backend = DatabricksBackend.from_config({"new_cluster": CLUSTER, "runtime_dir": RUNTIME_DIR, **QUICK})
        yield backend
        backend.close()

    @pytest.fixture
    def artifact_root(self, tmp_path) -> str:
        return str(tmp_path / "artifacts")

    @pytest.fixture
    def image(self) -> None:
        return None


@pytest.mark.integration
@pytest.mark.timeout(300)
class TestDatabricksFaults:
    """The adapter's faults, driven through the backend: exactly one run, none left running, the right words."""

    def request(self, tmp_path: Any, command: list[str] | None = None, **spec: Any) -> StepRequest:
        identity = StepIdentity("faults", "step", f"run-{uuid.uuid4().hex[:10]}")
        spec.setdefault("command", command or ["python3", "-c", "import time; time.sleep(60)"])
        return StepRequest.create(StepSpec.build(**spec), identity, ArtifactStore(str(tmp_path / "artifacts")))

    @pytest.mark.parametrize("fault", ["slow_create", "lost_create"])
    def test_an_ambiguous_create_leaves_exactly_one_run(self, service: DatabricksFaults,
                                                         fault_backend: DatabricksBackend, tmp_path: Any,
                                                         fault: str) -> None:
        request = self.request(tmp_path)
        service.slow_create(3) if fault == "slow_create" else service.lose_create_response()
        try:
            handle = fault_backend.submit(request)
        except TransientBackendError:
            handle = fault_backend.submit(request)  # what the lifecycle does: idempotent, so at once
        assert [job for job, _ in service.jobs(request.identity)] == [handle.job_id]
        fault_backend.cancel(handle)
        deadline = time.monotonic() + 60
        while any(running for _, running in service.jobs(request.identity)):
            assert time.monotonic() < deadline, "the run never stopped after its cancel"
            time.sleep(0.1)

    def test_a_429_burst_is_waited_out(self, service: DatabricksFaults, fault_backend: DatabricksBackend,
                                       tmp_path: Any) -> None:
        request = self.request(tmp_path)
        handle = fault_backend.submit(request)
        service.rate_limit(1, retry_after=1)
        assert fault_backend.poll(handle).state in (RunState.QUEUED, RunState.RUNNING)
        fault_backend.cancel(handle)

    def test_a_deleted_run_is_lost(self, service: DatabricksFaults, fault_backend: DatabricksBackend,
                                   tmp_path: Any) -> None:
        request = self.request(tmp_path)
        handle = fault_backend.submit(request)
        service.delete_job(handle.job_id)
        assert fault_backend.poll(handle).state is RunState.LOST
        assert service.jobs(request.identity) == []

    def test_oom_reaches_the_reason(self, service: DatabricksFaults, fault_backend: DatabricksBackend,
                                    tmp_path: Any) -> None:
        request = self.request(tmp_path, **service.oom_spec())
        handle = fault_backend.submit(request)
        outcome = wait_for_completion(fault_backend, handle, deadline=time.monotonic() + 120)
        assert outcome.status.state is RunState.FAILED and outcome.status.reason == "DRIVER_ERROR"
        assert "allocating" in str(failure_error(fault_backend, handle, outcome.status, outcome.tail))
        assert service.jobs(request.identity) == [(handle.job_id, False)]

    def test_a_revoked_token_names_the_connection(self, service: DatabricksFaults,
                                                  fault_backend: DatabricksBackend, tmp_path: Any) -> None:
        from airflow_remote_ml.core import BackendAPIError

        handle = fault_backend.submit(self.request(tmp_path))
        service.revoke_token()
        with pytest.raises(BackendAPIError, match="databricks_default") as caught:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the submit's own read may stand in for the first check
                fault_backend.poll(handle)
        assert caught.value.status_code == 403 and not isinstance(caught.value, TransientBackendError)
        service.server.cancel(int(handle.job_id))


@pytest.mark.integration
@pytest.mark.timeout(300)
class TestDatabricksFaultContract(FaultContract):
    """The shared fault contract (tests/contract/faults.py) on the Jobs API double."""

    # A runtime step on the double is a local process: it can ignore SIGTERM, and the runs/cancel the
    # double honours after TERMINATING ends it (Databricks kills the driver). Crashes, kills and defer are
    # the lifecycle's; they run here against the double's Jobs API too. Not "trigger_restart": a run's
    # output (runs/get-output) is only there once the run has ended, so there is no stream to resume.
    supports = DatabricksFaults.supports | {"crash", "kill", "defer", "ignores_sigterm"}

    @pytest.fixture
    def artifact_root(self, tmp_path) -> str:
        return str(tmp_path / "artifacts")

    @pytest.fixture
    def image(self) -> None:
        return None


# -- the shared run list of waiting deferred steps (backends/databricks/_shared.py) -------------------------

#: A short cap keeps the lists coming every 0.9 s; each ``await_change`` below is given far longer than that,
#: so a waiter is served by a list long before its own check would be due (no timing decides the counts).
SHARED = {"poll_first_delay": 0.1, "poll_factor": 3.0, "poll_cap": 1.0, "retry_delay": 0.1, "retry_limit": 2,
          "watch_manifest": False}
LONG = 120.0


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDatabricks]:
    """Runs stay PENDING (active, no process) until released or cancelled: as many as a test wants, cheaply."""
    with FakeDatabricks(token=TOKEN, hold_pending=True, cancel_seconds=0.1) as server:
        monkeypatch.setenv("AIRFLOW_CONN_DATABRICKS_DEFAULT", server.connection_json())
        yield server


def _submit_many(server: FakeDatabricks, tmp_path: Any, count: int) -> list[tuple[DatabricksBackend, Any]]:
    store = ArtifactStore(str(tmp_path / "artifacts"))
    waiting = []
    for i in range(count):
        backend = DatabricksBackend.from_config({"new_cluster": CLUSTER, "runtime_dir": RUNTIME_DIR, **SHARED})
        spec = StepSpec.build(command=["python3", "-c", "pass"])
        identity = StepIdentity("shared", f"step{i}", uuid.uuid4().hex[:10])
        waiting.append((backend, backend.submit(StepRequest.create(spec, identity, store))))
    return waiting


def _gets(server: FakeDatabricks, run_id: Any) -> int:
    return sum(1 for r in server.requests if r.endpoint == "jobs/runs/get" and
               int(r.params.get("run_id", 0)) == int(run_id))


async def _first_checks(waiting: list[tuple[DatabricksBackend, Any]], *, join: bool = True) -> None:
    """What the trigger does first: one apoll each (the submit's own read may stand in for it); then one
    wait each, which joins them all to the shared list."""
    for backend, handle in waiting:
        assert not (await backend.apoll(handle)).is_terminal
    if join:
        states = await asyncio.gather(*(b.await_change(h, LONG) for b, h in waiting))
        assert [s.state for s in states] == [RunState.QUEUED] * len(waiting)


async def _close_all(waiting: list[tuple[DatabricksBackend, Any]]) -> None:
    for backend, _ in waiting:
        await backend.aclose()


@pytest.mark.integration
@pytest.mark.timeout(300)
class TestDatabricksSharedList:
    """N deferred waits on one workspace share one paged ``runs/list`` of active runs."""

    def test_many_waiting_runs_share_one_paged_list(self, held: FakeDatabricks, tmp_path: Any) -> None:
        from airflow_remote_ml.backends.databricks._shared import live_watches

        waiting = _submit_many(held, tmp_path, 30)  # two pages of 25

        async def scenario() -> list[RunState]:
            await _first_checks(waiting, join=False)
            held.reset_counts()
            states = await asyncio.gather(*(b.await_change(h, LONG) for b, h in waiting))
            # Every wait was served by the same list: two pages, no runs/get of its own.
            calls = held.calls
            assert calls["jobs/runs/get"] == 0, calls
            lists = [r for r in held.requests if r.endpoint == "jobs/runs/list"]
            assert lists and all(r.params.get("active_only") in ("true", True) for r in lists)
            assert len(lists) % 2 == 0 and len(lists) <= 4, [r.params for r in lists]
            (watch,) = live_watches()
            assert watch.count == 30
            await _close_all(waiting)
            return [s.state for s in states]

        assert asyncio.run(scenario()) == [RunState.QUEUED] * 30
        for _, handle in waiting:
            held.cancel(int(handle.job_id))

    def test_a_run_that_left_the_list_is_read_once_and_the_others_keep_waiting(
            self, held: FakeDatabricks, tmp_path: Any) -> None:
        waiting = _submit_many(held, tmp_path, 4)
        (ended_backend, ended), others = waiting[0], waiting[1:]

        async def scenario() -> None:
            await _first_checks(waiting)
            held.cancel(int(ended.job_id))
            held.wait_until_terminal(int(ended.job_id))
            held.reset_counts()
            status = await ended_backend.await_change(ended, LONG)
            assert status.state is RunState.CANCELLED
            # One read of its own (and its output), none for the runs still listed.
            assert _gets(held, ended.job_id) == 1
            for backend, handle in others:
                assert (await backend.await_change(handle, LONG)).state is RunState.QUEUED
                assert _gets(held, handle.job_id) == 0
            await _close_all(waiting)

        asyncio.run(scenario())
        for _, handle in others:
            held.cancel(int(handle.job_id))

    def test_a_deleted_run_is_lost(self, held: FakeDatabricks, tmp_path: Any) -> None:
        waiting = _submit_many(held, tmp_path, 3)
        (backend, deleted) = waiting[0]

        async def scenario() -> None:
            await _first_checks(waiting)
            held.delete_run(int(deleted.job_id))
            assert (await backend.await_change(deleted, LONG)).state is RunState.LOST
            for other, handle in waiting[1:]:
                assert (await other.await_change(handle, LONG)).state is RunState.QUEUED
            await _close_all(waiting)

        asyncio.run(scenario())
        for _, handle in waiting[1:]:
            held.cancel(int(handle.job_id))

    def test_an_outage_of_the_list_is_a_transient_error_for_every_waiter(
            self, held: FakeDatabricks, tmp_path: Any) -> None:
        waiting = _submit_many(held, tmp_path, 5)

        async def wait_through_outage(backend: DatabricksBackend, handle: Any) -> tuple[int, RunState]:
            errors = 0
            while True:  # what the trigger's Follower does: count the transient error, look again
                try:
                    return errors, (await backend.await_change(handle, 0.1 if held.outage_active else LONG)).state
                except TransientBackendError:
                    errors += 1
                    if errors == 1:
                        seen_error.add(handle.job_id)
                        if len(seen_error) == len(waiting):
                            held.end_outage()
                    await asyncio.sleep(0.05)

        seen_error: set[str] = set()

        async def scenario() -> list[tuple[int, RunState]]:
            await _first_checks(waiting)
            held.outage(3600)  # ended by the test once every waiter has seen it
            results = await asyncio.gather(*(wait_through_outage(b, h) for b, h in waiting))
            await _close_all(waiting)
            return results

        results = asyncio.run(scenario())
        assert all(errors >= 1 and state is RunState.QUEUED for errors, state in results), results
        for _, handle in waiting:
            held.cancel(int(handle.job_id))

    def test_cancelling_one_waiter_does_not_stop_the_others(self, held: FakeDatabricks, tmp_path: Any) -> None:
        from airflow_remote_ml.backends.databricks._shared import live_watches

        waiting = _submit_many(held, tmp_path, 4)

        async def scenario() -> None:
            await _first_checks(waiting)
            (watch,) = live_watches()
            tasks = [asyncio.create_task(b.await_change(h, LONG)) for b, h in waiting]
            await asyncio.sleep(0)
            tasks[0].cancel()  # the trigger of one task was cancelled (task killed, triggerer moving it)
            with contextlib.suppress(asyncio.CancelledError):
                await tasks[0]
            await waiting[0][0].aclose()  # the trigger's finally
            assert [t.state for t in await asyncio.gather(*tasks[1:])] == [RunState.QUEUED] * 3
            assert watch.count == 3 and not watch.closed
            await _close_all(waiting[1:])
            # Nobody waits: the list stops (after its linger) and is not taken again.
            deadline = time.monotonic() + 60
            while not watch.closed:
                assert time.monotonic() < deadline, "the shared list outlived its waiters"
                await asyncio.sleep(0.05)
            assert live_watches() == []

        asyncio.run(scenario())
        for _, handle in waiting:
            held.cancel(int(handle.job_id))
