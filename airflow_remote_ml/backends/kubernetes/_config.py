"""The settings of the kubernetes backend (plain data; see ``docs/backends/kubernetes.md``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from airflow_remote_ml.core.backend import BackendConfig

DELETE_POLICIES = ("on_success", "always", "never")


@dataclass(frozen=True)
class KubernetesConfig(BackendConfig):
    """Settings of the kubernetes backend.

    Connection (see :mod:`._client`; explicit settings win over the connection's extras):
        conn_id: an Airflow connection of type ``kubernetes`` (read lazily, as ``KubernetesHook`` does).
        in_cluster, kubeconfig_path, kubeconfig (inline mapping or YAML/JSON text), context: where the
            cluster is; none of them: in-cluster when running in a pod, else ``~/.kube/config``.
        namespace: where pods go; default the connection's, else the kubeconfig context's, else ``default``.
        disable_verify_ssl, disable_tcp_keepalive: as the connection extras of the same names.

    Pods (see :mod:`._pod`):
        service_account_name, image_pull_secrets, image_pull_policy, labels, annotations, node_selector,
        tolerations: for every pod. ``default_profile``: the profile of a step that names none.
        profiles: ``{name: {node_selector, tolerations, affinity, cpu, memory, gpu, gpu_resource, requests,
            limits, labels, annotations, service_account_name, priority_class_name, ...}}`` (node pools).
        container_name: the step's container; python: the interpreter in the image that runs the runtime.
        artifact_volume: ``{claim_name, mount_path[, sub_path, read_only]}``: a PVC mounted at the artifact
            root's own path, so output URIs mean the same inside the pod and on the workers.
        pod_template: a base pod the built one merges over; pod_override: merged over the built pod.

    Life cycle:
        startup_timeout: seconds a pod may stay Pending (unscheduled, pulling, creating) before it fails.
        deadline_grace_seconds: ``activeDeadlineSeconds`` is the step timeout plus this (the runtime stops the
            step at its timeout itself; the deadline is the hard stop behind it).
        delete_grace_seconds: grace period of the delete that cancels a pod.
        delete_policy: ``on_success`` (keep failed pods for debugging), ``always`` or ``never``.
        api_retries: retries of one API call on 409 Conflict/429/5xx/broken connections.
        request_timeout: seconds for one API call.

    Deferred waiting (one shared watch per triggerer, see :mod:`._watch`):
        watch_timeout: server-side timeout of one watch request (it is then resumed).
        log_interval: least seconds between two log reads of one waiting step.
        max_log_requests_per_second: cap on log reads of all steps waiting in one triggerer.
        session_linger: seconds the shared watch stays open after its last waiting step left.

        job_url_template: e.g. ``https://console.example/pods/{namespace}/{name}``: the task's extra link.
    """

    conn_id: str | None = None
    in_cluster: bool | None = None
    kubeconfig_path: str | None = None
    kubeconfig: dict[str, Any] | str | None = None
    context: str | None = None
    namespace: str | None = None
    disable_verify_ssl: bool | None = None
    disable_tcp_keepalive: bool | None = None
    service_account_name: str | None = None
    image_pull_secrets: list[str] = field(default_factory=list)
    image_pull_policy: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    default_profile: str | None = None
    container_name: str = "step"
    python: str = "python3"
    artifact_volume: dict[str, Any] | None = None
    pod_template: dict[str, Any] | str | None = None
    pod_override: dict[str, Any] | None = None
    startup_timeout: float = 600.0
    deadline_grace_seconds: float = 60.0
    delete_grace_seconds: int = 30
    delete_policy: str = "on_success"
    api_retries: int = 5
    request_timeout: float = 60.0
    watch_timeout: float = 300.0
    log_interval: float = 10.0
    max_log_requests_per_second: float = 5.0
    session_linger: float = 60.0
    job_url_template: str | None = None

    def connection_fields(self) -> dict[str, Any]:
        return {"in_cluster": self.in_cluster, "kubeconfig_path": self.kubeconfig_path,
                "kubeconfig": self.kubeconfig, "context": self.context, "namespace": self.namespace,
                "disable_verify_ssl": self.disable_verify_ssl, "disable_tcp_keepalive": self.disable_tcp_keepalive}
