"""The ``kubernetes`` backend: each step is a pod, on the node pool its resource profile names.

* The pod follows from the step (:mod:`._pod`): the runtime is injected as ``python3 -c <runtime>`` with the
  step in ``REMOTE_ML_STEP``, so any image with python3 works; secrets become ``secretKeyRef``\\ s, resources
  requests/limits, a profile a node pool (node selector, tolerations, affinity).
* Completion comes from the watch API: a per-pod watch on a worker (:meth:`KubernetesBackend.wait`), and one
  watch shared by every waiting step of a triggerer (:mod:`._watch`) in deferred mode.
* Every pod phase and container state maps to a status with a reason (:mod:`._states`).
* Pods carry the step identity as labels; :meth:`KubernetesBackend.find` reattaches by the step-id label
  and skips pods marked finished. Succeeded pods are deleted, failed ones kept by default.
* Every API call goes through one choke point (:mod:`._client`) that maps errors and retries 409 Conflict,
  429 and 5xx with backoff honouring ``Retry-After``.

See ``docs/backends/kubernetes.md``.
"""

from __future__ import annotations

import kubernetes  # noqa: F401 - a missing SDK must surface as BackendUnavailableError when the package loads

from airflow_remote_ml.backends.kubernetes._backend import KubernetesBackend
from airflow_remote_ml.backends.kubernetes._config import KubernetesConfig

__all__ = ["KubernetesBackend", "KubernetesConfig"]
