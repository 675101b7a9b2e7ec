"""A chatty step's lines through the task's own logger: what a user running the operator pays for them.

    .venv/bin/python bench/bench_task_log.py --iterations 3 --lines 200000

``airflow dags test`` (SQLite, a private AIRFLOW_HOME) runs one local step per DAG, the DAGs taking turns:
- ``quiet``: the step prints 200 lines: the fixed cost of a task (parse, run, the step itself).
- ``chatty``: the same step printing ``--lines`` lines, logged as Airflow gets them now (lines read together
  are one record of up to 500, core/wait.py ``log_records``).
- ``chatty_per_line``: the same, through an operator that logs each line as its own record (as before, and as
  DockerOperator and KubernetesPodOperator do).
Reported: the DAG run's ``run_duration`` (Airflow's own figure), medians with min-max; the cost of the lines
is a chatty median minus the quiet one. The step itself (a bare ``python3`` printing the lines to a file) is
timed too.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

DAG_FILE = '''
from datetime import datetime
from airflow.sdk import DAG
from airflow_remote_ml.operators import RemoteExecutionOperator


class PerLine(RemoteExecutionOperator):
    """Each line its own record: the path before lines were batched."""

    def _log_lines(self, lines):
        for line in lines:
            self._log_line(line)


def step(n):
    return ["python3", "-c", f"for i in range({n}): print('a line of the step', i)"]


for dag_id, operator, n in (("quiet", RemoteExecutionOperator, 200), ("chatty", RemoteExecutionOperator, LINES),
                            ("chatty_per_line", PerLine, LINES)):
    with DAG(dag_id, schedule=None, start_date=datetime(2026, 1, 1)) as dag:
        # Block-buffered stdout on both chatty sides: the step's own cost is the same.
        operator(task_id="step", backend="local", command=step(n), env={"PYTHONUNBUFFERED": ""})
    globals()[dag_id] = dag
'''


def run_dag(env: dict[str, str], dag_id: str) -> float:
    result = subprocess.run([sys.executable, "-m", "airflow", "dags", "test", dag_id], env=env,
                            capture_output=True, text=True, check=False)
    found = re.findall(r"run_duration=([0-9.]+)", result.stdout + result.stderr)
    if result.returncode != 0 or not found or "state=success" not in result.stdout + result.stderr:
        raise SystemExit(f"{dag_id} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return float(found[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--lines", type=int, default=200_000)
    args = parser.parse_args()
    start_load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-task-log-") as tmp:
        home = Path(tmp)
        (home / "dags").mkdir()
        (home / "dags" / "chatty_dags.py").write_text(DAG_FILE.replace("LINES", str(args.lines)))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "REMOTE_ML_"))}
        env.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
                    "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "REMOTE_ML_ARTIFACT_ROOT": str(home / "artifacts"),
                    "REMOTE_ML_LOCAL_STATE_DIR": str(home / "jobs"),
                    "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True, check=True)
        sides = ["quiet", "chatty", "chatty_per_line"]
        times: dict[str, list[float]] = {side: [] for side in [*sides, "bare step"]}
        for i in range(args.iterations):
            for side in sides[i % 3:] + sides[:i % 3]:
                times[side].append(run_dag(env, side))
            begun = time.perf_counter()
            with open(home / "bare.log", "w") as out:
                subprocess.run(["python3", "-c", f"for i in range({args.lines}): print('a line of the step', i)"],
                               stdout=out, check=True)
            times["bare step"].append(time.perf_counter() - begun)
    print(f"`.venv/bin/python bench/bench_task_log.py --iterations {args.iterations} --lines {args.lines}` "
          f"(load {start_load:.2f} -> {os.getloadavg()[0]:.2f})\n")
    print("| DAG | run_duration, median s (min-max) | minus quiet |")
    print("|---|---:|---:|")
    quiet = statistics.median(times["quiet"])
    for side, values in times.items():
        median = statistics.median(values)
        extra = "" if side in ("quiet", "bare step") else f"{median - quiet:+.2f} s"
        print(f"| {side} | {median:.2f} ({min(values):.2f}-{max(values):.2f}) | {extra} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
