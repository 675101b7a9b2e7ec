"""Benchmark: RemoteExecutionOperator on the databricks backend vs the provider's DatabricksSubmitRunOperator.

Both run against the Jobs API test server (``tests/fakes/databricks_api.py``), each waiter on its own
server instance so every API call is attributed exactly. Four waiters: ours sync and deferred
(``RemoteStepTrigger``), the provider's sync and deferrable (``DatabricksExecutionTrigger``), all with
their default poll settings.

* **Long run** (10 minutes): counted analytically from each poll schedule, and verified by a real run
  with time scaled down (``--scale``, default 0.05: a 30 s run, every poll delay × 0.05, so each
  schedule makes the same decisions as over 10 minutes).
* **Short run** (20 s, real time): the delay between the run's end (the server's ``end_time``) and the
  moment the waiter knows, and the calls it made.

* **Many waiting** (``--many 50,500``): N deferred steps waiting in one event loop (one triggerer) on one
  server, ours (N ``RemoteStepTrigger`` s, sharing the workspace's ``runs/list``) and the provider's (N
  ``DatabricksExecutionTrigger`` s) taking turns: API requests per minute while they all wait, and the
  delay from each run's end to its trigger's event. The runs are simulated by the server (no process
  each), API only (no manifest is written).

    .venv/bin/python bench/bench_databricks.py            # about 1.5 minutes
    .venv/bin/python bench/bench_databricks.py --many 50,500   # only the many-waiting rows, about 12 minutes
    .venv/bin/python bench/bench_databricks.py --scale 0.1 --short 20
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Task logs of four operators would bury the table.
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "ERROR")

from airflow_remote_ml.backends.databricks import DatabricksPollPolicy  # noqa: E402
from airflow_remote_ml.core.poll import PollPolicy  # noqa: E402
from tests.fakes.databricks_api import FakeDatabricks  # noqa: E402

CLUSTER = {"spark_version": "15.4.x-scala2.12", "node_type_id": "i3.xlarge", "num_workers": 1}
PROVIDER_PERIOD = 30.0  # DatabricksSubmitRunOperator's default polling_period_seconds
WAITERS = ("ours, sync", "ours, deferred", "ours, sync, API only", "provider, sync", "provider, deferrable")


@dataclass
class Outcome:
    waiter: str
    calls: Counter[str] = field(default_factory=Counter)
    detected_at: float = 0.0
    run_ended_at: float = 0.0
    error: str | None = None

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    @property
    def delay(self) -> float:
        return self.detected_at - self.run_ended_at


# -- analytic counts ------------------------------------------------------------------------------------


def ours_calls(duration: float, policy: DatabricksPollPolicy, watched: bool) -> int:
    """submit + the submit's runs/get (reused as the first check) + the checks + one get-output (a fresh
    submit makes no find(): ``runs/submit`` is idempotent by the identity's token).

    API only: one runs/get per check of the poll schedule until one falls after the end. Watching the
    manifest: the sparse fallback checks before the end, then one when the manifest appears and one
    more once the run is TERMINATED (the runtime writes the manifest just before its process exits).
    """
    checks = 0
    if watched:
        fallback = PollPolicy(first_delay=2 * policy.first_delay, factor=2.0, cap=120.0)
        elapsed = fallback.delay(0)
        while elapsed < duration:
            checks += 1
            elapsed += fallback.delay(checks)
        return 1 + 1 + checks + 2 + 1
    for elapsed in itertools.accumulate(policy.schedule(10_000)):
        checks += 1
        if elapsed >= duration:
            break
    return 1 + 1 + checks + 1


def provider_calls(duration: float, period: float, deferrable: bool) -> int:
    """submit + get_run_page_url (+ get_job_id and get_run before deferring) + one runs/get per period
    until one falls after the end (+ the trigger's final get_run)."""
    checks = math.ceil(duration / period) + 1
    if deferrable:
        return 1 + 3 + checks + 1
    return 1 + 1 + checks


# -- the four waiters -----------------------------------------------------------------------------------


def _script(server: FakeDatabricks, seconds: float) -> str:
    """The provider's task file, placed in DBFS (a cluster cannot read a file on the worker)."""
    return server.put_file(f"dbfs:/bench/sleep_{uuid.uuid4().hex[:8]}.py",
                           f"import time\nprint('working', flush=True)\ntime.sleep({seconds})\nprint('done')\n")


def run_ours(server: FakeDatabricks, conn_id: str, seconds: float, scale: float, deferred: bool,
             workdir: Path, watch: bool = True) -> Outcome:
    from airflow.sdk.exceptions import TaskDeferred
    from airflow.triggers.base import TaskSuccessEvent

    from airflow_remote_ml.operators import RemoteExecutionOperator
    from tests.system.helpers import FakeTI, FileStateStore

    outcome = Outcome("ours")
    default = DatabricksPollPolicy()
    operator = RemoteExecutionOperator(
        task_id=f"ours_{'deferred' if deferred else 'sync'}",
        backend="databricks",
        backend_config={
            # The runtime goes to DBFS through a mount of it on the worker (no API call, as before the
            # double refused worker paths); the double serves dbfs:/ from the same directory.
            "databricks_conn_id": conn_id, "new_cluster": CLUSTER, "runtime_dir": "dbfs:/bench/runtime",
            "local_mounts": {"dbfs:/": str(server.dbfs_root)},
            "poll_first_delay": default.first_delay * scale, "poll_factor": default.factor,
            "poll_quick_delay": default.quick_delay * scale, "poll_quick_window": default.quick_window * scale,
            "poll_cap": default.cap * scale, "watch_cap": 120.0 * scale,
            "watch_manifest": watch, "watch_interval": 0.25 * scale,
        },
        command=["python3", "-c", f"import time; print('working', flush=True); time.sleep({seconds})"],
        artifact_root=str(workdir / "artifacts"),
        deferrable=deferred,
    )
    ti = FakeTI(dag_id="bench", task_id=operator.task_id, run_id=f"bench-{uuid.uuid4().hex[:8]}")
    # A task state store, as Airflow 3.3 gives every task: with none, the operator cannot tell a first try
    # from a crashed one and looks the run up (two runs/list calls) before it submits.
    context: dict[str, Any] = {"ti": ti, "task_state_store": FileStateStore(str(workdir / "task-state.json"))}
    try:
        operator.execute(context)  # type: ignore[arg-type]
    except TaskDeferred as deferral:
        event = asyncio.run(_first_event(deferral.trigger))
        outcome.detected_at = time.time()
        # The trigger's event resumes the operator on a worker, as the task runner would (a trigger that
        # ends the task itself, TaskSuccessEvent, needs no resume).
        if not isinstance(event, TaskSuccessEvent):
            operator.execute_complete(context, event.payload)  # type: ignore[arg-type]
    else:
        outcome.detected_at = time.time()
    return outcome


async def _first_event(trigger: Any) -> Any:
    async for event in trigger.run():
        return event
    raise RuntimeError("the trigger ended without an event")


def run_provider(server: FakeDatabricks, conn_id: str, seconds: float, scale: float, deferrable: bool,
                 workdir: Path) -> Outcome:
    from airflow.providers.databricks.operators.databricks import DatabricksSubmitRunOperator
    from airflow.sdk.exceptions import TaskDeferred

    outcome = Outcome("provider")
    operator = DatabricksSubmitRunOperator(
        task_id="provider",
        databricks_conn_id=conn_id,
        spark_python_task={"python_file": _script(server, seconds)},
        new_cluster=dict(CLUSTER),
        polling_period_seconds=PROVIDER_PERIOD * scale,
        deferrable=deferrable,
        do_xcom_push=False,
    )
    try:
        operator.execute(context={})  # type: ignore[arg-type]
    except TaskDeferred as deferral:
        event = asyncio.run(_first_event(deferral.trigger))
        outcome.detected_at = time.time()
        operator.execute_complete(context={}, event=event.payload)
    else:
        outcome.detected_at = time.time()
    return outcome


def measure(seconds: float, scale: float) -> list[Outcome]:
    """Run the four waiters at once, each against its own server; returns what each did."""
    results: dict[str, Outcome] = {}
    servers: dict[str, FakeDatabricks] = {}
    with tempfile.TemporaryDirectory(prefix="bench-dbx-") as tmp:
        for i, waiter in enumerate(WAITERS):
            server = FakeDatabricks(token=f"dapi-bench-{i}").start()
            servers[waiter] = server
            os.environ[f"AIRFLOW_CONN_BENCH_{i}"] = server.connection_json()

        def work(i: int, waiter: str) -> None:
            workdir = Path(tmp) / str(i)
            workdir.mkdir()
            try:
                if waiter.startswith("ours"):
                    out = run_ours(servers[waiter], f"bench_{i}", seconds, scale, "deferred" in waiter, workdir,
                                   watch="API only" not in waiter)
                else:
                    out = run_provider(servers[waiter], f"bench_{i}", seconds, scale, "deferrable" in waiter,
                                       workdir)
            except Exception as exc:  # report, do not hide, a waiter that broke
                out = Outcome(waiter, error=f"{type(exc).__name__}: {exc}")
                out.detected_at = time.time()
            out.waiter = waiter
            results[waiter] = out

        threads = [threading.Thread(target=work, args=(i, w)) for i, w in enumerate(WAITERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for waiter, server in servers.items():
            out = results[waiter]
            out.calls = Counter(r.endpoint for r in server.requests)
            (run_id,) = server.run_ids
            out.run_ended_at = server.get_run(run_id)["end_time"] / 1000
            server.stop()
    return [results[w] for w in WAITERS]


def _many_runs(server: FakeDatabricks, n: int, seconds: float, submit: Any) -> list[tuple[str, Any]]:
    """Submit ``n`` runs one after another; each is simulated by the server (a task_key match), so 500
    waiting runs are 500 threads of the double, not 500 processes. Their lengths are spread evenly over
    one provider period (``seconds`` to ``seconds + 30``), so their ends fall at every phase of either
    side's checks, as the ends of real runs do."""
    from airflow_remote_ml.backends.databricks._payload import task_key
    from airflow_remote_ml.core import StepIdentity

    made = []
    for i in range(n):
        identity = StepIdentity("bench", f"many{i}", uuid.uuid4().hex[:8])
        server.simulate(task_key(identity), seconds=seconds + PROVIDER_PERIOD * i / n)
        made.append((task_key(identity), submit(identity)))
    return made


def measure_many(n: int, seconds: float, side: str, warmup: float) -> dict[str, float]:
    """N deferred steps of ``seconds`` waiting in one event loop (one triggerer) on one server.

    ``side`` is ``ours`` (N ``RemoteStepTrigger`` s, each with its own backend, sharing the workspace's run
    list) or ``provider`` (N ``DatabricksExecutionTrigger`` s, one ``runs/get`` per run every 30 s).
    Requests are counted from ``warmup`` seconds after the last submit (every step past its first checks)
    until the first run ends.
    """
    from airflow.providers.databricks.hooks.databricks import DatabricksHook
    from airflow.providers.databricks.triggers.databricks import DatabricksExecutionTrigger

    from airflow_remote_ml.backends.databricks import DatabricksBackend
    from airflow_remote_ml.core import ArtifactStore, StepRequest, StepSpec
    from airflow_remote_ml.triggers import RemoteStepTrigger

    conn = f"bench_many_{side}_{n}"
    with tempfile.TemporaryDirectory(prefix="bench-dbx-many-") as tmp, \
            FakeDatabricks(token=f"dapi-{conn}") as server:
        os.environ[f"AIRFLOW_CONN_{conn.upper()}"] = server.connection_json()
        config = {"databricks_conn_id": conn, "new_cluster": CLUSTER, "runtime_dir": "dbfs:/bench/runtime",
                  "local_mounts": {"dbfs:/": str(server.dbfs_root)}, "watch_manifest": False}
        store = ArtifactStore(f"{tmp}/artifacts")
        spec = StepSpec.build(command=["python3", "-c", "pass"])
        if side == "ours":
            backend = DatabricksBackend.from_config(config)

            def submit(identity: Any) -> Any:
                handle = backend.submit(StepRequest.create(spec, identity, store))
                return RemoteStepTrigger(backend="databricks", backend_config=backend.config_json(),
                                         handle=handle.to_json())
        else:
            hook = DatabricksHook(conn)
            server.put_file("dbfs:/bench/provider.py", "pass\n")  # simulated, but it must exist to submit

            def submit(identity: Any) -> Any:
                from airflow_remote_ml.backends.databricks._payload import task_key

                run_id = hook.submit_run({"run_name": "provider", "tasks": [{
                    "task_key": task_key(identity), "new_cluster": dict(CLUSTER),
                    "spark_python_task": {"python_file": "dbfs:/bench/provider.py"}}]})
                return DatabricksExecutionTrigger(run_id, conn, polling_period_seconds=int(PROVIDER_PERIOD))

        triggers = _many_runs(server, n, seconds, submit)
        detected: dict[int, float] = {}

        async def wait(trigger: Any) -> None:
            async for event in trigger.run():
                payload = event.payload
                if side == "provider":
                    run_id, ok = trigger.run_id, '"SUCCESS"' in str(payload.get("run_state"))
                else:
                    run_id, ok = int(trigger.handle.job_id), (payload.get("status") or {}).get("state") == "succeeded"
                detected[int(run_id)] = time.time()
                assert ok, payload
                return

        async def all_wait() -> None:
            await asyncio.gather(*(wait(t) for _, t in triggers))

        asyncio.run(all_wait())
        from airflow_remote_ml.backends.databricks import _shared

        durations = [d for w in _shared._WATCHES.values() if f":{server.port}" in w.name for d in w.durations]
        ends = {run_id: server.get_run(run_id)["end_time"] / 1000 for run_id in server.run_ids}
        submits = [r.timestamp for r in server.requests if r.endpoint == "jobs/runs/submit"]
        window = (max(submits) + warmup, min(ends.values()))
        waiting = Counter(r.endpoint for r in server.requests if window[0] <= r.timestamp < window[1])
        delays = [detected[run_id] - end for run_id, end in ends.items()]
    minutes = (window[1] - window[0]) / 60
    total = sum(waiting.values())
    return {"total_per_min": total / minutes, "per_step": total / minutes / n, "window": window[1] - window[0],
            "by_kind": {k: v / minutes for k, v in waiting.items()},
            "delay_median": statistics.median(delays), "delay_min": min(delays), "delay_max": max(delays),
            "noticed": len(detected), "load": os.getloadavg()[0],
            "list_seconds": statistics.median(durations) if durations else float("nan")}


def print_many(counts: list[int], seconds: float, rounds: int, warmup: float) -> None:
    rows = []
    load_start = os.getloadavg()[0]
    for n in counts:
        for round_ in range(rounds):
            # Ours and the provider take turns (the provider first on odd rounds), one at a time.
            order = ("ours", "provider") if round_ % 2 == 0 else ("provider", "ours")
            for side in order:
                print(f"{side}: {n} steps of {seconds:g} s (round {round_ + 1}) ...", file=sys.stderr)
                r = measure_many(n, seconds, side, warmup)
                label = "ours, deferred (RemoteStepTrigger, shared runs/list)" if side == "ours" else \
                    "provider (DatabricksExecutionTrigger, 30 s)"
                kinds = ", ".join(f"{k.rsplit('/', 1)[-1]} {v:.1f}" for k, v in sorted(r["by_kind"].items()))
                rows.append(f"| {label} | {n} | {round_ + 1} | {r['total_per_min']:.1f} ({kinds}) | "
                            f"{r['per_step']:.3f} | {r['delay_median']:.1f} s ({r['delay_min']:.1f}–"
                            f"{r['delay_max']:.1f}) | {r['noticed']:g}/{n} | {r['load']:.1f} | "
                            f"{r['list_seconds']:.2f} |")
    print(f"\n### Databricks: N deferred steps of {seconds:g} s waiting in one event loop "
          f"({time.strftime('%Y-%m-%d %H:%M')})\n")
    print("| waiter | steps | round | requests/min while all wait (by endpoint) | per step "
          "| detection delay, median (min–max) | noticed | load at end | one shared list takes (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for line in rows:
        print(line)
    print(f"\nload average at the start: {load_start:.2f}, at the end: {os.getloadavg()[0]:.2f}; command: "
          f".venv/bin/python bench/bench_databricks.py --many {','.join(map(str, counts))} "
          f"--many-seconds {seconds:g} --rounds {rounds} --warmup {warmup:g}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", type=float, default=600.0, help="long run, seconds (before scaling)")
    parser.add_argument("--short", type=float, default=20.0, help="short run, seconds (real time)")
    parser.add_argument("--scale", type=float, default=0.05, help="time scale of the long run's verification")
    parser.add_argument("--many", default="", metavar="N,N",
                        help="only N deferred steps waiting in one event loop, for each N (e.g. 10,50)")
    parser.add_argument("--many-seconds", type=float, default=150.0, help="length of each --many step")
    parser.add_argument("--rounds", type=int, default=1, help="--many: turns of ours and the provider per N")
    parser.add_argument("--warmup", type=float, default=40.0,
                        help="--many: seconds after the last submit before counting (first checks over)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("airflow").setLevel(logging.ERROR)
    if args.many:
        print_many([int(x) for x in args.many.split(",") if x], args.many_seconds, args.rounds, args.warmup)
        return 0

    policy = DatabricksPollPolicy()
    analytic = {
        "ours, sync": ours_calls(args.long, policy, watched=True),
        "ours, deferred": ours_calls(args.long, policy, watched=True),
        "ours, sync, API only": ours_calls(args.long, policy, watched=False),
        "provider, sync": provider_calls(args.long, PROVIDER_PERIOD, False),
        "provider, deferrable": provider_calls(args.long, PROVIDER_PERIOD, True),
    }
    print(f"long run: {args.long:g} s scaled ×{args.scale:g} ({args.long * args.scale:g} s) ...", file=sys.stderr)
    long_runs = measure(args.long * args.scale, args.scale)
    print(f"short run: {args.short:g} s real time ...", file=sys.stderr)
    short_runs = measure(args.short, 1.0)

    print(f"\n### Databricks: API calls and detection delay ({time.strftime('%Y-%m-%d')})\n")
    print(f"| waiter | calls, {args.long / 60:g}-min run (measured ×{args.scale:g}) | calls (analytic) "
          f"| detection delay, {args.short:g} s run | calls, {args.short:g} s run |")
    print("|---|---|---|---|---|")
    for long, short in zip(long_runs, short_runs, strict=True):
        if long.error or short.error:
            print(f"| {long.waiter} | error: {long.error or short.error} | | | |")
            continue
        print(f"| {long.waiter} | {long.total} ({_detail(long.calls)}) | {analytic[long.waiter]} "
              f"| {short.delay:.2f} s | {short.total} |")
    print(f"\nOur API-only poll schedule: {policy.schedule(8)} s ({policy.first_delay:g} s, ×{policy.factor:g} to a "
          f"{policy.cap:g} s cap). Watching the manifest (a stat every 0.25 s, no API call), the API is asked at "
          f"6, 18, 42, ... s (doubling to 120 s) and when the manifest appears. Provider: every {PROVIDER_PERIOD:g} s.")
    print("\nAPI-only, by run length (analytic): the longest a run's end goes unnoticed, and the checks made")
    print("\n| run length | ours: worst delay | provider: worst delay | ours: checks | provider: checks |")
    print("|---|---|---|---|---|")
    for length in (10, 30, 60, 120, 300, 600, 1800, 3600):
        theirs = math.ceil(length / PROVIDER_PERIOD) + 1
        print(f"| {length:g} s | {policy.worst_delay(length):g} s | {PROVIDER_PERIOD:g} s "
              f"| {policy.checks_until(length)} | {theirs} |")
    print("Long-run delays scale with the run, so the scaled delay is not reported; calls are.")
    print("\nCommand: .venv/bin/python bench/bench_databricks.py "
          f"--long {args.long:g} --short {args.short:g} --scale {args.scale:g}")
    return 0


def _detail(calls: Counter[str]) -> str:
    short = {"jobs/runs/submit": "submit", "jobs/runs/get": "get", "jobs/runs/get-output": "output",
             "jobs/runs/list": "list"}
    return ", ".join(f"{short.get(k, k)} {v}" for k, v in sorted(calls.items()))


if __name__ == "__main__":
    sys.exit(main())
