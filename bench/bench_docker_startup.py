"""Where a no-op docker step's time goes inside the container: the runtime's start, variant by variant.

    .venv/bin/python bench/bench_docker_startup.py [--iterations 40] [--before REV]

One container of the runner image runs every variant ``--iterations`` times, the variants taking turns,
and prints the median and minimum wall time of each (a fresh process each time, as a step's container
starts one). ``--before REV`` adds the runtime of that git revision, e.g. the commit before a change.
The container gets a copy of this checkout's runtime with its bytecode written, as the backend's
``runtime.install`` puts it on the artifact mount. Needs the engine and the runner image.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "airflow-remote-ml/runner:latest"
STEP = '{"protocol_version":1,"command":["python3","-c","pass"],"manifest_uri":"/tmp/manifest.json"}'

#: (label, shell command run in the container); /rt/now holds this checkout's runtime, /rt/before the old one.
VARIANTS = [
    ("`python3 -c pass` alone (what DockerOperator runs)", "exec python3 -c pass"),
    ("`python3 -S -c pass` (an interpreter start)", "exec python3 -S -c pass"),
    ("`import json` (-S)", "exec python3 -S -c 'import json'"),
    ("`import signal` (-S)", "exec python3 -S -c 'import signal'"),
    ("`import json, signal, subprocess, contextlib` (-S)",
     "exec python3 -S -c 'import json, signal, subprocess, contextlib'"),
    ("`import _json, _signal, _posixsubprocess` (-S)", "exec python3 -S -c 'import _json, _signal, _posixsubprocess'"),
    ("runtime + step, source in the argv", 'exec python3 -S -c "$(cat /rt/now/runtime.py)"'),
    ("runtime + step, bytecode cached, normal exit",
     "exec python3 -S -c 'import sys; sys.path.insert(0, \"/rt/now\"); import runtime; sys.exit(runtime.main())'"),
    ("runtime + step, bytecode cached, no teardown (what the backend runs)",
     "exec python3 -S -c 'import sys; sys.path.insert(0, \"/rt/now\"); import runtime; runtime.exit(runtime.main())'"),
    ("  the same with -I",
     "exec python3 -I -S -c 'import sys; sys.path.insert(0, \"/rt/now\"); import runtime; runtime.exit(runtime.main())'"),
    ("  the same with -X frozen_modules=on", "exec python3 -X frozen_modules=on -S -c "
     "'import sys; sys.path.insert(0, \"/rt/now\"); import runtime; runtime.exit(runtime.main())'"),
]
BEFORE = [
    ("before: runtime + step, source in the argv", 'exec python3 -S -c "$(cat /rt/before/runtime.py)"'),
    ("before: runtime + step, bytecode cached",
     "exec python3 -S -c 'import sys; sys.path.insert(0, \"/rt/before\"); import runtime; sys.exit(runtime.main())'"),
]

TIMER = """
import statistics, subprocess, sys, time
variants = [line.split("\\t", 1) for line in open("/rt/variants.tsv").read().splitlines()]
times = {label: [] for label, _ in variants}
for _ in range(int(sys.argv[1])):
    for label, command in variants:
        started = time.perf_counter()
        subprocess.run(["bash", "-c", command], stdout=subprocess.DEVNULL, check=True)
        times[label].append((time.perf_counter() - started) * 1000)
for label, _ in variants:
    print(f"| {label} | {statistics.median(times[label]):.1f} | {min(times[label]):.1f} |")
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", "-n", type=int, default=40)
    parser.add_argument("--before", help="a git revision whose runtime.py to add, e.g. 49c093d")
    args = parser.parse_args(argv)
    variants = list(VARIANTS)
    with tempfile.TemporaryDirectory(prefix="bench-docker-startup-") as tmp:
        os.makedirs(f"{tmp}/now")
        with open(os.path.join(ROOT, "airflow_remote_ml", "runtime.py"), encoding="utf-8") as fh:
            source = fh.read()
        with open(f"{tmp}/now/runtime.py", "w", encoding="utf-8") as fh:
            fh.write(source)
        if args.before:
            os.makedirs(f"{tmp}/before")
            old = subprocess.run(["git", "-C", ROOT, "show", f"{args.before}:airflow_remote_ml/runtime.py"],
                                 check=True, capture_output=True, text=True).stdout
            with open(f"{tmp}/before/runtime.py", "w", encoding="utf-8") as fh:
                fh.write(old)
            variants[6:6] = BEFORE
        with open(f"{tmp}/variants.tsv", "w", encoding="utf-8") as fh:
            fh.write("\n".join(f"{label}\t{command}" for label, command in variants))
        with open(f"{tmp}/timer.py", "w", encoding="utf-8") as fh:
            fh.write(TIMER)
        # The bytecode of each runtime copy is written first, as the container would on its first step.
        warm = "for d in /rt/now /rt/before; do [ -d $d ] && PYTHONDONTWRITEBYTECODE= python3 -c \"import sys; " \
               "sys.path.insert(0, '$d'); import runtime\"; done; "
        load_before = os.getloadavg()[0]
        table = subprocess.run(
            ["docker", "run", "--rm", "--network", "none", "-v", f"{tmp}:/rt", "-e", f"REMOTE_ML_STEP={STEP}",
             IMAGE, "bash", "-c", warm + f"python3 /rt/timer.py {args.iterations}"],
            check=True, capture_output=True, text=True).stdout
    print(f"{args.iterations} runs of each, alternating, in one `{IMAGE}` container; "
          f"load {load_before:.2f} → {os.getloadavg()[0]:.2f} (1-minute average, start → end)\n")
    print("| what the container runs | median ms | min ms |")
    print("|---|---:|---:|")
    print(table, end="")
    print(f"\ncommand: .venv/bin/python bench/bench_docker_startup.py --iterations {args.iterations}"
          + (f" --before {args.before}" if args.before else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
