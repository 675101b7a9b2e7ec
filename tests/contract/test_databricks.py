"""The databricks backend passes the contract suite against the local Jobs API test server.

The server runs each ``spark_python_task`` as a local subprocess, so the step runtime really runs: the
runtime file is uploaded to DBFS through the DBFS API (the cluster cannot read a path on the worker), and
the artifact root is a local directory that the "cluster" and Airflow share the way a Unity Catalog volume
or a mounted bucket is shared in a deployment.
"""

from __future__ import annotations

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
