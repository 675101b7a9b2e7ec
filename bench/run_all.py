"""Run every benchmark in bench/ in turn and print their tables (the source of docs/benchmarks.md).

    make bench            # or: .venv/bin/python bench/run_all.py [--only docker]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", action="append", help="run only bench_<name>.py (repeatable)")
    args = parser.parse_args()
    failed = 0
    for script in sorted(HERE.glob("bench_*.py")):
        name = script.stem.removeprefix("bench_")
        if args.only and name not in args.only:
            continue
        print(f"\n## {name}\n\n$ python bench/{script.name}\n", flush=True)
        failed |= subprocess.run([sys.executable, str(script)], cwd=HERE.parent).returncode != 0
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
