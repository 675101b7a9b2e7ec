"""The code package: what is packed, that its hash is content-addressed, and how the runtime uses it."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import subprocess
import sys
import textwrap
import uuid
import zipfile
from pathlib import Path

import pytest

from airflow_remote_ml import runtime
from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec, codepkg
from airflow_remote_ml.core.errors import ConfigError

STEPS = textwrap.dedent("""
    import json
    from . import helpers

    def hello(outputs, name: str):
        with open(outputs["greeting"], "w") as fh:
            fh.write(helpers.greet(name))
        print(json.dumps({"length": len(name)}))
""")


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REMOTE_ML_CODE_CACHE", str(tmp_path / "worker-cache"))
    codepkg.clear_cache()
    yield
    codepkg.clear_cache()


def make_package(base: Path, name: str, greeting: str = "hello") -> Path:
    """A user's package ``name`` under ``base`` (steps + helpers + a data file), with tool leftovers."""
    pkg = base / name
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "steps.py").write_text(STEPS)
    (pkg / "helpers.py").write_text(f"def greet(name):\n    return '{greeting} ' + name + '\\n'\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "config.json").write_text('{"k": 1}')
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "steps.cpython-311.pyc").write_bytes(b"\0bytecode")
    (pkg / "stale.pyc").write_bytes(b"\0bytecode")
    (pkg / ".mypy_cache").mkdir()
    (pkg / ".mypy_cache" / "x.json").write_text("{}")
    return pkg


@pytest.fixture
def user_pkg(tmp_path, monkeypatch) -> str:
    """A uniquely named package importable from a folder on sys.path (as the DAG folder is on a worker)."""
    name = f"my_pipeline_{uuid.uuid4().hex[:8]}"
    make_package(tmp_path / "dags", name)
    monkeypatch.syspath_prepend(str(tmp_path / "dags"))
    importlib.invalidate_caches()
    return name


def names_in(data: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.namelist()


# -- the archive ------------------------------------------------------------------------------------------


def test_the_archive_holds_the_package_without_bytecode_or_tool_folders(user_pkg):
    package = codepkg.build([user_pkg])
    assert names_in(package.data) == sorted(names_in(package.data))
    assert names_in(package.data) == [f"{user_pkg}/{n}" for n in
                                      ("__init__.py", "helpers.py", "steps.py", "sub/__init__.py", "sub/config.json")]
    assert package.sha256 == hashlib.sha256(package.data).hexdigest()


def test_the_hash_depends_on_contents_not_on_where_or_when_the_files_are(tmp_path, monkeypatch):
    name = f"pkg_{uuid.uuid4().hex[:8]}"
    first, second = make_package(tmp_path / "a", name), make_package(tmp_path / "b", name)
    os.utime(first / "steps.py", (1_000_000, 1_000_000))  # another checkout time
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    importlib.invalidate_caches()
    one = codepkg.build([name])
    codepkg.clear_cache()
    monkeypatch.setattr(sys, "path", [str(tmp_path / "b"), *[p for p in sys.path if p != str(tmp_path / "a")]])
    importlib.invalidate_caches()
    assert codepkg.locate(name)[0][0] == os.path.realpath(second)
    two = codepkg.build([name])
    assert one.data == two.data and one.sha256 == two.sha256


def test_a_changed_file_changes_the_hash_and_an_unchanged_tree_is_not_zipped_again(user_pkg, tmp_path, monkeypatch):
    first = codepkg.build([user_pkg])
    # Unchanged: the very same package object comes back (nothing read or zipped again).
    assert codepkg.build([user_pkg]) is first
    helpers = tmp_path / "dags" / user_pkg / "helpers.py"
    helpers.write_text(helpers.read_text().replace("hello", "howdy"))
    os.utime(helpers, ns=(first_mtime := os.stat(helpers).st_mtime_ns, first_mtime + 1_000_000_000))
    second = codepkg.build([user_pkg])
    assert second.sha256 != first.sha256
    with zipfile.ZipFile(io.BytesIO(second.data)) as zf:
        assert b"howdy" in zf.read(f"{user_pkg}/helpers.py")


def test_another_process_on_the_worker_reads_the_archive_back_instead_of_zipping(user_pkg, tmp_path, monkeypatch):
    first = codepkg.build([user_pkg])
    codepkg.clear_cache()  # what a new task process starts with

    def no_zipping(*_args, **_kwargs):
        raise AssertionError("zipped again although the files did not change")

    monkeypatch.setattr(codepkg.zipfile, "ZipFile", no_zipping)
    again = codepkg.build([user_pkg])
    assert again.sha256 == first.sha256 and again.data == first.data


def test_an_unwritable_worker_cache_only_costs_a_zip(user_pkg, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("REMOTE_ML_CODE_CACHE", str(blocker / "code"))
    one = codepkg.build([user_pkg])
    codepkg.clear_cache()
    assert codepkg.build([user_pkg]).sha256 == one.sha256


def test_a_single_module_ships_as_one_file(tmp_path, monkeypatch):
    name = f"steps_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("def f():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert names_in(codepkg.build([name]).data) == [f"{name}.py"]


def test_the_callables_package_ships_by_default_plus_the_named_ones():
    assert codepkg.packages_to_ship("my_pipeline.steps:train", True) == ("my_pipeline",)
    assert codepkg.packages_to_ship("my_pipeline.steps:train", ["utils", "my_pipeline"]) == ("my_pipeline", "utils")
    assert codepkg.packages_to_ship("my_pipeline.steps:train", False) == ()
    assert codepkg.packages_to_ship(None, True) == ()  # a command ships only what is named
    assert codepkg.packages_to_ship(None, ["utils"]) == ("utils",)


# -- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "field", "words"), [
    ("my_pipeline", "code", "use ['my_pipeline']"),
    ({"my_pipeline": 1}, "code", "True, False or a list"),
    (["my_pipeline.steps"], "code[0]", "use 'my_pipeline'"),
    (["my-pipeline"], "code[0]", "not an importable name"),
    ([3], "code[0]", "not a package name"),
])
def test_a_bad_code_argument_is_a_config_error_naming_code(value, field, words):
    with pytest.raises(ConfigError) as err:
        codepkg.check_code_argument(value)
    assert err.value.field == field
    assert words in str(err.value)


def test_a_package_that_is_not_importable_on_the_worker_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="not importable on this worker.*DAG folder.*code=False") as err:
        codepkg.build([f"nowhere_{uuid.uuid4().hex[:8]}"])
    assert err.value.field == "code"


def test_the_standard_library_is_refused():
    with pytest.raises(ConfigError, match="standard library"):
        codepkg.build(["json"])


def test_an_installed_library_is_refused_with_how_to_install_it_instead():
    # fsspec is installed in this environment's site-packages (a dependency of the provider).
    with pytest.raises(ConfigError, match=r"installed library .*site-packages.*install 'fsspec' in the step's image"):
        codepkg.build(["fsspec"])


def test_a_package_too_big_to_ship_is_refused(user_pkg, tmp_path, monkeypatch):
    monkeypatch.setattr(codepkg, "MAX_PACKAGE_BYTES", 100)
    with pytest.raises(ConfigError, match="move data and models out of the package"):
        codepkg.build([user_pkg])


# -- storing ----------------------------------------------------------------------------------------------


def test_the_archive_is_stored_once_per_hash_under_the_artifact_root(user_pkg, tmp_path):
    root = tmp_path / "artifacts"
    ref = codepkg.prepare(f"{user_pkg}.steps:hello", True, str(root))
    assert ref is not None and ref.uri == str(root / "_code" / f"{ref.sha256}.zip")
    assert codepkg.publish(ref) is True
    assert codepkg.publish(ref) is False
    codepkg.clear_cache()  # another worker process: the file is there, so it is not written again
    before = os.stat(ref.uri).st_mtime_ns
    assert codepkg.publish(codepkg.prepare(f"{user_pkg}.steps:hello", True, str(root))) is False
    assert os.stat(ref.uri).st_mtime_ns == before
    assert hashlib.sha256(Path(ref.uri).read_bytes()).hexdigest() == ref.sha256


def test_the_archive_goes_through_fsspec_for_a_remote_root(user_pkg):
    import fsspec

    root = f"memory://bucket-{uuid.uuid4().hex[:8]}/ml"
    ref = codepkg.prepare(f"{user_pkg}.steps:hello", True, root)
    assert ref is not None and ref.uri == f"{root}/_code/{ref.sha256}.zip"
    assert codepkg.publish(ref) is True
    with fsspec.open(ref.uri, "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == ref.sha256


def test_the_request_carries_the_code_to_the_runtime_and_round_trips(user_pkg, tmp_path):
    ref = codepkg.prepare(f"{user_pkg}.steps:hello", True, str(tmp_path))
    request = StepRequest.create(StepSpec.build(callable=f"{user_pkg}.steps:hello"), StepIdentity("d", "t", "r"),
                                 ArtifactStore(str(tmp_path)), code=ref)
    config = request.runtime_config()
    assert config["code"] == {"uri": ref.uri, "sha256": ref.sha256, "packages": [user_pkg]}
    assert config["versions"]["code_sha256"] == ref.sha256
    again = StepRequest.from_json(json.loads(json.dumps(request.to_json())))
    assert again.code == ref
    assert StepRequest.create(request.spec, request.identity, ArtifactStore(str(tmp_path))).runtime_config()[
        "versions"]["code_sha256"] is None


# -- the runtime ------------------------------------------------------------------------------------------


def run_runtime(tmp_path: Path, step: dict, *, cwd: Path) -> tuple[subprocess.CompletedProcess[str], dict | None]:
    """The runtime as the docker backend starts it (source injected, -S), in a folder without the code."""
    manifest = tmp_path / "out" / "manifest.json"
    step = {"protocol_version": runtime.PROTOCOL_VERSION, "manifest_uri": str(manifest), **step}
    env = {"PATH": os.environ["PATH"], "REMOTE_ML_STEP": json.dumps(step)}
    proc = subprocess.run(runtime.launch_command(sys.executable), env=env, capture_output=True, text=True,
                          timeout=120, cwd=cwd)
    return proc, (json.loads(manifest.read_text()) if manifest.exists() else None)


@pytest.fixture
def shipped(user_pkg, tmp_path):
    root = tmp_path / "artifacts"
    ref = codepkg.prepare(f"{user_pkg}.steps:hello", True, str(root))
    assert ref is not None
    codepkg.publish(ref)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    return user_pkg, ref, root, empty


def test_the_runtime_imports_the_callable_from_the_shipped_archive(shipped, tmp_path):
    name, ref, root, empty = shipped
    request = StepRequest.create(StepSpec.build(callable=f"{name}.steps:hello", params={"name": "ada"},
                                                outputs=["greeting"]), StepIdentity("d", "t", "r"),
                                 ArtifactStore(str(root)), code=ref)
    proc, _ = run_runtime(tmp_path, request.runtime_config(), cwd=empty)
    assert proc.returncode == 0, proc.stderr
    assert Path(request.outputs["greeting"]).read_text() == "hello ada\n"
    manifest = json.loads(Path(request.manifest_uri).read_text())
    assert manifest["versions"]["code_sha256"] == ref.sha256
    assert manifest["metrics"] == {"length": 3}


def test_without_the_archive_the_same_step_cannot_import_and_says_what_to_do(shipped, tmp_path):
    """The bug this fixes: a stock image has no user code. The error names the cause and the fix."""
    name, _ref, _root, empty = shipped
    proc, manifest = run_runtime(tmp_path, {"callable": f"{name}.steps:hello", "params": {"name": "ada"},
                                            "versions": {"image": "airflow-remote-ml/runner:latest"}}, cwd=empty)
    assert proc.returncode == runtime.EXIT_BAD_CONFIG
    assert manifest is not None
    assert f"No module named '{name}'" in manifest["error"]
    assert "no code was shipped" in manifest["error"]
    assert "image 'airflow-remote-ml/runner:latest'" in manifest["error"]


def test_a_library_missing_from_the_image_is_named_as_not_shipped(shipped, tmp_path):
    name, ref, root, empty = shipped
    (tmp_path / "dags" / name / "steps.py").write_text("import not_installed_lib\n" + STEPS)
    codepkg.clear_cache()
    ref = codepkg.prepare(f"{name}.steps:hello", True, str(root))
    assert ref is not None
    codepkg.publish(ref)
    proc, manifest = run_runtime(tmp_path, {"callable": f"{name}.steps:hello", "params": {"name": "x"},
                                            "code": ref.to_json(), "versions": {"image": "img:1"}}, cwd=empty)
    assert proc.returncode == runtime.EXIT_BAD_CONFIG
    assert manifest is not None
    assert f"'not_installed_lib' is not in the shipped code ({name}; sha256 {ref.sha256[:12]})" in manifest["error"]
    assert "install it in image 'img:1'" in manifest["error"]


def test_an_archive_changed_after_it_was_stored_is_refused(shipped, tmp_path):
    name, ref, _root, empty = shipped
    Path(ref.uri).write_bytes(Path(ref.uri).read_bytes() + b"x")
    proc, manifest = run_runtime(tmp_path, {"callable": f"{name}.steps:hello", "params": {"name": "x"},
                                            "code": ref.to_json()}, cwd=empty)
    assert proc.returncode == runtime.EXIT_BAD_CONFIG
    assert manifest is not None and "changed after it was stored" in manifest["error"]


def test_an_unreachable_archive_says_the_artifact_root_must_be_reachable(shipped, tmp_path):
    name, ref, _root, empty = shipped
    os.remove(ref.uri)
    proc, manifest = run_runtime(tmp_path, {"callable": f"{name}.steps:hello", "params": {"name": "x"},
                                            "code": ref.to_json()}, cwd=empty)
    assert proc.returncode == runtime.EXIT_BAD_CONFIG
    assert manifest is not None and "not reachable from where the step runs" in manifest["error"]


def test_a_command_finds_the_shipped_packages_on_its_pythonpath(shipped, tmp_path):
    name, ref, _root, empty = shipped
    out = tmp_path / "greeting"
    command = [sys.executable, "-c", f"from {name} import helpers; open({str(out)!r}, 'w').write(helpers.greet('bo'))"]
    proc, manifest = run_runtime(tmp_path, {"command": command, "code": ref.to_json()}, cwd=empty)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "hello bo\n"


# -- backends that make the archive reachable themselves ---------------------------------------------------


def test_valohai_downloads_the_archive_as_the_runtime_steps_code_input(shipped, tmp_path):
    """Valohai downloads each input into $VH_INPUTS_DIR/<input name>/ (docs.valohai.com, "Inputs"); the
    bootstrap points the runtime at the file there, so the step imports the shipped code."""
    from airflow_remote_ml.backends.valohai import BOOTSTRAP, ValohaiConfig, build_execution
    from airflow_remote_ml.backends.valohai._execution import CODE_SLOT

    name, ref, _root, empty = shipped
    remote = dataclasses_replace(ref, uri=f"s3://ml-bucket/_code/{ref.sha256}.zip")
    request = StepRequest.create(StepSpec.build(callable=f"{name}.steps:hello", params={"name": "vh"},
                                                outputs=["greeting"]), StepIdentity("d", "t", "r"),
                                 ArtifactStore("s3://ml-bucket"), code=remote)
    config = ValohaiConfig(token="t", project="demo", branch="main", runtime_step="remote-ml-runtime")
    body, _ = build_execution(request, config, "p")
    assert body["inputs"] == {CODE_SLOT: [remote.uri]}
    # What the Valohai worker does: download the input, then run the step's command.
    inputs, outputs = tmp_path / "vh" / "inputs", tmp_path / "vh" / "outputs"
    (inputs / CODE_SLOT).mkdir(parents=True)
    outputs.mkdir(parents=True)
    (inputs / CODE_SLOT / f"{ref.sha256}.zip").write_bytes(Path(ref.uri).read_bytes())
    env = {"PATH": os.environ["PATH"], "VH_INPUTS_DIR": str(inputs), "VH_OUTPUTS_DIR": str(outputs),
           **body["environment_variables"]}
    proc = subprocess.run([sys.executable, "-c", BOOTSTRAP], env=env, capture_output=True, text=True, timeout=120,
                          cwd=empty)
    assert proc.returncode == 0, proc.stderr
    assert (outputs / "greeting").read_text() == "hello vh\n"


def test_valohai_refuses_an_archive_it_cannot_download_naming_code(shipped):
    from airflow_remote_ml.backends.valohai import ValohaiBackend, ValohaiConfig

    name, ref, root, _empty = shipped
    request = StepRequest.create(StepSpec.build(callable=f"{name}.steps:hello"), StepIdentity("d", "t", "r"),
                                 ArtifactStore(str(root)), code=ref)
    backend = ValohaiBackend(ValohaiConfig(token="t", project="demo", branch="main", runtime_step="remote-ml-runtime"))
    with pytest.raises(ConfigError) as err:
        backend.validate(request)
    assert err.value.field == "code"
    assert "path on the Airflow worker" in str(err.value) and "code=False" in str(err.value)


def test_databricks_places_the_archive_through_its_storage_where_the_cluster_reads_it(shipped, tmp_path):
    from airflow_remote_ml.backends.databricks import DatabricksBackend, DatabricksConfig

    name, ref, _root, _empty = shipped
    volume = tmp_path / "volume"  # what the worker mounts of /Volumes/main/ml/artifacts
    root = "/Volumes/main/ml/artifacts"
    remote = dataclasses_replace(ref, uri=f"{root}/_code/{ref.sha256}.zip")
    backend = DatabricksBackend(DatabricksConfig.from_mapping({
        "local_mounts": {root: str(volume)},
        "new_cluster": {"spark_version": "15.4.x-scala2.12", "node_type_id": "i3.xlarge", "num_workers": 0}},
        "databricks"))
    request = StepRequest.create(StepSpec.build(callable=f"{name}.steps:hello"), StepIdentity("d", "t", "r"),
                                 ArtifactStore(root), code=remote)
    backend.publish_code(request)
    placed = volume / "_code" / f"{ref.sha256}.zip"
    assert hashlib.sha256(placed.read_bytes()).hexdigest() == ref.sha256


def dataclasses_replace(ref: codepkg.CodeRef, **changes: str) -> codepkg.CodeRef:
    import dataclasses

    return dataclasses.replace(ref, **changes)


# -- the runtime's own unzip (zipfile costs a step ~80 ms to import) ------------------------------------------


def _zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED, **kw) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression, **kw) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED, zipfile.ZIP_BZIP2])
def test_the_runtime_unpacks_what_zipfile_packs(tmp_path, compression):
    entries = {"pkg/__init__.py": b"", "pkg/data/big.bin": os.urandom(200_000), "pkg/run.sh": b"#!/bin/sh\n",
               "mod.py": b"X = 1\n"}
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip(entries, compression))  # bzip2: not handled natively, so zipfile unpacks it
    runtime._unzip(str(archive), str(tmp_path / "out"))
    for name, data in entries.items():
        assert (tmp_path / "out" / name).read_bytes() == data


def test_the_runtime_keeps_the_executable_bit_of_a_shipped_script(user_pkg, tmp_path):
    script = tmp_path / "dags" / user_pkg / "tool.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    archive = tmp_path / "code.zip"
    archive.write_bytes(codepkg.build([user_pkg]).data)
    runtime._unzip(str(archive), str(tmp_path / "out"))
    assert os.access(tmp_path / "out" / user_pkg / "tool.sh", os.X_OK)
    assert not os.access(tmp_path / "out" / user_pkg / "steps.py", os.X_OK)


@pytest.mark.parametrize("name", ["../evil.py", "/etc/evil.py", "a/../../evil.py"])
def test_the_runtime_refuses_a_path_outside_its_folder(tmp_path, name):
    archive = tmp_path / "a.zip"
    info = zipfile.ZipInfo("placeholder")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        info.filename = name  # writestr would normalise it; a hostile archive is not made by zipfile
        zf.writestr(info, b"x")
    archive.write_bytes(buffer.getvalue())
    with pytest.raises(runtime.StepError, match="unsafe path"):
        runtime._unzip(str(archive), str(tmp_path / "out"))
    assert not (tmp_path / "evil.py").exists()


def test_steps_on_one_machine_unpack_an_archive_once(shipped, tmp_path, monkeypatch):
    name, ref, _root, _empty = shipped
    monkeypatch.setenv("TMPDIR", str(tmp_path / "machine"))
    (tmp_path / "machine").mkdir()
    step = {"code": ref.to_json()}
    first = runtime._unpacked(ref.uri, ref.sha256, runtime._Scratch())
    assert first == str(tmp_path / "machine" / f"remote-ml-code-{os.getuid()}" / ref.sha256)
    marker = Path(first) / "added-by-the-first-step"
    marker.write_text("")
    assert runtime._unpacked(ref.uri, ref.sha256, runtime._Scratch()) == first  # not unpacked again
    assert marker.exists()
    assert step["code"]["sha256"] == ref.sha256


def test_a_cache_folder_others_may_write_is_never_used(shipped, tmp_path, monkeypatch):
    """Whoever can write the folder could plant code the step would import: it is passed over."""
    name, ref, _root, _empty = shipped
    monkeypatch.setenv("TMPDIR", str(tmp_path / "machine"))
    shared = tmp_path / "machine" / f"remote-ml-code-{os.getuid()}"
    (shared / ref.sha256 / name).mkdir(parents=True)
    (shared / ref.sha256 / name / "__init__.py").write_text("raise SystemExit('planted')")
    shared.chmod(0o777)
    scratch = runtime._Scratch()
    try:
        target = runtime._unpacked(ref.uri, ref.sha256, scratch)
        assert not target.startswith(str(shared))
        assert (Path(target) / name / "__init__.py").read_text() == ""
    finally:
        scratch.remove()


# -- the operator -----------------------------------------------------------------------------------------


def make_operator(tmp_path: Path, **kwargs):
    from airflow_remote_ml.operators import RemoteExecutionOperator

    # inherit_sys_path=False: the step's interpreter cannot import the package from the worker's folders,
    # as a container of a stock image cannot.
    config = {"state_dir": str(tmp_path / "jobs"), "inherit_sys_path": False}
    return RemoteExecutionOperator(task_id="hello", backend="local", backend_config=config,
                                   artifact_root=str(tmp_path / "art"), **kwargs)


def test_the_operator_refuses_a_bad_code_argument_when_the_dag_is_parsed(tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(ConfigError) as err:
        make_operator(tmp_path, callable="my_pipeline.steps:hello", code="my_pipeline")
    assert err.value.field == "code" and isinstance(err.value, AirflowFailException)


def test_the_operator_ships_the_callables_package_and_records_its_hash(user_pkg, tmp_path):
    from tests.system.helpers import FakeTI, FileStateStore, context

    result = make_operator(tmp_path, callable=f"{user_pkg}.steps:hello", parameters={"name": "op"},
                           outputs=["greeting"]).execute(context(FakeTI(), FileStateStore(str(tmp_path / "s.json"))))
    assert Path(result["outputs"]["greeting"]).read_text() == "hello op\n"
    manifest = json.loads(Path(result["outputs"]["greeting"]).parents[1].joinpath("manifest.json").read_text())
    sha = manifest["versions"]["code_sha256"]
    assert (tmp_path / "art" / "_code" / f"{sha}.zip").is_file()


def test_with_code_false_the_step_cannot_import_and_the_error_says_so(user_pkg, tmp_path):
    from airflow_remote_ml.core import StepFailedError
    from tests.system.helpers import FakeTI, FileStateStore, context

    operator = make_operator(tmp_path, callable=f"{user_pkg}.steps:hello", parameters={"name": "op"},
                             outputs=["greeting"], code=False)
    with pytest.raises(StepFailedError, match=f"No module named '{user_pkg}'.*no code was shipped"):
        operator.execute(context(FakeTI(), FileStateStore(str(tmp_path / "s.json"))))
    assert not (tmp_path / "art" / "_code").exists()


def test_a_named_package_the_worker_cannot_import_fails_before_anything_is_submitted(tmp_path):
    from tests.system.helpers import FakeTI, FileStateStore, context

    missing = f"missing_{uuid.uuid4().hex[:6]}"
    operator = make_operator(tmp_path, callable=f"{missing}.steps:hello", code=[missing])
    with pytest.raises(ConfigError, match="not importable on this worker") as err:
        operator.execute(context(FakeTI(), FileStateStore(str(tmp_path / "s.json"))))
    assert err.value.field == "code"
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())


def test_the_callables_package_missing_on_the_worker_is_left_to_the_steps_environment(tmp_path, caplog, capsys):
    """As before code shipping: a Databricks workspace folder or the image may hold it. A warning says so,
    and the step's own import error says nothing was shipped."""
    from airflow_remote_ml.core import StepFailedError
    from tests.system.helpers import FakeTI, FileStateStore, context

    missing = f"missing_{uuid.uuid4().hex[:6]}"
    operator = make_operator(tmp_path, callable=f"{missing}.steps:hello")
    with pytest.raises(StepFailedError, match=f"No module named '{missing}'.*no code was shipped"):
        operator.execute(context(FakeTI(), FileStateStore(str(tmp_path / "s.json"))))
    # The task logger writes through Airflow's structlog (to stdout here), not to the logging records.
    logged = capsys.readouterr().out + "".join(r.getMessage() for r in caplog.records)
    assert f"Not shipping {missing} with the step (package '{missing}' is not importable on this worker" in logged


def test_an_installed_library_as_the_callables_package_is_not_shipped():
    skipped: list[str] = []
    assert codepkg.prepare("fsspec.core:url_to_fs", True, "/tmp/a", lambda name, _exc: skipped.append(name)) is None
    assert skipped == ["fsspec"]
    with pytest.raises(ConfigError, match="installed library"):
        codepkg.prepare("fsspec.core:url_to_fs", ["fsspec"], "/tmp/a")
