"""``@task.remote_ml``: registration, the function's reference, its call as parameters, its return value."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG, task

from airflow_remote_ml import runtime
from airflow_remote_ml.core.errors import ArtifactError, ConfigError
from airflow_remote_ml.core.status import StepResult
from airflow_remote_ml.decorators import (
    RemoteMLDecoratedOperator,
    call_parameters,
    function_reference,
    remote_ml_task,
)
from airflow_remote_ml.get_provider_info import get_provider_info

REPO = Path(__file__).resolve().parents[2]

# Module-level functions of this test module: importable by name, as the step needs.


def fit(alpha: float, features: str = "all", inputs: dict[str, str] | None = None,
        outputs: dict[str, str] | None = None) -> dict[str, Any]:
    return {"alpha": alpha}


@remote_ml_task(outputs=["model"])
def decorated_fit(alpha: float, outputs: dict[str, str]) -> dict[str, Any]:
    return {"alpha": alpha}


def spread(first: int, **rest: Any) -> None: ...


def with_context(alpha: float, run_id: str) -> None: ...


def starred(*values: int) -> None: ...


def make_dag() -> DAG:
    return DAG(dag_id="decorator_unit", schedule=None, start_date=datetime(2026, 1, 1))


# -- registration -----------------------------------------------------------------------------------------------

def test_the_provider_registers_the_decorator_as_docker_and_kubernetes_do() -> None:
    assert get_provider_info()["task-decorators"] == [
        {"class-name": "airflow_remote_ml.decorators.remote_ml_task", "name": "remote_ml"}]
    # Airflow's own lookup (ProvidersManager.taskflow_decorators) resolves task.remote_ml to it.
    assert task.remote_ml is remote_ml_task


def _airflow(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "airflow", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_airflow_cli_shows_the_decorator() -> None:
    (info,) = json.loads(_airflow("providers", "get", "airflow-remote-ml", "--full", "-o", "json"))
    assert info["task-decorators"] == [{"class-name": "airflow_remote_ml.decorators.remote_ml_task",
                                        "name": "remote_ml"}]
    listed = {p["package_name"]: p for p in json.loads(_airflow("providers", "list", "-o", "json"))}
    # `providers list` shows the description without "_" (airflow/cli/commands/provider_command.py
    # _remove_rst_syntax strips [`_<>]); the decorator's exact name is in `providers get` above.
    assert "TaskFlow decorator @task.remoteml" in listed["airflow-remote-ml"]["description"]


# -- the function's reference ------------------------------------------------------------------------------------

def test_a_module_level_function_runs_by_its_name() -> None:
    assert function_reference(fit) == f"{__name__}:fit"


def test_a_function_decorated_at_module_level_is_reached_through_the_task() -> None:
    # The module's name now holds the task object; the step calls its .function.
    assert function_reference(decorated_fit.function) == f"{__name__}:decorated_fit.function"


def test_a_nested_function_or_lambda_is_refused_with_the_fix() -> None:
    def inner(alpha: float) -> None: ...

    for function in (inner, lambda alpha: None):
        with pytest.raises(ConfigError) as error:
            function_reference(function)
        assert "cannot reach a nested one" in error.value.problem
        assert error.value.fix == "define it at the top level of a module"


def test_a_function_from_a_notebook_or_main_is_refused_when_the_dag_is_parsed() -> None:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec("def notebook_step(alpha):\n    return alpha\n", namespace)  # what a Jupyter cell defines
    with make_dag(), pytest.raises(ConfigError) as error:
        remote_ml_task()(namespace["notebook_step"])(alpha=1)
    assert error.value.field == "@task.remote_ml notebook_step"
    assert "'__main__' (a notebook or a script run directly)" in error.value.problem
    assert "task.remote_ml(...)(steps.train)" in (error.value.fix or "")


def test_a_dag_file_function_is_named_by_its_place_under_sys_path(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Airflow loads a DAG file as ``unusual_prefix_<sha1>_<name>``; the step imports it by its file's name."""
    (tmp_path / "my_dag.py").write_text("def step(alpha):\n    return alpha\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "unusual_prefix_0123456789abcdef_my_dag"  # as airflow.utils.file.get_unique_dag_module_name makes it
    spec = importlib.util.spec_from_file_location(name, tmp_path / "my_dag.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    assert function_reference(module.step) == "my_dag:step"
    # The same file outside sys.path cannot be imported by the step: refused, with where it is.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    with pytest.raises(ConfigError) as error:
        function_reference(module.step)
    assert "not under any sys.path entry" in error.value.problem


# -- the call as parameters --------------------------------------------------------------------------------------

def test_the_call_becomes_the_steps_parameters_by_name(tmp_path: Path) -> None:
    with make_dag():
        remote_ml_task(outputs=["model"], inputs={"dataset": str(tmp_path)})(fit)(0.5, features="core")
    op = make_dag_task("fit")
    assert isinstance(op, RemoteMLDecoratedOperator)
    assert op.callable == f"{__name__}:fit"
    op._bind_call()
    # Positional arguments are named; the runtime's inputs/outputs are not parameters; defaults stay in the step.
    assert op.parameters == {"alpha": 0.5, "features": "core"}
    assert op.inputs == {"dataset": str(tmp_path)}


_LAST_DAG: list[DAG] = []


def make_dag_task(task_id: str) -> Any:
    from airflow.sdk.definitions._internal.contextmanager import DagContext

    dag = DagContext.get_current() or _LAST_DAG[-1]
    return dag.task_dict[task_id]


@pytest.fixture(autouse=True)
def _remember_dags(monkeypatch: pytest.MonkeyPatch) -> None:
    original = DAG.__exit__

    def exit_and_remember(self: DAG, *args: Any) -> Any:
        _LAST_DAG.append(self)
        return original(self, *args)

    monkeypatch.setattr(DAG, "__exit__", exit_and_remember)


def test_keyword_arguments_spread_and_unknown_ones_are_refused() -> None:
    from airflow_remote_ml.decorators import _parameter_signature

    signature = _parameter_signature(spread)
    assert call_parameters("spread", signature, [1], {"b": 2, "c": [3]}) == {"first": 1, "b": 2, "c": [3]}
    with pytest.raises(ConfigError) as error:
        call_parameters("fit", _parameter_signature(fit), [], {"alpha": 1, "beta": 2})
    assert error.value.field == "fit()" and "beta" in error.value.problem


def test_a_non_json_argument_is_a_config_error_naming_it_when_the_dag_is_parsed() -> None:
    with make_dag(), pytest.raises(ConfigError) as error:
        remote_ml_task()(fit)(alpha=Decimal("0.5"))
    assert error.value.field == "fit(alpha)"
    assert "is not JSON-serialisable" in error.value.problem
    with make_dag(), pytest.raises(ConfigError) as error:
        remote_ml_task()(fit)(alpha=0.5, features={"nested": float("nan")})
    assert error.value.field == "fit(features).nested"


def test_a_rendered_non_json_argument_fails_before_anything_is_submitted() -> None:
    with make_dag():
        remote_ml_task()(fit)(alpha="{{ params.alpha }}")
    op = make_dag_task("fit")
    op.op_kwargs = {"alpha": {1, 2}}  # what an XComArg could resolve to
    with pytest.raises(ConfigError) as error:
        op._bind_call()
    assert error.value.field == "fit(alpha)"


def test_a_context_named_parameter_must_be_passed_the_step_has_no_airflow_context() -> None:
    with make_dag(), pytest.raises(ConfigError) as error:
        remote_ml_task()(with_context)(alpha=1)
    assert error.value.field == "with_context(run_id)"
    assert "with_context(run_id='{{ run_id }}')" in (error.value.fix or "")
    with make_dag():
        remote_ml_task()(with_context)(alpha=1, run_id="{{ run_id }}")  # passed: fine


@pytest.mark.parametrize(("arguments", "field"), [
    ({"callable": "a:b"}, "@task.remote_ml(callable=...)"),
    ({"command": ["echo"]}, "@task.remote_ml(command=...)"),
    ({"parameters": {"a": 1}}, "@task.remote_ml(parameters=...)"),
])
def test_what_the_decorator_derives_cannot_be_given(arguments: dict[str, Any], field: str) -> None:
    with make_dag(), pytest.raises(ConfigError) as error:
        remote_ml_task(**arguments)(fit)(alpha=1)
    assert error.value.field == field


def test_multiple_outputs_starred_args_and_call_outputs_are_refused() -> None:
    with pytest.raises(ConfigError) as error:
        remote_ml_task(multiple_outputs=True)
    assert "task_output['result'][key]" in (error.value.fix or "")
    with make_dag(), pytest.raises(ConfigError) as error:
        remote_ml_task()(starred)(1, 2)
    assert error.value.field == "@task.remote_ml starred(*values)"
    with make_dag(), pytest.raises(ConfigError) as error:
        remote_ml_task()(fit)(alpha=1, outputs=["model"])
    assert error.value.field == "fit(outputs=...)"


def test_inputs_of_the_decorator_and_the_call_merge_and_a_name_given_twice_is_refused() -> None:
    with make_dag():
        remote_ml_task(inputs={"dataset": "/data/a"})(fit)(alpha=1, inputs={"model": "/models/b"})
    assert make_dag_task("fit").inputs == {"dataset": "/data/a", "model": "/models/b"}
    with make_dag(), pytest.raises(ConfigError) as error:
        remote_ml_task(inputs={"dataset": "/data/a"})(fit)(alpha=1, inputs={"dataset": "/data/b"})
    assert error.value.field == "inputs.dataset"


def test_a_templated_backend_and_mapping_work_as_with_the_operator() -> None:
    with make_dag() as dag:
        remote_ml_task(backend="{{ params.backend }}", outputs=["model"])(fit).partial(
            inputs={"dataset": "/data/a"}).expand(alpha=[0.1, 1.0])
    mapped = dag.task_dict["fit"]
    assert mapped.partial_kwargs["backend"] == "{{ params.backend }}"
    assert "backend" in mapped.template_fields and "op_kwargs" in mapped.template_fields
    assert mapped.multiple_outputs is False


# -- the return value ---------------------------------------------------------------------------------------------

def _result(manifest_extra: dict[str, Any]) -> StepResult:
    return StepResult(outputs={}, metrics={}, backend="local", job_id="j1", manifest=manifest_extra)


def test_the_functions_return_value_is_the_xcoms_result() -> None:
    with make_dag():
        remote_ml_task()(fit)(alpha=1)
    op = make_dag_task("fit")
    xcom: dict[str, Any] = {"outputs": {}}
    op._on_result(_result({"return_value": [1, "two"]}), xcom)
    assert xcom["result"] == [1, "two"]


def test_a_return_value_the_runtime_could_not_keep_fails_the_task_once_with_the_reason() -> None:
    from airflow.sdk.exceptions import AirflowFailException

    with make_dag():
        remote_ml_task()(fit)(alpha=1)
    op = make_dag_task("fit")
    with pytest.raises(ArtifactError) as error:
        op._on_result(_result({"return_value_error": "the function returned a set, which is not JSON"}), {})
    assert isinstance(error.value, AirflowFailException)  # a bug in the function: no retry
    assert str(error.value) == "fit: the function returned a set, which is not JSON"


def _run_step(tmp_path: Path, body: str) -> dict[str, Any]:
    (tmp_path / "retsteps.py").write_text(textwrap.dedent(body))
    step = {"protocol_version": runtime.PROTOCOL_VERSION, "manifest_uri": str(tmp_path / "manifest.json"),
            "callable": "retsteps:step"}
    proc = subprocess.run([sys.executable, runtime.__file__], env={**os.environ, "REMOTE_ML_STEP": json.dumps(step),
                                                                   "PYTHONPATH": str(tmp_path)},
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads((tmp_path / "manifest.json").read_text()))


@pytest.mark.parametrize(("returned", "kept"), [("[1, 'two', None]", [1, "two", None]), ("'done'", "done"),
                                                ("{'rmse': 0.5}", {"rmse": 0.5})])
def test_the_runtime_keeps_a_json_return_value_in_the_manifest(tmp_path: Path, returned: str, kept: Any) -> None:
    manifest = _run_step(tmp_path, f"def step():\n    return {returned}\n")
    assert manifest["return_value"] == kept and "return_value_error" not in manifest


def test_the_runtime_records_why_a_return_value_is_not_kept(tmp_path: Path) -> None:
    manifest = _run_step(tmp_path, "def step():\n    return {1, 2}\n")
    assert manifest["return_value"] is None
    assert manifest["return_value_error"].startswith("the function returned a set, which is not JSON")
    big = _run_step(tmp_path, f"def step():\n    return 'x' * {runtime.RETURN_VALUE_LIMIT}\n")
    assert "more than the 65536 kept" in big["return_value_error"]
    assert "return_value" not in _run_step(tmp_path, "def step():\n    pass\n")  # nothing returned
