"""The local backend against a bare subprocess on a chatty step (200k lines), alternating in one run.

    .venv/bin/python bench/bench_local_chatty.py [--iterations 10] [--lines 200000]

Per-step time = submit → completion noticed → result read, the step's output going to the job's log file
through the runtime's relay. The peer is what a user would write without us: ``subprocess.run`` of the
same command with its output to a log file. Both sides run the same interpreter and command; the order
flips every iteration so neither always runs on a warmer page cache. Prints medians and min–max.
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
# as `python bench/bench_local_chatty.py`, which puts only bench/ on the path).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from airflow_remote_ml.backends.local import LocalBackend
from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec
from airflow_remote_ml.core.wait import wait_for_completion


def step_code(lines: int) -> str:
    # One JSON metrics line at the end, so the relay's metric parsing is part of the cost.
    return f"import json\nfor i in range({lines}): print('line', i)\nprint(json.dumps({{'lines': {lines}}}))"


#: The two ways a Python step's stdout can be buffered; both sides of a row run the same way.
#: "unbuffered" is the local backend's default (PYTHONUNBUFFERED=1: prints reach the log as they happen);
#: "block-buffered" is a step that opts out with env={"PYTHONUNBUFFERED": ""}, and a bare subprocess
#: started without PYTHONUNBUFFERED in its environment.
MODES = {"unbuffered": "1", "block-buffered": ""}


def ours(backend: LocalBackend, store: ArtifactStore, code: str, unbuffered: str) -> float:
    spec = StepSpec.build(command=[sys.executable, "-c", code], env={"PYTHONUNBUFFERED": unbuffered})
    request = StepRequest.create(spec, StepIdentity("bench", "chatty", uuid.uuid4().hex), store)
    started = time.perf_counter()
    backend.validate(request)
    handle = backend.submit(request)
    outcome = wait_for_completion(backend, handle, on_line=lambda line: None)
    result = backend.fetch_result(handle)
    elapsed = time.perf_counter() - started
    assert outcome.status.is_successful, outcome
    assert result.metrics.get("lines"), result.metrics
    return elapsed


def bare(code: str, log_dir: str, unbuffered: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    started = time.perf_counter()
    with open(os.path.join(log_dir, f"{uuid.uuid4().hex}.log"), "wb") as log:
        subprocess.run([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, check=True, env=env)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", "-n", type=int, default=10)
    parser.add_argument("--lines", type=int, default=200_000)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    code = step_code(args.lines)
    mine: dict[str, list[float]] = {mode: [] for mode in MODES}
    theirs: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-local-chatty-") as tmp:
        backend = LocalBackend.from_config({"state_dir": f"{tmp}/jobs"})
        store = ArtifactStore(f"{tmp}/artifacts")
        os.makedirs(f"{tmp}/logs")
        ours(backend, store, code, "1")  # warm-up: imports, page cache
        bare(code, f"{tmp}/logs", "1")
        for i in range(args.iterations):
            for mode, unbuffered in MODES.items():
                pair = [lambda m=mode, u=unbuffered: mine[m].append(ours(backend, store, code, u)),
                        lambda m=mode, u=unbuffered: theirs[m].append(bare(code, f"{tmp}/logs", u))]
                for run in pair if i % 2 == 0 else reversed(pair):
                    run()
            print(f"iteration {i + 1}/{args.iterations} done", file=sys.stderr)
    print(f"{args.lines} lines, {args.iterations} iterations, alternating; load {load_before:.2f} → {os.getloadavg()[0]:.2f} (1-minute average, start → end)\n")
    print("| step stdout | bare subprocess, median (min–max) | local backend, median (min–max) | ratio |")
    print("|---|---:|---:|---:|")
    for mode in MODES:
        a, b = statistics.median(theirs[mode]), statistics.median(mine[mode])
        print(f"| {mode} | {a:.3f} s ({min(theirs[mode]):.3f}–{max(theirs[mode]):.3f}) | "
              f"{b:.3f} s ({min(mine[mode]):.3f}–{max(mine[mode]):.3f}) | {b / a:.2f}× |")
    print(f"\ncommand: .venv/bin/python bench/bench_local_chatty.py --iterations {args.iterations} --lines {args.lines}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
