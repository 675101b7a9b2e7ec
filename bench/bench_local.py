"""The local backend against a bare subprocess, alternating in one run.

    .venv/bin/python bench/bench_local.py [--iterations 20]

Per-step time = validate → submit → completion noticed → result read (for the bare subprocess: run and
wait). The no-op step shows our fixed overhead (the runtime's interpreter start, the manifest); the
1-second step shows it is fixed, not proportional. The order flips every iteration so neither side always
runs on a warmer page cache. Prints medians and min–max, and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

# This checkout's code, not whatever copy of the package happens to be installed (run_all.py starts us
# as `python bench/bench_local.py`, which puts only bench/ on the path).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from airflow_remote_ml.backends.local import LocalBackend
from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec
from airflow_remote_ml.core.wait import wait_for_completion

STEPS = {"no-op": "pass", "1-second": "import time; time.sleep(1)"}


def ours(backend: LocalBackend, store: ArtifactStore, code: str) -> float:
    spec = StepSpec.build(command=[sys.executable, "-c", code])
    request = StepRequest.create(spec, StepIdentity("bench", "step", uuid.uuid4().hex), store)
    started = time.perf_counter()
    backend.validate(request)
    handle = backend.submit(request)
    outcome = wait_for_completion(backend, handle)
    backend.fetch_result(handle)
    elapsed = time.perf_counter() - started
    assert outcome.status.is_successful, outcome
    return elapsed


def bare(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="bench-local-")
    backend = LocalBackend.from_config({"state_dir": f"{tmp}/jobs"})
    store = ArtifactStore(f"{tmp}/artifacts")
    rows = []
    for name, code in STEPS.items():
        ours(backend, store, code)  # warm-up: imports, page cache
        bare(code)
        theirs_t: list[float] = []
        ours_t: list[float] = []
        for i in range(args.iterations):
            pair = [lambda: theirs_t.append(bare(code)),  # noqa: B023 - called within this iteration
                    lambda: ours_t.append(ours(backend, store, code))]  # noqa: B023
            for run in pair if i % 2 == 0 else reversed(pair):
                run()
        a, b = statistics.median(theirs_t), statistics.median(ours_t)
        rows.append(f"| {name} | {a * 1000:.0f} ms ({min(theirs_t) * 1000:.0f}–{max(theirs_t) * 1000:.0f}) | "
                    f"{b * 1000:.0f} ms ({min(ours_t) * 1000:.0f}–{max(ours_t) * 1000:.0f}) | {b / a:.2f}× |")
    print(f"{args.iterations} iterations per step, alternating; load {load_before:.2f} → {os.getloadavg()[0]:.2f} (1-minute average, start → end)\n")
    print("| step | bare subprocess, median (min–max) | local backend, median (min–max) | ratio |")
    print("|---|---:|---:|---:|")
    for line in rows:
        print(line)
    print(f"\ncommand: .venv/bin/python bench/bench_local.py --iterations {args.iterations}")

if __name__ == "__main__":
    main()
