"""What retention costs a finishing local step, with a backlog of job directories.

A real step runs once; its finished job directory is copied N-1 times under new names (the files a real
job leaves: step.json, pid of a process long gone, exit_code, finished, log). Then, alternating, the time
of ``list_jobs()`` over all N, and of one ``cleanup()`` (one listing, at most RETIRE_BATCH removals; the
directories it removed are put back before the next round, so every round sees N). A process sweeps at most
once per ``SWEEP_INTERVAL`` (30 s) per location: each round forgets the last sweep so that its finish
sweeps, and then times one more finish right after it, which the throttle lets skip the listing.

    python bench/bench_jobs.py --jobs 429 --rounds 7
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from airflow_remote_ml.backends.local import LocalBackend
from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec, jobs
from airflow_remote_ml.core.jobs import RETIRE_BATCH


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=429)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    backend = LocalBackend.from_config({"state_dir": str(tmp / "state"), "retention": {"max_count": 100}})
    request = StepRequest.create(StepSpec.build(command=["python3", "-c", "print('x')"]),
                                 StepIdentity("bench", "step", "run"), ArtifactStore(str(tmp / "artifacts")))
    handle = backend.submit(request)
    while not backend.wait(handle, 5.0).is_terminal:
        pass
    backend.mark_finished(handle)
    source = Path(handle.data["job_dir"])
    backlog = tmp / "backlog"
    backlog.mkdir()
    for i in range(args.jobs - 1):
        shutil.copytree(source, backlog / f"{i:040x}", copy_function=shutil.copy2)
    state = tmp / "state"

    def refill() -> None:
        for path in backlog.iterdir():
            if not (state / path.name).exists():
                shutil.copytree(path, state / path.name, copy_function=shutil.copy2)

    listing, finishing, throttled = [], [], []
    for _ in range(args.rounds):
        refill()
        start = time.perf_counter()
        listed = backend.list_jobs()
        listing.append(time.perf_counter() - start)
        assert len(listed) == args.jobs
        jobs._last_sweep.clear()  # this finish is the first in its interval: it sweeps
        start = time.perf_counter()
        backend.cleanup(handle, backend.poll(handle))
        finishing.append(time.perf_counter() - start)
        assert len(list(state.iterdir())) == args.jobs - RETIRE_BATCH
        start = time.perf_counter()
        backend.cleanup(handle, backend.poll(handle))  # within the interval: no sweep
        throttled.append(time.perf_counter() - start)
        assert len(list(state.iterdir())) == args.jobs - RETIRE_BATCH
    for name, values in (("list_jobs", listing), ("cleanup, sweeping", finishing),
                         ("cleanup, within the sweep interval", throttled)):
        print(f"{name}: {args.jobs} job dirs, median {statistics.median(values) * 1000:.0f} ms "
              f"(min {min(values) * 1000:.0f}, max {max(values) * 1000:.0f}, {args.rounds} rounds)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
