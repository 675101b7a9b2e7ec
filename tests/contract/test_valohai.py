"""The valohai backend passes the contract suite against a local server speaking the Valohai v0 API.

The suite's steps are ``python3 -c`` commands that use the runtime's conventions (``REMOTE_ML_OUTPUT_*``,
``{outputs.x}`` placeholders), which a Valohai step of its own does not have. The backend's *runtime
mode* is exactly for such steps: the execution runs the generic ``remote-ml-runtime`` step of
``backends/valohai/valohai.yaml`` (loaded from that file here), whose command starts the runtime that the
backend sends along. Everything else is real Valohai behaviour as the test server reproduces it: the step
runs as a process with ``VH_*`` directories, outputs become datums, logs come from the events API, a time
limit or a stop ends the execution.

Two configurations run the suite:

* ``TestValohaiBackend`` exports outputs to the artifact root (``export_outputs``), the way a Valohai
  step feeds a step on another backend; every contract test holds unchanged.
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

import pytest

from airflow_remote_ml.backends.valohai import ValohaiBackend
from airflow_remote_ml.core import RunState
from tests.contract.suite import WRITE_MODEL, BackendContract
from tests.fakes.valohai_api import FakeValohai

TOKEN = "contract-token"
VALOHAI_YAML = Path(__file__).resolve().parents[2] / "backends" / "valohai" / "valohai.yaml"


@pytest.fixture
def valohai(tmp_path: Path) -> Iterator[FakeValohai]:
    repository = tmp_path / "repository"
    repository.mkdir()
    with FakeValohai(token=TOKEN, stop_grace=1.0) as server:
        server.add_project("contract", config=VALOHAI_YAML.read_text(), repository=repository)
        yield server


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


class TestValohaiBackendDatumOutputs(TestValohaiBackend):
    export_outputs = False

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
