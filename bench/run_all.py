"""Run every benchmark in bench/, with the arguments docs/benchmarks.md reports, and print their tables.

    make bench            # or: .venv/bin/python bench/run_all.py [--only docker] [--list]

Each run is printed with its exact command, the commit and the load average before it, which is what
docs/benchmarks.md records next to each figure. On a 2-core machine the whole set takes about 15 minutes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: (backend, script, arguments): the runs behind docs/benchmarks.md. Some scripts need more than one run
#: (docker's chatty step, kubernetes' per-step request counts are separate modes), so this is a list of
#: runs, not of scripts. Iteration counts are kept modest so the set takes about 15 minutes.
RUNS: list[tuple[str, str, list[str]]] = [
    ("local", "bench_local.py", ["--iterations", "20"]),
    ("local", "bench_local_chatty.py", ["--iterations", "5", "--lines", "200000"]),
    ("local", "bench_task_log.py", ["--iterations", "3", "--lines", "200000"]),
    ("local", "bench_codepkg.py", ["--iterations", "20"]),
    ("local", "bench_jobs.py", ["--jobs", "429", "--rounds", "7"]),
    ("docker", "bench_docker.py", ["--iterations", "10", "--phases"]),
    ("docker", "bench_docker.py", ["--chatty", "--iterations", "5"]),
    ("docker", "bench_docker.py", ["--iterations", "30", "--step", "no-op", "--record-ms", "7.0,8.8"]),
    ("docker", "bench_docker_startup.py", ["--iterations", "40"]),
    ("kubernetes", "bench_kubernetes.py", ["--per-step", "10"]),
    ("kubernetes", "bench_kubernetes.py", ["--window", "20", "--steps", "50,500"]),
    ("databricks", "bench_databricks.py", []),
    ("databricks", "bench_databricks.py", ["--many", "50,500", "--many-seconds", "150", "--warmup", "40"]),
    ("valohai", "bench_valohai.py", ["-n", "12", "--duration", "120", "--spread", "20", "--deferred", "--many", "50",
                                     "--idle"]),
    ("valohai", "bench_valohai.py", ["-n", "0", "--duration", "120", "--spread", "20", "--many", "500", "--idle"]),
    ("deferred", "bench_task_state.py", ["--rounds", "30"]),
    ("deferred", "bench_deferred.py", ["--steps", "200", "--rounds", "1", "--sides", "ours,floor"]),
    ("deferred", "bench_deferred.py", ["--steps", "20", "--rounds", "2", "--sides", "ours,floor"]),
    ("s3", "bench_s3.py", ["--iterations", "7", "--sizes", "4,128"]),
]


def commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True,
                            text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE.parent,
                           capture_output=True, text=True, check=False).stdout.strip()
    return (result.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", action="append", help="run only this backend's benchmarks (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the commands and exit")
    args = parser.parse_args()
    # A benchmark nobody runs goes stale unnoticed: every bench_*.py must have a run above.
    unlisted = {p.name for p in HERE.glob("bench_*.py")} - {script for _, script, _ in RUNS}
    if unlisted:
        print(f"bench/run_all.py has no run for: {', '.join(sorted(unlisted))}", file=sys.stderr)
        return 2
    backends = {backend for backend, _, _ in RUNS}
    if args.only and not set(args.only) <= backends:
        parser.error(f"--only takes one of {', '.join(sorted(backends))}")
    print(f"commit {commit()}", flush=True)
    failed = []
    for backend, script, script_args in RUNS:
        if args.only and backend not in args.only:
            continue
        command = " ".join([".venv/bin/python", f"bench/{script}", *script_args])
        if args.list:
            print(command)
            continue
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"\n## {backend}\n\n$ {command}\n\nload average before: {load}\n", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *script_args], cwd=HERE.parent).returncode:
            failed.append(command)
    for command in failed:
        print(f"FAILED: {command}", file=sys.stderr)
    return int(bool(failed))


if __name__ == "__main__":
    sys.exit(main())
