"""The code package reaches a Kubernetes pod through the artifact volume, as it reaches a container.

The Kubernetes API double runs each pod's container as a local process and mounts a registered claim's
directory at the pod's mountPath. Unlike the example DAG's test, no ``PYTHONPATH`` leads the pod to the
DAG folder: the step imports its package from the shipped archive, or not at all.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import uuid
from pathlib import Path

import pytest

from airflow_remote_ml.core import codepkg
from airflow_remote_ml.core.wait import wait_for_completion
from tests.fakes.kubernetes_api import FakeKubernetes
from tests.integration.kubernetes_support import CLAIM, make_backend, request
from tests.unit.test_codepkg import make_package

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"k8s_pipeline_{uuid.uuid4().hex[:8]}"
    make_package(tmp_path / "dags", name)
    monkeypatch.syspath_prepend(str(tmp_path / "dags"))
    importlib.invalidate_caches()
    codepkg.clear_cache()
    return name


@pytest.mark.parametrize("shipped", [True, False])
def test_a_pod_runs_the_shipped_code_and_without_it_cannot_import_it(package: str, tmp_path: Path,
                                                                     shipped: bool) -> None:
    root = str(tmp_path / "artifacts")
    with FakeKubernetes() as k8s:
        k8s.register_volume_claim(CLAIM, root)
        backend = make_backend(k8s, root)
        try:
            base = request(root, callable=f"{package}.steps:hello", params={"name": "pod"}, outputs=["greeting"])
            code = codepkg.prepare(f"{package}.steps:hello", True, root) if shipped else None
            step = dataclasses.replace(base, code=code)
            backend.validate(step)
            backend.publish_code(step)
            handle = backend.submit(step)
            outcome = wait_for_completion(backend, handle, deadline=None)
            if shipped:
                assert outcome.status.is_successful, (outcome.status, outcome.tail)
                result = backend.fetch_result(handle)
                assert Path(result.outputs["greeting"]).read_text() == "hello pod\n"
                assert result.manifest["versions"]["code_sha256"] == code.sha256
            else:
                assert not outcome.status.is_successful
                manifest = json.loads(Path(step.manifest_uri).read_text())
                assert f"No module named '{package}'" in manifest["error"]
                assert "no code was shipped" in manifest["error"]
        finally:
            backend.close()
