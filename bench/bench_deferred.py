"""Deferred completion: N mapped deferred steps end together; how long until each task is a success.

    .venv/bin/python bench/bench_deferred.py --steps 200 --rounds 1

A real deployment (tests/deployment/harness.py: PostgreSQL, scheduler with the LocalExecutor,
dag-processor, triggerer, api-server; as root, ``.ci/postgres.sh`` installs and starts PostgreSQL) runs
bench/dags/bench_deferred_steps.py. Each round runs the DAGs in turn (the order rotates every round):

- ours: ``RemoteExecutionOperator``; the trigger pushes the result and ends the task (``TaskSuccessEvent``).
- worker: the old path; the task resumes on a worker (``execute_complete``) after the trigger fired.
- floor: Airflow's own floor (bench/deferred_floor.py): the same shell lines as a bare process, a trigger
  waiting on its pidfd that pushes one small XCom and ends the task; no provider code at all. Ours minus
  the floor is what this provider adds; the floor is what Airflow 3.3 costs to end N tasks at once.

The N steps start, defer, and block on a lock the bench holds; once every task is deferred with its
trigger running, the bench releases the lock and every step ends at once, writing the time it ended.
Measured per task: the step's end -> the task's ``end_date`` (REST API), which is the trigger fired ->
task success plus the trigger noticing the exit (a pidfd in the triggerer's event loop). Also: how many
tasks resumed on a worker (their log says so), and the time from the release to the last success.
A warm-up round of 2 steps runs first: the triggerer builds its in-process execution API on the first
request of any trigger (seconds, once per triggerer process); its figure is printed apart.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # measure the checkout this script sits in

from tests.deployment.harness import Deployment, wait_for  # noqa: E402

DAGS = {"ours": "bench_deferred_ours", "floor": "bench_deferred_floor", "worker": "bench_deferred_worker"}
LABELS = {"ours": "ours (the trigger pushes the result and ends the task)",
          "floor": "Airflow's floor (a bare trigger: one small push, then `TaskSuccessEvent`)",
          "worker": "old path (`execute_complete` on a worker)"}
RESUMED_ON_WORKER = "Resumed on a worker after the trigger fired"


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def tis(live: Deployment, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    """Every mapped task instance of the run."""
    return [ti for ti in live.task_instances(dag_id, run_id) if ti["task_id"] == "step" and ti["map_index"] >= 0]


def one_round(live: Deployment, side: str, steps: int, root: Path) -> dict[str, Any]:
    dag_id = DAGS[side]
    control = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=root))
    gate = control / "gate"
    gate.touch()
    with open(gate, "rb+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # every step blocks on it (flock -s) until the release below
        run_id = live.trigger(dag_id, {"control_dir": str(control), "steps": steps})

        def all_deferred() -> bool:
            found = tis(live, dag_id, run_id)
            running = [ti for ti in found if ti["state"] == "deferred" and (ti["trigger"] or {}).get("triggerer_id")]
            failed = [ti for ti in found if ti["state"] in ("failed", "upstream_failed")]
            if failed:
                raise SystemExit(f"{len(failed)} steps failed before the release\n{live.describe_run(dag_id, run_id)}")
            return len(running) == steps and len(list(control.glob("started.*"))) == steps

        wait_for(f"{steps} steps of {dag_id} deferred with their triggers running", all_deferred, 900, interval=1.0)
        released = time.time()
        fcntl.flock(lock, fcntl.LOCK_UN)
    state = live.wait_for_run(dag_id, run_id, timeout=900)
    if state != "success":
        raise SystemExit(f"{dag_id} ended {state}\n{live.describe_run(dag_id, run_id)}")
    delays, ends = [], []
    resumed = 0
    for ti in tis(live, dag_id, run_id):
        ended_at = datetime.fromisoformat(ti["end_date"]).timestamp()
        step_end = float((control / f"ended.{ti['map_index']}").read_text())
        delays.append(ended_at - step_end)
        ends.append(ended_at)
        if RESUMED_ON_WORKER in live.task_log_json(dag_id, run_id, "step", ti["try_number"], ti["map_index"]):
            resumed += 1
    return {"side": side, "delays": delays, "last": max(ends) - released, "resumed": resumed}


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1, help="rounds of both sides (the order flips each round)")
    parser.add_argument("--sides", default="ours,floor,worker",
                        help="comma-separated sides to measure, of: " + ", ".join(DAGS))
    parser.add_argument("--keep", type=Path, help="run the deployment in this directory and keep its logs")
    args = parser.parse_args()
    # A SIGTERM (a bounded run's timeout) still stops the deployment: the finally below runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sides = [side.strip() for side in args.sides.split(",") if side.strip()]
    unknown = [side for side in sides if side not in DAGS]
    if unknown or not sides:
        parser.error(f"--sides: {unknown or 'none'} not of {', '.join(DAGS)}")
    command = (f".venv/bin/python bench/bench_deferred.py --steps {args.steps} --rounds {args.rounds} "
               f"--sides {','.join(sides)}")
    start_load = load()
    with tempfile.TemporaryDirectory(prefix="bench-deferred-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        live = Deployment.start(root / "airflow", extra_dags=HERE / "dags")
        try:
            live.wait_for_dags(list(DAGS.values()))
            # The triggerer builds its in-process execution API on the first request a trigger makes (here:
            # the first result push), in its main loop: a one-time cost per triggerer, measured apart.
            cold = one_round(live, "ours", 2, root)
            print(f"cold start (first push of this triggerer, 2 steps): median {statistics.median(cold['delays']):.2f} s",
                  flush=True)
            results: list[dict[str, Any]] = []
            for i in range(args.rounds):
                for side in sides[i % len(sides):] + sides[:i % len(sides)]:
                    result = one_round(live, side, args.steps, root)
                    d = result["delays"]
                    print(f"round {i + 1} {side}: median {statistics.median(d):.2f} s, p90 {p90(d):.2f} s, "
                          f"max {max(d):.2f} s, last success {result['last']:.1f} s after the release, "
                          f"{result['resumed']}/{len(d)} resumed on a worker", flush=True)
                    results.append(result)
        finally:
            with contextlib.suppress(Exception):
                live.stop()
    print(f"\n`{command}` (load {start_load} -> {load()}); cold start (the triggerer's first result push, "
          f"2 steps, not in the table): median {statistics.median(cold['delays']):.2f} s\n")
    print("| path | steps | step end -> task success: median | p90 | min-max | release -> last success | "
          "resumed on a worker |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for side in sides:
        rows = [r for r in results if r["side"] == side]
        if not rows:
            continue
        d = [x for r in rows for x in r["delays"]]
        label = LABELS[side]
        lasts = ", ".join(f"{r['last']:.1f} s" for r in rows)
        resumed = sum(r["resumed"] for r in rows)
        print(f"| {label} | {args.steps} x {len(rows)} | {statistics.median(d):.2f} s | {p90(d):.2f} s | "
              f"{min(d):.2f}-{max(d):.2f} s | {lasts} | {resumed}/{len(d)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
