"""``FakeKubernetes``: the server in a background thread, plus the hooks tests and benchmarks use."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from ._kubelet import FakeNode, ImageBehavior, Kubelet, PodRuntime
from ._meta import JSON, fmt_time, now_ns
from ._server import ApiServer, Fault, RequestRecord
from ._store import Store

T = TypeVar("T")

DEFAULT_UNSCHEDULABLE_MESSAGE = (
    "0/3 nodes are available: 3 node(s) had untolerated taint {gpu: true}. preemption: 0/3 nodes are "
    "available: 3 Preemption is not helpful for scheduling."
)


class FakeKubernetes:
    """A Kubernetes API server test double with a fake scheduler and a subprocess "kubelet".

    Use it as a context manager; it serves plain HTTP on 127.0.0.1 with an ephemeral port and
    bearer-token auth, and writes a kubeconfig pointing at itself::

        with FakeKubernetes() as k8s:
            kubernetes.config.load_kube_config(config_file=str(k8s.kubeconfig_path))
            ...

    Every hook is safe to call from the test's thread (or from a coroutine on another loop); it
    runs on the server's loop and returns a deep copy of any object.

    Args:
        token: The bearer token the kubeconfig carries and the server requires.
        require_token: Answer 401 ``Unauthorized`` to requests without the token.
        namespace: The kubeconfig context's namespace (also created at start).
        nodes: The fake nodes; default one untainted ``fake-node-1`` (8 CPU, 32Gi).
        schedule_delay: Seconds before the scheduler binds a new pod.
        kubelet_delay: Seconds between binding and the kubelet accepting the pod (ContainerCreating).
        pull_seconds: Default "image pull" time.
        pull_backoff: First ImagePullBackOff delay (doubles up to 300 s).
        crashloop_backoff: First CrashLoopBackOff delay for restartPolicy Always/OnFailure.
        bookmark_interval: Seconds between BOOKMARK events on watches that allow them (the real
            apiserver sends about one a minute).
        watch_timeout: Server-side timeout of a watch that sends no ``timeoutSeconds``.
        history_limit: Changes kept for watch resumption; older resourceVersions get 410 Gone.
        map_python: Run ``python``/``python3``/``python3.X`` commands with this interpreter
            (``sys.executable``), so the venv's packages are importable "in the container".
        inherit_env: Give processes the whole host environment instead of PATH/PYTHONPATH/LANG only.
        extra_env: Extra environment for every container process (under the container's own env).
        rewrite_paths: Rewrite container paths (volume mounts, termination message path) found in
            command, args, env values and workingDir to their host directories.
        auto_create_namespaces: Create a namespace on first use instead of answering 404. Off by default,
            as on a real cluster (the NamespaceLifecycle admission plugin refuses content in a namespace
            that does not exist: 404 ``namespaces "x" not found``).
        enforce_memory_limits: OOM-kill the biggest process of a container whose processes together use
            more resident memory than its ``limits.memory`` (the memory cgroup's memory.max).
        root: Directory for per-pod files (default: a new temp dir, removed at stop).
    """

    def __init__(
        self,
        *,
        token: str = "fake-token",
        require_token: bool = True,
        namespace: str = "default",
        nodes: list[FakeNode] | None = None,
        schedule_delay: float = 0.0,
        kubelet_delay: float = 0.0,
        pull_seconds: float = 0.01,
        pull_backoff: float = 0.5,
        crashloop_backoff: float = 1.0,
        bookmark_interval: float = 60.0,
        watch_timeout: float = 1800.0,
        history_limit: int = 100_000,
        map_python: bool = True,
        inherit_env: bool = False,
        extra_env: dict[str, str] | None = None,
        rewrite_paths: bool = True,
        auto_create_namespaces: bool = False,
        enforce_memory_limits: bool = True,
        root: str | os.PathLike[str] | None = None,
    ) -> None:
        self.token = token
        self.namespace = namespace
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="fake-k8s-"))
        self._nodes = nodes if nodes is not None else [FakeNode("fake-node-1")]
        self._store_args = {"history_limit": history_limit}
        self._kubelet_args = {
            "schedule_delay": schedule_delay, "kubelet_delay": kubelet_delay, "pull_seconds": pull_seconds,
            "pull_backoff": pull_backoff, "crashloop_backoff": crashloop_backoff, "map_python": map_python,
            "inherit_env": inherit_env, "extra_env": dict(extra_env or {}), "rewrite_paths": rewrite_paths,
            "sa_token": token, "enforce_memory_limits": enforce_memory_limits,
        }
        self._server_args = {
            "token": token, "require_token": require_token, "auto_create_namespaces": auto_create_namespaces,
            "bookmark_interval": bookmark_interval, "watch_timeout": watch_timeout,
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.store: Store
        self.kubelet: Kubelet
        self.server: ApiServer
        self.host = "127.0.0.1"
        self.port = 0

    # ---------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> FakeKubernetes:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the loop thread and the server; returns once it accepts connections."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start_async())
            except BaseException as exc:  # surfaced to the starting thread
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._stop_async())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-kubernetes", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]
        self.kubeconfig_path.write_text(json.dumps(self.kubeconfig()))

    async def _start_async(self) -> None:
        self.store = Store(**self._store_args)  # type: ignore[arg-type]
        self.kubelet = Kubelet(self.store, self.root, **self._kubelet_args)  # type: ignore[arg-type]
        self.server = ApiServer(self.store, self.kubelet, **self._server_args)  # type: ignore[arg-type]
        for ns in {"default", "kube-system", "kube-public", "kube-node-lease", self.namespace}:
            self.server.create_namespace(ns)
        for node in self._nodes:
            self.kubelet.add_node(node)
        self._runner = web.AppRunner(self.server.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(2048)
        self.port = sock.getsockname()[1]
        site = web.SockSite(self._runner, sock, backlog=2048)
        await site.start()

    async def _stop_async(self) -> None:
        self.store.drop_watches()
        await self.kubelet.shutdown()
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        """Kill every container process, close every connection and remove the temp files."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
        self._loop = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server loop and return its result (awaiting it if it is a coroutine)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("FakeKubernetes is not running")

        async def wrapper() -> T:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result  # type: ignore[no-any-return]

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("call FakeKubernetes hooks from outside its loop")
        return asyncio.run_coroutine_threadsafe(wrapper(), loop).result(60)

    # ------------------------------------------------------------------------ client config

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def kubeconfig_path(self) -> Path:
        return self.root / "kubeconfig"

    def kubeconfig(self) -> JSON:
        """The kubeconfig content (JSON is valid YAML): token auth over plain HTTP."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                       "namespace": self.namespace}}],
            "current-context": "fake",
        }

    def configuration(self) -> Any:
        """A ``kubernetes.client.Configuration`` pointing at the fake."""
        from kubernetes import client

        cfg = client.Configuration(host=self.url)
        # Since kubernetes 36 the bearer token lives under the "BearerToken" key, prefix included.
        cfg.api_key = {"BearerToken": f"Bearer {self.token}"}
        return cfg

    def api_client(self) -> Any:
        from kubernetes import client

        return client.ApiClient(self.configuration())

    def core_v1(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client())

    def async_configuration(self) -> Any:
        """A ``kubernetes_asyncio.client.Configuration`` pointing at the fake."""
        from kubernetes_asyncio import client

        cfg = client.Configuration(host=self.url)
        cfg.api_key = {"BearerToken": f"Bearer {self.token}"}
        return cfg

    # ------------------------------------------------------------------------- registration

    def register_image(self, image: str, behavior: ImageBehavior | None = None, **fields: Any) -> ImageBehavior:
        """Say what ``image`` (exact name or fnmatch glob) does; later registrations win."""
        b = behavior or ImageBehavior(**fields)

        def do() -> ImageBehavior:
            self.kubelet.images.append((image, b))
            return b

        return self._call(do)

    def set_default_image_behavior(self, behavior: ImageBehavior) -> None:
        def do() -> None:
            self.kubelet.default_behavior = behavior

        self._call(do)

    def add_secret(self, name: str, data: dict[str, str | bytes], *, namespace: str | None = None,
                   type: str = "Opaque") -> JSON:  # noqa: A002 - the Secret field's name
        """Create (or replace) a Secret; values are plain text/bytes, stored base64 as the API does."""
        ns = namespace or self.namespace
        encoded = {k: base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode() for k, v in data.items()}
        return self._put("secrets", ns, {"metadata": {"name": name, "namespace": ns}, "type": type,
                                         "data": encoded})

    def add_config_map(self, name: str, data: dict[str, str], *, namespace: str | None = None) -> JSON:
        ns = namespace or self.namespace
        return self._put("configmaps", ns, {"metadata": {"name": name, "namespace": ns}, "data": dict(data)})

    def register_volume_claim(self, claim_name: str, host_dir: str | os.PathLike[str], *,
                              namespace: str | None = None) -> JSON:
        """Create a Bound PVC whose volume is ``host_dir``: pods mounting it share that directory."""
        ns = namespace or self.namespace
        path = Path(host_dir)
        path.mkdir(parents=True, exist_ok=True)

        def do() -> None:
            self.kubelet.pvc_dirs[(ns, claim_name)] = path

        self._call(do)
        return self._put("persistentvolumeclaims", ns, {
            "metadata": {"name": claim_name, "namespace": ns},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "10Gi"}},
                     "volumeName": f"pvc-{claim_name}", "storageClassName": "standard"},
            "status": {"phase": "Bound", "accessModes": ["ReadWriteMany"], "capacity": {"storage": "10Gi"}}})

    def register_host_path(self, path: str, host_dir: str | os.PathLike[str]) -> None:
        """Map a ``hostPath`` volume's path to a real directory (unregistered ones get a temp dir)."""
        target = Path(host_dir)
        target.mkdir(parents=True, exist_ok=True)

        def do() -> None:
            self.kubelet.host_paths[path] = target

        self._call(do)

    def create_namespace(self, name: str) -> JSON:
        return self._call(lambda: self.server.create_namespace(name))

    def add_service_account(self, name: str, *, namespace: str | None = None) -> JSON:
        ns = namespace or self.namespace

        def do() -> JSON:
            self.server.create_namespace(ns)
            return self.server.create_service_account(ns, name)

        return self._call(do)

    def apply(self, documents: list[JSON], *, namespace: str | None = None) -> None:
        """``kubectl apply -n namespace -f``: ServiceAccounts, Roles, RoleBindings (and Cluster* RBAC).

        The namespace must exist (kubectl would be refused too); a document's own namespace wins.
        """
        def do() -> None:
            for doc in documents:
                if not doc:
                    continue
                kind = doc["kind"]
                resource = {"ServiceAccount": "serviceaccounts", "Role": "roles", "RoleBinding": "rolebindings",
                            "ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings"}[kind]
                obj = copy.deepcopy(doc)
                meta = obj.setdefault("metadata", {})
                if kind.startswith("Cluster"):
                    meta.pop("namespace", None)
                else:
                    meta["namespace"] = meta.get("namespace") or namespace or self.namespace
                    if self.store.peek("namespaces", "", meta["namespace"]) is None:
                        raise KeyError(f'namespaces "{meta["namespace"]}" not found')
                key = (meta.get("namespace", ""), meta["name"])
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", fmt_time(now_ns()))
                if key in self.store.objects[resource]:
                    self.store.replace(resource, {**obj, "metadata": {
                        **self.store.objects[resource][key]["metadata"], **meta}})
                else:
                    self.store.create(resource, obj)

        self._call(do)

    def service_account_token(self, name: str, *, namespace: str | None = None) -> str:
        """A bearer token that authenticates as ServiceAccount ``namespace/name`` (RBAC then applies)."""
        ns = namespace or self.namespace
        return self._call(lambda: self.server.rbac.issue_token(ns, name))

    def kubeconfig_for_token(self, token: str) -> JSON:
        """A kubeconfig like :meth:`kubeconfig` that authenticates with ``token``."""
        config = self.kubeconfig()
        config["users"] = [{"name": "fake", "user": {"token": token}}]
        return config

    def add_node(self, node: FakeNode) -> None:
        """Add (or replace) a node; pending pods are rescheduled."""
        self._call(lambda: self.kubelet.add_node(node))

    def remove_node(self, name: str) -> None:
        self._call(lambda: self.kubelet.remove_node(name))

    def _put(self, resource: str, ns: str, obj: JSON) -> JSON:
        def do() -> JSON:
            meta = obj["metadata"]
            current = self.store.peek(resource, ns, meta["name"])
            if current is None:
                self.server.create_namespace(ns)  # a setup hook, not the API: the namespace is made for it
                return self.server.create_object(resource, ns, obj, {})
            merged = {**obj, "metadata": {**current["metadata"], **meta}}
            return self.store.replace(resource, merged)

        return self._call(do)

    # --------------------------------------------------------------------------- inspection

    def get_pod(self, name: str, *, namespace: str | None = None) -> JSON | None:
        return self._call(lambda: self.store.get("pods", namespace or self.namespace, name))

    def list_pods(self, *, namespace: str | None = None) -> list[JSON]:
        ns = namespace or self.namespace
        def do() -> list[JSON]:
            return [copy.deepcopy(obj) for (s, _), obj in self.store.objects["pods"].items() if s == ns]

        return self._call(do)

    def events(self, name: str | None = None, *, namespace: str | None = None) -> list[JSON]:
        """Events (oldest first), optionally only those about pod ``name``."""
        ns = namespace or self.namespace

        def do() -> list[JSON]:
            out = [e for (s, _), e in self.store.objects["events"].items()
                   if s == ns and (name is None or e["involvedObject"]["name"] == name)]
            out.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
            return json.loads(json.dumps(out))

        return self._call(do)

    def _runtime(self, name: str, namespace: str | None) -> PodRuntime:
        rt = self.kubelet.pods.get((namespace or self.namespace, name))
        if rt is None:
            raise KeyError(f"no running pod {namespace or self.namespace}/{name}")
        return rt

    def pod_log(self, name: str, container: str | None = None, *, namespace: str | None = None) -> str:
        def do() -> str:
            rt = self._runtime(name, namespace)
            c = rt.find(container) if container else next(iter(rt.containers.values()))
            assert c is not None
            return b"".join(d for _, d in c.logs).decode(errors="replace")

        return self._call(do)

    def container_pid(self, name: str, container: str | None = None, *, namespace: str | None = None) -> int | None:
        """PID of the container's process (None for simulated or not started containers)."""
        def do() -> int | None:
            rt = self._runtime(name, namespace)
            c = rt.find(container) if container else next(iter(rt.containers.values()))
            return c.pid if c is not None and c.proc is not None else None

        return self._call(do)

    def pod_dir(self, name: str, *, namespace: str | None = None) -> Path:
        """The per-pod host directory (rootfs/, volumes/, termination/<container>)."""
        return self._call(lambda: self._runtime(name, namespace).dir)

    def wait_for_pod(self, name: str, condition: str | Callable[[JSON | None], bool], *, timeout: float = 30.0,
                     namespace: str | None = None) -> JSON:
        """Wait (in the test thread, no API calls counted) until the pod meets ``condition``.

        ``condition`` is a phase name, ``"Deleted"``, or a predicate on the pod dict (None once gone).
        Returns the pod as it then is, or ``{}`` once it is gone.
        """
        if isinstance(condition, str):
            phase = condition

            def condition(p: JSON | None) -> bool:
                return p is None if phase == "Deleted" else p is not None and p["status"].get("phase") == phase

        deadline = time.monotonic() + timeout
        while True:
            pod = self.get_pod(name, namespace=namespace)
            if condition(pod):
                return pod or {}
            if time.monotonic() > deadline:
                raise TimeoutError(f"pod {name} did not reach the expected state; last: "
                                   f"{json.dumps((pod or {}).get('status'))}")
            time.sleep(0.01)

    @property
    def resource_version(self) -> int:
        return self._call(lambda: self.store.rv)

    # ---------------------------------------------------------------------- request counting

    @property
    def request_counts(self) -> Counter[tuple[str, str, bool]]:
        """Requests by (method, kind, watch); kind is e.g. ``pods``, ``pods/{name}``, ``pods/{name}/log``."""
        return self._call(lambda: Counter(self.server.counts))

    @property
    def requests(self) -> list[RequestRecord]:
        return self._call(lambda: list(self.server.records))

    def count(self, method: str | None = None, kind: str | None = None, watch: bool | None = None) -> int:
        """Number of requests matching every given filter."""
        return sum(n for (m, k, w), n in self.request_counts.items()
                   if (method is None or m == method) and (kind is None or k == kind)
                   and (watch is None or w == watch))

    def reset_counts(self) -> None:
        def do() -> None:
            self.server.counts.clear()
            self.server.records.clear()

        self._call(do)

    @property
    def active_watches(self) -> int:
        return self._call(lambda: self.server.active_watches)

    # ---------------------------------------------------------------------- failure injection

    def fail_next(self, status: int, count: int = 1, *, method: str | None = None, kind: str | None = None,
                  watch: bool | None = None, retry_after: int | None = None, message: str | None = None) -> None:
        """The next ``count`` matching requests get ``status`` (429 with Retry-After, 409, 500, 503,
        504, 401, 403, 404...) as the real apiserver words it; ``status=0`` resets the connection."""
        fault = Fault(status, count, method, kind, watch, retry_after, message)
        self._call(lambda: self.server.faults.append(fault))

    def clear_faults(self) -> None:
        def do() -> None:
            self.server.faults.clear()
            self.server.late_answers.clear()
            self.server.outage_until = 0.0

        self._call(do)

    def answer_late(self, seconds: float, count: int = 1, *, method: str | None = "POST",
                    kind: str | None = "pods") -> None:
        """The next ``count`` matching requests take effect at once but are answered ``seconds`` later
        (a create behind slow admission webhooks or a loaded etcd: the object exists before the answer)."""
        fault = Fault(200, count, method, kind, None, None, str(seconds))
        self._call(lambda: self.server.late_answers.append(fault))

    def lose_answer(self, count: int = 1, *, method: str | None = "POST", kind: str | None = "pods") -> None:
        """The next ``count`` matching requests take effect, then the connection closes with no answer."""
        fault = Fault(0, count, method, kind)
        self._call(lambda: self.server.late_answers.append(fault))

    def outage(self, seconds: float) -> None:
        """Every request gets 503 ServiceUnavailable for ``seconds`` from now; open watches and log
        streams are cut (the connections to the apiserver break)."""
        def do() -> None:
            self.server.outage_until = time.monotonic() + seconds
            self.store.drop_watches(abrupt=True)

        self._call(do)

    @property
    def created_pods(self) -> list[JSON]:
        """Every pod ever created through the API, as created (deleted ones included), oldest first."""
        return self._call(lambda: copy.deepcopy(self.server.created_pods))

    def drop_watches(self, *, abrupt: bool = False) -> int:
        """End every open watch stream (cleanly, or by resetting the connection); returns how many."""
        return self._call(lambda: self.store.drop_watches(abrupt))

    def compact(self) -> None:
        """Make every resourceVersion before now "too old": watches from them get ERROR 410 Expired."""
        self._call(self.store.compact)

    def send_bookmarks(self) -> None:
        """Send a BOOKMARK now on every watch that allows bookmarks."""
        def do() -> None:
            for w in self.store.watchers:
                if w.bookmarks:
                    w.push("BOOKMARK")

        self._call(do)

    def block_scheduling(self, message: str | None = DEFAULT_UNSCHEDULABLE_MESSAGE) -> None:
        """Make every pod not yet scheduled Unschedulable with ``message`` (a real scheduler text)."""
        def do() -> None:
            self.kubelet.scheduling_block = message
            self.kubelet.kick_scheduler()

        self._call(do)

    def unblock_scheduling(self) -> None:
        self.block_scheduling(None)

    def oom_kill(self, name: str, container: str | None = None, *, namespace: str | None = None) -> int | None:
        """The container hits its memory limit: the kernel's OOM killer SIGKILLs the biggest process of the
        container (only that one; the container's main process survives if it was a child that was
        biggest) and the container is reported ``terminated.reason: OOMKilled`` when it ends. Returns the PID."""
        def do() -> int | None:
            rt = self._runtime(name, namespace)
            c = rt.find(container) if container else next(iter(rt.containers.values()))
            assert c is not None
            return self.kubelet.oom_kill(rt, c)

        return self._call(do)

    def evict(self, name: str, message: str | None = None, *, namespace: str | None = None) -> None:
        """Node-pressure eviction: phase Failed, reason Evicted, the kubelet's message, Events."""
        self._call(lambda: self.kubelet.evict(self._runtime(name, namespace), message))

    def delete_pod(self, name: str, *, grace_seconds: int | None = None, namespace: str | None = None) -> JSON:
        """Delete a pod as someone else (kubectl, a controller) would, without counting a request."""
        ns = namespace or self.namespace

        def do() -> JSON:
            if self.store.peek("pods", ns, name) is None:
                raise KeyError(f"no pod {ns}/{name}")
            return self.kubelet.request_delete(ns, name, grace_seconds)

        return self._call(do)

    def finish_container(self, name: str, container: str | None = None, *, exit_code: int = 0,
                         namespace: str | None = None) -> bool:
        """End a simulated container that runs until told (``ImageBehavior(simulate=True, duration=None)``)."""
        def do() -> bool:
            rt = self._runtime(name, namespace)
            c = rt.find(container) if container else next(iter(rt.containers.values()))
            assert c is not None
            return self.kubelet.finish_container(rt, c, exit_code)

        return self._call(do)

    def patch_pod_status(self, name: str, status: JSON, *, namespace: str | None = None) -> JSON:
        """Overwrite parts of a pod's status (for table tests of odd states no kubelet path produces)."""
        ns = namespace or self.namespace

        def do() -> JSON:
            def apply(p: JSON) -> None:
                p["status"] = {**p.get("status", {}), **status}

            result = self.store.mutate("pods", ns, name, apply)
            if result is None:
                raise KeyError(f"no pod {ns}/{name}")
            return result

        return self._call(do)

    def now(self) -> str:
        """The server's current time as a ``metav1.Time`` string."""
        return fmt_time(now_ns())
