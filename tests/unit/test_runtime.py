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


def start_runtime(tmp_path, step: dict, **env: str) -> subprocess.Popen:
    step = {"protocol_version": runtime.PROTOCOL_VERSION, "manifest_uri": str(tmp_path / "m.json"), **step}
    return subprocess.Popen([sys.executable, runtime.__file__], stdout=subprocess.PIPE,
                            env={**os.environ, "REMOTE_ML_STEP": json.dumps(step),
                                 "REMOTE_ML_PGID_FILE": str(tmp_path / "pgid"), **env})


def wait_for_file(path, proc: subprocess.Popen, bound: float = 60.0) -> str:
    """The file's content once it exists (bounded; fails early if the runtime has exited)."""
    import time

    deadline = time.monotonic() + bound
    while not os.path.exists(path):
        assert proc.poll() is None, f"the runtime exited ({proc.returncode}) before writing {path}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return open(path).read()


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is in the group (a zombie is dead, just not reaped yet)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = open(f"/proc/{name}/stat", "rb").read()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def test_sigterm_ends_a_command_step_promptly(tmp_path):
    import signal

    proc = start_runtime(tmp_path, {"command": ["sleep", "60"]})
    wait_for_file(tmp_path / "pgid", proc)  # the step is running: not a fixed sleep
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert manifest["error"] == "the step was stopped by SIGTERM (exit 143)"


def test_a_step_that_ignores_sigterm_is_killed_after_the_grace_with_its_whole_group(tmp_path):
    """The runtime escalates by itself: whoever sent SIGTERM (a task process) may be dead by now."""
    import signal

    ready = tmp_path / "ready"
    proc = start_runtime(tmp_path, {"command": f"trap '' TERM; touch {ready}; sleep 150 & sleep 150", "shell": True},
                         REMOTE_ML_KILL_GRACE="0.5")
    pgid = int(wait_for_file(tmp_path / "pgid", proc).split()[0])
    try:
        wait_for_file(ready, proc)  # SIGTERM is ignored from here on
        assert pgid != os.getpgid(proc.pid), "the command runs in a process group of its own"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGKILL
        assert not group_alive(pgid), "a process of the step survived"
    finally:  # whatever failed, nothing of this test outlives it
        for kill in (lambda: os.killpg(pgid, signal.SIGKILL), proc.kill):
            try:
                kill()
            except ProcessLookupError:
                pass
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert manifest["error"] == ("the step was stopped: it did not end within 0.5s of SIGTERM and was killed "
                                 "by SIGKILL (exit 137)")


def test_a_step_killed_by_sigkill_says_so_in_plain_words(tmp_path):
    proc, manifest = run_step(tmp_path, {"command": [
        sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]})
    assert proc.returncode == 137
    assert manifest["exit_code"] == 137
    assert manifest["error"].startswith("the step's process was killed by SIGKILL (exit 137; often the kernel's "
                                        "OOM killer")
    assert "compute.memory" in manifest["error"]


def test_output_is_relayed_as_soon_as_it_arrives_even_without_a_newline(tmp_path):
    """A step printing a progress bar (or a line a minute) is shown at once, not when a newline comes."""
    go = tmp_path / "go"
    code = (f"import os, sys, time\nsys.stdout.write('epoch 1/3 '); sys.stdout.flush()\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.02)\nprint('done')")
    proc = start_runtime(tmp_path, {"command": [sys.executable, "-c", code]})
    assert proc.stdout is not None
    try:
        seen = os.read(proc.stdout.fileno(), 100)  # blocks until the runtime relays something
    finally:
        go.write_text("")  # the step ends even when this test fails (a relay that never relays)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0
    assert seen == b"epoch 1/3 "
    assert seen + rest == b"epoch 1/3 done\n"


def test_metrics_lines_split_across_reads_are_parsed_and_huge_lines_relayed_only(tmp_path):
    big = {"blob": "x" * 200_000}  # larger than one 64 KiB read
    code = ("import json, sys\n"
            "for i in range(20000): print(i)\n"
            "print(json.dumps({'blob': 'x' * 200_000}))\n"
            "print('y' * (3 << 20))\n"  # a 3 MiB line: relayed, never buffered for metrics
            "print(json.dumps({'loss': 0.5}), end='')\n")  # the last line has no newline
    proc, manifest = run_step(tmp_path, {"command": [sys.executable, "-c", code]})
    assert proc.returncode == 0, proc.stderr
    assert manifest["metrics"] == {**big, "loss": 0.5}
    lines = proc.stdout.split("\n")
    assert lines[:3] == ["0", "1", "2"] and len(lines[20001]) == 3 << 20 and lines[-1] == '{"loss": 0.5}'


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


def test_launched_from_its_file_it_runs_and_does_not_shadow_a_steps_runtime_module(tmp_path):
    (tmp_path / "runtime.py").write_text("WHO = 'the step'\n")
    step = {"protocol_version": runtime.PROTOCOL_VERSION, "manifest_uri": str(tmp_path / "manifest.json"),
            "command": [sys.executable, "-c", "print('{\"ok\": 3}')"]}
    proc = subprocess.run(runtime.launch_from_file(sys.executable), env={**os.environ, "REMOTE_ML_STEP": json.dumps(step)},
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "manifest.json").read_text())["metrics"] == {"ok": 3}
    (tmp_path / "steps2.py").write_text("def who():\n    import runtime\n    print(runtime.WHO)\n")
    step = {**step, "command": None, "callable": "steps2:who", "python_path": [str(tmp_path)]}
    proc = subprocess.run(runtime.launch_from_file(sys.executable), env={**os.environ, "REMOTE_ML_STEP": json.dumps(step)},
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "the step" in proc.stdout


# -- start-up cost: what the runtime imports, and the codec that replaces json -----------------------------


JSON_DOCUMENTS = [
    {"b": 1, "a": [1, 2.5, None, True, False, "é\n\"q\"\\", -0.0], "c": {"z": 1e300, "y": -7}},
    [], {}, "text", 3, 12345678901234567890, None, [{"nested": [[], {}]}],
]


@pytest.mark.parametrize("document", JSON_DOCUMENTS)
@pytest.mark.parametrize("options", [{}, {"sort_keys": True}, {"sort_keys": True, "separators": (",", ":")}])
def test_the_runtimes_json_codec_writes_and_reads_what_the_json_package_does(document, options):
    assert runtime._dumps(document, **options) == json.dumps(document, **options)
    text = json.dumps(document, indent=1)  # whitespace inside and around the value
    assert runtime._loads(f" \n{text}\t\r\n") == json.loads(text)


@pytest.mark.parametrize("text", ["", "   ", "abc", "{} x", '{"a": }', "[1,]", '{"a" 1}', "NaN x"])
def test_the_runtimes_json_codec_refuses_what_the_json_package_refuses(text):
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        runtime._loads(text)


def test_the_runtimes_json_codec_keeps_json_defaults_for_odd_values():
    assert runtime._loads('{"a": NaN, "b": Infinity, "c": -Infinity}')["b"] == float("inf")
    with pytest.raises(TypeError, match="not JSON serializable"):
        runtime._dumps({"x": object()})
    assert runtime._dumps({"x": b"raw"}, default=str) == json.dumps({"x": b"raw"}, default=str)


def test_a_command_step_starts_without_the_costly_stdlib_imports(tmp_path):
    """json (re), signal (enum), subprocess (selectors, locale) and contextlib cost ~10 ms of every step's
    start in a container (docs/backends/docker.md); a command step's happy path needs none of them."""
    step = {"protocol_version": runtime.PROTOCOL_VERSION, "manifest_uri": str(tmp_path / "manifest.json"),
            "outputs": {"o": str(tmp_path / "o")}}
    step["command"] = [sys.executable, "-c", f"open({str(tmp_path / 'o')!r}, 'w').write('x'); print('{{\"ok\": 1}}')"]
    boot = runtime.launch_from_file(sys.executable)[3].replace(
        "_rt.exit(_rt.main())",
        f"code = _rt.main(); open({str(tmp_path / 'modules')!r}, 'w').write(' '.join(sys.modules)); _rt.exit(code)")
    proc = subprocess.run([sys.executable, "-S", "-c", boot], env={**os.environ, "REMOTE_ML_STEP": json.dumps(step)},
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "manifest.json").read_text())["metrics"] == {"ok": 1}
    loaded = set((tmp_path / "modules").read_text().split())
    assert not loaded & {"json", "re", "enum", "signal", "subprocess", "contextlib", "selectors", "threading"}


def test_the_steps_command_gets_default_sigpipe_and_no_descriptors_beyond_stdio(tmp_path):
    """What Popen(restore_signals=True, close_fds=True) gave the step: Python ignores SIGPIPE for itself,
    and a step that inherited that would not die when its reader goes away; nor may it hold our files.
    Read from /proc by a process that is not Python (Python ignores SIGPIPE again at its own start)."""
    leaked = os.open(tmp_path, os.O_RDONLY)
    try:
        os.set_inheritable(leaked, True)
        step = {"protocol_version": runtime.PROTOCOL_VERSION, "manifest_uri": str(tmp_path / "manifest.json"),
                "command": ["sh", "-c", "grep SigIgn /proc/$$/status; ls /proc/$$/fd"]}
        proc = subprocess.run([sys.executable, runtime.__file__], env={**os.environ, "REMOTE_ML_STEP": json.dumps(step)},
                              capture_output=True, text=True, timeout=60, close_fds=False)
    finally:
        os.close(leaked)
    assert proc.returncode == 0, proc.stderr
    ignored, *fds = proc.stdout.split()[1:]
    assert not int(ignored, 16) & (1 << (13 - 1)), proc.stdout  # SIGPIPE is 13 on Linux
    assert sorted(map(int, fds)) == [0, 1, 2], proc.stdout


def test_a_shell_command_runs_under_sh(tmp_path):
    proc, manifest = run_step(tmp_path, {"command": "echo '{\"n\": '$((2 + 3))'}'", "shell": True})
    assert proc.returncode == 0, proc.stderr
    assert manifest["metrics"] == {"n": 5}


def test_install_puts_one_copy_per_version_with_its_bytecode_and_it_runs(tmp_path):
    import importlib.util

    path = runtime.install(str(tmp_path / "rt"))
    assert os.path.basename(path).startswith("remote_ml_runtime_") and open(path).read() == runtime.source()
    assert os.path.exists(importlib.util.cache_from_source(path))
    stamp = os.stat(path).st_mtime_ns
    assert runtime.install(str(tmp_path / "rt")) == path and os.stat(path).st_mtime_ns == stamp  # never rewritten
    step = {"protocol_version": runtime.PROTOCOL_VERSION, "manifest_uri": str(tmp_path / "manifest.json"),
            "command": [sys.executable, "-c", "print('{\"ok\": 4}')"]}
    proc = subprocess.run(runtime.launch_from_file(sys.executable, path), timeout=60, capture_output=True, text=True,
                          env={**os.environ, "REMOTE_ML_STEP": json.dumps(step), "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "manifest.json").read_text())["metrics"] == {"ok": 4}


def test_a_callables_atexit_handlers_still_run(tmp_path):
    """The runtime skips its interpreter's finalisation only after a command step (runtime.exit)."""
    (tmp_path / "atexits.py").write_text(textwrap.dedent(f"""
        import atexit
        def register():
            atexit.register(lambda: open({str(tmp_path / 'at-exit')!r}, 'w').write('ran'))
    """))
    step = {"protocol_version": runtime.PROTOCOL_VERSION, "manifest_uri": str(tmp_path / "manifest.json"),
            "callable": "atexits:register", "python_path": [str(tmp_path)]}
    proc = subprocess.run(runtime.launch_from_file(sys.executable), env={**os.environ, "REMOTE_ML_STEP": json.dumps(step)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "at-exit").read_text() == "ran"
