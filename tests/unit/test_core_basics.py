from __future__ import annotations

import json
import subprocess
import sys

import pytest

from airflow_remote_ml.core import (
    ArtifactStore,
    BackendNotFoundError,
    BackendUnavailableError,
    ConfigError,
    PollPolicy,
    RunHandle,
    RunState,
    RunStatus,
    StepIdentity,
    registry,
)
from airflow_remote_ml.core.poll import parse_retry_after


def test_core_and_runtime_never_import_airflow():
    code = (
        "import sys; sys.modules['airflow'] = None\n"
        "import airflow_remote_ml.core, airflow_remote_ml.runtime, airflow_remote_ml.backends.local\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_runtime_imports_only_the_standard_library():
    code = (
        "import sys, importlib.util\n"
        "before = set(sys.modules)\n"
        "spec = importlib.util.spec_from_file_location('rt', 'airflow_remote_ml/runtime.py')\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "third = sorted(m for m in new if m not in sys.stdlib_module_names and m not in ('rt',))\n"
        "print(third)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_identity_is_deterministic_and_fits_every_backend():
    a = StepIdentity("a_very_long_dag_id_" * 5, "train", "manual__2026-11-24T17:34:09+00:00", 3)
    assert a == StepIdentity(a.dag_id, a.task_id, a.run_id, 3)
    assert a.digest != a.next_generation().digest
    assert len(a.idempotency_token) <= 64
    assert len(a.name()) <= 63 and a.name()[0].isalnum() and a.name()[-1].isalnum()
    for value in a.labels().values():
        assert len(value) <= 63
    assert StepIdentity.from_json(json.loads(json.dumps(a.to_json()))) == a


def test_artifact_prefix_is_per_step_and_deterministic(tmp_path):
    store = ArtifactStore(str(tmp_path))
    ident = StepIdentity("dag", "train", "manual__2026-01-01T00:00:00+00:00", 2, generation=1)
    uri = store.output_uri(ident, "model")
    assert uri == store.output_uri(ident, "model")
    assert uri.startswith(str(tmp_path) + "/dag/")
    assert "/train/map_2/gen_1/outputs/model" in uri
    assert store.output_uri(ident.next_generation(), "model") != uri
    remote = ArtifactStore("s3://bucket/ml")
    assert remote.output_uri(ident, "model").startswith("s3://bucket/ml/dag/")


def test_relative_artifact_root_is_refused():
    with pytest.raises(ConfigError, match="absolute"):
        ArtifactStore("artifacts")


def test_handles_and_statuses_round_trip_through_json():
    handle = RunHandle("docker", "abc", None, {"manifest_uri": "/x", "declared_outputs": ["m"]})
    assert RunHandle.from_json(json.loads(json.dumps(handle.to_json()))) == handle
    status = RunStatus(RunState.FAILED, "exited", "boom", 3)
    assert RunStatus.from_json(json.loads(json.dumps(status.to_json()))) == status
    assert status.is_terminal and not status.is_successful
    assert not RunState.QUEUED.is_terminal and RunState.LOST.is_terminal


def test_poll_policy_backs_off_to_a_cap_and_honours_retry_after():
    policy = PollPolicy(first_delay=1, factor=2, cap=10)
    assert [policy.delay(i) for i in range(6)] == [1, 2, 4, 8, 10, 10]
    assert policy.delay(0, retry_after=30) == 30
    assert policy.delay(5, retry_after=3) == 10
    assert parse_retry_after("7") == 7
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0
    assert parse_retry_after("nonsense") is None


def test_unknown_backend_suggests_the_closest_name():
    with pytest.raises(BackendNotFoundError, match="did you mean 'docker'"):
        registry.get_backend_class("dokcer")
    with pytest.raises(BackendNotFoundError, match="known backends"):
        registry.get_backend_class("zzzzzz")


def test_missing_sdk_names_the_pip_extra(monkeypatch):
    monkeypatch.setitem(registry.BUILTIN_BACKENDS, "fakeplatform",
                        ("no_such_platform_sdk_xyz:Backend", "fakeplatform"))
    monkeypatch.setattr(registry, "_entry_points", lambda: {})
    with pytest.raises(BackendUnavailableError, match=r"pip install 'airflow-remote-ml\[fakeplatform\]'"):
        registry.get_backend_class("fakeplatform")


def test_backends_are_registered_as_entry_points():
    registry._entry_points.cache_clear()
    names = set(registry._entry_points())
    assert {"local", "docker", "kubernetes", "databricks", "valohai"} <= names
    assert registry.get_backend_class("local").name == "local"


def test_run_ids_that_shared_an_artifact_folder_keep_distinct_job_names_and_labels():
    # The artifact prefix changed to an injective encoding; the identity backends name jobs by did not.
    a = StepIdentity("dag", "train", "manual__2024-05-01T12:00:00+00:00")
    b = StepIdentity("dag", "train", "manual__2024-05-01T12_00_00+00_00")
    assert a.key == "dag/train/manual__2024-05-01T12:00:00+00:00/-1/0"
    assert a.digest != b.digest and a.name() != b.name()
    for ident in (a, b):
        assert len(ident.name()) <= 63 and len(ident.idempotency_token) <= 64
        assert all(len(value) <= 63 for value in ident.labels().values())
