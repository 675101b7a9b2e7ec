"""Every documented snippet runs: the next doc example that fails (``resources=`` for ``compute=``) fails here.

- Every ``python`` block of README.md and docs/ compiles, and is executed: a fragment of a DAG file runs
  inside a ``with DAG(...)`` with the imports a DAG file has (``RemoteExecutionOperator``, ``timedelta``)
  and a ``prepare`` task when it refers to one, so each operator it builds is validated as Airflow would.
- A block whose first line names a file under ``$AIRFLOW_HOME`` is that file: the quickstart's steps
  module and DAG. The DAG is parsed by Airflow's DagBag.
- The quickstart runs as written: its ``bash`` blocks marked ``<!-- test: NAME -->`` run in bash with a
  fresh ``HOME`` (so ``~/airflow`` is private), the files written where the page says, on ``local`` and
  (marked ``docker``, like every test that needs the engine) on ``docker`` from the stock runner image.
  Its other blocks are checked against what they claim (the extras exist, ``make demo`` exists).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
QUICKSTART = REPO / "docs" / "quickstart.md"
#: First line of a block that is a whole file the reader creates.
FILE_HEADER = re.compile(r"^# (\$AIRFLOW_HOME/\S+)$")
#: First line of a block that quotes a file of this repository (``# from dags/example_ml_taskflow.py``): the
#: block is checked to be in that file verbatim, and the file itself runs in its own tests.
EXCERPT_HEADER = re.compile(r"^# from (\S+\.py)$")
#: Last line of a block that shows an error: ``# raises ConfigError: <the message's start>; ...``.
RAISES = re.compile(r"^# raises (\w+): (.*?)(?:; \.\.\.|\.\.\.)?\s*\Z", re.M)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    language: str
    text: str
    marker: str | None  # NAME of a preceding "<!-- test: NAME -->"

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def file(self) -> str | None:
        match = FILE_HEADER.match(self.text.splitlines()[0]) if self.text else None
        return match.group(1) if match else None


def blocks(path: Path) -> list[Block]:
    found, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = re.match(r"^<!-- test: ([\w-]+) -->$", previous)
        found.append(Block(path, start + 1, fence.group(1), "\n".join(body) + "\n", marker.group(1) if marker else None))
        i += 1
    return found


ALL = [b for doc in DOCS for b in blocks(doc)]
EXCERPTS = [b for b in ALL if b.language == "python" and EXCERPT_HEADER.match(b.text.splitlines()[0] if b.text else "")]
PYTHON = [b for b in ALL if b.language == "python" and b not in EXCERPTS]
FRAGMENTS = [b for b in PYTHON if b.file is None]


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_every_python_snippet_compiles(block: Block) -> None:
    compile(block.text, block.id, "exec")


@pytest.mark.parametrize("block", EXCERPTS, ids=[b.id for b in EXCERPTS])
def test_every_excerpt_is_in_its_file_verbatim(block: Block) -> None:
    header, _, body = block.text.partition("\n")
    match = EXCERPT_HEADER.match(header)
    assert match is not None
    source = (REPO / match.group(1)).read_text(encoding="utf-8")
    assert body.strip() and body.rstrip() in source, f"{block.id} is not what {match.group(1)} says"


@pytest.mark.parametrize("block", FRAGMENTS, ids=[b.id for b in FRAGMENTS])
def test_every_python_snippet_runs(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    """Executed as part of a DAG file: every operator it builds passes the operator's own checks."""
    from datetime import datetime, timedelta

    from airflow.sdk import DAG

    from airflow_remote_ml.operators import RemoteExecutionOperator

    # A module of its own, as a DAG file is (a dataclass looks its module up in sys.modules).
    module = types.ModuleType(f"snippet_{block.path.stem}_{block.line}")
    namespace = module.__dict__
    namespace.update({"RemoteExecutionOperator": RemoteExecutionOperator, "timedelta": timedelta,
                      "datetime": datetime})
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with DAG(dag_id=f"snippet_{block.line}", schedule=None, start_date=datetime(2026, 1, 1)) as dag:
        if re.search(r"\bprepare\.output\b", block.text) and not re.search(r"^prepare\s*=", block.text, re.M):
            # The upstream step the fragment refers to, as the quickstart and the example pipeline define it.
            namespace["prepare"] = RemoteExecutionOperator(task_id="prepare", callable="my_pipeline.steps:prepare",
                                                           outputs=["dataset"])
        raises = RAISES.search(block.text)
        if raises:
            # A block that shows an error ends in "# raises ConfigError: <message>; ...": it must raise that.
            with pytest.raises(Exception) as err:
                exec(compile(block.text, block.id, "exec"), namespace)
            assert type(err.value).__name__ == raises.group(1), err.value
            assert str(err.value).startswith(raises.group(2)), err.value
        else:
            exec(compile(block.text, block.id, "exec"), namespace)
    for task in dag.tasks:
        assert task.task_id


# -- the quickstart -------------------------------------------------------------------------------------------

QUICK = blocks(QUICKSTART)


def quick_block(marker: str) -> Block:
    (block,) = [b for b in QUICK if b.marker == marker]
    return block


def test_every_quickstart_block_is_exercised_here() -> None:
    """A block added to the quickstart must be run by this module (or checked for what it claims)."""
    covered = {"setup", "local", "docker"}
    for block in QUICK:
        if block.marker:
            assert block.marker in covered, block.id
        elif block.file:
            assert block.language == "python", block.id
        elif block.language == "text":
            # The layout: it names exactly the files the page has the reader write.
            shown = set(re.findall(r"[\w.]+\.py", block.text))
            assert shown == {Path(b.file).name for b in QUICK if b.file} | {"__init__.py"}, block.id
        elif block.text.startswith("pip install"):
            extras = re.search(r"\[([\w,]+)\]", block.text)
            assert extras is not None
            declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
            named = set(extras.group(1).split(",")) | set(re.findall(r"\b(\w+)\b", block.text.split("#", 1)[1]))
            assert named - {"extras"} <= set(declared), named - set(declared)
        elif block.text.strip() == "make demo":
            assert re.search(r"^demo:", (REPO / "Makefile").read_text(), re.M)
        else:
            pytest.fail(f"{block.id}: a quickstart block this test neither runs nor checks:\n{block.text}")


def test_the_quickstart_dag_parses_in_airflow(tmp_path: Path, airflow_db: Path) -> None:
    from airflow.dag_processing.dagbag import DagBag

    dags = tmp_path / "airflow" / "dags"
    write_files(tmp_path / "airflow")
    bag = DagBag(dag_folder=str(dags))
    assert bag.import_errors == {}
    assert set(bag.dags["my_pipeline"].task_ids) == {"make_data", "fit"}


def write_files(airflow_home: Path) -> None:
    for block in QUICK:
        if block.file:
            target = airflow_home / block.file.removeprefix("$AIRFLOW_HOME/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.text, encoding="utf-8")


def shell_env(home: Path) -> dict[str, str]:
    """A reader's shell: a fresh HOME, Airflow on PATH, none of the test session's Airflow settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "REMOTE_ML_", "PYTEST"))}
    env["HOME"] = str(home)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # This checkout's provider, as the installed one (the editable install may point at another checkout).
    env["PYTHONPATH"] = str(REPO)
    return env


def bash(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-e", "-c", script], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reader's HOME after section 2's commands and with sections 3 and 4's files written."""
    home = tmp_path_factory.mktemp("reader")
    setup = quick_block("setup").text
    done = bash(setup, shell_env(home), home)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    write_files(home / "airflow")
    return home


def run_in_reader_shell(home: Path, marker: str) -> str:
    """A block run in the shell the setup ran in (its exports still set)."""
    exports = "\n".join(line for line in quick_block("setup").text.splitlines() if line.startswith("export "))
    done = bash(f"{exports}\n{quick_block(marker).text}", shell_env(home), home)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "Dag run in success state" in output, output[-5000:]
    return output


def manifests(home: Path, run_id: str) -> dict[str, dict]:
    run_dir = home / "airflow-remote-ml" / "artifacts" / "my_pipeline" / run_id
    return {task: json.loads((run_dir / task / "map_-1" / "gen_0" / "manifest.json").read_text())
            for task in ("make_data", "fit")}


def run_id_of(output: str) -> str:
    """The run's folder name under the artifact root (its id, ':' escaped as the artifact layout does)."""
    match = re.search(r"Output model: \S+/my_pipeline/([^/]+)/fit/", output)
    assert match, output[-3000:]
    return match.group(1)


def check_outcome(home: Path, output: str) -> dict[str, dict]:
    found = manifests(home, run_id_of(output))
    code = {m["versions"]["code_sha256"] for m in found.values()}
    assert len(code) == 1 and None not in code, code  # both steps ran the same shipped code
    (sha,) = code
    assert (home / "airflow-remote-ml" / "artifacts" / "_code" / f"{sha}.zip").is_file()
    model = json.loads(Path(found["fit"]["outputs"]["model"]["uri"]).read_text())
    assert abs(model["slope"] - 3) < 0.2 and abs(model["intercept"] - 2) < 0.5, model
    assert found["fit"]["metrics"]["rmse"] < 1.5
    return found


def test_the_quickstart_runs_as_written_on_the_local_backend(quickstart: Path) -> None:
    output = run_in_reader_shell(quickstart, "local")
    found = check_outcome(quickstart, output)
    assert found["fit"]["versions"]["python"] == sys.version.split()[0]  # the worker's own Python


@pytest.mark.docker
def test_the_quickstart_runs_as_written_on_docker_from_the_stock_image(quickstart: Path, docker_engine) -> None:
    """The issue's "done when": the user's own DAG on docker, from an image without its code."""
    import docker.errors

    from tests.conftest import RUNNER_IMAGE

    # The image really lacks the code: importing the package there fails.
    with pytest.raises(docker.errors.ContainerError, match=r"No module named .{1,3}my_pipeline"):
        docker_engine.containers.run(RUNNER_IMAGE, ["python3", "-c", "import my_pipeline"], remove=True)
    output = run_in_reader_shell(quickstart, "docker")
    assert "docker: started container" in output
    found = check_outcome(quickstart, output)
    image_python = docker_engine.containers.run(
        RUNNER_IMAGE, ["python3", "-c", "import platform; print(platform.python_version())"], remove=True)
    image_python = image_python.decode().strip()
    assert found["fit"]["versions"]["python"] == image_python
    assert found["fit"]["versions"]["image"] == RUNNER_IMAGE
