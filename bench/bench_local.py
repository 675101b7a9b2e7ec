"""The local backend against a bare subprocess, alternating in one run.

    .venv/bin/python bench/bench_local.py [--iterations 20]

Per-step time = submit → completion noticed → result read (for the bare subprocess: run and wait). The
no-op step shows our fixed overhead (the runtime's interpreter start, the manifest); the 1-second step
shows it is fixed, not proportional.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

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
    tmp = tempfile.mkdtemp(prefix="bench-local-")
    backend = LocalBackend.from_config({"state_dir": f"{tmp}/jobs"})
    store = ArtifactStore(f"{tmp}/artifacts")
    print("| step | bare subprocess (median) | local backend (median) | ratio |")
    print("|---|---|---|---|")
    for name, code in STEPS.items():
        ours(backend, store, code)  # warm-up: imports, page cache
        theirs_t, ours_t = [], []
        for _ in range(args.iterations):
            theirs_t.append(bare(code))
            ours_t.append(ours(backend, store, code))
        a, b = statistics.median(theirs_t), statistics.median(ours_t)
        print(f"| {name} | {a * 1000:.0f} ms | {b * 1000:.0f} ms | {b / a:.2f}× |")


if __name__ == "__main__":
    main()
