"""A Kubernetes API server test double that really runs pods as local processes.

It speaks the core/v1 REST API closely enough that the official ``kubernetes`` client and
``kubernetes_asyncio`` work against it unchanged (create/get/list/watch/patch/delete of pods, logs,
events, secrets, configmaps, PVCs, namespaces, nodes), and a fake scheduler + kubelet move each pod
through the states a real node reports while running the container's ``command``/``args``.

Typical use from a backend test::

    from tests.fakes.kubernetes_api import FakeKubernetes, ImageBehavior

    with FakeKubernetes() as k8s:
        kubernetes.config.load_kube_config(config_file=str(k8s.kubeconfig_path))
        # ... run the backend; then inspect or break things:
        k8s.wait_for_pod("step-1", "Succeeded")
        k8s.fail_next(429, retry_after=1, method="GET", kind="pods/{name}")
        k8s.drop_watches()
        assert k8s.count(kind="pods", watch=True) == 1

How a container runs (the contract the runtime can rely on):

* The image is ignored unless registered with ``register_image`` (ENTRYPOINT/CMD/ENV, pull
  errors, OOM, or a cheap simulated container for benchmarks).
* ``python``/``python3`` commands run with the test's interpreter (``map_python``).
* The process env is PATH/PYTHONPATH/LANG from the host, ``HOSTNAME`` (pod name), ``HOME`` (a
  per-pod dir), the container's ``env``/``envFrom`` (``secretKeyRef``/``configMapKeyRef`` resolved
  from registered Secrets/ConfigMaps; a missing one gives CreateContainerConfigError, as on a real
  node), plus two variables the fake adds:

  - ``REMOTE_ML_TERMINATION_LOG``: host path of the container's termination message file. The
    spec's ``terminationMessagePath`` (default ``/dev/termination-log``) is remapped to it; the
    runtime should write there when the variable is set. The kubelet reads the last 4096 bytes after
    exit; with ``FallbackToLogsOnError`` an empty file on failure falls back to the log tail (80 lines
    / 2048 bytes).
  - ``REMOTE_ML_PATH_MAP``: JSON object mapping each container path (volume ``mountPath``s and the
    termination message path) to its host directory/file.

  With ``rewrite_paths`` (default) every occurrence of a mount path in command, args, env values
  and ``workingDir`` is also rewritten to the host path, so ``--out /mnt/artifacts/x`` or
  ``file:///mnt/artifacts`` just work.
* Volumes: ``persistentVolumeClaim`` -> the directory given to ``register_volume_claim`` (a claim
  that does not exist leaves the pod Unschedulable with the scheduler's message); ``hostPath`` ->
  ``register_host_path`` (else a temp dir); ``emptyDir`` -> a per-pod dir; ``secret``/``configMap``
  -> files; the service-account volume holds ``token`` and ``namespace``.
* ``workingDir`` (or the image WORKDIR) maps into a per-pod ``rootfs`` dir unless it is under a
  mount. stdout and stderr are merged into the container log, each line timestamped when written.
"""

from __future__ import annotations

from ._fake import DEFAULT_UNSCHEDULABLE_MESSAGE, FakeKubernetes
from ._kubelet import (
    DEADLINE_MESSAGE,
    DEFAULT_TERMINATION_PATH,
    PATH_MAP_ENV,
    TERMINATION_ENV,
    FakeNode,
    ImageBehavior,
)
from ._meta import ApiError, status_body
from ._server import RequestRecord

__all__ = [
    "DEADLINE_MESSAGE",
    "DEFAULT_TERMINATION_PATH",
    "DEFAULT_UNSCHEDULABLE_MESSAGE",
    "PATH_MAP_ENV",
    "TERMINATION_ENV",
    "ApiError",
    "FakeKubernetes",
    "FakeNode",
    "ImageBehavior",
    "RequestRecord",
    "status_body",
]
