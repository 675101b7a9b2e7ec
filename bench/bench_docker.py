"""Benchmark: a step through our docker backend versus the Docker provider's ``DockerOperator``.

Both run the same image and the same command on the same engine, alternating within one run (the order
flips every iteration so neither side always runs on a warmer engine). Each side does what a task does:

* ours: what ``RemoteExecutionOperator.execute`` does on a first try, through the same ``StepLifecycle``:
  build the backend from its configuration, ``validate``, record the intent, ``submit`` (a first try has no
  record, so nothing to look up first), wait (event-driven, logs relayed), ``fetch_result`` (reads the
  manifest), ``finish`` (records it and marks the container: removal_policy on_success removes it at once),
  ``cleanup``, ``close``; without Airflow's task bookkeeping (the journal is in memory);
* theirs: ``DockerOperator(...).execute(context)`` with its defaults except ``auto_remove="success"``
  (so both remove their container) and ``network_mode="none"`` (both);
* bare: ``docker run --rm --network none IMAGE COMMAND`` through the CLI, its output to a log file: what
  a user without Airflow's operators would run (issue 11's second chatty-step peer).

The three take turns, and the order rotates every iteration. With ``--log-path`` a fourth side takes its
turn: ours with ``attach=False`` (the log read back from the engine after the exit, the path before the
attach stream).

It also reports how soon our wait noticed each container's exit: the moment ``wait`` returned minus the
engine's ``State.FinishedAt`` (same host clock).

Run (needs the engine and the runner image: ``bash .ci/docker-engine.sh && bash backends/docker/build-images.sh``)::

    .venv/bin/python bench/bench_docker.py --iterations 10 --phases   # no-op and 1-second steps
    .venv/bin/python bench/bench_docker.py --chatty --iterations 5     # 200k lines
    .venv/bin/python bench/bench_docker.py --chatty --log-path -n 5    # + ours with attach=False, in turn

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import datetime
from typing import Any

# This checkout's code, not whatever copy of the package happens to be installed (run_all.py starts us
# as `python bench/bench_docker.py`, which puts only bench/ on the path).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RUNNER_IMAGE = "airflow-remote-ml/runner:latest"
STEPS = {
    "no-op": ["python3", "-c", "pass"],
    "1-second": ["python3", "-c", "import time; time.sleep(1)"],
}
#: With --chatty: a step printing 200k lines (issue 11), its log streamed on both sides.
CHATTY = {"200k lines": ["python3", "-c", "for i in range(200000): print('line', i)"]}


def finished_at(attrs: dict[str, Any], key: str = "FinishedAt") -> float:
    """``State.FinishedAt`` (or another RFC 3339 time of ``State``) as epoch seconds."""
    stamp = attrs["State"][key]
    head, _, fraction = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float(f"0.{fraction or 0}")


class Probe:
    """Times engine calls on both sides alike: when the wait API answered, and each container's own end.

    The container's ``State.FinishedAt`` is read just before it is removed; that extra inspect is not
    counted in the step's time.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.wait_returned = 0.0
        self.exited = 0.0
        self.ran = 0.0
        self.excluded = 0.0

    def install(self) -> None:
        import docker

        wait, remove, inspect = docker.APIClient.wait, docker.APIClient.remove_container, docker.APIClient.inspect_container
        probe = self

        def timed_wait(client, container, *args, **kwargs):  # type: ignore[no-untyped-def]
            result = wait(client, container, *args, **kwargs)
            probe.wait_returned = time.time()
            return result

        def timed_remove(client, container, *args, **kwargs):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            attrs = inspect(client, container)
            probe.exited = finished_at(attrs)
            probe.ran = probe.exited - finished_at(attrs, "StartedAt")
            probe.excluded += time.perf_counter() - started
            return remove(client, container, *args, **kwargs)

        docker.APIClient.wait = timed_wait
        docker.APIClient.remove_container = timed_remove


def make_timed_backend_class() -> Any:
    from airflow_remote_ml.backends.docker import DockerBackend

    class TimedDockerBackend(DockerBackend):
        """Records when ``wait`` knew the step's final status (the wait API's answer plus one inspect)."""

        noticed = 0.0

        def wait(self, handle, timeout):  # type: ignore[no-untyped-def]
            status = super().wait(handle, timeout)
            if status.is_terminal and not self.noticed:
                self.noticed = time.time()
            return status

    return TimedDockerBackend


class PricedJournal:
    """The step record in memory, each read and write taking as long as the task state store's call does
    in a real deployment (``--record-ms``, measured by bench/bench_task_state.py); 0 ms keeps it free."""

    def __init__(self, read_ms: float, write_ms: float) -> None:
        from airflow_remote_ml.core.lifecycle import MemoryJournal

        self.memory, self.read_s, self.write_s = MemoryJournal(), read_ms / 1000, write_ms / 1000

    def read(self) -> dict[str, Any] | None:
        if self.read_s:
            time.sleep(self.read_s)
        return self.memory.read()

    def write(self, record: dict[str, Any]) -> None:
        if self.write_s:
            time.sleep(self.write_s)
        self.memory.write(record)


def run_ours(backend_class: Any, command: list[str], artifact_root: str, probe: Probe,
             attach: bool = True, record_ms: tuple[float, float] = (0.0, 0.0)) -> dict[str, float]:
    """What ``RemoteExecutionOperator.execute`` does on a task's first try, through the same core lifecycle.

    The journal is in memory. The operator's is Airflow's task state store: a read and three writes per
    first try, each a call to the API server; ``record_ms`` (read, write) prices them as a deployment does.
    A first try finds no record, so it submits without listing first.
    """
    from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec
    from airflow_remote_ml.core.lifecycle import StepLifecycle

    probe.reset()
    phases: dict[str, float] = {}
    started = time.perf_counter()
    backend = backend_class.from_config({"network_mode": "none", "pull": "never", "attach": attach})
    lifecycle = StepLifecycle(backend, PricedJournal(*record_ms),
                             StepIdentity("bench", "step", f"run-{uuid.uuid4().hex[:12]}"))
    spec = StepSpec.build(image=RUNNER_IMAGE, command=command)

    def make_request(identity: StepIdentity) -> StepRequest:
        request = StepRequest.create(spec, identity, ArtifactStore(artifact_root))
        backend.validate(request)
        return request

    handle = lifecycle.start(make_request)
    phases["submit"] = time.perf_counter() - started
    outcome = lifecycle.wait(on_line=lambda line: None, on_lines=lambda lines: None, deadline=None)
    phases["wait"] = time.perf_counter() - started - phases["submit"]
    if not outcome.status.is_successful:
        raise RuntimeError(f"our step failed: {outcome.status}\n" + "\n".join(outcome.tail))
    backend.fetch_result(handle)
    lifecycle.finish(outcome.status)  # records it finished and marks it (removed at once: on_success)
    backend.cleanup(handle, outcome.status)
    backend.close()
    total = time.perf_counter() - started - probe.excluded
    phases["finish"] = total - phases["submit"] - phases["wait"]
    phases["total"] = total
    phases["noticed_ms"] = (backend.noticed - probe.exited) * 1000
    phases["wait_api_ms"] = (probe.wait_returned - probe.exited) * 1000
    phases["ran_ms"] = probe.ran * 1000
    return phases


def run_theirs(command: list[str], probe: Probe) -> dict[str, float]:
    from airflow.providers.docker.operators.docker import DockerOperator

    probe.reset()
    started = time.perf_counter()
    operator = DockerOperator(task_id=f"bench_{uuid.uuid4().hex[:8]}", image=RUNNER_IMAGE, command=command,
                              network_mode="none", auto_remove="success")
    operator.execute(context={})  # type: ignore[arg-type]
    total = time.perf_counter() - started - probe.excluded
    return {"total": total, "wait_api_ms": (probe.wait_returned - probe.exited) * 1000, "ran_ms": probe.ran * 1000}


def run_bare(command: list[str], log_dir: str) -> float:
    """``docker run --rm`` through the CLI, attached, its output to a file: the step without Airflow."""
    started = time.perf_counter()
    with open(os.path.join(log_dir, f"{uuid.uuid4().hex}.log"), "wb") as log:
        subprocess.run(["docker", "run", "--rm", "--network", "none", RUNNER_IMAGE, *command],
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", "-n", type=int, default=10)
    parser.add_argument("--phases", action="store_true", help="also print where our time goes")
    parser.add_argument("--chatty", action="store_true", help="run only the 200k-line step")
    parser.add_argument("--step", action="append", choices=sorted(STEPS), help="run only this step (repeatable)")
    parser.add_argument("--log-path", action="store_true",
                        help="also run ours with attach=False (the log read back after the exit), in turn")
    parser.add_argument("--record-ms", metavar="READ,WRITE",
                        help="also run ours with each step-record read and write taking this long, as the task "
                             "state store's calls do in a deployment (bench/bench_task_state.py), in turn")
    args = parser.parse_args(argv)
    record_ms = tuple(float(x) for x in args.record_ms.split(",")) if args.record_ms else None
    if record_ms is not None and len(record_ms) != 2:
        parser.error("--record-ms: READ,WRITE in milliseconds, e.g. 7.0,8.8")
    steps = CHATTY if args.chatty else {name: STEPS[name] for name in (args.step or STEPS)}
    # Importing Airflow configures its logging; quieten it afterwards. The operator and our backend log
    # every step, and the operator warns that it runs outside a task runner: a table needs none of it.
    import airflow.providers.docker.operators.docker  # noqa: F401

    for noisy in ("airflow", "airflow_remote_ml"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    # The task SDK's operator logger prints to sys.stdout whatever the levels say: hide it during the runs.
    table = sys.stdout
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - swapped back before the table is printed

    import docker

    engine = docker.from_env(version="auto")
    engine.images.get(RUNNER_IMAGE)  # fail early and clearly when the image is not built
    version = engine.version()
    info = engine.info()
    engine.close()

    load_before = os.getloadavg()[0]
    probe = Probe()
    probe.install()
    backend_class = make_timed_backend_class()
    ours: dict[str, list[dict[str, float]]] = defaultdict(list)
    theirs: dict[str, list[dict[str, float]]] = defaultdict(list)
    bare: dict[str, list[float]] = defaultdict(list)
    logpath: dict[str, list[dict[str, float]]] = defaultdict(list)
    priced: dict[str, list[dict[str, float]]] = defaultdict(list)
    if not shutil.which("docker"):
        raise SystemExit("the docker CLI is needed for the bare `docker run` peer")
    with tempfile.TemporaryDirectory(prefix="bench-docker-") as artifact_root:
        log_dir = os.path.join(artifact_root, "bare-logs")
        os.makedirs(log_dir)
        for command in steps.values():  # warm-up, untimed: first-use costs on every side
            run_ours(backend_class, command, artifact_root, probe)
            run_theirs(command, probe)
            run_bare(command, log_dir)
        for i in range(args.iterations):
            for name, command in steps.items():
                turns = [lambda c=command, n=name: ours[n].append(run_ours(backend_class, c, artifact_root, probe)),
                         lambda c=command, n=name: theirs[n].append(run_theirs(c, probe)),
                         lambda c=command, n=name: bare[n].append(run_bare(c, log_dir))]
                if args.log_path:
                    turns.append(lambda c=command, n=name: logpath[n].append(
                        run_ours(backend_class, c, artifact_root, probe, attach=False)))
                if record_ms is not None:
                    turns.append(lambda c=command, n=name: priced[n].append(
                        run_ours(backend_class, c, artifact_root, probe, record_ms=record_ms)))
                k = i % len(turns)
                for run in turns[k:] + turns[:k]:
                    run()
            print(f"iteration {i + 1}/{args.iterations} done", file=sys.stderr)

    sys.stdout.close()
    sys.stdout = table
    print(f"load {load_before:.2f} → {os.getloadavg()[0]:.2f} (1-minute average, start → end)\n")
    print(f"Docker engine {version['Version']} (API {version['ApiVersion']}, storage {info['Driver']}), "
          f"image `{RUNNER_IMAGE}`, {args.iterations} iterations per step, rotating; "
          f"load {os.getloadavg()[0]:.1f}.\n")
    print("| step | docker backend, median s (min–max) | DockerOperator, median s (min–max) | ratio | "
          "bare `docker run`, median s (min–max) | ratio |")
    print("|---|---:|---:|---:|---:|---:|")

    def span(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"

    for name in steps:
        mine_all = [r["total"] for r in ours[name]]
        other_all = [r["total"] for r in theirs[name]]
        mine = statistics.median(mine_all)
        print(f"| {name} | {span(mine_all)} | {span(other_all)} | {mine / statistics.median(other_all):.2f}× | "
              f"{span(bare[name])} | {mine / statistics.median(bare[name]):.2f}× |")
    if args.log_path:
        print("\nOurs with `attach=False` (the log read back from the engine after the exit), in the same turns:\n")
        print("| step | attach=False, median s (min–max) | attach (default) ÷ attach=False |")
        print("|---|---:|---:|")
        for name in steps:
            values = [r["total"] for r in logpath[name]]
            mine = statistics.median(r["total"] for r in ours[name])
            print(f"| {name} | {span(values)} | {mine / statistics.median(values):.2f}× |")
    if record_ms is not None:
        print(f"\nOurs with the step record priced as in a deployment ({record_ms[0]:g} ms a read, "
              f"{record_ms[1]:g} ms a write), in the same turns:\n")
        print("| step | ours, record priced, median s (min–max) | ratio to DockerOperator | added to ours |")
        print("|---|---:|---:|---:|")
        for name in steps:
            values = [r["total"] for r in priced[name]]
            mine = statistics.median(r["total"] for r in ours[name])
            other = statistics.median(r["total"] for r in theirs[name])
            print(f"| {name} | {span(values)} | {statistics.median(values) / other:.2f}× | "
                  f"{(statistics.median(values) - mine) * 1000:+.1f} ms |")
    print("\nMilliseconds from the container's exit (`State.FinishedAt`) to ... (median / max over all runs):\n")
    print("| | docker backend | DockerOperator |")
    print("|---|---:|---:|")
    every_ours = [r for name in steps for r in ours[name]]
    every_theirs = [r for name in steps for r in theirs[name]]

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} / {max(values):.1f}"

    print(f"| the engine's wait API answered | {cell([r['wait_api_ms'] for r in every_ours])} | "
          f"{cell([r['wait_api_ms'] for r in every_theirs])} |")
    print(f"| the final status was known (wait API + inspect) | {cell([r['noticed_ms'] for r in every_ours])} | |")
    print("\nContainer run time, `StartedAt` → `FinishedAt` (median ms): what runs inside the container.\n")
    print("| step | docker backend (runtime + command) | DockerOperator (command) |")
    print("|---|---:|---:|")
    for name in steps:
        print(f"| {name} | {statistics.median(r['ran_ms'] for r in ours[name]):.0f} | "
              f"{statistics.median(r['ran_ms'] for r in theirs[name]):.0f} |")
    if args.phases:
        print("\n| step | submit (s) | wait (s) | result + mark + cleanup (s) |")
        print("|---|---:|---:|---:|")
        for name in steps:
            med = {k: statistics.median(r[k] for r in ours[name]) for k in ("submit", "wait", "finish")}
            print(f"| {name} | {med['submit']:.3f} | {med['wait']:.3f} | {med['finish']:.3f} |")
    flags = ((" --chatty" if args.chatty else "") + (" --phases" if args.phases else "")
             + (" --log-path" if args.log_path else "")
             + (f" --record-ms {args.record_ms}" if args.record_ms else "")
             + "".join(f" --step {name}" for name in args.step or ()))
    print(f"\ncommand: .venv/bin/python bench/bench_docker.py{flags} --iterations {args.iterations}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
