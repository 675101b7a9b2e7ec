"""What shipping the step's code costs per step: on the worker (first and cached) and inside the step.

    .venv/bin/python bench/bench_codepkg.py [--iterations 20]

Worker side, per package: ``codepkg.prepare`` + ``codepkg.publish`` (what the operator does before it
submits) the first time on a worker (nothing cached, the archive not yet stored: walk, read, zip, hash,
write), in a new task process after that (Airflow 3 runs each task instance in its own process: walk and
stat, the archive read back from the worker's disk cache, the store asked whether it has it), and again in
the same process (walk and stat only).
Step side: a no-op callable run by the local backend (validate → submit → completion noticed → result
read) with its package shipped (the runtime fetches the archive, checks its sha256, unpacks it once per
machine, puts it first on sys.path) and without (the package importable from the worker's sys.path),
alternating; the difference is the in-step overhead. And the runtime's code install alone (fetch,
verify the sha256, unpack, sys.path) in a fresh interpreter, as in a fresh container (new TMPDIR: unpacked)
and on a machine that unpacked it before (same TMPDIR). Packages: the example pipeline's ``example_ml`` and a synthetic
one of 200 modules (~1 MB). Prints medians and min–max, and the load average.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

# This checkout's code, not whatever copy of the package happens to be installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from airflow_remote_ml.backends.local import LocalBackend
from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec, codepkg
from airflow_remote_ml.core.wait import wait_for_completion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_synthetic(base: str, name: str, modules: int = 200, size: int = 5000) -> None:
    pkg = os.path.join(base, name)
    os.makedirs(pkg)
    with open(os.path.join(pkg, "__init__.py"), "w") as fh:
        fh.write("")
    with open(os.path.join(pkg, "steps.py"), "w") as fh:
        fh.write("def noop():\n    return None\n")
    for i in range(modules):
        with open(os.path.join(pkg, f"mod_{i:03d}.py"), "w") as fh:
            line = f"VALUE_{i} = {i!r}  # padding to a realistic module size\n"
            fh.write(line * (size // len(line)))


def worker_side(package: str, root: str, iterations: int, tmp: str) -> tuple[list[float], list[float], list[float],
                                                                          int, int]:
    """prepare + publish: first on the worker, in a new task process after that, again in the same process."""
    first, new_process, same_process = [], [], []
    ref = None
    for i in range(iterations):
        os.environ["REMOTE_ML_CODE_CACHE"] = tempfile.mkdtemp(dir=tmp)  # a worker that never built it
        codepkg.clear_cache()
        shutil.rmtree(os.path.join(root, codepkg.CODE_DIR), ignore_errors=True)
        timings = []
        for forget in (True, True, False):
            if forget:
                codepkg.clear_cache()  # what a new task process starts with: the disk cache and the store stay
            started = time.perf_counter()
            ref = codepkg.prepare(f"{package}.steps:noop", True, root)
            assert ref is not None
            codepkg.publish(ref)
            timings.append(time.perf_counter() - started)
        first.append(timings[0])
        new_process.append(timings[1])
        same_process.append(timings[2])
        assert os.path.isfile(ref.uri), i
    assert ref is not None and ref.archive is not None
    files = codepkg.build([package]).files
    return first, new_process, same_process, len(ref.archive), files


def step(backend: LocalBackend, store: ArtifactStore, package: str, shipped: bool) -> float:
    spec = StepSpec.build(callable=f"{package}.steps:noop")
    code = codepkg.prepare(spec.callable, True, store.root) if shipped else None
    request = StepRequest.create(spec, StepIdentity("bench", "step", uuid.uuid4().hex), store, code=code)
    started = time.perf_counter()
    backend.validate(request)
    backend.publish_code(request)
    handle = backend.submit(request)
    outcome = wait_for_completion(backend, handle)
    backend.fetch_result(handle)
    elapsed = time.perf_counter() - started
    assert outcome.status.is_successful, outcome
    return elapsed


#: Runs in a fresh interpreter started as a backend starts the runtime (-S): times _install_code alone,
#: from the first import it needs to the package first on sys.path (importing the step's module after it
#: costs what it costs without shipping; it is only checked to work).
_INSTALL = """
import json, sys, time
sys.path.insert(0, {repo!r})
from airflow_remote_ml import runtime
step = json.loads({step!r})
scratch = runtime._Scratch()
started = time.perf_counter()
runtime._install_code(step, scratch)
elapsed = time.perf_counter() - started
__import__({module!r})
print(elapsed)
scratch.remove()
"""


def in_step(ref: codepkg.CodeRef, package: str, tmpdir: str) -> float:
    """The runtime's code install, in a fresh interpreter whose TMPDIR is ``tmpdir``: a new empty one is a
    fresh container (the archive is unpacked), a reused one a machine that unpacked it before."""
    import subprocess

    script = _INSTALL.format(repo=REPO, step=json.dumps({"code": ref.to_json()}), module=f"{package}.steps")
    out = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, check=True,
                         env={"PATH": os.environ.get("PATH", ""), "TMPDIR": tmpdir})
    return float(out.stdout.strip())


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} ms ({min(values) * 1000:.1f}–{max(values) * 1000:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="bench-codepkg-")
    synthetic = f"bench_pkg_{uuid.uuid4().hex[:6]}"
    make_synthetic(tmp, synthetic)
    sys.path.insert(0, tmp)
    sys.path.insert(0, os.path.join(REPO, "dags"))
    importlib.invalidate_caches()
    store = ArtifactStore(os.path.join(tmp, "artifacts"))
    # The step processes inherit sys.path (inherit_sys_path): without the archive they import the package
    # from the worker's folders, as the local backend always did.
    backend = LocalBackend.from_config({"state_dir": os.path.join(tmp, "jobs")})
    packages = {"example_ml": "example_ml", "synthetic": synthetic}
    with open(os.path.join(REPO, "dags", "example_ml", "steps.py")) as fh:
        if "def noop" not in fh.read():
            # example_ml has no no-op step: time a copy of it that has one, under another name.
            copy = f"example_ml_{uuid.uuid4().hex[:6]}"
            shutil.copytree(os.path.join(REPO, "dags", "example_ml"), os.path.join(tmp, copy),
                            ignore=shutil.ignore_patterns("__pycache__"))
            with open(os.path.join(tmp, copy, "steps.py"), "a") as out:
                out.write("\n\ndef noop():\n    return None\n")
            packages["example_ml"] = copy
    importlib.invalidate_caches()
    worker_rows, step_rows = [], []
    for label, package in packages.items():
        first, new_process, same_process, size, files = worker_side(package, store.root, args.iterations, tmp)
        worker_rows.append(f"| {label} ({files} files, archive {size / 1024:.0f} KiB) | {ms(first)} | "
                           f"{ms(new_process)} | {ms(same_process)} |")
        step(backend, store, package, True)  # warm-up: page cache, bytecode of the runtime
        step(backend, store, package, False)
        with_code: list[float] = []
        without: list[float] = []
        for i in range(args.iterations):
            pair = [lambda: with_code.append(step(backend, store, package, True)),  # noqa: B023
                    lambda: without.append(step(backend, store, package, False))]  # noqa: B023
            for run in pair if i % 2 == 0 else reversed(pair):
                run()
        delta = statistics.median(with_code) - statistics.median(without)
        ref = codepkg.prepare(f"{package}.steps:noop", True, store.root)
        assert ref is not None
        codepkg.publish(ref)
        fresh, again = [], []
        reused = tempfile.mkdtemp(dir=tmp)
        for _ in range(args.iterations):
            fresh.append(in_step(ref, package, tempfile.mkdtemp(dir=tmp)))
            again.append(in_step(ref, package, reused))
        step_rows.append(f"| {label} | {ms(without)} | {ms(with_code)} | {delta * 1000:+.1f} ms | {ms(fresh)} "
                         f"| {ms(again)} |")
    print(f"{args.iterations} iterations; load {load_start:.1f} → {os.getloadavg()[0]:.1f}\n")
    print("Worker side, per step: prepare + publish, median (min–max)\n")
    print("| package | first on the worker (zip + hash + store) | a new task process (stat, read back, exists?) "
          "| the same process again (stat only) |")
    print("|---|---:|---:|---:|")
    print("\n".join(worker_rows))
    print("\nWhole no-op callable step on the local backend, alternating, median (min–max)\n")
    print("| package | code=False (worker's sys.path) | code shipped | difference of medians "
          "| in the step, fresh container: verify + unpack | same, unpacked before on the machine: verify |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(step_rows))
    print(f"\ncommand: .venv/bin/python bench/bench_codepkg.py --iterations {args.iterations}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
