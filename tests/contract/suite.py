"""The contract every backend passes: one abstract suite, one line per backend.

A backend's test module provides three fixtures and inherits the tests::

    class TestLocal(BackendContract):
        @pytest.fixture
        def backend(self, tmp_path): return LocalBackend.from_config({...})
        @pytest.fixture
        def artifact_root(self, tmp_path): return str(tmp_path / "artifacts")
        @pytest.fixture
        def image(self): return None

Steps are ``python3`` commands, so they run in any image with python3 and need no code in it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any

import pytest

from airflow_remote_ml.core import (
    ArtifactStore,
    Backend,
    ConfigError,
    RunHandle,
    RunState,
    StepIdentity,
    StepRequest,
    StepSpec,
)
from airflow_remote_ml.core.wait import await_completion, failure_error, wait_for_completion

WRITE_MODEL = (
    "import json, os\n"
    "print('preparing', flush=True)\n"
    "print(json.dumps({'rmse': 0.25, 'epochs': 3}), flush=True)\n"
    "data = open(os.environ['REMOTE_ML_INPUT_DATA']).read() if 'REMOTE_ML_INPUT_DATA' in os.environ else ''\n"
    "open(os.environ['REMOTE_ML_OUTPUT_MODEL'], 'w').write('model:' + data)\n"
    "print('done', flush=True)\n"
)


class BackendContract:
    """Inherit and provide the ``backend``, ``artifact_root`` and ``image`` fixtures."""

    #: Seconds the suite waits for any job to end; generous, these are correctness tests.
    wait_timeout: float = 120.0
    #: Whether the backend can pass an input file between two steps through the artifact root.
    supports_inputs: bool = True

    # -- helpers --------------------------------------------------------------------------------------

    def request(self, artifact_root: str, image: str | None, **spec: Any) -> StepRequest:
        spec.setdefault("image", image)
        identity = StepIdentity("contract", spec.pop("task_id", "step"), f"run-{uuid.uuid4().hex[:12]}")
        return StepRequest.create(StepSpec.build(**spec), identity, ArtifactStore(artifact_root))

    def run(self, backend: Backend, request: StepRequest):
        backend.validate(request)
        handle = backend.submit(request)
        lines: list[str] = []
        outcome = wait_for_completion(backend, handle, on_line=lines.append,
                                      deadline=time.monotonic() + self.wait_timeout)
        assert not outcome.timed_out, f"job did not finish in {self.wait_timeout}s: {outcome.status}"
        return handle, outcome, lines

    def wait_until(self, backend: Backend, handle: RunHandle, states: set[RunState]) -> None:
        deadline = time.monotonic() + self.wait_timeout
        while backend.poll(handle).state not in states:
            assert time.monotonic() < deadline, f"job never reached {states}"
            time.sleep(0.1)

    # -- submit → poll → terminal → result ------------------------------------------------------------

    def test_success_returns_outputs_and_metrics(self, backend, artifact_root, image):
        request = self.request(artifact_root, image, command=["python3", "-c", WRITE_MODEL], outputs=["model"])
        handle, outcome, lines = self.run(backend, request)
        assert outcome.status.state is RunState.SUCCEEDED, outcome
        result = backend.fetch_result(handle)
        assert result.outputs == {"model": request.outputs["model"]}
        assert result.metrics["rmse"] == 0.25 and result.metrics["epochs"] == 3
        assert result.backend == backend.name and result.job_id == handle.job_id
        assert result.manifest["outputs"]["model"]["size"] == len("model:")
        assert "preparing" in lines and "done" in lines, lines
        xcom = result.to_xcom()
        assert set(xcom) == {"outputs", "metrics", "backend", "job_id", "url"}
        assert len(json.dumps(xcom)) < 4096

    def test_output_of_one_step_is_input_of_the_next(self, backend, artifact_root, image):
        if not self.supports_inputs:
            pytest.skip("this backend cannot pass files between steps")
        first = self.request(artifact_root, image, task_id="first",
                             command=["python3", "-c",
                                      "import os; open(os.environ['REMOTE_ML_OUTPUT_DATA'], 'w').write('rows')"],
                             outputs=["data"])
        handle, outcome, _ = self.run(backend, first)
        assert outcome.status.is_successful, outcome
        uri = backend.fetch_result(handle).outputs["data"]
        second = self.request(artifact_root, image, task_id="second", command=["python3", "-c", WRITE_MODEL],
                              inputs={"data": uri}, outputs=["model"])
        handle2, outcome2, _ = self.run(backend, second)
        assert outcome2.status.is_successful, outcome2
        result = backend.fetch_result(handle2)
        assert result.manifest["versions"]["inputs"] == {"data": uri}
        assert result.manifest["outputs"]["model"]["size"] == len("model:rows")

    def test_placeholders_in_command_arguments(self, backend, artifact_root, image):
        request = self.request(
            artifact_root, image, outputs=["report"], params={"alpha": 0.5},
            command=["python3", "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
                     "{outputs.report}", "alpha={params.alpha}"],
        )
        handle, outcome, _ = self.run(backend, request)
        assert outcome.status.is_successful, outcome
        assert backend.fetch_result(handle).manifest["outputs"]["report"]["size"] == len("alpha=0.5")

    def test_failing_step_reports_exit_code_and_log_tail(self, backend, artifact_root, image):
        request = self.request(artifact_root, image, command=[
            "python3", "-c", "import sys; print('loading data', flush=True); print('boom', file=sys.stderr); sys.exit(7)"])
        handle, outcome, lines = self.run(backend, request)
        assert outcome.status.state is RunState.FAILED
        assert outcome.status.exit_code == 7
        error = failure_error(backend, handle, outcome.status, outcome.tail)
        assert error.exit_code == 7
        assert any("loading data" in line for line in error.log_tail)
        assert "exit code: 7" in str(error)
        if handle.url:
            assert handle.url in str(error)

    def test_missing_declared_output_fails_naming_it(self, backend, artifact_root, image):
        request = self.request(artifact_root, image, command=["python3", "-c", "print('forgot')"],
                               outputs=["model", "metrics_report"])
        handle, outcome, _ = self.run(backend, request)
        assert outcome.status.state is RunState.FAILED
        error = failure_error(backend, handle, outcome.status, outcome.tail)
        assert "'model'" in str(error) and "'metrics_report'" in str(error)

    def test_step_timeout_stops_the_step(self, backend, artifact_root, image):
        request = self.request(artifact_root, image, command=["python3", "-c", "import time; time.sleep(60)"],
                               timeout=1)
        started = time.monotonic()
        handle, outcome, _ = self.run(backend, request)
        assert outcome.status.state in (RunState.FAILED, RunState.CANCELLED)
        assert time.monotonic() - started < 55

    # -- cancel, find, handles ------------------------------------------------------------------------

    def test_cancel_stops_the_job_and_is_idempotent(self, backend, artifact_root, image):
        request = self.request(artifact_root, image, command=["python3", "-c", "import time; time.sleep(300)"])
        backend.validate(request)
        handle = backend.submit(request)
        self.wait_until(backend, handle, {RunState.RUNNING})
        backend.cancel(handle)
        self.wait_until(backend, handle, {RunState.CANCELLED, RunState.FAILED, RunState.LOST})
        assert backend.poll(handle).state is RunState.CANCELLED
        backend.cancel(handle)  # again: no error
        assert backend.poll(handle).is_terminal

    def test_cancel_of_a_finished_job_is_harmless(self, backend, artifact_root, image):
        request = self.request(artifact_root, image, command=["python3", "-c", "print('quick')"])
        handle, outcome, _ = self.run(backend, request)
        assert outcome.status.is_successful
        backend.cancel(handle)
        assert backend.poll(handle).state is RunState.SUCCEEDED

    def test_find_reattaches_from_a_new_backend_instance(self, backend, artifact_root, image):
        request = self.request(artifact_root, image, command=["python3", "-c", "import time; time.sleep(2); print('x')"])
        backend.validate(request)
        handle = backend.submit(request)
        # A restarted worker has nothing but the configuration and the identity.
        other = type(backend).from_config(backend.config_json())
        try:
            found = other.find(request.identity)
            assert found is not None
            assert found.job_id == handle.job_id
            outcome = wait_for_completion(other, found, deadline=time.monotonic() + self.wait_timeout)
            assert outcome.status.is_successful
        finally:
            other.close()

    def test_find_returns_none_for_an_unknown_identity(self, backend):
        assert backend.find(StepIdentity("contract", "never", f"run-{uuid.uuid4().hex}")) is None

    def test_handle_survives_a_json_round_trip(self, backend, artifact_root, image):
        request = self.request(artifact_root, image, command=["python3", "-c", "print('hi')"])
        handle, outcome, _ = self.run(backend, request)
        copy = RunHandle.from_json(json.loads(json.dumps(handle.to_json())))
        assert copy == handle
        other = type(backend).from_config(json.loads(json.dumps(backend.config_json())))
        try:
            assert other.poll(copy).state is RunState.SUCCEEDED
        finally:
            other.close()

    def test_unknown_backend_option_is_a_config_error(self, backend, artifact_root, image):
        request = self.request(artifact_root, image, command=["python3", "-c", "pass"],
                               backend_options={backend.name: {"no_such_option_xyz": 1}})
        with pytest.raises(ConfigError, match="no_such_option_xyz"):
            backend.validate(request)

    def test_unknown_profile_is_refused_by_strict_backends(self, backend, artifact_root, image):
        request = self.request(artifact_root, image, command=["python3", "-c", "pass"],
                               resources={"profile": "no-such-profile"})
        if not backend.config.strict_profiles:
            backend.validate(request)  # laptop backends run it with the step's own resources
            return
        with pytest.raises(ConfigError, match="resources.profile"):
            backend.validate(request)

    def test_logs_stream_once_in_order(self, backend, artifact_root, image):
        request = self.request(artifact_root, image, command=[
            "python3", "-c", "import time\nfor i in range(5):\n    print(f'line {i}', flush=True)\n    time.sleep(0.2)"])
        handle, outcome, lines = self.run(backend, request)
        assert outcome.status.is_successful
        numbered = [line for line in lines if line.startswith("line ")]
        assert numbered == [f"line {i}" for i in range(5)]
        again = backend.read_logs(handle, outcome.cursor)
        assert [line for line in again.lines if line.startswith("line ")] == []

    def test_async_wait_reaches_the_same_end(self, backend, artifact_root, image):
        request = self.request(artifact_root, image, command=["python3", "-c", WRITE_MODEL], outputs=["model"])
        backend.validate(request)
        handle = backend.submit(request)
        lines: list[str] = []
        outcome = asyncio.run(await_completion(backend, handle, on_line=lines.append,
                                               deadline=time.monotonic() + self.wait_timeout))
        assert outcome.status.state is RunState.SUCCEEDED
        assert "done" in lines
        assert backend.fetch_result(handle).metrics["rmse"] == 0.25

    def test_env_reaches_the_step(self, backend, artifact_root, image):
        request = self.request(artifact_root, image, env={"GREETING": "hello-from-env"}, outputs=["out"],
                               command=["python3", "-c",
                                        "import os; open(os.environ['REMOTE_ML_OUTPUT_OUT'],'w')"
                                        ".write(os.environ['GREETING'])"])
        handle, outcome, _ = self.run(backend, request)
        assert outcome.status.is_successful, outcome
        uri = backend.fetch_result(handle).outputs["out"]
        if os.path.exists(uri):
            assert open(uri).read() == "hello-from-env"
