"""Benchmark: requests per minute and detection delay of waiting Valohai executions (issue 11, Valohai row).

Runs against the Valohai API test server (``tests/fakes/valohai_api.py``): N executions of a step that
sleeps for a duration spread evenly over ``[--duration, --duration + --spread]`` seconds (so their ends
fall at every phase of the poll schedule), each followed to its end by the real wait loop
(``core.wait.wait_for_completion``, as a worker does, or ``await_completion``, as the trigger does) with
its own backend. Every request the server saw for an execution's id after its submit is that waiter's;
with ``--many N``, N deferred steps wait on one project in one event loop (one triggerer), sharing one
list of the project's unfinished executions, whose requests are split evenly among them.

Reported per waiter kind: requests/min over the whole wait (submit to detection) and while waiting (from
60 s after the submit, once the backoff has reached its cap, until the execution ended), log reads included;
how many reads went to the events endpoint; and the delay between the server's
``end_time`` and the moment the wait returned. The old airflow-valohai-plugin is given analytically: a
fixed 30 s period, one status request per look, first look after 30 s (2/min, median delay 15 s).

    .venv/bin/python bench/bench_valohai.py                    # 8 executions of 120-140 s, sync: ~2.5 min
    .venv/bin/python bench/bench_valohai.py --deferred --many 50   # also alone and 50 sharing, deferred
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "ERROR")

from airflow_remote_ml.backends.valohai import ValohaiBackend  # noqa: E402
from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec  # noqa: E402
from airflow_remote_ml.core.wait import await_completion, wait_for_completion  # noqa: E402
from tests.fakes.valohai_api import FakeValohai  # noqa: E402

TOKEN = "bench-token"
STEADY_AFTER = 60.0
CONFIG = [{"step": {
    "name": "sleep", "image": "busybox",
    # Prints a line every 5 s, like a training loop reporting progress: the log is never empty. A shell
    # loop, not Python, so 50 of them at once leave the machine to the waiters being measured.
    "command": "end=$(( $(date +%s) + {parameter-value:seconds} )); n=0; "
               "while [ $(date +%s) -lt $end ]; do if [ $((n % 5)) -eq 0 ]; then echo epoch $n; fi; "
               "n=$((n + 1)); sleep 1; done",
    "parameters": [{"name": "seconds", "type": "integer"}],
}}, {"step": {
    # --idle: one line, then a single sleep, so 500 waiting executions are 500 idle processes.
    "name": "idle", "image": "busybox",
    "command": "echo started; sleep {parameter-value:seconds}; echo done",
    "parameters": [{"name": "seconds", "type": "integer"}],
}}]


@dataclass
class Waited:
    kind: str
    job_id: str
    submitted: float  # time.time()
    detected: float
    lines: int


def backend_for(server: FakeValohai, project: str = "bench", shared_from: int = 0) -> ValohaiBackend:
    return ValohaiBackend.from_config({"host": server.url, "token": TOKEN, "project": project, "branch": "main",
                                       "steps": {"bench:sleep": "sleep", "bench:idle": "idle"},
                                       "shared_watch_from": shared_from})


def request(seconds: float, task: str, root: str, step: str = "bench:sleep") -> StepRequest:
    spec = StepSpec.build(callable=step, params={"seconds": round(seconds)})
    return StepRequest.create(spec, StepIdentity("bench", task, f"run-{uuid.uuid4().hex[:8]}"), ArtifactStore(root))


def wait_sync(server: FakeValohai, seconds: float, task: str, root: str, out: list[Waited]) -> None:
    backend = backend_for(server)
    try:
        handle = backend.submit(request(seconds, task, root))
        submitted = time.time()
        lines: list[str] = []
        outcome = wait_for_completion(backend, handle, on_line=lines.append)
        assert outcome.status.is_successful, outcome
        out.append(Waited("sync", handle.job_id, submitted, time.time(), len(lines)))
    finally:
        backend.close()


async def wait_async(server: FakeValohai, seconds: float, task: str, root: str, out: list[Waited], *,
                     kind: str = "deferred, alone", project: str = "bench", shared_from: int = 0,
                     step: str = "bench:sleep", submit_lock: asyncio.Lock | None = None) -> None:
    backend = backend_for(server, project, shared_from)
    try:
        if submit_lock is not None:
            async with submit_lock:  # one create at a time, as from separate workers
                handle = await asyncio.to_thread(backend.submit, request(seconds, task, root, step))
        else:
            handle = await asyncio.to_thread(backend.submit, request(seconds, task, root, step))
        submitted = time.time()
        lines: list[str] = []
        outcome = await await_completion(backend, handle, on_line=lines.append)
        assert outcome.status.is_successful, outcome
        out.append(Waited(kind, handle.job_id, submitted, time.time(), len(lines)))
    finally:
        await backend.aclose()


def measure(server: FakeValohai, waited: list[Waited]) -> dict[str, dict[str, float]]:
    by_kind: dict[str, dict[str, list[float]]] = {}
    for w in waited:
        ex = server.executions[w.job_id]
        assert ex.end_time is not None
        end = ex.end_time.timestamp()
        # The request log holds no times; each waiter's requests are those naming its execution.
        count = sum(1 for _, path, _ in server.request_log if w.job_id in path)
        events = sum(1 for _, path, _ in server.request_log if w.job_id in path and path.endswith("/events/"))
        # Waiting rate: requests per minute from STEADY_AFTER after the submit until the execution ended
        # (the backoff has reached its cap; the look that notices the end is detection, not waiting).
        window = (w.submitted + STEADY_AFTER, end)
        steady = [t for t in server.request_times.get(w.job_id, []) if window[0] <= t < window[1]]
        alone = not server.list_times.get(w.kind)
        stats = by_kind.setdefault(w.kind, {"per_min": [], "steady_per_min": [], "delay": [], "lines": [],
                                            "events_reads": []})
        # Requests that name no execution (the shared list) are split evenly among the group's waiters.
        lists = [t for t in server.list_times.get(w.kind, []) if w.submitted <= t <= w.detected]
        share = 1 / max(1, sum(1 for x in waited if x.kind == w.kind))
        stats["per_min"].append((count + len(lists) * share) / ((w.detected - w.submitted) / 60))
        steady_lists = [t for t in lists if window[0] <= t < window[1]]
        if alone and len(steady) >= 3:
            # The rate at which a lone waiter makes requests: requests between its first and last one in the
            # window over the time between them. Counting requests in a window of arbitrary ends instead
            # adds a fencepost (3 or 4 looks at 20 s fall in 65 s: 2.8 or 3.7/min for the same loop).
            stats["steady_per_min"].append((len(steady) - 1) / ((steady[-1] - steady[0]) / 60))
        elif window[1] > window[0]:
            stats["steady_per_min"].append((len(steady) + len(steady_lists) * share) / ((window[1] - window[0]) / 60))
        stats["events_reads"].append(events)
        stats["delay"].append(w.detected - end)
        stats["lines"].append(w.lines)
    summary = {}
    for kind, stats in by_kind.items():
        summary[kind] = {
            "n": len(stats["delay"]),
            "per_min": statistics.median(stats["per_min"]),
            "steady_per_min": statistics.median(stats["steady_per_min"] or [0.0]),
            "steady_max": max(stats["steady_per_min"] or [0.0]),
            "events_reads": statistics.median(stats["events_reads"]),
            "delay_median": statistics.median(stats["delay"]),
            "delay_min": min(stats["delay"]),
            "delay_max": max(stats["delay"]),
        }
    return summary


class TimedFake(FakeValohai):
    """The API test server, also noting when each request naming an execution arrived."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.request_times: dict[str, list[float]] = {}
        #: Times of list requests by the waiter group of their project.
        self.list_times: dict[str, list[float]] = {}
        self.group_of_project: dict[str, str] = {}

    def handle(self, method, raw_path, headers, body):  # type: ignore[no-untyped-def,override]
        now = time.time()
        with self.lock:
            for job_id in self.executions:
                if job_id in raw_path:
                    self.request_times.setdefault(job_id, []).append(now)
            if raw_path.startswith("/api/v0/executions/?"):
                for project_id, group in self.group_of_project.items():
                    if project_id in raw_path and "status=incomplete" in raw_path:
                        self.list_times.setdefault(group, []).append(now)
        return super().handle(method, raw_path, headers, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=8, help="executions per waiter kind")
    parser.add_argument("--duration", type=float, default=120.0, help="shortest step, seconds")
    parser.add_argument("--spread", type=float, default=20.0, help="steps last duration .. duration+spread")
    parser.add_argument("--deferred", action="store_true", help="also wait through the trigger's async loop")
    parser.add_argument("--many", type=int, default=0, metavar="N",
                        help="also N deferred steps waiting on one project in one triggerer (shared list)")
    parser.add_argument("--idle", action="store_true",
                        help="--many steps print one line and sleep (cheap enough for 500 at once)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    def spread(n: int) -> list[float]:
        return [args.duration + args.spread * i / max(1, n - 1) for i in range(n)]

    durations = spread(args.n)
    waited: list[Waited] = []
    many = f"deferred, {args.many} sharing"
    with tempfile.TemporaryDirectory() as root, TimedFake(token=TOKEN) as server:
        server.add_project("bench", config=CONFIG)
        server.group_of_project[server.add_project("bench-many", config=CONFIG)["id"]] = many
        threads = [threading.Thread(target=wait_sync, args=(server, d, f"sync{i}", root, waited))
                   for i, d in enumerate(durations)]
        for thread in threads:
            thread.start()

        async def all_deferred() -> None:
            waits = []
            if args.deferred:
                waits += [wait_async(server, d, f"deferred{i}", root, waited) for i, d in enumerate(durations)]
            lock = asyncio.Lock()
            waits += [wait_async(server, d, f"many{i}", root, waited, kind=many, project="bench-many",
                                 shared_from=4, step="bench:idle" if args.idle else "bench:sleep",
                                 submit_lock=lock) for i, d in enumerate(spread(args.many))]
            await asyncio.gather(*waits)

        if args.deferred or args.many:
            asyncio.run(all_deferred())
        for thread in threads:
            thread.join()
        summary = measure(server, waited)
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nValohai, waiting executions ({args.n} per kind, {args.many} sharing; steps of {args.duration:g}-"
          f"{args.duration + args.spread:g} s, printing every 5 s; {started})\n")
    print("| waiter | requests/min (submit to detection) | requests/min waiting, after 60 s (median, max) | events-endpoint "
          "reads per execution | detection delay median (min-max) |")
    print("|---|---|---|---|---|")
    for kind, s in sorted(summary.items()):
        print(f"| ours, {kind} | {s['per_min']:.2f} | {s['steady_per_min']:.2f}, {s['steady_max']:.2f} | "
              f"{s['events_reads']:g} | {s['delay_median']:.1f} s ({s['delay_min']:.1f}-{s['delay_max']:.1f}) |")
    print("| old airflow-valohai-plugin (30 s period, analytic) | 2.00 | 2.00, 2.00 | 0 | 15.0 s (0-30) |")
    flags = (" --deferred" if args.deferred else "") + (f" --many {args.many}" if args.many else "") + \
        (" --idle" if args.idle else "")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}; command: .venv/bin/python bench/bench_valohai.py "
          f"-n {args.n} --duration {args.duration:g} --spread {args.spread:g}{flags}")


if __name__ == "__main__":
    main()
