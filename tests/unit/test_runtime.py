"""The in-step runtime, run as the backends run it: a separate python3 process fed JSON."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from airflow_remote_ml import runtime


def run_step(tmp_path, step: dict, *, via_source: bool = False, env: dict | None = None):
    step = {"protocol_version": runtime.PROTOCOL_VERSION, "manifest_uri": str(tmp_path / "manifest.json"), **step}
    argv = runtime.launch_command(sys.executable) if via_source else [sys.executable, runtime.__file__]
    proc = subprocess.run(argv, env={**os.environ, "REMOTE_ML_STEP": json.dumps(step),
                                     "PYTHONPATH": str(tmp_path), **(env or {})},
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    return proc, manifest


@pytest.fixture
def steps_module(tmp_path):
    (tmp_path / "mysteps.py").write_text(textwrap.dedent("""
        import json, os, sys
        def train(alpha, inputs, outputs):
            print('training with', alpha)
            print(json.dumps({"loss": alpha * 2}))
            with open(outputs["model"], "w") as fh:
                fh.write(open(inputs["data"]).read().upper())
            return {"alpha": alpha}
        def fails():
            raise ValueError("bad data in row 7")
        def forgets(outputs):
            print("nothing written")
        def sleeps():
            import time; time.sleep(60)
        def exits():
            sys.exit(4)
    """))
    (tmp_path / "data.txt").write_text("rows")
    return tmp_path


def test_callable_gets_params_and_paths_and_its_metrics_are_collected(tmp_path, steps_module):
    proc, manifest = run_step(tmp_path, {
        "callable": "mysteps:train", "params": {"alpha": 0.5},
        "inputs": {"data": str(tmp_path / "data.txt")}, "outputs": {"model": str(tmp_path / "out" / "model")},
        "versions": {"image": "img:1", "code_version": "abc123"},
    })
    assert proc.returncode == 0, proc.stderr
    assert "training with 0.5" in proc.stdout
    assert manifest["status"] == "succeeded"
    assert manifest["metrics"] == {"loss": 1.0, "alpha": 0.5}
    out = manifest["outputs"]["model"]
    assert out["uri"] == str(tmp_path / "out" / "model")
    assert out["size"] == 4 and out["sha256"] == hashlib.sha256(b"ROWS").hexdigest()
    versions = manifest["versions"]
    assert versions["image"] == "img:1" and versions["code_version"] == "abc123"
    assert versions["code"] == "mysteps:train" and versions["params"] == {"alpha": 0.5}
    assert versions["inputs"] == {"data": str(tmp_path / "data.txt")}


def test_command_in_any_language_uses_env_and_placeholders(tmp_path):
    script = ("echo '{\"accuracy\": 0.9}'; echo \"$REMOTE_ML_PARAMS\" > \"$REMOTE_ML_OUTPUT_REPORT\"; "
              "echo extra >> {outputs.report}; echo alpha={params.alpha}")
    proc, manifest = run_step(tmp_path, {"command": script, "shell": True, "params": {"alpha": 3},
                                         "outputs": {"report": str(tmp_path / "report.txt")}})
    assert proc.returncode == 0, proc.stderr
    assert "alpha=3" in proc.stdout
    assert manifest["metrics"] == {"accuracy": 0.9}
    assert (tmp_path / "report.txt").read_text() == '{"alpha": 3}\nextra\n'


def test_failing_callable_exits_non_zero_with_its_traceback(tmp_path, steps_module):
    proc, manifest = run_step(tmp_path, {"callable": "mysteps:fails"})
    assert proc.returncode == 1
    assert "ValueError: bad data in row 7" in proc.stderr
    assert manifest["status"] == "failed" and manifest["exit_code"] == 1


def test_sys_exit_code_is_kept(tmp_path, steps_module):
    proc, manifest = run_step(tmp_path, {"callable": "mysteps:exits"})
    assert proc.returncode == 4 and manifest["exit_code"] == 4


def test_missing_declared_output_fails_and_names_it(tmp_path, steps_module):
    proc, manifest = run_step(tmp_path, {"callable": "mysteps:forgets", "outputs": {"model": str(tmp_path / "m")}})
    assert proc.returncode == runtime.EXIT_MISSING_OUTPUT
    assert "'model'" in manifest["error"] and manifest["status"] == "failed"


def test_a_stale_output_from_an_earlier_attempt_does_not_count(tmp_path, steps_module):
    (tmp_path / "m").write_text("old")
    proc, manifest = run_step(tmp_path, {"callable": "mysteps:forgets", "outputs": {"model": str(tmp_path / "m")}})
    assert proc.returncode == runtime.EXIT_MISSING_OUTPUT


def test_timeout_stops_a_callable_and_a_command(tmp_path, steps_module):
    proc, manifest = run_step(tmp_path, {"callable": "mysteps:sleeps", "timeout": 0.5})
    assert proc.returncode == runtime.EXIT_TIMEOUT and "timeout" in manifest["error"]
    proc, manifest = run_step(tmp_path, {"command": ["sleep", "60"], "timeout": 0.5})
    assert proc.returncode == runtime.EXIT_TIMEOUT


def test_unknown_parameter_is_reported_clearly(tmp_path, steps_module):
    proc, manifest = run_step(tmp_path, {"callable": "mysteps:train", "params": {"alpha": 1, "beta": 2},
                                         "inputs": {"data": str(tmp_path / "data.txt")},
                                         "outputs": {"model": str(tmp_path / "m")}})
    assert proc.returncode == runtime.EXIT_BAD_CONFIG
    assert "'beta'" in manifest["error"] and "alpha" in manifest["error"]


def test_missing_program_is_exit_127(tmp_path):
    proc, manifest = run_step(tmp_path, {"command": ["no-such-program-xyz"]})
    assert proc.returncode == 127 and "no-such-program-xyz" in manifest["error"]


def test_runs_from_injected_source_with_nothing_installed(tmp_path):
    proc, manifest = run_step(tmp_path, {"command": [sys.executable, "-c", "print('{\"ok\": 1}')"]},
                              via_source=True, env={"PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert manifest["metrics"] == {"ok": 1}


def test_newer_protocol_is_refused(tmp_path):
    proc, manifest = run_step(tmp_path, {"command": ["true"], "protocol_version": runtime.PROTOCOL_VERSION + 1})
    assert proc.returncode == runtime.EXIT_BAD_CONFIG and "newer" in manifest["error"]


def test_termination_message_fits_the_kubernetes_limit(tmp_path):
    big = {"protocol_version": 1, "status": "succeeded", "exit_code": 0, "error": None,
           "manifest_uri": "/x/manifest.json", "metrics": {f"m{i}": i for i in range(2000)}}
    text = runtime.termination_message(big)
    assert len(text.encode()) <= runtime.TERMINATION_LOG_LIMIT
    assert json.loads(text)["manifest_uri"] == "/x/manifest.json"
    proc, _ = run_step(tmp_path, {"command": ["true"]}, env={"REMOTE_ML_TERMINATION_LOG": str(tmp_path / "term")})
    assert json.loads((tmp_path / "term").read_text())["status"] == "succeeded"


def test_sigterm_ends_a_command_step_promptly(tmp_path):
    import signal
    import time

    step = {"protocol_version": 1, "command": ["sleep", "60"], "manifest_uri": str(tmp_path / "m.json")}
    proc = subprocess.Popen([sys.executable, runtime.__file__], env={**os.environ, "REMOTE_ML_STEP": json.dumps(step)})
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM


def test_env_carried_in_the_step_reaches_it_and_the_platform_env_wins(tmp_path):
    proc, manifest = run_step(tmp_path, {
        "command": [sys.executable, "-c", "import os, json; print(json.dumps({'a': os.environ['A'], 'b': os.environ['B']}))"],
        "env": {"A": "from-step", "B": "from-step"}}, env={"B": "from-platform"})
    assert proc.returncode == 0, proc.stderr
    assert manifest["metrics"] == {"a": "from-step", "b": "from-platform"}


def test_step_from_a_file_argument(tmp_path):
    step = {"protocol_version": runtime.PROTOCOL_VERSION, "command": [sys.executable, "-c", "print('{\"ok\": 2}')"],
            "manifest_uri": str(tmp_path / "manifest.json")}
    (tmp_path / "step.json").write_text(json.dumps(step))
    env = {k: v for k, v in os.environ.items() if k != "REMOTE_ML_STEP"}
    proc = subprocess.run([sys.executable, runtime.__file__, f"@{tmp_path / 'step.json'}"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "manifest.json").read_text())["metrics"] == {"ok": 2}
