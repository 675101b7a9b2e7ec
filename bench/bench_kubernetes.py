"""Benchmark: waiting for pods with our kubernetes backend versus KubernetesPodOperator (cncf-kubernetes).

Everything runs against ONE Kubernetes API test double (``tests/fakes/kubernetes_api``) in the same run,
with cheap simulated containers (``ImageBehavior(simulate=True, duration=None)``) that run until the
benchmark ends them, so the moment of termination is known exactly. The server counts every request.

Contenders, each with its defaults:

* **ours, worker**: ``wait_for_completion`` (a per-pod watch + log reads), what a non-deferred task does.
* **ours, deferred**: ``await_completion`` per step in one event loop, each with its own backend object, as
  the triggerer runs ``RemoteStepTrigger`` (all share one watch per cluster and namespace).
* **KPO, worker**: the provider's ``PodManager`` as ``KubernetesPodOperator.execute_sync`` uses it with
  ``get_logs=True`` (follow the log stream, then poll the container and the pod).
* **KPO, deferred**: the provider's ``KubernetesPodTrigger.run()`` (polls the pod every 2 s).

Measures:

1. one waiting step: API requests per minute of waiting, and the delay between the container's
   termination and the waiter noticing it;
2. N steps waiting in one event loop (default 50 and 500): total API requests per minute while they wait,
   and the delay until each noticed its pod's end (median, max).

3. with ``--per-step N``: the API requests one no-op step makes end to end (submit, wait, result, mark,
   cleanup), sync and deferred, by request kind (issue 10's target: at most 6 per sync step).

    .venv/bin/python bench/bench_kubernetes.py --per-step 10         # request counts per step only
    .venv/bin/python bench/bench_kubernetes.py                       # about 3 minutes
    .venv/bin/python bench/bench_kubernetes.py --window 30 --steps 50,500
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
from collections import Counter
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from airflow_remote_ml.backends.kubernetes import KubernetesBackend
from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec
from airflow_remote_ml.core.wait import await_completion, wait_for_completion
from tests.fakes.kubernetes_api import FakeKubernetes, FakeNode, ImageBehavior

IMAGE = "bench/step:1"
CLAIM = "bench-artifacts"
NS = "default"


def our_config(k8s: FakeKubernetes, root: str) -> dict[str, Any]:
    return {"kubeconfig_path": str(k8s.kubeconfig_path), "artifact_volume": {"claim_name": CLAIM, "mount_path": root},
            "delete_grace_seconds": 1}


def our_pod(k8s: FakeKubernetes, root: str, tag: str) -> Any:
    backend = KubernetesBackend.from_config(our_config(k8s, root))
    try:
        spec = StepSpec.build(image=IMAGE, command=["python3", "-c", "pass"])
        identity = StepIdentity("bench", f"step-{tag}", f"run-{uuid.uuid4().hex[:10]}")
        return backend.submit(StepRequest.create(spec, identity, ArtifactStore(root)))
    finally:
        backend.close()


def kpo_pod(k8s: FakeKubernetes, tag: str) -> str:
    """A pod as KubernetesPodOperator creates it (one container named ``base``)."""
    name = f"kpo-{tag}-{uuid.uuid4().hex[:6]}"
    k8s.core_v1().create_namespaced_pod(NS, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"kubernetes_pod_operator": "True"}},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "base", "image": IMAGE, "command": ["x"]}]}})
    return name


def wait_running(k8s: FakeKubernetes, names: list[str]) -> None:
    for name in names:
        k8s.wait_for_pod(name, "Running", timeout=120)


def finish_all(k8s: FakeKubernetes, names: list[str]) -> dict[str, float]:
    ended = {}
    for name in names:
        ended[name] = time.monotonic()
        k8s.finish_container(name)
    return ended


# -- the waiters ---------------------------------------------------------------------------------------------


def ours_worker(k8s: FakeKubernetes, root: str, handle: Any, noticed: dict[str, float]) -> Callable[[], None]:
    def run() -> None:
        backend = KubernetesBackend.from_config(our_config(k8s, root))
        try:
            outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 900)
            noticed[handle.data["pod"]] = time.monotonic()
            assert outcome.status.is_successful, outcome.status
        finally:
            backend.close()
    return run


async def ours_deferred(k8s: FakeKubernetes, root: str, handle: Any, noticed: dict[str, float]) -> None:
    backend = KubernetesBackend.from_config(our_config(k8s, root))  # as RemoteStepTrigger.run() builds it
    try:
        outcome = await await_completion(backend, handle, deadline=time.monotonic() + 900)
        noticed[handle.data["pod"]] = time.monotonic()
        assert outcome.status.is_successful, outcome.status
    finally:
        await backend.aclose()


def kpo_worker(k8s: FakeKubernetes, name: str, noticed: dict[str, float]) -> Callable[[], None]:
    from airflow.providers.cncf.kubernetes.utils.pod_manager import PodManager
    from kubernetes import client

    def run() -> None:
        manager = PodManager(kube_client=k8s.core_v1())
        pod = client.V1Pod(metadata=client.V1ObjectMeta(name=name, namespace=NS))
        # KubernetesPodOperator.execute_sync with get_logs=True (its default):
        manager.fetch_requested_container_logs(pod, containers="base", follow_logs=True)
        manager.await_container_completion(pod, container_name="base")
        manager.await_pod_completion(pod, container_name="base")
        noticed[name] = time.monotonic()
    return run


async def kpo_deferred(k8s: FakeKubernetes, name: str, noticed: dict[str, float]) -> None:
    from airflow.providers.cncf.kubernetes.triggers.pod import KubernetesPodTrigger

    trigger = KubernetesPodTrigger(
        pod_name=name, pod_namespace=NS, trigger_start_time=dt.datetime.now(tz=dt.UTC),
        base_container_name="base", kubernetes_conn_id=None, config_dict=k8s.kubeconfig(),
        poll_interval=2, get_logs=True)
    event = await trigger.run().__anext__()
    noticed[name] = time.monotonic()
    assert event.payload["status"] == "success", event.payload


# -- API requests per step ------------------------------------------------------------------------------------


def step_requests(k8s: FakeKubernetes, root: str, steps: int, deferred: bool) -> tuple[Counter[str], float]:
    """Run ``steps`` no-op steps (a real ``python3 -c pass`` process under the runtime) end to end as the
    operator does -- submit, wait (worker or trigger), fetch_result, mark_finished, cleanup -- and count the
    API requests the double answered, by request kind. Returns (requests per step by kind, median seconds)."""
    counts: Counter[str] = Counter()
    took: list[float] = []
    for i in range(steps):
        backend = KubernetesBackend.from_config({**our_config(k8s, root), "session_linger": 0.0})
        spec = StepSpec.build(image="python:3.11-slim", command=["python3", "-c", "pass"])
        identity = StepIdentity("bench", f"noop-{i}", f"run-{uuid.uuid4().hex[:10]}")
        request = StepRequest.create(spec, identity, ArtifactStore(root))
        k8s.reset_counts()
        started = time.monotonic()
        try:
            handle = backend.submit(request)
            if deferred:
                async def wait(h: Any = handle, b: KubernetesBackend = backend) -> Any:
                    try:
                        return await await_completion(b, h, deadline=time.monotonic() + 120)
                    finally:
                        await b.aclose()

                outcome = asyncio.run(wait())
            else:
                outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 120)
            assert outcome.status.is_successful, outcome.status
            backend.fetch_result(handle)
            backend.mark_finished(handle)
            backend.cleanup(handle, outcome.status)
        finally:
            backend.close()
        took.append(time.monotonic() - started)
        k8s.wait_for_pod(handle.data["pod"], "Deleted")
        for record in k8s.requests:
            kind = record.kind.replace("pods/{name}/log", "log").replace("pods/{name}", "pod")
            counts[f"{record.method} {kind}{' watch' if record.watch else ''}"] += 1
    return Counter({k: v / steps for k, v in counts.items()}), statistics.median(took)


def print_step_requests(k8s: FakeKubernetes, root: str, steps: int) -> None:
    print()
    print(f"API requests per no-op step ({steps} steps each, submit -> wait -> fetch_result -> mark_finished -> "
          "cleanup), counted by the API test double:")
    print()
    print("| path | requests per step | by kind | median s per step |")
    print("|---|---:|---|---:|")
    for label, deferred in (("sync (worker)", False), ("deferred (triggerer)", True)):
        per_kind, median = step_requests(k8s, root, steps, deferred)
        detail = ", ".join(f"{k} {v:g}" for k, v in sorted(per_kind.items()))
        print(f"| {label} | {sum(per_kind.values()):g} | {detail} | {median:.2f} |")


# -- measurements --------------------------------------------------------------------------------------------


def measure_threads(k8s: FakeKubernetes, names: list[str], runners: list[Callable[[], None]], window: float,
                    noticed: dict[str, float]) -> tuple[float, list[float]]:
    k8s.reset_counts()
    threads = [threading.Thread(target=r, daemon=True) for r in runners]
    for t in threads:
        t.start()
    time.sleep(window)
    calls = k8s.count()
    ended = finish_all(k8s, names)
    for t in threads:
        t.join(120)
    return calls * 60.0 / window, [noticed[n] - ended[n] for n in names if n in noticed]


def measure_loop(k8s: FakeKubernetes, names: list[str], make: Callable[[str], Any], window: float,
                 noticed: dict[str, float]) -> tuple[float, list[float]]:
    async def main() -> tuple[float, dict[str, float]]:
        k8s.reset_counts()
        tasks = [asyncio.create_task(make(n)) for n in names]
        await asyncio.sleep(window)
        calls = await asyncio.to_thread(k8s.count)
        ended = await asyncio.to_thread(finish_all, k8s, names)
        await asyncio.wait_for(asyncio.gather(*tasks), 300)
        return calls * 60.0 / window, ended

    per_minute, ended = asyncio.run(main())
    return per_minute, [noticed[n] - ended[n] for n in names if n in noticed]


def row(label: str, n: int, per_minute: float, delays: list[float]) -> str:
    med = statistics.median(delays) if delays else float("nan")
    worst = max(delays) if delays else float("nan")
    return (f"| {label} | {n} | {per_minute:,.0f} | {per_minute / n:,.1f} | {med:.2f} | {worst:.2f} | "
            f"{len(delays)}/{n} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=20.0, help="seconds of waiting that are counted")
    parser.add_argument("--steps", default="50,500", help="comma-separated numbers of steps waiting at once")
    parser.add_argument("--per-step", type=int, default=0, metavar="N",
                        help="only count the API requests of N no-op steps run end to end, sync and deferred")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.disable(logging.WARNING)  # the provider logs every poll of every pod at INFO
    counts = [int(x) for x in args.steps.split(",") if x]
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, FakeKubernetes(
            history_limit=1_000_000,
            # One node big enough for every pod of the run (a default node takes 110 pods).
            nodes=[FakeNode("bench-node", allocatable={"cpu": "10000", "memory": "10000Gi", "pods": "10000"})],
    ) as k8s:
        root = os.path.join(tmp, "artifacts")
        k8s.register_volume_claim(CLAIM, root)
        k8s.register_image("bench/*", ImageBehavior(simulate=True, duration=None, output="working\n"))
        if args.per_step:
            print_step_requests(k8s, root, args.per_step)
            print()
            print(f"command: .venv/bin/python bench/bench_kubernetes.py --per-step {args.per_step}")
            return

        # The task SDK's structlog loggers print every KPO poll to sys.stdout whatever logging's levels say
        # (2,000 lines per run buried the table): hide stdout while waiting, the table is printed after.
        table, sys.stdout = sys.stdout, open(os.devnull, "w")  # noqa: SIM115 - restored below
        try:
            measure_waiting(k8s, root, args.window, counts, rows)
        finally:
            sys.stdout.close()
            sys.stdout = table

    print()
    print(f"Waiting for pods: {args.window:g} s of waiting counted per row, same API test double for all.")
    print()
    print("| waiter | steps | API requests/min (all steps) | per step | noticed after (median s) | "
          "noticed after (max s) | noticed |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for line in rows:
        print(line)
    print()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}; "
          f"command: .venv/bin/python bench/bench_kubernetes.py --window {args.window:g} --steps {args.steps}")


def measure_waiting(k8s: FakeKubernetes, root: str, window: float, counts: list[int], rows: list[str]) -> None:
    """1 step on a worker each way, then 1 and each of ``counts`` steps waiting in one event loop."""
    # 1. One waiting step, each way of waiting.
    noticed: dict[str, float] = {}
    handle = our_pod(k8s, root, "w")
    wait_running(k8s, [handle.data["pod"]])
    rows.append(row("ours, worker (per-pod watch)", 1,
                    *measure_threads(k8s, [handle.data["pod"]], [ours_worker(k8s, root, handle, noticed)],
                                     window, noticed)))
    name = kpo_pod(k8s, "w")
    wait_running(k8s, [name])
    rows.append(row("KPO, worker (PodManager, get_logs)", 1,
                    *measure_threads(k8s, [name], [kpo_worker(k8s, name, noticed)], window, noticed)))

    # 2. Steps waiting in one event loop (a triggerer).
    for n in [1, *counts]:
        handles = {h.data["pod"]: h for h in (our_pod(k8s, root, f"d{n}-{i}") for i in range(n))}
        wait_running(k8s, list(handles))
        rows.append(row("ours, deferred (shared watch)", n,
                        *measure_loop(k8s, list(handles), lambda j: ours_deferred(k8s, root, handles[j], noticed),  # noqa: B023
                                      window, noticed)))
        names = [kpo_pod(k8s, f"d{n}-{i}") for i in range(n)]
        wait_running(k8s, names)
        rows.append(row("KPO, deferred (KubernetesPodTrigger)", n,
                        *measure_loop(k8s, names, lambda j: kpo_deferred(k8s, j, noticed), window,
                                      noticed)))
        for pod in k8s.list_pods():  # keep the namespace small for the next round
            if pod["status"].get("phase") in ("Succeeded", "Failed"):
                k8s.core_v1().delete_namespaced_pod(pod["metadata"]["name"], NS, grace_period_seconds=0)


if __name__ == "__main__":
    main()
