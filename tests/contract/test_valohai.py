"""The valohai backend passes the contract suite against a local server speaking the Valohai v0 API.

The suite's steps are ``python3 -c`` commands that use the runtime's conventions (``REMOTE_ML_OUTPUT_*``,
``{outputs.x}`` placeholders), which a Valohai step of its own does not have. The backend's *runtime
mode* is exactly for such steps: the execution runs the generic ``remote-ml-runtime`` step of
``backends/valohai/valohai.yaml`` (loaded from that file here), whose command starts the runtime that the
backend sends along. Everything else is real Valohai behaviour as the test server reproduces it: the step
runs as a process with ``VH_*`` directories, outputs become datums, logs come from the events API, a time
limit or a stop ends the execution.

The fault contract (``tests/contract/faults.py``) gets its ``service`` (a :class:`ValohaiFaults`
adapter over the API test server's knobs) and ``fault_backend`` (a 1 s client request timeout, so
``slow_create(3)`` outlasts it) fixtures from this module.

Two configurations run the suite:

* ``TestValohaiBackend`` exports outputs to the artifact root (``export_outputs``), the way a Valohai
  step feeds a step on another backend. One test is overridden: an exported output under a *local*
  artifact root is a path on the Airflow worker, which a next Valohai execution cannot download
  (Valohai fetches inputs from URLs only), so chaining it is a ConfigError before submit.
* ``TestValohaiBackendDatumOutputs`` keeps outputs on Valohai as ``datum://`` URIs, the default. One test
  is overridden, because its assumption (the output lives at the artifact-store URI the request names)
  does not hold for a platform that stores outputs itself; the override asserts the datum instead. The
  chaining test then passes a ``datum://`` from one Valohai execution to the next, as the platform does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_remote_ml.backends.valohai import IDENTITY_TAG_PREFIX, ValohaiBackend
from airflow_remote_ml.core import ConfigError, RunState, StepIdentity
from tests.contract.faults import FaultContract
from tests.contract.suite import WRITE_MODEL, BackendContract
from tests.fakes.valohai_api import INCOMPLETE_STATUSES, FakeValohai

TOKEN = "contract-token"
VALOHAI_YAML = Path(__file__).resolve().parents[2] / "backends" / "valohai" / "valohai.yaml"


#: A machine too small for the OOM step below (the fake kills the biggest process beyond it, as the
#: kernel's OOM killer does in a memory-limited container).
SMALL_MACHINE = "fake-small-64m"


@pytest.fixture
def valohai(tmp_path: Path) -> Iterator[FakeValohai]:
    repository = tmp_path / "repository"
    repository.mkdir()
    with FakeValohai(token=TOKEN, stop_grace=1.0) as server:
        server.add_environment(SMALL_MACHINE, memory_mib=64)
        server.add_project("contract", config=VALOHAI_YAML.read_text(), repository=repository)
        yield server


class ValohaiFaults:
    """The fault contract's view of the Valohai API test server (``FaultyService`` in tests/contract)."""

    supports = frozenset({"slow_create", "lost_create", "outage", "rate_limit", "deleted", "oom"})

    def __init__(self, server: FakeValohai) -> None:
        self.server = server

    def jobs(self, identity: StepIdentity) -> list[tuple[str, bool]]:
        """Every execution ever created with the identity's tag, oldest first, from the server's state."""
        tag = f"{IDENTITY_TAG_PREFIX}{identity.digest}"
        with self.server.lock:
            mine = sorted((ex for ex in self.server.executions.values() if tag in ex.tags), key=lambda ex: ex.counter)
            return [(ex.id, ex.status in INCOMPLETE_STATUSES) for ex in mine]

    def slow_create(self, seconds: float) -> None:
        self.server.slow_create(seconds)

    def lose_create_response(self) -> None:
        self.server.lose_create_response()

    def outage(self, seconds: float) -> None:
        self.server.outage(seconds)

    def rate_limit(self, count: int, retry_after: float) -> None:
        self.server.rate_limit(count, retry_after)

    def delete_job(self, job_id: str) -> None:
        self.server.delete_execution(job_id)

    def oom_spec(self) -> dict[str, Any]:
        """A step that grows past its machine's memory; Valohai ends it in ``error`` saying so."""
        grow = "import time; x = b'x' * (512 << 20); time.sleep(120)"
        return {"command": ["python3", "-c", grow], "backend_options": {"valohai": {"environment": SMALL_MACHINE}}}


@pytest.fixture
def service(valohai: FakeValohai) -> ValohaiFaults:
    return ValohaiFaults(valohai)


@pytest.fixture
def fault_backend(valohai: FakeValohai) -> Iterator[ValohaiBackend]:
    """A backend whose client gives up after 1 s, so a slow create (3 s) is ambiguous to it."""
    backend = ValohaiBackend.from_config({
        "host": valohai.url, "token": TOKEN, "project": "contract", "branch": "main",
        "runtime_step": "remote-ml-runtime", "request_timeout": 1.0, "max_retries": 2, "max_retry_wait": 2.0,
    })
    yield backend
    backend.close()


@pytest.mark.integration
@pytest.mark.timeout(300)
class TestValohaiBackend(BackendContract):
    export_outputs = True

    @pytest.fixture
    def backend(self, valohai: FakeValohai) -> Iterator[ValohaiBackend]:
        backend = ValohaiBackend.from_config({
            "host": valohai.url, "token": TOKEN, "project": "contract", "branch": "main",
            "runtime_step": "remote-ml-runtime", "export_outputs": self.export_outputs,
        })
        yield backend
        backend.close()

    @pytest.fixture
    def artifact_root(self, tmp_path: Path) -> str:
        return str(tmp_path / "artifacts")

    @pytest.fixture
    def image(self) -> None:
        return None


    def test_output_of_one_step_is_input_of_the_next(self, backend, artifact_root, image, valohai):
        """Overridden: an output exported under a local artifact root cannot feed a Valohai execution."""
        first = self.request(artifact_root, image, task_id="first", outputs=["data"], command=[
            "python3", "-c", "import os; open(os.environ['REMOTE_ML_OUTPUT_DATA'], 'w').write('rows')"])
        handle, outcome, _ = self.run(backend, first)
        assert outcome.status.is_successful, outcome
        exported = backend.fetch_result(handle).outputs["data"]
        assert open(exported).read() == "rows"  # readable by a step on another backend
        second = self.request(artifact_root, image, task_id="second", command=["python3", "-c", WRITE_MODEL],
                              inputs={"data": exported}, outputs=["model"])
        created = len(valohai.executions)
        with pytest.raises(ConfigError) as err:
            backend.validate(second)
        assert err.value.field == "inputs.data"
        assert len(valohai.executions) == created


class TestValohaiBackendDatumOutputs(TestValohaiBackend):
    export_outputs = False

    # A datum:// output is a URL Valohai downloads: the suite's chaining test holds as written.
    test_output_of_one_step_is_input_of_the_next = BackendContract.test_output_of_one_step_is_input_of_the_next  # type: ignore[assignment]

    def test_success_returns_outputs_and_metrics(self, backend, artifact_root, image, valohai):
        """Overridden: the output is a datum of the execution, not a file under the artifact root."""
        request = self.request(artifact_root, image, command=["python3", "-c", WRITE_MODEL], outputs=["model"])
        handle, outcome, lines = self.run(backend, request)
        assert outcome.status.state is RunState.SUCCEEDED, outcome
        result = backend.fetch_result(handle)
        uri = result.outputs["model"]
        assert uri.startswith("datum://")
        datum = valohai.data[uri.removeprefix("datum://")]
        assert datum.name == "model" and datum.output_execution_id == handle.job_id
        assert open(datum.path).read() == "model:"
        assert not os.path.exists(request.outputs["model"])  # nothing was copied
        assert result.metrics["rmse"] == 0.25 and result.metrics["epochs"] == 3
        assert result.manifest["outputs"]["model"]["size"] == len("model:")
        assert "preparing" in lines and "done" in lines, lines
        xcom = result.to_xcom()
        assert set(xcom) == {"outputs", "metrics", "backend", "job_id", "url"}
        assert "Signature" not in json.dumps(xcom) and len(json.dumps(xcom)) < 4096


# -- the fault contract ------------------------------------------------------------------------------------

# The adapter's own tests below check that each knob does what the contract expects of it.


@pytest.mark.integration
@pytest.mark.timeout(300)
class TestValohaiFaultContract(FaultContract):
    """The shared fault contract (tests/contract/faults.py) on the Valohai API double."""

    # The double runs each execution as local processes and kills them on a stop, after its grace.
    supports = ValohaiFaults.supports | {"crash", "kill", "defer", "trigger_restart", "ignores_sigterm"}

    @pytest.fixture
    def artifact_root(self, tmp_path) -> str:
        return str(tmp_path / "artifacts")

    @pytest.fixture
    def image(self) -> None:
        return None


@pytest.mark.integration
@pytest.mark.timeout(300)
class TestValohaiFaultAdapter:
    """The adapter and the fault backend: each knob seen through the backend as the contract sees it."""

    def request(self, tmp_path: Path, **spec: Any):
        return BackendContract().request(str(tmp_path / "artifacts"), None, **spec)

    def test_a_slow_create_is_ambiguous_yet_creates_exactly_one_job(self, service, fault_backend, tmp_path):
        from airflow_remote_ml.core import TransientBackendError

        request = self.request(tmp_path, command=["python3", "-c", "print('hi')"])
        service.slow_create(3)
        with pytest.raises(TransientBackendError):
            fault_backend.submit(request)
        [(job_id, _)] = service.jobs(request.identity)
        found = fault_backend.find(request.identity)
        assert found is not None and found.job_id == job_id

    def test_a_lost_create_response_is_ambiguous_yet_creates_exactly_one_job(self, service, fault_backend,
                                                                            tmp_path):
        from airflow_remote_ml.core import TransientBackendError

        request = self.request(tmp_path, command=["python3", "-c", "print('hi')"])
        service.lose_create_response()
        with pytest.raises(TransientBackendError):
            fault_backend.submit(request)
        assert len(service.jobs(request.identity)) == 1
        assert fault_backend.find(request.identity) is not None

    def test_a_burst_of_429_refuses_the_create_for_now_with_retry_after(self, service, fault_backend, tmp_path):
        from airflow_remote_ml.core import TransientBackendError

        request = self.request(tmp_path, command=["python3", "-c", "print('hi')"])
        fault_backend.project_id()  # resolved before the burst, as after an earlier step
        fault_backend.branch_commit(fault_backend.project_id(), "main")
        service.rate_limit(1, 4)
        service.server.inject_fault(429, count=1, retry_after=4, method="POST", path="/api/v0/executions/")
        with pytest.raises(TransientBackendError) as err:
            fault_backend.submit(request)
        assert err.value.retry_after == 4 and service.jobs(request.identity) == []

    def test_an_outage_makes_a_poll_transient(self, service, fault_backend, tmp_path):
        from airflow_remote_ml.core import TransientBackendError

        handle = fault_backend.submit(self.request(tmp_path, command=["python3", "-c", "print('hi')"]))
        service.outage(3600)
        with pytest.raises(TransientBackendError):
            fault_backend.poll(handle)
        service.server.end_outage()

    def test_a_deleted_job_is_lost_and_no_longer_running(self, service, fault_backend, tmp_path):
        request = self.request(tmp_path, command=["python3", "-c", "import time; time.sleep(60)"])
        handle = fault_backend.submit(request)
        service.delete_job(handle.job_id)
        assert fault_backend.poll(handle).state is RunState.LOST
        assert service.jobs(request.identity) == []

    def test_the_oom_step_fails_with_the_platform_reason_and_words(self, service, fault_backend, tmp_path):
        from airflow_remote_ml.core.wait import failure_error

        request = self.request(tmp_path, **service.oom_spec())
        handle, outcome, _ = BackendContract().run(fault_backend, request)
        status = outcome.status
        assert status.state is RunState.FAILED and status.reason == "error"
        assert "Out of memory" in status.message and status.exit_code == 137
        assert "Out of memory" in str(failure_error(fault_backend, handle, status, outcome.tail))
        assert service.jobs(request.identity) == [(handle.job_id, False)]


# -- deferred waits on the shared list: per-step log reads (backends/valohai/_shared.py) --------------------

IDLE = [{"step": {"name": "idle", "image": "busybox", "command": "echo started; sleep 600"}}]


@pytest.fixture
def waits() -> Iterator[FakeValohai]:
    with FakeValohai(token=TOKEN, stop_grace=0.5) as server:
        server.add_project("waits", config=IDLE)
        yield server


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_shared_waits_pace_their_log_reads_and_stop_reading_when_their_trigger_is_gone(
        waits: FakeValohai, tmp_path: Path) -> None:
    """On the shared list each execution's log is its own request: read at most once per
    shared_log_interval while waiting, and never again once its waiter left (the list goes on)."""
    import asyncio
    import time
    import uuid

    from airflow_remote_ml.core import ArtifactStore, StepRequest, StepSpec

    count = 4
    backends = [ValohaiBackend.from_config({
        "host": waits.url, "token": TOKEN, "project": "waits", "branch": "main",
        "steps": {"idle:step": "idle"}, "shared_watch_from": 2, "shared_log_interval": 3600})
        for _ in range(count)]
    store = ArtifactStore(str(tmp_path / "artifacts"))
    handles = [b.submit(StepRequest.create(StepSpec.build(callable="idle:step"),
                                           StepIdentity("waits", f"step{i}", uuid.uuid4().hex[:10]), store))
               for i, b in enumerate(backends)]

    def naming(job_id: str) -> int:
        return sum(1 for _, path, _ in waits.request_log if job_id in path)

    cursors: dict[str, Any] = {}

    async def scenario() -> None:
        for b, h in zip(backends, handles, strict=True):
            await b.apoll(h)
            # The read that follows a look (it may use the look's inline events).
            cursors[h.job_id] = (await b.aread_logs(h)).cursor
        deadline = time.monotonic() + 60
        # A wait joins the shared list; short ones, until every execution has been on a list.
        while not all(b._watching.get(h.job_id) and b._watching[h.job_id][0].listed_at
                      for b, h in zip(backends, handles, strict=True)):
            assert time.monotonic() < deadline, "the shared list never started"
            await asyncio.gather(*(b.await_change(h, 0.2) for b, h in zip(backends, handles, strict=True)))
        watch = backends[0]._watching[handles[0].job_id][0]
        # Paced: within the interval a log read is no request at all.
        before = [naming(h.job_id) for h in handles]
        for b, h in zip(backends, handles, strict=True):
            assert (await b.aread_logs(h, cursors[h.job_id])).lines == []
        assert [naming(h.job_id) for h in handles] == before
        # Nobody reads the first execution any more: two more lists go by without a request naming it.
        await backends[0].aclose()
        gone = naming(handles[0].job_id)
        for _ in range(2):
            listed = watch.listed_at
            while watch.listed_at == listed:
                assert time.monotonic() < deadline + 120, "the shared list stopped"
                await watch.changed(30)
        assert naming(handles[0].job_id) == gone
        for b in backends[1:]:
            await b.aclose()

    try:
        asyncio.run(scenario())
    finally:
        for b, h in zip(backends, handles, strict=True):
            b.cancel(h)
            b.close()
