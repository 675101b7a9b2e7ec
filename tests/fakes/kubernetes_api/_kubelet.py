"""The fake scheduler and kubelet: they move pods through the states a real node reports.

A pod is scheduled against the fake nodes (node selector, required node affinity, taints and
tolerations, resource requests, missing PVCs), then the "kubelet" pulls (sleeps), resolves env and
volumes, runs each container's ``command``/``args`` as a local subprocess, captures stdout+stderr as
the container log, reads the termination message file and reports everything through pod status
updates and Events, with the reasons and messages the real components use.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._meta import JSON, fmt_micro_time, fmt_time, now_ns, parse_quantity
from ._store import Store

DEFAULT_TERMINATION_PATH = "/dev/termination-log"
TERMINATION_ENV = "REMOTE_ML_TERMINATION_LOG"
PATH_MAP_ENV = "REMOTE_ML_PATH_MAP"
MAX_TERMINATION_MESSAGE = 4096  # kubecontainer.MaxContainerTerminationMessageLength
FALLBACK_LOG_LINES = 80  # kubecontainer.MaxContainerTerminationMessageLogLines
FALLBACK_LOG_BYTES = 2048  # kubecontainer.MaxContainerTerminationMessageLogLength
DEADLINE_MESSAGE = "Pod was active on the node longer than the specified deadline"
#: Marks every process of a container (inherited by its children): the double's stand-in for the cgroup.
CONTAINER_ENV = "FAKE_KUBERNETES_CONTAINER"
DEFAULT_EVICTION_MESSAGE = (
    "The node was low on resource: memory. Threshold quantity: 100Mi, available: 42Mi. Container {container} "
    "was using 1843Mi, request is 0, has larger consumption of memory. "
)


@dataclass
class ImageBehavior:
    """What the fake does for an image (the image itself is never pulled).

    Attributes:
        entrypoint: The image's ENTRYPOINT, used when a container has no ``command``.
        cmd: The image's CMD, used when a container has neither ``command`` nor ``args``.
        env: The image's ENV, under the container's own ``env``.
        workdir: The image's WORKDIR (a container path; mapped like ``workingDir``).
        pull_seconds: How long "pulling" takes; None uses the fake's default.
        pull_error: If set, every pull fails with this runtime message (ErrImagePull, then
            ImagePullBackOff, forever, like a missing tag). Clear it with ``register_image`` to "fix"
            the image: the next pull retry succeeds.
        simulate: Do not start a process; the container "runs" for ``duration`` seconds (None: until
            ``FakeKubernetes.finish_container``), prints ``output`` and exits with ``exit_code``.
            Cheap enough for hundreds of pods in a benchmark.
        exit_code: Exit code of a simulated container.
        output: Log output of a simulated container.
        duration: Run time of a simulated container; None waits for ``finish_container``.
        termination_message: What a simulated container "writes" to its termination message file.
        oom_after: Kill the container as OOMKilled (exit 137) this many seconds after it starts.
        image_size: Bytes reported in the ``Pulled`` event.
    """

    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    pull_seconds: float | None = None
    pull_error: str | None = None
    simulate: bool = False
    exit_code: int = 0
    output: str = ""
    duration: float | None = 0.0
    termination_message: str = ""
    oom_after: float | None = None
    image_size: int = 104_857_600


@dataclass
class FakeNode:
    """A node the fake scheduler can place pods on."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[JSON] = field(default_factory=list)  # [{"key", "value", "effect"}]
    allocatable: dict[str, str] = field(
        default_factory=lambda: {"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"}
    )
    unschedulable: bool = False

    def to_json(self) -> JSON:
        labels = {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                  **self.labels}
        spec: JSON = {"taints": self.taints} if self.taints else {}
        if self.unschedulable:
            spec["unschedulable"] = True
        return {
            "kind": "Node",
            "apiVersion": "v1",
            "metadata": {"name": self.name, "labels": labels, "uid": str(uuid.uuid4())},
            "spec": spec,
            "status": {
                "capacity": dict(self.allocatable),
                "allocatable": dict(self.allocatable),
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "kubelet is posting ready status"}],
                "nodeInfo": {"kubeletVersion": "v1.31.0", "containerRuntimeVersion": "containerd://1.7.22",
                             "operatingSystem": "linux", "architecture": "amd64"},
            },
        }


class _Stopped(Exception):
    """The pod is being killed; abandon a waiting stage."""


class ContainerRun:
    """Runtime state of one container of one pod (the CRI's view)."""

    def __init__(self, spec: JSON, init: bool) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.init = init
        self.state: JSON = {"waiting": {"reason": "PodInitializing"}}
        self.last_state: JSON = {}
        self.ready = False
        self.started = False
        self.ever_started = False
        self.restart_count = 0
        self.container_id = ""
        self.image_id = ""
        self.logs: list[tuple[int, bytes]] = []
        self.prev_logs: list[tuple[int, bytes]] | None = None
        self.changed = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self.sim: asyncio.Future[int] | None = None
        self.oom = False
        self.done = False  # terminated and will not restart
        self.task: asyncio.Task[None] | None = None
        self.pid: int | None = None

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def terminated(self) -> JSON | None:
        return self.state.get("terminated")

    def wake(self) -> None:
        ev, self.changed = self.changed, asyncio.Event()
        ev.set()

    def append_log(self, data: bytes) -> None:
        self.logs.append((now_ns(), data))
        self.wake()

    def status(self) -> JSON:
        st: JSON = {
            "name": self.name,
            "state": copy.deepcopy(self.state),
            "lastState": copy.deepcopy(self.last_state),
            "ready": self.ready,
            "restartCount": self.restart_count,
            "image": self.spec.get("image", ""),
            "imageID": self.image_id,
            "started": self.started,
        }
        if self.container_id:
            st["containerID"] = self.container_id
        return st


class PodRuntime:
    """What the kubelet knows about one pod."""

    def __init__(self, pod: JSON, root: Path) -> None:
        meta = pod["metadata"]
        self.ns: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.dir = root / "pods" / f"{self.ns}_{self.name}_{self.uid[:8]}"
        spec = pod["spec"]
        self.init_containers = [ContainerRun(c, True) for c in spec.get("initContainers") or []]
        self.containers = {c["name"]: ContainerRun(c, False) for c in spec["containers"]}
        self.node: str | None = None
        self.host_ip = ""
        self.pod_ip = ""
        self.start_ns: int | None = None
        self.accepted = False
        self.reason: str | None = None
        self.message: str | None = None
        self.stopping = False
        self.stop_event = asyncio.Event()
        self.deleting = False
        self.task: asyncio.Task[None] | None = None
        self.deadline_task: asyncio.Task[None] | None = None
        self.reschedule = asyncio.Event()
        self.conditions: dict[str, JSON] = {}
        self.initialized = not self.init_containers
        self.finished = asyncio.Event()
        self.mounts: list[tuple[str, Path]] = []
        if not self.init_containers:
            for c in self.containers.values():
                c.state = {"waiting": {"reason": "ContainerCreating"}}

    def all_runs(self) -> list[ContainerRun]:
        return [*self.init_containers, *self.containers.values()]

    def find(self, name: str) -> ContainerRun | None:
        return self.containers.get(name) or next((c for c in self.init_containers if c.name == name), None)

    def set_condition(self, type_: str, status: str, reason: str | None = None, message: str | None = None) -> None:
        old = self.conditions.get(type_)
        if old and old["status"] == status and old.get("reason") == reason and old.get("message") == message:
            return
        when = old["lastTransitionTime"] if old and old["status"] == status else fmt_time(now_ns())
        cond: JSON = {"type": type_, "status": status, "lastProbeTime": None, "lastTransitionTime": when}
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message
        self.conditions[type_] = cond

    def phase(self, restart_policy: str) -> str:
        if self.reason in ("DeadlineExceeded", "Evicted"):
            return "Failed"
        if any(c.done and c.terminated and c.terminated["exitCode"] != 0 for c in self.init_containers) \
                and restart_policy == "Never":
            return "Failed"
        mains = list(self.containers.values())
        if mains and all(c.done for c in mains):
            return "Failed" if any((c.terminated or {}).get("exitCode", 0) != 0 for c in mains) else "Succeeded"
        if self.initialized and any(c.ever_started for c in mains):
            return "Running"
        return "Pending"


def _qos_class(spec: JSON) -> str:
    containers = [*(spec.get("initContainers") or []), *spec.get("containers", [])]
    any_set = False
    guaranteed = True
    for c in containers:
        res = c.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        if req or lim:
            any_set = True
        for r in ("cpu", "memory"):
            if r not in lim or parse_quantity(req.get(r, lim[r])) != parse_quantity(lim[r]):
                guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


def _pod_requests(spec: JSON) -> dict[str, float]:
    """Effective requests: max(init container) vs sum(containers); limits imply requests."""
    def one(c: JSON) -> dict[str, float]:
        res = c.get("resources") or {}
        merged = {**(res.get("limits") or {}), **(res.get("requests") or {})}
        return {k: parse_quantity(v) for k, v in merged.items()}

    total: dict[str, float] = {}
    for c in spec.get("containers", []):
        for k, v in one(c).items():
            total[k] = total.get(k, 0.0) + v
    for c in spec.get("initContainers") or []:
        for k, v in one(c).items():
            total[k] = max(total.get(k, 0.0), v)
    return total


def _tolerates(tolerations: list[JSON], taint: JSON) -> bool:
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        op = t.get("operator", "Equal")
        if not t.get("key") and op == "Exists":
            return True
        if t.get("key") != taint.get("key"):
            continue
        if op == "Exists" or t.get("value", "") == taint.get("value", ""):
            return True
    return False


def _match_expression(expr: JSON, labels: dict[str, str]) -> bool:
    key: str = expr.get("key", "")
    op, values = expr.get("operator"), expr.get("values") or []
    present = key in labels
    if op == "In":
        return present and labels[key] in values
    if op == "NotIn":
        return not present or labels[key] not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt") and present:
        try:
            a, b = int(labels[key]), int(values[0])
        except (ValueError, IndexError):
            return False
        return a > b if op == "Gt" else a < b
    return False


def _node_affinity_ok(spec: JSON, labels: dict[str, str]) -> bool:
    for k, v in (spec.get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            return False
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution")
    if required:
        terms = required.get("nodeSelectorTerms") or []
        if not any(all(_match_expression(e, labels) for e in t.get("matchExpressions") or []) for t in terms):
            return False
    return True


class Kubelet:
    """Scheduler + kubelet + container runtime for all fake nodes."""

    def __init__(self, store: Store, root: Path, *, schedule_delay: float, kubelet_delay: float,
                 pull_seconds: float, pull_backoff: float, crashloop_backoff: float, map_python: bool,
                 inherit_env: bool, extra_env: dict[str, str], rewrite_paths: bool, sa_token: str,
                 enforce_memory_limits: bool = True) -> None:
        self.store = store
        self.enforce_memory_limits = enforce_memory_limits
        self.root = root
        self.schedule_delay = schedule_delay
        self.kubelet_delay = kubelet_delay
        self.pull_seconds = pull_seconds
        self.pull_backoff = pull_backoff
        self.crashloop_backoff = crashloop_backoff
        self.map_python = map_python
        self.inherit_env = inherit_env
        self.extra_env = extra_env
        self.rewrite_paths = rewrite_paths
        self.sa_token = sa_token
        self.images: list[tuple[str, ImageBehavior]] = []
        self.default_behavior = ImageBehavior()
        self.nodes: dict[str, FakeNode] = {}
        self.pvc_dirs: dict[tuple[str, str], Path] = {}
        self.host_paths: dict[str, Path] = {}
        self.pods: dict[tuple[str, str], PodRuntime] = {}
        self.pulled: set[tuple[str, str]] = set()
        self.scheduling_block: str | None = None
        self._ip = 10
        self._tasks: set[asyncio.Task[Any]] = set()
        self._event_index: dict[tuple[str, str, str, str, str], str] = {}
        store.listeners.append(self._on_change)

    # ------------------------------------------------------------------------------ registries

    def behavior(self, image: str) -> ImageBehavior:
        for pattern, b in reversed(self.images):
            if image == pattern:
                return b
        for pattern, b in reversed(self.images):
            if fnmatch.fnmatchcase(image, pattern):
                return b
        return self.default_behavior

    def add_node(self, node: FakeNode) -> None:
        self.nodes[node.name] = node
        obj = node.to_json()
        if self.store.peek("nodes", "", node.name) is not None:
            obj["metadata"]["uid"] = self.store.peek("nodes", "", node.name)["metadata"]["uid"]  # type: ignore[index]
            self.store.replace("nodes", obj)
        else:
            self.store.create("nodes", obj)
        self.kick_scheduler()

    def remove_node(self, name: str) -> None:
        self.nodes.pop(name, None)
        self.store.delete("nodes", "", name)

    def kick_scheduler(self) -> None:
        for rt in self.pods.values():
            rt.reschedule.set()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---------------------------------------------------------------------------------- events

    def record_event(self, pod: JSON | PodRuntime, reason: str, message: str, type_: str = "Normal", *,
                     component: str = "kubelet", container: ContainerRun | None = None) -> None:
        """Record (or count up) an Event about a pod, aggregated like the event recorder does."""
        if isinstance(pod, PodRuntime):
            ns, name, uid = pod.ns, pod.name, pod.uid
            host = pod.node or ""
            cur = self.store.peek("pods", ns, name)
            pod_rv = cur["metadata"]["resourceVersion"] if cur else ""
        else:
            ns, name, uid = pod["metadata"]["namespace"], pod["metadata"]["name"], pod["metadata"]["uid"]
            host, pod_rv = pod.get("spec", {}).get("nodeName", ""), pod["metadata"]["resourceVersion"]
        involved: JSON = {"kind": "Pod", "namespace": ns, "name": name, "uid": uid, "apiVersion": "v1",
                          "resourceVersion": pod_rv}
        if container is not None:
            involved["fieldPath"] = f"spec.{'initContainers' if container.init else 'containers'}{{{container.name}}}"
        t = now_ns()
        index_key = (ns, uid, reason, message, component)
        key_name = self._event_index.get(index_key)
        if key_name is not None and self.store.peek("events", ns, key_name) is not None:
            # A repeat is counted on the existing Event, as the kubelet's event correlator does.
            def bump(e: JSON) -> None:
                if component == "default-scheduler":
                    series = e.get("series") or {"count": 1}
                    e["series"] = {"count": series["count"] + 1, "lastObservedTime": fmt_micro_time(t)}
                else:
                    e["count"] = e.get("count", 1) + 1
                    e["lastTimestamp"] = fmt_time(t)

            self.store.mutate("events", ns, key_name, bump)
            return
        # Named "<object>.<hex UnixNano>" like client-go's recorder, so key order is time order.
        event_name = f"{name}.{t:x}"
        while self.store.peek("events", ns, event_name) is not None:
            t += 1
            event_name = f"{name}.{t:x}"
        event: JSON = {
            "metadata": {"name": event_name, "namespace": ns, "uid": str(uuid.uuid4()),
                         "creationTimestamp": fmt_time(t)},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": type_,
            "reportingComponent": component,
        }
        if component == "default-scheduler":
            # Scheduler events come from the events.k8s.io recorder: eventTime set, no timestamps/count.
            event.update({"source": {}, "firstTimestamp": None, "lastTimestamp": None,
                          "eventTime": fmt_micro_time(t), "action": "Scheduling" if type_ == "Warning" else "Binding",
                          "reportingInstance": f"default-scheduler-{next(iter(self.nodes), 'control-plane')}"})
        else:
            event.update({"source": {"component": component, "host": host}, "firstTimestamp": fmt_time(t),
                          "lastTimestamp": fmt_time(t), "count": 1, "eventTime": None,
                          "reportingInstance": host})
        self._event_index[index_key] = event["metadata"]["name"]
        self.store.create("events", event)

    # ---------------------------------------------------------------------------------- status

    def sync(self, rt: PodRuntime) -> None:
        """Write the kubelet's view of the pod into its status (one MODIFIED if anything changed)."""
        current = self.store.peek("pods", rt.ns, rt.name)
        if current is None or current["metadata"].get("uid") != rt.uid:
            return  # deleted, or a new pod of the same name: never touch it

        def apply(pod: JSON) -> None:
            spec = pod["spec"]
            policy = spec.get("restartPolicy", "Always")
            status: JSON = {"phase": rt.phase(policy)}
            conds = [rt.conditions[t] for t in ("DisruptionTarget", "PodReadyToStartContainers", "Initialized",
                                                "Ready", "ContainersReady", "PodScheduled") if t in rt.conditions]
            if conds:
                status["conditions"] = copy.deepcopy(conds)
            if rt.reason:
                status["reason"] = rt.reason
            if rt.message:
                status["message"] = rt.message
            if rt.accepted:
                status["hostIP"] = rt.host_ip
                status["hostIPs"] = [{"ip": rt.host_ip}]
                if rt.pod_ip:
                    status["podIP"] = rt.pod_ip
                    status["podIPs"] = [{"ip": rt.pod_ip}]
                status["startTime"] = fmt_time(rt.start_ns or now_ns())
                if rt.init_containers:
                    status["initContainerStatuses"] = [c.status() for c in rt.init_containers]
                status["containerStatuses"] = [rt.containers[c["name"]].status() for c in spec["containers"]]
            status["qosClass"] = _qos_class(spec)
            pod["status"] = status

        self.store.mutate("pods", rt.ns, rt.name, apply)

    def _update_readiness(self, rt: PodRuntime) -> None:
        pod = self.store.peek("pods", rt.ns, rt.name)
        policy = (pod or {}).get("spec", {}).get("restartPolicy", "Always")
        phase = rt.phase(policy)
        if phase in ("Succeeded", "Failed"):
            rt.set_condition("PodReadyToStartContainers", "False")
            rt.set_condition("Ready", "False", "PodCompleted")
            rt.set_condition("ContainersReady", "False", "PodCompleted")
            return
        unready = [c.name for c in rt.containers.values() if not c.ready]
        if unready:
            msg = f"containers with unready status: [{' '.join(unready)}]"
            rt.set_condition("Ready", "False", "ContainersNotReady", msg)
            rt.set_condition("ContainersReady", "False", "ContainersNotReady", msg)
        else:
            rt.set_condition("Ready", "True")
            rt.set_condition("ContainersReady", "True")
        if rt.init_containers:
            pending = [c.name for c in rt.init_containers if not (c.done and c.terminated
                                                                  and c.terminated["exitCode"] == 0)]
            if pending:
                rt.set_condition("Initialized", "False", "ContainersNotInitialized",
                                 f"containers with incomplete status: [{' '.join(pending)}]")
            else:
                rt.set_condition("Initialized", "True")

    # ------------------------------------------------------------------------------ lifecycle

    def on_created(self, pod: JSON) -> None:
        rt = PodRuntime(pod, self.root)
        self.pods[(rt.ns, rt.name)] = rt
        rt.task = self.spawn(self._run_pod(rt))

    def _on_change(self, change: Any) -> None:
        # A finalizer removed from a terminating, finished pod lets the deletion complete.
        if change.resource == "pods" and change.type == "MODIFIED":
            meta = change.obj["metadata"]
            rt = self.pods.get((meta["namespace"], meta["name"]))
            if meta.get("deletionTimestamp") and not meta.get("finalizers") and rt is not None \
                    and rt.finished.is_set() and rt.deleting:
                asyncio.get_event_loop().call_soon(self._remove, rt)
        if change.resource == "secrets" or change.resource == "configmaps" \
                or change.resource == "persistentvolumeclaims":
            self.kick_scheduler()

    def _remove(self, rt: PodRuntime) -> None:
        pod = self.store.peek("pods", rt.ns, rt.name)
        if pod is None or pod["metadata"].get("uid") != rt.uid:
            self.forget(rt)  # already gone from the API (immediate deletion)
            return
        if pod["metadata"].get("finalizers"):
            return
        self.store.delete("pods", rt.ns, rt.name)
        self.forget(rt)

    def forget(self, rt: PodRuntime) -> None:
        if self.pods.get((rt.ns, rt.name)) is rt:
            del self.pods[(rt.ns, rt.name)]
        shutil.rmtree(rt.dir, ignore_errors=True)

    async def _run_pod(self, rt: PodRuntime) -> None:
        try:
            await self._schedule(rt)
            await self._sleep(rt, self.kubelet_delay)
            await self._accept(rt)
            for c in rt.init_containers:
                await self._run_container(rt, c)
                if rt.stopping:
                    raise _Stopped
                if c.terminated and c.terminated["exitCode"] != 0:
                    break
            else:
                rt.initialized = True
                self._update_readiness(rt)
                for c in rt.containers.values():
                    if "waiting" in c.state and c.state["waiting"].get("reason") == "PodInitializing":
                        c.state = {"waiting": {"reason": "ContainerCreating"}}
                self.sync(rt)
                for c in rt.containers.values():
                    c.task = self.spawn(self._run_container(rt, c))
                await asyncio.gather(*(c.task for c in rt.containers.values() if c.task), return_exceptions=True)
        except _Stopped:
            pass
        except asyncio.CancelledError:
            raise
        finally:
            if rt.deadline_task:
                rt.deadline_task.cancel()
        await self._finish(rt)

    async def _finish(self, rt: PodRuntime) -> None:
        if rt.accepted and (rt.stopping or rt.reason):
            # Containers that never ran on a terminal pod are reported as the kubelet (1.27+) does.
            for c in rt.all_runs():
                if "waiting" in c.state:
                    c.state = {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                              "message": "The container could not be located when the pod was "
                                                         "terminated", "startedAt": None, "finishedAt": None}}
                    c.done = True
        if rt.accepted:
            self._update_readiness(rt)
            self.sync(rt)
        rt.finished.set()
        if rt.deleting:
            self._remove(rt)

    async def _sleep(self, rt: PodRuntime, seconds: float) -> None:
        if rt.stopping:
            raise _Stopped
        if seconds <= 0:
            await asyncio.sleep(0)
        else:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(rt.stop_event.wait(), seconds)
        if rt.stopping:
            raise _Stopped

    # ------------------------------------------------------------------------------ scheduling

    def _fit(self, pod: JSON) -> tuple[str | None, str | None]:
        """Return (node, None) or (None, scheduler message), as the default scheduler words it."""
        spec = pod["spec"]
        for vol in spec.get("volumes") or []:
            claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and self.store.peek("persistentvolumeclaims", pod["metadata"]["namespace"], claim) is None:
                n = len(self.nodes)
                return None, (f'0/{n} nodes are available: persistentvolumeclaim "{claim}" not found. '
                              f"preemption: 0/{n} nodes are available: {n} Preemption is not helpful for "
                              "scheduling.")
        if self.scheduling_block is not None:
            return None, self.scheduling_block
        if not self.nodes:
            return None, "no nodes available to schedule pods"
        reasons: dict[str, int] = {}
        preempt: dict[str, int] = {}
        requests = _pod_requests(spec)
        tolerations = spec.get("tolerations") or []
        for node in self.nodes.values():
            labels = node.to_json()["metadata"]["labels"]
            reason: str | None = None
            resolvable = False
            if spec.get("nodeName") and spec["nodeName"] != node.name:
                reason = "node(s) didn't match the requested node name"
            elif node.unschedulable:
                reason = "node(s) were unschedulable"
            else:
                for taint in node.taints:
                    if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(tolerations, taint):
                        reason = f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value', '')}}}"
                        break
            if reason is None and not _node_affinity_ok(spec, labels):
                reason = "node(s) didn't match Pod's node affinity/selector"
            if reason is None:
                used = self._allocated(node.name)
                for res, amount in sorted(requests.items()):
                    cap = parse_quantity(node.allocatable.get(res, "0"))
                    if amount > 0 and used.get(res, 0.0) + amount > cap:
                        reason, resolvable = f"Insufficient {res}", True
                        break
            if reason is None:
                return node.name, None
            reasons[reason] = reasons.get(reason, 0) + 1
            p = "No preemption victims found for incoming pod" if resolvable else \
                "Preemption is not helpful for scheduling"
            preempt[p] = preempt.get(p, 0) + 1
        n = len(self.nodes)
        why = ", ".join(sorted(f"{v} {k}" for k, v in reasons.items()))
        pre = ", ".join(sorted(f"{v} {k}" for k, v in preempt.items()))
        return None, f"0/{n} nodes are available: {why}. preemption: 0/{n} nodes are available: {pre}."

    def _allocated(self, node: str) -> dict[str, float]:
        used: dict[str, float] = {}
        for (ns, name), rt in self.pods.items():
            if rt.node != node or rt.finished.is_set():
                continue
            pod = self.store.peek("pods", ns, name)
            if pod is None:
                continue
            for k, v in _pod_requests(pod["spec"]).items():
                used[k] = used.get(k, 0.0) + v
        used["pods"] = float(sum(1 for rt in self.pods.values() if rt.node == node and not rt.finished.is_set()))
        return used

    async def _schedule(self, rt: PodRuntime) -> None:
        await self._sleep(rt, self.schedule_delay)
        while True:
            pod = self.store.peek("pods", rt.ns, rt.name)
            if pod is None:
                raise _Stopped
            node, message = self._fit(pod)
            if node is not None:
                rt.node = node
                rt.set_condition("PodScheduled", "True")

                def bind(p: JSON, node: str = node) -> None:
                    p["spec"]["nodeName"] = node
                    p["status"]["conditions"] = [copy.deepcopy(rt.conditions["PodScheduled"])]

                if not pod["spec"].get("nodeName"):
                    self.store.mutate("pods", rt.ns, rt.name, bind)
                    self.record_event(rt, "Scheduled", f"Successfully assigned {rt.ns}/{rt.name} to {node}",
                                      component="default-scheduler")
                return
            rt.set_condition("PodScheduled", "False", "Unschedulable", message)

            def unschedulable(p: JSON) -> None:
                p["status"]["conditions"] = [copy.deepcopy(rt.conditions["PodScheduled"])]

            self.store.mutate("pods", rt.ns, rt.name, unschedulable)
            self.record_event(rt, "FailedScheduling", message or "", "Warning", component="default-scheduler")
            rt.reschedule.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._wait_any(rt.reschedule, rt.stop_event)), 5.0)
            if rt.stopping:
                raise _Stopped

    @staticmethod
    async def _wait_any(*events: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _accept(self, rt: PodRuntime) -> None:
        self._ip += 1
        rt.host_ip = f"172.18.0.{2 + list(self.nodes).index(rt.node) if rt.node in self.nodes else 2}"
        rt.pod_ip = f"10.244.{self._ip // 250}.{self._ip % 250 + 2}"
        rt.start_ns = now_ns()
        rt.accepted = True
        rt.dir.mkdir(parents=True, exist_ok=True)
        rt.set_condition("PodReadyToStartContainers", "True")
        self._update_readiness(rt)
        if not rt.init_containers:
            rt.set_condition("Initialized", "True")
        self.sync(rt)
        pod = self.store.peek("pods", rt.ns, rt.name)
        ads = (pod or {}).get("spec", {}).get("activeDeadlineSeconds")
        if ads:
            rt.deadline_task = self.spawn(self._deadline(rt, float(ads)))
        await self._setup_volumes(rt)

    async def _deadline(self, rt: PodRuntime, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if rt.finished.is_set() or rt.stopping:
            return
        rt.reason, rt.message = "DeadlineExceeded", DEADLINE_MESSAGE
        self.record_event(rt, "DeadlineExceeded", DEADLINE_MESSAGE, "Normal")
        pod = self.store.peek("pods", rt.ns, rt.name) or {}
        self.spawn(self.kill(rt, float(pod.get("spec", {}).get("terminationGracePeriodSeconds", 30))))

    async def _setup_volumes(self, rt: PodRuntime) -> None:
        pod = self.store.peek("pods", rt.ns, rt.name)
        if pod is None:
            raise _Stopped
        vol_dirs: dict[str, Path] = {}
        for vol in pod["spec"].get("volumes") or []:
            name = vol["name"]
            while True:
                problem = None
                if "persistentVolumeClaim" in vol:
                    claim = vol["persistentVolumeClaim"]["claimName"]
                    path = self.pvc_dirs.get((rt.ns, claim)) or self.root / "pvc" / rt.ns / claim
                elif "hostPath" in vol:
                    hp = vol["hostPath"]["path"]
                    path = self.host_paths.get(hp) or self.root / "hostpath" / hp.lstrip("/")
                elif "secret" in vol or "configMap" in vol:
                    path = rt.dir / "volumes" / name
                    problem = self._materialize(rt.ns, vol, path)
                else:  # emptyDir, projected, downwardAPI...: a per-pod directory
                    path = rt.dir / "volumes" / name
                    if name.startswith("kube-api-access-"):
                        path.mkdir(parents=True, exist_ok=True)
                        (path / "token").write_text(self.sa_token)
                        (path / "namespace").write_text(rt.ns)
                        (path / "ca.crt").write_text("")
                if problem is None:
                    path.mkdir(parents=True, exist_ok=True)
                    vol_dirs[name] = path
                    break
                self.record_event(rt, "FailedMount", f'MountVolume.SetUp failed for volume "{name}" : {problem}',
                                  "Warning")
                await self._sleep(rt, 1.0)
        rt.vol_dirs = vol_dirs  # type: ignore[attr-defined]

    def _materialize(self, ns: str, vol: JSON, path: Path) -> str | None:
        if "secret" in vol:
            ref = vol["secret"]
            obj = self.store.peek("secrets", ns, ref.get("secretName", ""))
            if obj is None:
                return None if ref.get("optional") else f'secret "{ref.get("secretName")}" not found'
            data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        else:
            ref = vol["configMap"]
            obj = self.store.peek("configmaps", ns, ref.get("name", ""))
            if obj is None:
                return None if ref.get("optional") else f'configmap "{ref.get("name")}" not found'
            data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        path.mkdir(parents=True, exist_ok=True)
        items = ref.get("items")
        for key, value in data.items():
            target = key
            if items:
                match = next((i for i in items if i.get("key") == key), None)
                if match is None:
                    continue
                target = match.get("path", key)
            (path / target).parent.mkdir(parents=True, exist_ok=True)
            (path / target).write_bytes(value)
        return None

    # ------------------------------------------------------------------------------ containers

    async def _pull(self, rt: PodRuntime, c: ContainerRun) -> ImageBehavior:
        image = c.spec["image"]
        policy = c.spec.get("imagePullPolicy") or ("Always" if image.endswith(":latest") or ":" not in
                                                   image.rsplit("/", 1)[-1] else "IfNotPresent")
        backoff = self.pull_backoff
        while True:
            b = self.behavior(image)
            node_key = (rt.node or "", image)
            if policy != "Always" and node_key in self.pulled and not b.pull_error:
                self.record_event(rt, "Pulled", f'Container image "{image}" already present on machine', container=c)
                break
            if policy == "Never" and node_key not in self.pulled:
                msg = f'Container image "{image}" is not present with pull policy of Never'
                c.state = {"waiting": {"reason": "ErrImageNeverPull", "message": msg}}
                self.sync(rt)
                self.record_event(rt, "ErrImageNeverPull", msg, "Warning", container=c)
                await self._sleep(rt, backoff)
                continue
            self.record_event(rt, "Pulling", f'Pulling image "{image}"', container=c)
            seconds = self.pull_seconds if b.pull_seconds is None else b.pull_seconds
            await self._sleep(rt, seconds)
            if b.pull_error:
                err = b.pull_error
                c.state = {"waiting": {"reason": "ErrImagePull", "message": err}}
                self.sync(rt)
                self.record_event(rt, "Failed", f'Failed to pull image "{image}": {err}', "Warning", container=c)
                self.record_event(rt, "Failed", "Error: ErrImagePull", "Warning", container=c)
                await self._sleep(rt, min(backoff, 0.05))
                msg = f'Back-off pulling image "{image}"'
                c.state = {"waiting": {"reason": "ImagePullBackOff", "message": msg}}
                self.sync(rt)
                self.record_event(rt, "BackOff", msg, "Normal", container=c)
                self.record_event(rt, "Failed", "Error: ImagePullBackOff", "Warning", container=c)
                await self._sleep(rt, backoff)
                backoff = min(backoff * 2, 300.0)
                continue
            ms = int(seconds * 1000)
            took = f"{ms}ms" if ms < 1000 else f"{seconds:.3f}s"
            self.record_event(rt, "Pulled", f'Successfully pulled image "{image}" in {took} ({took} including '
                                            f"waiting). Image size: {b.image_size} bytes.", container=c)
            self.pulled.add(node_key)
            break
        repo = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
        c.image_id = f"{repo}@sha256:{hashlib.sha256(image.encode()).hexdigest()}"
        return b

    def _resolve_env(self, rt: PodRuntime, c: ContainerRun, pod: JSON) -> tuple[dict[str, str], str | None]:
        """The container's own environment (``env``/``envFrom``), or the CreateContainerConfigError message."""
        env: dict[str, str] = {}
        for src in c.spec.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "secretRef" in src:
                ref = src["secretRef"]
                obj = self.store.peek("secrets", rt.ns, ref.get("name", ""))
                if obj is None:
                    if ref.get("optional"):
                        continue
                    return env, f'secret "{ref.get("name")}" not found'
                for k, v in (obj.get("data") or {}).items():
                    env[prefix + k] = base64.b64decode(v).decode(errors="replace")
            elif "configMapRef" in src:
                ref = src["configMapRef"]
                obj = self.store.peek("configmaps", rt.ns, ref.get("name", ""))
                if obj is None:
                    if ref.get("optional"):
                        continue
                    return env, f'configmap "{ref.get("name")}" not found'
                for k, v in (obj.get("data") or {}).items():
                    env[prefix + k] = v
        for item in c.spec.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = _expand(item.get("value", ""), env)
                continue
            vf = item["valueFrom"]
            if "secretKeyRef" in vf:
                ref = vf["secretKeyRef"]
                obj = self.store.peek("secrets", rt.ns, ref.get("name", ""))
                if obj is None:
                    if ref.get("optional"):
                        continue
                    return env, f'secret "{ref.get("name")}" not found'
                data = obj.get("data") or {}
                if ref.get("key") not in data:
                    if ref.get("optional"):
                        continue
                    return env, f"couldn't find key {ref.get('key')} in Secret {rt.ns}/{ref.get('name')}"
                env[name] = base64.b64decode(data[ref["key"]]).decode(errors="replace")
            elif "configMapKeyRef" in vf:
                ref = vf["configMapKeyRef"]
                obj = self.store.peek("configmaps", rt.ns, ref.get("name", ""))
                if obj is None:
                    if ref.get("optional"):
                        continue
                    return env, f'configmap "{ref.get("name")}" not found'
                data = obj.get("data") or {}
                if ref.get("key") not in data:
                    if ref.get("optional"):
                        continue
                    return env, f"couldn't find key {ref.get('key')} in ConfigMap {rt.ns}/{ref.get('name')}"
                env[name] = data[ref["key"]]
            elif "fieldRef" in vf:
                env[name] = _field_ref(pod, vf["fieldRef"].get("fieldPath", ""), rt)
            elif "resourceFieldRef" in vf:
                ref = vf["resourceFieldRef"]
                res = ref.get("resource", "")
                kind, _, rname = res.partition(".")
                value = ((c.spec.get("resources") or {}).get(kind) or {}).get(rname)
                if value is None:
                    value = "8" if rname == "cpu" else str(32 * 2**30)
                divisor = parse_quantity(ref.get("divisor", "1"))
                amount = parse_quantity(value) / divisor
                env[name] = str(int(-(-amount // 1)))
        return env, None

    def _container_paths(self, rt: PodRuntime, c: ContainerRun) -> list[tuple[str, Path]]:
        vol_dirs: dict[str, Path] = getattr(rt, "vol_dirs", {})
        mounts: list[tuple[str, Path]] = []
        for m in c.spec.get("volumeMounts") or []:
            host = vol_dirs.get(m.get("name", ""))
            if host is None:
                continue
            if m.get("subPath"):
                host = host / m["subPath"]
                host.mkdir(parents=True, exist_ok=True)
            mounts.append((m["mountPath"].rstrip("/") or "/", host))
        tpath = c.spec.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        host_t = rt.dir / "termination" / c.name
        host_t.parent.mkdir(parents=True, exist_ok=True)
        host_t.write_bytes(b"")
        mounts.append((tpath, host_t))
        mounts.sort(key=lambda m: len(m[0]), reverse=True)
        return mounts

    def _rewrite(self, value: str, mounts: list[tuple[str, Path]]) -> str:
        if not self.rewrite_paths:
            return value
        for cpath, host in mounts:
            if cpath == "/":
                continue
            # A callable replacement, so backslashes in the host path are taken literally.
            host_text = str(host)
            value = re.sub(r"(?<![\w.-])" + re.escape(cpath) + r"(?=/|$|[^\w.-])",
                           lambda _m: host_text, value)  # noqa: B023 - used immediately
        return value

    async def _run_container(self, rt: PodRuntime, c: ContainerRun) -> None:
        try:
            await self._run_container_inner(rt, c)
        except _Stopped:
            pass
        finally:
            c.wake()

    async def _run_container_inner(self, rt: PodRuntime, c: ContainerRun) -> None:
        c.state = {"waiting": {"reason": "ContainerCreating" if not c.init else "PodInitializing"}}
        behavior = await self._pull(rt, c)
        while True:
            pod = self.store.peek("pods", rt.ns, rt.name)
            if pod is None or rt.stopping:
                raise _Stopped
            env, problem = self._resolve_env(rt, c, pod)
            if problem is None:
                break
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": problem}}
            self.sync(rt)
            self.record_event(rt, "Failed", f"Error: {problem}", "Warning", container=c)
            await self._sleep(rt, 1.0)
        backoff = self.crashloop_backoff
        while True:
            await self._start_and_wait(rt, c, pod, env, behavior)
            if c.done:
                return
            c.last_state = {"terminated": c.state["terminated"]}
            c.restart_count += 1
            c.prev_logs, c.logs = c.logs, []
            msg = f"back-off {int(backoff)}s restarting failed container={c.name} pod={rt.name}_{rt.ns}({rt.uid})"
            c.state = {"waiting": {"reason": "CrashLoopBackOff", "message": msg}}
            c.ready = False
            self._update_readiness(rt)
            self.sync(rt)
            self.record_event(rt, "BackOff", f"Back-off restarting failed container {c.name} in pod "
                                             f"{rt.name}_{rt.ns}({rt.uid})", "Warning", container=c)
            await self._sleep(rt, backoff)
            backoff = min(backoff * 2, 300.0)

    def _argv(self, c: ContainerRun, behavior: ImageBehavior, env: dict[str, str]) -> list[str]:
        command = c.spec.get("command")
        args = c.spec.get("args")
        if command:
            argv = list(command) + list(args or [])
        else:
            argv = list(behavior.entrypoint or []) + list(args if args is not None else behavior.cmd or [])
        return [_expand(a, env) for a in argv]

    async def _start_and_wait(self, rt: PodRuntime, c: ContainerRun, pod: JSON, env: dict[str, str],
                              behavior: ImageBehavior) -> tuple[int, str, str]:
        mounts = self._container_paths(rt, c)
        term_host = next(h for p, h in mounts if p == (c.spec.get("terminationMessagePath")
                                                       or DEFAULT_TERMINATION_PATH))
        c.container_id = f"containerd://{uuid.uuid4().hex}{uuid.uuid4().hex}"
        c.oom = False
        started = now_ns()
        argv = self._argv(c, behavior, env)
        self.record_event(rt, "Created", f"Created container: {c.name}", container=c)
        if behavior.simulate:
            c.sim = asyncio.get_event_loop().create_future()
            self._mark_running(rt, c, started)
            if behavior.output:
                for line in behavior.output.splitlines(keepends=True):
                    c.append_log(line.encode())
            if behavior.duration is not None:
                asyncio.get_event_loop().call_later(behavior.duration, _resolve, c.sim, behavior.exit_code)
            if behavior.oom_after is not None:
                self.spawn(self._oom_later(rt, c, behavior.oom_after))
            code = await c.sim
            if behavior.termination_message and not term_host.read_bytes():
                term_host.write_text(behavior.termination_message)
        else:
            proc_env = self._process_env(rt, c, behavior, env, mounts, term_host)
            workdir_c = c.spec.get("workingDir") or behavior.workdir
            if workdir_c:
                mapped = self._rewrite(workdir_c, mounts)
                cwd = Path(mapped) if mapped != workdir_c else rt.dir / "rootfs" / workdir_c.lstrip("/")
            else:
                cwd = rt.dir / "rootfs"
            cwd.mkdir(parents=True, exist_ok=True)
            argv = [self._rewrite(a, mounts) for a in argv]
            if argv and self.map_python and re.fullmatch(r"python(3(\.\d+)?)?", os.path.basename(argv[0])):
                argv[0] = sys.executable
            try:
                if not argv:
                    raise FileNotFoundError("no command specified")
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    stdin=asyncio.subprocess.DEVNULL, env=proc_env, cwd=str(cwd), start_new_session=True)
            except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
                what = argv[0] if argv else ""
                why = "no command specified" if not argv else (
                    "executable file not found in $PATH" if isinstance(exc, FileNotFoundError) else "permission denied")
                message = ("failed to create containerd task: failed to create shim task: OCI runtime create "
                           "failed: runc create failed: unable to start container process: exec: "
                           f'"{what}": {why}: unknown')
                c.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": message,
                                          "startedAt": "1970-01-01T00:00:00Z", "finishedAt": fmt_time(now_ns()),
                                          "containerID": c.container_id}}
                self.record_event(rt, "Failed", f"Error: {message}", "Warning", container=c)
                c.done = not self._will_restart(rt, c, pod, 128)
                self._update_readiness(rt)
                self.sync(rt)
                return 128, "StartError", message
            c.proc = proc
            c.pid = proc.pid
            self._mark_running(rt, c, started)
            if behavior.oom_after is not None:
                self.spawn(self._oom_later(rt, c, behavior.oom_after))
            limit = ((c.spec.get("resources") or {}).get("limits") or {}).get("memory")
            if limit and self.enforce_memory_limits:
                self.spawn(self._memory_cgroup(rt, c, proc, parse_quantity(limit)))
            assert proc.stdout is not None and proc.stderr is not None
            pumps = asyncio.gather(_pump(proc.stdout, c), _pump(proc.stderr, c))
            rc = await proc.wait()
            # The main process is the container's PID 1: when it exits the kernel SIGKILLs every other
            # process of its PID namespace (pid_namespaces(7)), so nothing it started outlives the container
            # -- not even a child in a session of its own, which still holds the log pipes.
            self._kill_all(c, proc.pid)
            await pumps
            code = 128 - rc if rc < 0 else rc
            c.proc = None
        finished = now_ns()
        reason = "OOMKilled" if c.oom else ("Completed" if code == 0 else "Error")
        policy = c.spec.get("terminationMessagePolicy", "File")
        try:
            raw = term_host.read_bytes()[-MAX_TERMINATION_MESSAGE:]
        except OSError:
            raw = b""
        message = raw.decode(errors="replace")
        if not message and policy == "FallbackToLogsOnError" and code != 0:
            tail = b"".join(d for _, d in c.logs[-FALLBACK_LOG_LINES:])
            message = tail[-FALLBACK_LOG_BYTES:].decode(errors="replace")
        term: JSON = {"exitCode": code, "reason": reason}
        if message:
            term["message"] = message
        term.update({"startedAt": fmt_time(started), "finishedAt": fmt_time(finished), "containerID": c.container_id})
        c.state = {"terminated": term}
        c.ready = False
        c.started = False
        c.sim = None
        # Decided before reporting, so "terminated" and the final phase arrive in one update.
        c.done = not self._will_restart(rt, c, pod, code)
        self._update_readiness(rt)
        self.sync(rt)
        return code, reason, message

    @staticmethod
    def _will_restart(rt: PodRuntime, c: ContainerRun, pod: JSON, code: int) -> bool:
        if rt.stopping or rt.reason:
            return False
        policy = pod["spec"].get("restartPolicy", "Always")
        if c.init:
            return code != 0 and policy != "Never"
        return policy == "Always" or (policy == "OnFailure" and code != 0)

    def _mark_running(self, rt: PodRuntime, c: ContainerRun, started: int) -> None:
        c.state = {"running": {"startedAt": fmt_time(started)}}
        c.started = True
        c.ever_started = True
        c.ready = not c.init
        self._update_readiness(rt)
        self.sync(rt)
        self.record_event(rt, "Started", f"Started container {c.name}", container=c)

    def _process_env(self, rt: PodRuntime, c: ContainerRun, behavior: ImageBehavior, env: dict[str, str],
                     mounts: list[tuple[str, Path]], term_host: Path) -> dict[str, str]:
        if self.inherit_env:
            base = dict(os.environ)
        else:
            base = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "LANG",
                                                                  "LC_ALL", "TZ", "SYSTEMROOT", "TMPDIR")}
        home = rt.dir / "rootfs" / "root"
        home.mkdir(parents=True, exist_ok=True)
        base.update({"HOSTNAME": rt.name, "HOME": str(home)})
        base.update(self.extra_env)
        base.update({k: self._rewrite(v, mounts) for k, v in behavior.env.items()})
        base.update({k: self._rewrite(v, mounts) for k, v in env.items()})
        base[TERMINATION_ENV] = str(term_host)
        base[CONTAINER_ENV] = c.container_id
        base[PATH_MAP_ENV] = json.dumps({p: str(h) for p, h in mounts})
        return base

    async def _memory_cgroup(self, rt: PodRuntime, c: ContainerRun, proc: Any, limit: float) -> None:
        """memory.max of the container's cgroup: the OOM killer runs while its processes use more.

        The kernel charges every page of every process of the cgroup; the double sums their resident
        memory every 100 ms (a real kill happens at the allocation that crosses the limit, a few ms earlier).
        """
        while proc.returncode is None and c.proc is proc:
            used = sum(max(_oom_points(pid), 0) for pid in _container_processes(c.container_id, proc.pid)) * 1024
            if used > limit:
                self.oom_kill(rt, c)
            await asyncio.sleep(0.1)

    async def _oom_later(self, rt: PodRuntime, c: ContainerRun, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if c.running:
            self.oom_kill(rt, c)

    def oom_kill(self, rt: PodRuntime, c: ContainerRun) -> int | None:
        """The memory cgroup of the container ran out: kill its biggest process, as the kernel does.

        When a cgroup exceeds memory.max and reclaim fails, the kernel's OOM killer (mm/oom_kill.c:
        ``select_bad_process`` over the cgroup's tasks, ``oom_badness`` = resident pages + swap + page
        tables) kills the ONE task with the highest score with SIGKILL -- not the whole cgroup, unless
        memory.oom.group is set, which the kubelet does not do for containers (cgroup-v2 docs: "an OOM
        routine is invoked to select and kill the bulkiest task in the cgroup"). If that task is a child
        of the container's main process, the main process survives and exits when it likes.
        containerd records the cgroup's oom event (TaskOOM) and the CRI then reports the container's
        ``terminated.reason`` as ``OOMKilled`` whatever the exit code (pkg/cri/server/events.go).

        Returns the PID killed (None for a simulated container, which just ends with 137).
        """
        c.oom = True
        if c.sim is not None and not c.sim.done():
            c.sim.set_result(128 + int(signal.SIGKILL))
            return None
        if c.proc is None or c.proc.returncode is not None:
            return None
        victim = _biggest_process(_container_processes(c.container_id, c.proc.pid))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(victim, signal.SIGKILL)
        return victim

    def _signal(self, c: ContainerRun, sig: signal.Signals) -> None:
        """Stop a container the way containerd does: SIGTERM to its main process only (PID 1 of the
        container, which may forward it), SIGKILL to every process of the container (``runc kill --all``)."""
        if c.sim is not None and not c.sim.done():
            c.sim.set_result(128 + int(sig))
        if c.proc is not None and c.proc.returncode is None:
            if sig == signal.SIGKILL:
                self._kill_all(c, c.proc.pid)
            else:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(c.proc.pid, sig)

    @staticmethod
    def _kill_all(c: ContainerRun, main: int) -> None:
        for pid in _container_processes(c.container_id, main):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    async def kill(self, rt: PodRuntime, grace: float) -> None:
        """Stop every container: SIGTERM, SIGKILL after ``grace``; abandon waiting stages."""
        first = not rt.stopping
        rt.stopping = True
        rt.stop_event.set()
        running = [c for c in rt.all_runs() if c.running]
        if first:
            for c in running:
                self.record_event(rt, "Killing", f"Stopping container {c.name}", container=c)
        for c in running:
            self._signal(c, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        deadline = asyncio.get_event_loop().time() + max(grace, 0)
        while any(c.running for c in running) and asyncio.get_event_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for c in running:
            if c.running:
                self._signal(c, signal.SIGKILL)

    def request_delete(self, ns: str, name: str, grace: int | None) -> JSON:
        """The apiserver's graceful pod deletion followed by the kubelet's kill; returns the Pod as answered."""
        pod = self.store.peek("pods", ns, name)
        assert pod is not None
        rt = self.pods.get((ns, name))
        if rt is not None and rt.uid != pod["metadata"]["uid"]:
            rt = None
        if grace is None:
            grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))
        grace = max(int(grace), 0)
        phase = pod.get("status", {}).get("phase")
        # Unscheduled or finished pods are removed at once (pod strategy CheckGracefulDelete).
        immediate = grace == 0 or not pod["spec"].get("nodeName") or phase in ("Succeeded", "Failed") \
            or rt is None or rt.finished.is_set()
        meta = pod["metadata"]
        if meta.get("deletionTimestamp") and not immediate:
            current = int(meta.get("deletionGracePeriodSeconds", grace))
            if grace >= current:
                return copy.deepcopy(pod)
        t = now_ns()
        period = 0 if immediate else grace

        def mark(p: JSON) -> None:
            p["metadata"]["deletionTimestamp"] = fmt_time(t + period * 1_000_000_000)
            p["metadata"]["deletionGracePeriodSeconds"] = period

        answered = self.store.mutate("pods", ns, name, mark)
        assert answered is not None
        if rt is not None:
            rt.deleting = True
            self.spawn(self.kill(rt, float(period)))
        if immediate and not answered["metadata"].get("finalizers"):
            # The object goes now; a live runtime still stops its processes and cleans up in _finish.
            gone = self.store.delete("pods", ns, name)
            if rt is not None and rt.finished.is_set():
                self.forget(rt)
            return gone or answered
        return answered

    def deadline_changed(self, ns: str, name: str) -> None:
        """``activeDeadlineSeconds`` was set or shortened by a patch: re-arm the timer."""
        rt = self.pods.get((ns, name))
        pod = self.store.peek("pods", ns, name)
        if rt is None or pod is None or not rt.accepted or rt.finished.is_set():
            return
        if rt.deadline_task:
            rt.deadline_task.cancel()
        ads = pod["spec"].get("activeDeadlineSeconds")
        if ads:
            elapsed = (now_ns() - (rt.start_ns or now_ns())) / 1e9
            rt.deadline_task = self.spawn(self._deadline(rt, max(float(ads) - elapsed, 0.0)))

    def evict(self, rt: PodRuntime, message: str | None) -> None:
        """Node-pressure eviction: Failed/Evicted, DisruptionTarget, containers killed without grace."""
        first = next(iter(rt.containers))
        message = message or DEFAULT_EVICTION_MESSAGE.format(container=first)
        rt.reason, rt.message = "Evicted", message
        rt.set_condition("DisruptionTarget", "True", "TerminationByKubelet", message)
        self.record_event(rt, "Evicted", message, "Warning")
        self.sync(rt)
        self.spawn(self.kill(rt, 0.0))

    def finish_container(self, rt: PodRuntime, c: ContainerRun, exit_code: int) -> bool:
        if c.sim is not None and not c.sim.done():
            c.sim.set_result(exit_code)
            return True
        return False

    async def shutdown(self) -> None:
        for rt in list(self.pods.values()):
            rt.stopping = True
            rt.stop_event.set()
            for c in rt.all_runs():
                self._signal(c, signal.SIGKILL)
        # Let killed processes be reaped first, so no subprocess transport outlives the loop.
        pod_tasks = [rt.task for rt in self.pods.values() if rt.task is not None]
        if pod_tasks:
            await asyncio.wait(pod_tasks, timeout=5)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)


def _container_processes(container_id: str, main: int) -> list[int]:
    """The processes of a container (its "cgroup"): the main one and every process carrying the container's
    marker variable, which the double puts in the main process's environment and children inherit -- so an
    orphan re-parented away, or a child in a session of its own, still counts, as it would in the cgroup."""
    marker = f"{CONTAINER_ENV}={container_id}".encode() + b"\0"
    pids = [main]
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == main:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if marker in fh.read() + b"\0":
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _oom_points(pid: int) -> int:
    """``oom_badness`` without oom_score_adj: resident pages + swap entries + page-table pages."""
    points = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmSwap", "VmPTE"):
                    points += int(value.split()[0])  # kB
    except (OSError, ValueError, IndexError):
        return -1
    return points


def _biggest_process(pids: list[int]) -> int:
    # select_bad_process keeps the last task with the highest score on a tie; any deterministic pick will do.
    return max(pids, key=lambda pid: (_oom_points(pid), pid))


def _resolve(fut: asyncio.Future[int], value: int) -> None:
    if not fut.done():
        fut.set_result(value)


async def _pump(stream: asyncio.StreamReader, c: ContainerRun) -> None:
    """Split a pipe into log lines, timestamped when each line completes (as the CRI log does)."""
    buf = b""
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            break
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            c.append_log(buf[: nl + 1])
            buf = buf[nl + 1:]
    if buf:
        c.append_log(buf)


_EXPAND = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined vars are replaced, ``$$`` escapes, unknown stay literal."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _EXPAND.sub(sub, value)


def _field_ref(pod: JSON, path: str, rt: PodRuntime) -> str:
    meta = pod["metadata"]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    table: dict[str, Callable[[], str]] = {
        "metadata.name": lambda: meta["name"],
        "metadata.namespace": lambda: meta["namespace"],
        "metadata.uid": lambda: meta["uid"],
        "spec.nodeName": lambda: rt.node or "",
        "spec.serviceAccountName": lambda: pod["spec"].get("serviceAccountName", "default"),
        "status.hostIP": lambda: rt.host_ip,
        "status.podIP": lambda: rt.pod_ip,
    }
    return table[path]() if path in table else ""
