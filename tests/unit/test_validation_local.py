"""The local backend runs the step on the worker, so what would only fail inside the step is refused before
its process starts (issue 9, item 4: a missing local file on the local backend)."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_remote_ml.backends.local import LocalBackend, LocalConfig
from airflow_remote_ml.core import ArtifactStore, ConfigError, StepIdentity, StepRequest, StepSpec


def request(tmp_path: Any, root: str | None = None, **spec: Any) -> StepRequest:
    spec.setdefault("command", ["true"])
    return StepRequest.create(StepSpec.build(**spec), StepIdentity("dag", "t", "manual__1"),
                              ArtifactStore(root or str(tmp_path / "art")))


def backend(tmp_path: Any) -> LocalBackend:
    return LocalBackend(LocalConfig(state_dir=str(tmp_path / "jobs")))


@pytest.mark.parametrize("uri", ["{tmp}/missing.csv", "file://{tmp}/missing.csv"])
def test_a_local_input_missing_on_the_worker_is_refused_before_the_step_starts(tmp_path, uri):
    b = backend(tmp_path)
    with pytest.raises(ConfigError) as info:
        b.validate(request(tmp_path, inputs={"data": uri.format(tmp=tmp_path)}))
    assert info.value.field == "inputs.data" and "does not exist on the worker" in info.value.problem
    assert not (tmp_path / "jobs").exists() or not list((tmp_path / "jobs").iterdir())


def test_existing_local_and_remote_inputs_pass(tmp_path):
    (tmp_path / "train.csv").write_text("a\n")
    backend(tmp_path).validate(request(tmp_path, inputs={"data": str(tmp_path / "train.csv"),
                                                         "dir": f"file://{tmp_path}", "remote": "s3://b/x.csv"}))


@pytest.mark.parametrize(("cwd", "problem"), [(["/tmp"], "as a string"), (5, "as a string"),
                                              ("/nonexistent/dir", "is not a directory")])
def test_the_cwd_option_is_a_directory(tmp_path, cwd, problem):
    """Before: a list reached os.path.isdir and raised TypeError (found by the property test)."""
    with pytest.raises(ConfigError) as info:
        backend(tmp_path).validate(request(tmp_path, backend_options={"local": {"cwd": cwd}}))
    assert info.value.field == "backend_options.local.cwd" and problem in info.value.problem


@pytest.mark.parametrize(("first", "second"), [
    ("manual__2024-05-01T12:00:00+00:00", "manual__2024-05-01T12_00_00+00_00"),
    ("backfill:2024~1", "backfill_2024_1"),
])
def test_two_run_ids_that_shared_a_folder_keep_both_outputs(tmp_path, first, second):
    """Issue 9, item 5, end to end: the runtime clears leftover outputs before a step runs, so while both
    run ids mapped to one prefix the second run deleted the first one's model."""
    import sys
    import time

    from airflow_remote_ml.core.wait import wait_for_completion

    b = backend(tmp_path)
    store = ArtifactStore(str(tmp_path / "art"))
    written = {}
    for run_id in (first, second):
        code = f"import os; open(os.environ['REMOTE_ML_OUTPUT_MODEL'], 'w').write({run_id!r})"
        req = StepRequest.create(StepSpec.build(command=[sys.executable, "-c", code], outputs=["model"]),
                                 StepIdentity("dag", "train", run_id), store)
        b.validate(req)
        handle = b.submit(req)
        outcome = wait_for_completion(b, handle, deadline=time.monotonic() + 120)
        assert outcome.status.is_successful, outcome.tail
        written[run_id] = b.fetch_result(handle).outputs["model"]
    assert written[first] != written[second]
    for run_id, uri in written.items():
        with open(uri, encoding="utf-8") as fh:
            assert fh.read() == run_id
