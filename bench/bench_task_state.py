"""What the step record costs in a real deployment: Airflow's task state store calls, next to an XCom push.

    .venv/bin/python bench/bench_task_state.py [--rounds 30]

The operator's lifecycle keeps its record in the task state store: one ``get`` and three ``set`` calls on a
task's first try (intent before the submit, submitted after it, finished at the end); DockerOperator and
KubernetesPodOperator keep none. bench/bench_docker.py and the other backend benches keep the record in
memory, on neither side counting Airflow's bookkeeping; this bench prices what that leaves out. A real
deployment (tests/deployment/harness.py: PostgreSQL, scheduler with the LocalExecutor, dag-processor,
triggerer, api-server; as root, ``.ci/postgres.sh`` installs and starts PostgreSQL) runs
bench/dags/bench_task_state.py, whose task times each call from inside a task process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # measure the checkout this script sits in

from tests.deployment.harness import Deployment  # noqa: E402

DAG_ID = "bench_task_state"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start_load = f"{os.getloadavg()[0]:.2f}"
    with tempfile.TemporaryDirectory(prefix="bench-task-state-") as tmp:
        live = Deployment.start(Path(tmp) / "airflow", extra_dags=HERE / "dags")
        try:
            live.wait_for_dags([DAG_ID])
            run_id = live.trigger(DAG_ID, {"rounds": args.rounds})
            state = live.wait_for_run(DAG_ID, run_id, timeout=600)
            if state != "success":
                raise SystemExit(f"{DAG_ID} ended {state}\n{live.describe_run(DAG_ID, run_id)}")
            times = live.xcom(DAG_ID, run_id, "calls")
        finally:
            with contextlib.suppress(Exception):
                live.stop()
    print(f"`.venv/bin/python bench/bench_task_state.py --rounds {args.rounds}` "
          f"(load {start_load} -> {os.getloadavg()[0]:.2f})\n")
    print("| call, from inside a task | median ms | min-max ms |")
    print("|---|---:|---:|")
    for kind, values in times.items():
        print(f"| `{kind}` | {statistics.median(values):.1f} | {min(values):.1f}-{max(values):.1f} |")
    get, put = statistics.median(times["task_state_store.get"]), statistics.median(times["task_state_store.set"])
    print(f"\nThe step record on a first try (1 get + 3 set): {get + 3 * put:.1f} ms per task.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
