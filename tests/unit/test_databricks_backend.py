"""Unit tests of the databricks backend's pure parts: state mapping, request building, polling, errors.

No I/O: every test feeds plain data (Jobs API answers, step requests) and checks what comes out.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import requests

from airflow_remote_ml.backends.databricks import (
    DatabricksConfig,
    DatabricksPollPolicy,
    RetryAfterWait,
    build_submit_payload,
    choose_node_type,
    error_info,
    status_from_run,
)
from airflow_remote_ml.backends.databricks._payload import matches_identity, parse_description, validate_request
from airflow_remote_ml.backends.databricks._states import exit_code_from, metrics_from_logs, parse_error_body
from airflow_remote_ml.core import (
    ArtifactStore,
    ConfigError,
    RunState,
    RunStatus,
    StepIdentity,
    StepRequest,
    StepSpec,
)

CLUSTER = {"spark_version": "15.4.x-scala2.12", "node_type_id": "i3.xlarge", "num_workers": 1}
IDENTITY = StepIdentity("dag", "features", "manual__2026-01-01", 3, 1)


def request(root: str = "dbfs:/ml", **spec: Any) -> StepRequest:
    spec.setdefault("command", ["python3", "-c", "print(1)"])
    return StepRequest.create(StepSpec.build(**spec), IDENTITY, ArtifactStore(root))


def config(**settings: Any) -> DatabricksConfig:
    settings.setdefault("new_cluster", dict(CLUSTER))
    # These requests use a dbfs:/ root: a classic cluster with the /dbfs mount (see the dbfs_fuse tests).
    settings.setdefault("dbfs_fuse", True)
    return DatabricksConfig.from_mapping(settings, "databricks")


def run(life: str | None, result: str | None = None, message: str = "", **extra: Any) -> dict[str, Any]:
    state: dict[str, Any] = {"state_message": message}
    if life is not None:
        state["life_cycle_state"] = life
    if result is not None:
        state["result_state"] = result
    return {"run_id": 42, "state": state, **extra}


# -- state mapping: every life_cycle_state and result_state ------------------------------------------------


@pytest.mark.parametrize(("life", "expected"), [
    ("QUEUED", RunState.QUEUED),
    ("PENDING", RunState.QUEUED),
    ("BLOCKED", RunState.QUEUED),
    ("WAITING_FOR_RETRY", RunState.QUEUED),
    ("RUNNING", RunState.RUNNING),
    ("TERMINATING", RunState.RUNNING),
    ("SKIPPED", RunState.FAILED),
    ("INTERNAL_ERROR", RunState.FAILED),
])
def test_life_cycle_states(life: str, expected: RunState) -> None:
    status = status_from_run(run(life, message="why"))
    assert status.state is expected
    assert status.remote_state == life
    if expected.is_terminal:
        assert "why" in status.message


@pytest.mark.parametrize(("result", "expected"), [
    ("SUCCESS", RunState.SUCCEEDED),
    ("FAILED", RunState.FAILED),
    ("TIMEDOUT", RunState.FAILED),
    ("CANCELED", RunState.CANCELLED),
    ("MAXIMUM_CONCURRENT_RUNS_REACHED", RunState.FAILED),
    ("EXCLUDED", RunState.FAILED),
    ("UPSTREAM_FAILED", RunState.FAILED),
    ("UPSTREAM_CANCELED", RunState.CANCELLED),
    ("DISABLED", RunState.FAILED),
    ("SUCCESS_WITH_FAILURES", RunState.FAILED),
])
def test_result_states_of_terminated_runs(result: str, expected: RunState) -> None:
    status = status_from_run(run("TERMINATED", result, "Workload failed"))
    assert status.state is expected
    assert status.remote_state == f"TERMINATED/{result}"
    if expected is not RunState.SUCCEEDED:
        assert status.message


def test_success_with_failures_is_configurable() -> None:
    answer = run("TERMINATED", "SUCCESS_WITH_FAILURES")
    assert status_from_run(answer).state is RunState.FAILED
    assert "success_with_failures_is_success" in status_from_run(answer).message
    assert status_from_run(answer, success_with_failures_is_success=True).state is RunState.SUCCEEDED


def test_timed_out_run_says_so() -> None:
    status = status_from_run(run("TERMINATED", "TIMEDOUT", "Task timed out after 61 seconds."))
    assert "timed out" in status.message and "61 seconds" in status.message


def test_unknown_life_cycle_state_keeps_waiting_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    status = status_from_run(run("HIBERNATING"))
    assert status.state is RunState.RUNNING and not status.is_terminal
    assert status.remote_state == "HIBERNATING"
    assert "HIBERNATING" in caplog.text


def test_unknown_life_cycle_state_falls_back_to_the_2_2_status() -> None:
    assert status_from_run(run("SOMETHING_NEW", status={"state": "QUEUED"})).state is RunState.QUEUED
    done = run("SOMETHING_NEWER", status={"state": "TERMINATED",
                                          "termination_details": {"code": "SUCCESS", "type": "SUCCESS"}})
    assert status_from_run(done).state is RunState.SUCCEEDED


def test_2_2_status_alone_is_understood() -> None:
    assert status_from_run({"run_id": 1, "status": {"state": "WAITING"}}).state is RunState.QUEUED
    cancelled = {"run_id": 1, "status": {"state": "TERMINATED", "termination_details": {"code": "USER_CANCELED"}}}
    assert status_from_run(cancelled).state is RunState.CANCELLED
    failed = {"run_id": 1, "status": {"state": "TERMINATED", "termination_details": {"code": "DRIVER_ERROR"}}}
    assert status_from_run(failed).state is RunState.FAILED


def test_unknown_result_state_decided_by_termination_code_or_failed() -> None:
    new = run("TERMINATED", "PARTIALLY_DONE", status={"state": "TERMINATED",
                                                     "termination_details": {"code": "SUCCESS"}})
    assert status_from_run(new).state is RunState.SUCCEEDED
    assert status_from_run(run("TERMINATED", "PARTIALLY_DONE")).state is RunState.FAILED


def test_terminated_without_result_waits_for_a_complete_answer() -> None:
    assert status_from_run(run("TERMINATED")).state is RunState.RUNNING


# -- request building ---------------------------------------------------------------------------------------


def test_default_task_runs_the_runtime_with_the_step_as_argument() -> None:
    req = request(params={"alpha": 0.5}, inputs={"data": "dbfs:/in.csv"}, outputs=["model"], timeout=100)
    payload = build_submit_payload(req, config(), "dbfs:/ml/_remote_ml/runtime.py")
    (task,) = payload["tasks"]
    assert task["task_key"] == "features"
    assert task["spark_python_task"]["python_file"] == "dbfs:/ml/_remote_ml/runtime.py"
    (argument,) = task["spark_python_task"]["parameters"]
    step = json.loads(argument)
    assert step == req.runtime_config(python_path=[])
    assert step["outputs"] == {"model": req.outputs["model"]} and step["params"] == {"alpha": 0.5}
    assert task["new_cluster"] == CLUSTER
    assert payload["idempotency_token"] == IDENTITY.idempotency_token
    assert len(payload["idempotency_token"]) <= 64
    assert payload["timeout_seconds"] == 160  # the step's timeout plus the grace for the runtime
    assert matches_identity(payload["run_name"], IDENTITY)
    assert payload["run_name"].startswith("dag.features[3] #1 ")
    meta = parse_description(task["description"])
    assert meta == {"manifest_uri": req.manifest_uri, "outputs": req.outputs, "task": "spark_python_task",
                    "runtime": True}


def test_run_name_of_another_identity_does_not_match() -> None:
    payload = build_submit_payload(request(), config(), "dbfs:/r.py")
    assert not matches_identity(payload["run_name"], IDENTITY.next_generation())
    assert not matches_identity(None, IDENTITY)


def test_env_and_secrets_become_spark_env_vars_with_secret_references() -> None:
    req = request(env={"MODE": "fast"}, secrets={"DB_PASSWORD": "warehouse/password"})
    cfg = config(new_cluster={**CLUSTER, "spark_env_vars": {"MODE": "slow", "KEEP": "1"}})
    env = build_submit_payload(req, cfg, "dbfs:/r.py")["tasks"][0]["new_cluster"]["spark_env_vars"]
    assert env == {"MODE": "fast", "KEEP": "1", "DB_PASSWORD": "{{secrets/warehouse/password}}"}


def test_secret_without_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="secrets.TOKEN"):
        validate_request(request(secrets={"TOKEN": "scope-only"}), config())


def test_existing_cluster_from_settings_takes_env_in_the_step_but_refuses_secrets() -> None:
    cfg = DatabricksConfig.from_mapping({"existing_cluster_id": "0101-abc", "dbfs_fuse": True})
    task = build_submit_payload(request(), cfg, "dbfs:/r.py")["tasks"][0]
    assert task["existing_cluster_id"] == "0101-abc" and "new_cluster" not in task
    validate_request(request(env={"A": "1"}), cfg)
    task = build_submit_payload(request(env={"A": "1"}), cfg, "dbfs:/r.py")["tasks"][0]
    assert json.loads(task["spark_python_task"]["parameters"][0])["env"] == {"A": "1"}
    with pytest.raises(ConfigError, match="existing cluster"):
        validate_request(request(secrets={"TOKEN": "scope/key"}), cfg)
    with pytest.raises(ConfigError, match="does not run the step runtime"):
        validate_request(request(env={"A": "1"}, backend_options={"databricks": {"python_file": "dbfs:/u.py"}}),
                         cfg)


def test_profile_shapes_the_job_cluster_and_options_win() -> None:
    cfg = config(profiles={
        "spark-large": {"node_type_id": "r5.4xlarge", "autoscale": {"min_workers": 2, "max_workers": 8},
                        "spark_conf": {"spark.sql.shuffle.partitions": "64"},
                        "libraries": [{"pypi": {"package": "scikit-learn"}}]},
        "shared": {"existing_cluster_id": "0202-shared"},
    }, libraries=[{"whl": "dbfs:/wheels/common.whl"}])
    req = request(resources={"profile": "spark-large"},
                  backend_options={"databricks": {"num_workers": 3, "spark_version": "16.4.x-scala2.12"}})
    task = build_submit_payload(req, cfg, "dbfs:/r.py")["tasks"][0]
    cluster = task["new_cluster"]
    assert cluster["node_type_id"] == "r5.4xlarge"
    assert cluster["num_workers"] == 3 and "autoscale" not in cluster
    assert cluster["spark_version"] == "16.4.x-scala2.12"
    assert cluster["spark_conf"] == {"spark.sql.shuffle.partitions": "64"}
    assert task["libraries"] == [{"whl": "dbfs:/wheels/common.whl"}, {"pypi": {"package": "scikit-learn"}}]
    shared = build_submit_payload(request(resources={"profile": "shared"}), cfg, "dbfs:/r.py")["tasks"][0]
    assert shared["existing_cluster_id"] == "0202-shared" and "new_cluster" not in shared


def test_unknown_profile_key_is_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="did you mean 'node_type_id'"):
        config(profiles={"x": {"node_typ_id": "i3.xlarge"}})


def test_resources_pick_the_smallest_fitting_node_type() -> None:
    nodes = [{"node_type_id": "big", "cpu": 16, "memory": "122Gi"},
             {"node_type_id": "small", "cpu": 4, "memory": "30Gi"},
             {"node_type_id": "gpu", "cpu": 8, "memory": "61Gi", "gpu": 1}]
    assert choose_node_type(nodes, 2, None, 0) == "small"
    assert choose_node_type(nodes, 8, None, 0) == "big"
    assert choose_node_type(nodes, None, 40 * 1024**3, 0) == "big"
    assert choose_node_type(nodes, 1, None, 1) == "gpu"
    assert choose_node_type(nodes, 64, None, 0) is None
    req = request(resources={"cpu": 8, "memory": "64Gi"})
    cluster = build_submit_payload(req, config(node_types=nodes), "dbfs:/r.py")["tasks"][0]["new_cluster"]
    assert cluster["node_type_id"] == "big"
    with pytest.raises(ConfigError, match="no node type"):
        build_submit_payload(request(resources={"cpu": 64}), config(node_types=nodes), "dbfs:/r.py")


def test_gpu_without_a_way_to_get_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="resources.gpu"):
        validate_request(request(resources={"gpu": 1}), config())


def test_job_cluster_needs_a_spark_version_and_node_type() -> None:
    with pytest.raises(ConfigError, match="spark_version"):
        validate_request(request(), DatabricksConfig.from_mapping({"new_cluster": {"node_type_id": "x"}}))
    with pytest.raises(ConfigError, match="node_type_id"):
        validate_request(request(), DatabricksConfig.from_mapping({"new_cluster": {"spark_version": "15.4"}}))


def test_callable_runs_through_the_runtime_with_the_python_path() -> None:
    req = StepRequest.create(StepSpec.build(callable="spark_features:build_features", outputs=["features"]),
                             IDENTITY, ArtifactStore("dbfs:/ml"))
    cfg = config(python_path=["/Workspace/Shared/code"])
    req_with_option = StepRequest.create(
        StepSpec.build(callable="spark_features:build_features",
                       backend_options={"databricks": {"python_path": ["/dbfs/code"]}}),
        IDENTITY, ArtifactStore("dbfs:/ml"))
    step = json.loads(build_submit_payload(req, cfg, "dbfs:/r.py")["tasks"][0]["spark_python_task"]["parameters"][0])
    assert step["callable"] == "spark_features:build_features" and step["python_path"] == ["/Workspace/Shared/code"]
    step2 = json.loads(build_submit_payload(req_with_option, cfg, "dbfs:/r.py")["tasks"][0]
                       ["spark_python_task"]["parameters"][0])
    assert step2["python_path"] == ["/dbfs/code", "/Workspace/Shared/code"]


def test_oversized_step_is_refused_before_submission() -> None:
    with pytest.raises(ConfigError, match="bytes"):
        build_submit_payload(request(params={"blob": "x" * 20_000}), config(), "dbfs:/r.py")


def test_user_python_file_gets_uris_through_placeholders() -> None:
    req = request(command=["--train", "{inputs.data}", "--out", "{outputs.features}", "--k={params.k}"],
                  inputs={"data": "dbfs:/raw/train.csv"}, outputs=["features"], params={"k": 3},
                  backend_options={"databricks": {"python_file": "/Workspace/Shared/features.py"}})
    task = build_submit_payload(req, config(), None)["tasks"][0]
    assert task["spark_python_task"] == {
        "python_file": "/Workspace/Shared/features.py",
        "parameters": ["--train", "dbfs:/raw/train.csv", "--out", req.outputs["features"], "--k=3"],
    }
    assert parse_description(task["description"])["runtime"] is False


@pytest.mark.parametrize(("options", "key", "expected"), [
    ({"task": "python_wheel_task", "package_name": "pipe", "entry_point": "features"}, "python_wheel_task",
     {"package_name": "pipe", "entry_point": "features", "parameters": ["--out", "dbfs:/ml/x"]}),
    ({"task": "spark_jar_task", "main_class_name": "org.example.Features"}, "spark_jar_task",
     {"main_class_name": "org.example.Features", "parameters": ["--out", "dbfs:/ml/x"]}),
    ({"task": "spark_submit_task"}, "spark_submit_task", {"parameters": ["--out", "dbfs:/ml/x"]}),
])
def test_other_task_types(options: dict[str, Any], key: str, expected: dict[str, Any]) -> None:
    req = request(command=["--out", "dbfs:/ml/x"], backend_options={"databricks": options})
    task = build_submit_payload(req, config(), None)["tasks"][0]
    assert task[key] == expected
    assert "spark_python_task" not in task


def test_notebook_task_gets_params_inputs_outputs_and_manifest() -> None:
    req = request(params={"alpha": 0.1, "name": "x"}, inputs={"data": "dbfs:/in"}, outputs=["report"],
                  backend_options={"databricks": {"task": "notebook_task", "notebook_path": "/Users/me/nb"}})
    task = build_submit_payload(req, config(), None)["tasks"][0]["notebook_task"]
    assert task["notebook_path"] == "/Users/me/nb"
    assert task["base_parameters"] == {"alpha": "0.1", "name": "x", "input_data": "dbfs:/in",
                                       "output_report": req.outputs["report"],
                                       "remote_ml_manifest_uri": req.manifest_uri}


def test_task_types_refuse_missing_settings_and_callables() -> None:
    with pytest.raises(ConfigError, match="package_name"):
        build_submit_payload(request(backend_options={"databricks": {"task": "python_wheel_task"}}), config(), None)
    with pytest.raises(ConfigError, match="notebook_path"):
        build_submit_payload(request(backend_options={"databricks": {"task": "notebook_task"}}), config(), None)
    with pytest.raises(ConfigError, match="sql_task"):
        build_submit_payload(request(backend_options={"databricks": {"task": "sql_task"}}), config(), None)
    callable_req = StepRequest.create(
        StepSpec.build(callable="m:f", backend_options={"databricks": {"task": "spark_jar_task",
                                                                        "main_class_name": "X"}}),
        IDENTITY, ArtifactStore("dbfs:/ml"))
    with pytest.raises(ConfigError, match="callable"):
        build_submit_payload(callable_req, config(), None)


# -- polling ---------------------------------------------------------------------------------------------


def test_poll_schedule_is_quick_then_backs_off_to_the_cap() -> None:
    policy = DatabricksPollPolicy()
    delays = policy.schedule(20)
    assert delays[:4] == [3.0, 9.0, 18.0, 30.0]
    assert max(delays) == policy.cap == 30.0 and delays[-1] == policy.cap
    assert delays == sorted(delays)
    assert [policy.delay(i) for i in range(20)] == delays
    quick = DatabricksPollPolicy(first_delay=1, quick_delay=3, quick_window=10).schedule(8)
    assert quick[:5] == [1, 2, 3, 3, 3] and quick[5:] == [9, 9, 30]  # 12 s, 21 s, then the 30 s grid


#: DatabricksSubmitRunOperator's default polling_period_seconds: it notices an end up to 30 s late.
PROVIDER_PERIOD = 30.0


@pytest.mark.parametrize("run_seconds", [1, 5, 20, 45, 90, 300, 599, 1800, 3600])
def test_poll_schedule_is_never_later_than_the_provider(run_seconds: float) -> None:
    policy = DatabricksPollPolicy()
    elapsed, checks = 0.0, 0
    for delay in policy.schedule(10_000):
        elapsed += delay
        checks += 1
        if elapsed >= run_seconds:
            break
    # The first check at or after the run's end is no later than a 30 s loop's (started with ours).
    import math

    assert elapsed <= math.ceil(run_seconds / PROVIDER_PERIOD) * PROVIDER_PERIOD
    assert elapsed - run_seconds <= PROVIDER_PERIOD
    assert policy.worst_delay(run_seconds) <= PROVIDER_PERIOD
    assert policy.checks_until(run_seconds) == checks


def test_poll_schedule_costs_at_most_1_2_times_the_providers_checks_over_10_minutes() -> None:
    import math

    provider = math.ceil(600 / PROVIDER_PERIOD) + 1  # one check per period until one falls after the end
    ours = DatabricksPollPolicy().checks_until(600)
    assert ours <= 1.2 * provider, (ours, provider)


def test_retry_after_wins_when_longer() -> None:
    policy = DatabricksPollPolicy()
    assert policy.delay(0, retry_after=7) == 7
    assert policy.delay(30, retry_after=7) == policy.cap


def test_hook_wait_honours_retry_after() -> None:
    wait = RetryAfterWait(1.0, 8.0, max_retry_after=30)
    response = requests.Response()
    response.status_code = 429
    response.headers["Retry-After"] = "12"
    error = requests.HTTPError(response=response)
    outcome = SimpleNamespace(failed=True, exception=lambda: error)
    state = SimpleNamespace(outcome=outcome, attempt_number=1)
    assert wait(state) == 12
    response.headers["Retry-After"] = "3600"
    assert wait(state) == 30  # a server asking for an hour gets max_retry_after
    plain = SimpleNamespace(outcome=SimpleNamespace(failed=True, exception=lambda: ValueError()), attempt_number=1)
    assert wait(plain) == 1.0


# -- errors ---------------------------------------------------------------------------------------------


def test_error_bodies_are_parsed_from_the_hook_message() -> None:
    body = json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": "Run 5 does not exist."})
    assert parse_error_body(f"Response: {body}, Status Code: 400") == ("INVALID_PARAMETER_VALUE",
                                                                       "Run 5 does not exist.")
    assert parse_error_body("plain text") == ("", "plain text")


def test_error_info_of_a_wrapped_http_error() -> None:
    from airflow.providers.databricks.exceptions import DatabricksApiError

    response = requests.Response()
    response.status_code = 400
    response._content = json.dumps({"error_code": "INVALID_PARAMETER_VALUE",
                                    "message": "Run 7 does not exist."}).encode()
    try:
        try:
            raise requests.HTTPError(response=response)
        except requests.HTTPError as inner:
            raise DatabricksApiError("Response: ..., Status Code: 400", http_status_code=400) from inner
    except DatabricksApiError as exc:
        info = error_info(exc)
    assert info is not None and info.not_found and not info.transient
    assert error_info(ValueError("bug")) is None


def test_exit_codes_and_metrics_from_text() -> None:
    assert exit_code_from("Python process exited with exit code 7.") == 7
    assert exit_code_from("the step exited with code 3") == 3
    assert exit_code_from("boom") is None
    assert metrics_from_logs('x\n{"rmse": 0.5}\n{bad\n{"r2": 1}\n') == {"rmse": 0.5, "r2": 1}


def test_the_example_deployment_config_is_valid_for_every_profile() -> None:
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "backends" / "databricks" / "backend_config.example.json"
    cfg = DatabricksConfig.from_mapping(json.loads(path.read_text())["databricks"], "databricks")
    assert cfg.dbfs_fuse  # the example deployment's classic clusters mount /dbfs
    assert set(cfg.profiles) == {"spark-small", "spark-large", "gpu", "shared"}
    for name in ("spark-small", "spark-large", "gpu"):
        req = request(resources={"profile": name, **({"gpu": 1} if name == "gpu" else {})})
        validate_request(req, cfg)
        assert build_submit_payload(req, cfg, "dbfs:/r.py")["tasks"][0]["new_cluster"]["node_type_id"] == \
            cfg.profiles[name]["node_type_id"]
    validate_request(request(resources={"profile": "shared"}), cfg)
    # Without a profile, cpu/memory pick from the node type catalogue.
    cluster = build_submit_payload(request(resources={"cpu": 3}), cfg, "dbfs:/r.py")["tasks"][0]["new_cluster"]
    assert cluster["node_type_id"] == "m5d.xlarge"


# -- the one choke point of errors ------------------------------------------------------------------------


def _hook_failure(cause: BaseException) -> BaseException:
    """What DatabricksHook raises after its retries: AirflowException from tenacity's RetryError."""
    from tenacity import Future, RetryError

    attempt = Future(1)
    attempt.set_exception(cause)
    retry_error = RetryError(attempt)
    try:
        raise RuntimeError("API requests to Databricks failed 3 times. Giving up.") from retry_error
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize("cause", [
    requests.ReadTimeout("read timed out"),
    requests.ConnectionError("Connection aborted: RemoteDisconnected"),
])
def test_submit_timeouts_and_dropped_connections_are_transient(cause: BaseException) -> None:
    from airflow_remote_ml.backends.databricks import map_error
    from airflow_remote_ml.core import TransientBackendError

    mapped = map_error(_hook_failure(cause), "submitting the run", backend="databricks", conn_id="c",
                       ambiguous=True)
    assert isinstance(mapped, TransientBackendError) and "outcome unknown" in str(mapped)


def test_a_body_cut_off_mid_submit_is_transient_not_a_refusal() -> None:
    # The hook neither retries nor wraps ChunkedEncodingError: it arrives raw, and the run may exist.
    from airflow_remote_ml.backends.databricks import DatabricksBackend, map_error
    from airflow_remote_ml.core import BackendAPIError, TransientBackendError

    cut = requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead")
    assert isinstance(map_error(cut, "submitting the run", backend="databricks", conn_id="c", ambiguous=True),
                      TransientBackendError)
    # A read is not ambiguous: nothing was created by it.
    refused = map_error(cut, "reading the run", backend="databricks", conn_id="c")
    assert isinstance(refused, BackendAPIError) and not isinstance(refused, TransientBackendError)
    assert DatabricksBackend.idempotent_submit is True


# -- the platform's reason for a failure -------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "reason"), [
    (run("INTERNAL_ERROR", None, "Cluster 0101 was terminated"), "INTERNAL_ERROR"),
    (run("TERMINATED", "TIMEDOUT", "Run timed out after 60 seconds."), "TIMEDOUT"),
    (run("TERMINATED", "CANCELED", "Run cancelled."), "CANCELED"),
    (run("TERMINATED", "FAILED", "Cluster failed to start", status={
        "state": "TERMINATED", "termination_details": {"code": "CLUSTER_ERROR", "type": "CLOUD_FAILURE",
                                                      "message": "Cloud provider launch failure"}}),
     "CLUSTER_ERROR"),
    (run("TERMINATED", "FAILED", "The spark driver has stopped unexpectedly and is restarting.", status={
        "state": "TERMINATED", "termination_details": {"code": "DRIVER_ERROR", "type": "CLIENT_ERROR",
                                                      "message": "The spark driver has stopped unexpectedly "
                                                                 "and is restarting."}}),
     "DRIVER_ERROR"),
    # The step's own code failed: no platform reason, so the step's error leads.
    (run("TERMINATED", "FAILED", "Workload failed", status={
        "state": "TERMINATED", "termination_details": {"code": "RUN_EXECUTION_ERROR", "type": "CLIENT_ERROR"}}),
     ""),
    (run("TERMINATED", "SUCCESS"), ""),
])
def test_failure_reason_is_the_platforms_word(answer: dict[str, Any], reason: str) -> None:
    status = status_from_run(answer)
    assert status.reason == reason
    assert RunStatus.from_json(status.to_json()) == status


def test_a_stopped_driver_says_it_probably_ran_out_of_memory() -> None:
    status = status_from_run(run("TERMINATED", "FAILED", "The spark driver has stopped unexpectedly and is "
                                 "restarting. Your notebook will be automatically reattached.",
                                 status={"state": "TERMINATED", "termination_details": {"code": "DRIVER_ERROR"}}))
    assert status.reason == "DRIVER_ERROR"
    assert "stopped unexpectedly" in status.message and "ran out of memory" in status.message
    assert "compute.memory" in status.message


def test_runtime_file_written_by_many_threads_at_once_is_whole(tmp_path) -> None:
    """Threads of one triggerer write the same runtime file; each must land whole, never interleaved."""
    import threading

    from airflow_remote_ml.backends.databricks._storage import Storage

    def no_api(*_args, **_kwargs):  # a mounted path never reaches the DBFS API
        raise AssertionError("the DBFS API was called for a mounted path")

    storage = Storage({"dbfs:/remote-ml": str(tmp_path)}, no_api, "databricks")
    payloads = [bytes([65 + i]) * 200_000 for i in range(8)]
    barrier = threading.Barrier(len(payloads))
    errors: list[BaseException] = []

    def write(data: bytes) -> None:
        barrier.wait()
        try:
            for _ in range(5):
                storage.write("dbfs:/remote-ml/runtime/runtime.py", data)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (tmp_path / "runtime" / "runtime.py").read_bytes() in payloads
    assert [p.name for p in (tmp_path / "runtime").iterdir()] == ["runtime.py"]  # no temporary left behind
