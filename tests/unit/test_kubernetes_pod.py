"""Pod building, the log cursor, connection settings and error mapping of the kubernetes backend: no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from airflow_remote_ml import runtime
from airflow_remote_ml.backends.kubernetes import KubernetesBackend, KubernetesConfig
from airflow_remote_ml.backends.kubernetes import _logs as logcursor
from airflow_remote_ml.backends.kubernetes._client import (
    AlreadyExists,
    Expired,
    Invalid,
    NotFound,
    call_with_retries,
    map_api_exception,
    resolve_settings,
)
from airflow_remote_ml.backends.kubernetes._pod import build_pod, cpu_quantity, deep_merge, memory_quantity
from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec
from airflow_remote_ml.core.errors import BackendAPIError, ConfigError, TransientBackendError
from airflow_remote_ml.core.identity import LABEL_STEP_ID

ROOT = "/artifacts"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
PROFILES = {
    "default": {"node_selector": {"pool": "default"}},
    "gpu": {"node_selector": {"pool": "gpu"}, "tolerations": [GPU_TOLERATION], "gpu": 1,
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "gpu-type", "operator": "In", "values": ["a100"]}]}]}}},
            "labels": {"team": "ml"}},
}


def config(**extra: Any) -> KubernetesConfig:
    base: dict[str, Any] = {"artifact_volume": {"claim_name": "ml-artifacts", "mount_path": ROOT},
                            "profiles": PROFILES, "namespace": "ml"}
    return KubernetesConfig.from_mapping({**base, **extra}, "kubernetes")


def req(**spec: Any) -> StepRequest:
    spec.setdefault("image", "ghcr.io/acme/train:1")
    spec.setdefault("command", ["python", "train.py"])
    return StepRequest.create(StepSpec.build(**spec), StepIdentity("dag", "train", "manual__2024-01-01T00:00:00+00:00"),
                              ArtifactStore(ROOT))


def build(cfg: KubernetesConfig | None = None, **spec: Any) -> dict[str, Any]:
    cfg = cfg or config()
    request = req(**spec)
    return build_pod(cfg, request, cfg.profile(request.spec.resources.profile or cfg.default_profile, "kubernetes"),
                     "ml")


def container(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["spec"]["containers"][0]


# -- the pod -----------------------------------------------------------------------------------------------


def test_runtime_is_injected_and_the_step_travels_in_env() -> None:
    request = req(env={"MODE": "fast"}, timeout=600)
    pod = build_pod(config(), request, {}, "ml")
    c = container(pod)
    assert c["command"] == runtime.launch_command("python3")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert json.loads(env["REMOTE_ML_STEP"]) == json.loads(json.dumps(request.runtime_config()))
    assert env["MODE"] == "fast"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["activeDeadlineSeconds"] == 660  # timeout + the default 60 s grace


def test_identity_labels_are_valid_for_kubernetes_and_not_overridable() -> None:
    pod = build(config(pod_override={"metadata": {"labels": {LABEL_STEP_ID: "hijack"}}}))
    labels = pod["metadata"]["labels"]
    assert labels[LABEL_STEP_ID] == req().identity.digest
    assert labels["remote-ml.airflow.apache.org/map-index"] == "none"  # "-1" is refused by the API server
    assert labels["app.kubernetes.io/managed-by"] == "airflow-remote-ml"
    assert labels["remote-ml.airflow.apache.org/run-id"] == "manual__2024-01-01T00_00_00_00_00"
    assert pod["metadata"]["name"] == req().identity.name()


def test_secrets_become_secret_key_refs_and_never_values() -> None:
    pod = build(secrets={"DB_PASSWORD": "db-creds/password"})
    assert {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db-creds", "key": "password"}}} \
        in container(pod)["env"]


def test_a_secret_without_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="secrets.TOKEN"):
        build(secrets={"TOKEN": "just-a-name"})


def test_resources_become_requests_limits_and_gpus() -> None:
    pod = build(resources={"cpu": 0.5, "memory": "4Gi", "gpu": 2})
    assert container(pod)["resources"] == {
        "requests": {"cpu": "500m", "memory": "4Gi"},
        "limits": {"cpu": "500m", "memory": "4Gi", "nvidia.com/gpu": "2"},
    }


def test_gpu_profile_maps_to_node_pool_tolerations_and_affinity() -> None:
    pod = build(resources={"profile": "gpu"})
    spec = pod["spec"]
    assert spec["nodeSelector"] == {"pool": "gpu"}
    assert spec["tolerations"] == [GPU_TOLERATION]
    assert spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert container(pod)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["metadata"]["labels"]["team"] == "ml"


def test_default_profile_applies_when_the_step_names_none() -> None:
    pod = build(config(default_profile="default"))
    assert pod["spec"]["nodeSelector"] == {"pool": "default"}
    assert "tolerations" not in pod["spec"]  # a light pod never tolerates the GPU taint


def test_service_account_pull_secrets_annotations_and_step_options() -> None:
    cfg = config(service_account_name="remote-ml-steps", image_pull_secrets=["regcred"],
                 annotations={"team": "ml"}, image_pull_policy="IfNotPresent")
    pod = build(cfg, backend_options={"kubernetes": {"annotations": {"cost-center": "42"},
                                                     "node_selector": {"zone": "a"}}})
    assert pod["spec"]["serviceAccountName"] == "remote-ml-steps"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["metadata"]["annotations"]["team"] == "ml"
    assert pod["metadata"]["annotations"]["cost-center"] == "42"
    assert pod["spec"]["nodeSelector"] == {"zone": "a"}
    assert container(pod)["imagePullPolicy"] == "IfNotPresent"


def test_artifact_volume_is_mounted_at_the_artifact_root() -> None:
    pod = build()
    assert pod["spec"]["volumes"] == [{"name": "remote-ml-artifacts",
                                       "persistentVolumeClaim": {"claimName": "ml-artifacts"}}]
    assert container(pod)["volumeMounts"] == [{"name": "remote-ml-artifacts", "mountPath": ROOT}]


def test_local_artifact_root_without_a_volume_is_refused() -> None:
    cfg = KubernetesConfig.from_mapping({"namespace": "ml"}, "kubernetes")
    with pytest.raises(ConfigError, match="artifact_root.*artifact_volume"):
        build_pod(cfg, req(), {}, "ml")


def test_object_storage_root_needs_no_volume() -> None:
    cfg = KubernetesConfig.from_mapping({"namespace": "ml"}, "kubernetes")
    request = StepRequest.create(StepSpec.build(image="x", command=["true"]), StepIdentity("d", "t", "r"),
                                 ArtifactStore("s3://bucket/ml"))
    assert "volumes" not in build_pod(cfg, request, {}, "ml")["spec"]


def test_pod_template_is_a_base_and_pod_override_wins() -> None:
    cfg = config(pod_template={"spec": {"securityContext": {"runAsNonRoot": True}, "restartPolicy": "Always",
                                        "containers": [{"name": "step", "workingDir": "/code"},
                                                       {"name": "sidecar", "image": "proxy:1"}]}},
                 pod_override={"spec": {"hostIPC": True}})
    pod = build(cfg, backend_options={"kubernetes": {"pod_override": {
        "spec": {"containers": [{"name": "step", "stdin": True}]}}}})
    spec = pod["spec"]
    assert spec["securityContext"] == {"runAsNonRoot": True}
    assert spec["restartPolicy"] == "Never"  # the built pod wins over the template
    assert spec["hostIPC"] is True
    step = next(c for c in spec["containers"] if c["name"] == "step")
    assert step["workingDir"] == "/code" and step["stdin"] is True and step["image"] == "ghcr.io/acme/train:1"
    assert [c["name"] for c in spec["containers"]] == ["step", "sidecar"]


def test_unknown_option_and_bad_values_are_config_errors() -> None:
    backend = KubernetesBackend(config())
    with pytest.raises(ConfigError, match="no_such"):
        backend.validate(req(backend_options={"kubernetes": {"no_such": 1}}))
    with pytest.raises(ConfigError, match="tolerations"):
        backend.validate(req(backend_options={"kubernetes": {"tolerations": "gpu"}}))
    with pytest.raises(ConfigError, match="reserved"):
        backend.validate(req(backend_options={"kubernetes": {"labels": {LABEL_STEP_ID: "x"}}}))
    with pytest.raises(ConfigError, match="image"):
        backend.validate(req(image=None))
    with pytest.raises(ConfigError, match="delete_policy"):
        KubernetesBackend(config(delete_policy="sometimes"))
    with pytest.raises(ConfigError, match="profiles.bad.gpu"):
        KubernetesBackend(config(profiles={"bad": {"gpu": "lots"}}))


@pytest.mark.parametrize(("cpu", "quantity"), [(2, "2"), (0.5, "500m"), (1.25, "1250m"), (0.001, "1m")])
def test_cpu_quantity(cpu: float, quantity: str) -> None:
    assert cpu_quantity(cpu) == quantity


@pytest.mark.parametrize(("size", "quantity"), [(4 * 1024**3, "4Gi"), (512 * 1024**2, "512Mi"), (1000, "1000")])
def test_memory_quantity(size: int, quantity: str) -> None:
    assert memory_quantity(size) == quantity


def test_deep_merge_deletes_with_none_and_merges_named_lists() -> None:
    base = {"a": {"b": 1, "c": 2}, "env": [{"name": "X", "value": "1"}], "args": ["x"]}
    merged = deep_merge(base, {"a": {"c": None}, "env": [{"name": "X", "value": "2"}, {"name": "Y"}], "args": ["y"]})
    assert merged == {"a": {"b": 1}, "env": [{"name": "X", "value": "2"}, {"name": "Y"}], "args": ["y"]}
    assert base["a"] == {"b": 1, "c": 2}


# -- the log cursor ----------------------------------------------------------------------------------------

LOG = (b"2024-05-01T12:00:00.100000000Z one\n2024-05-01T12:00:00.200000000Z two\n"
       b"2024-05-01T12:00:01.500000000Z three\n")


def test_log_cursor_skips_what_was_handed_out() -> None:
    first = logcursor.next_chunk(logcursor.parse_entries(LOG, complete=False), None)
    assert first.lines == ["one", "two", "three"]
    assert logcursor.since_of(first.cursor) == "2024-05-01T12:00:00Z"
    # The next read from that sinceTime repeats all three, then the new line.
    again = LOG + b"2024-05-01T12:00:02.000000000Z four\n"
    second = logcursor.next_chunk(logcursor.parse_entries(again, complete=False), first.cursor)
    assert second.lines == ["four"]
    third = logcursor.next_chunk(logcursor.parse_entries(b"2024-05-01T12:00:01.500000000Z three\n"
                                                         b"2024-05-01T12:00:02.000000000Z four\n", complete=False),
                                 second.cursor)
    assert third.lines == []


def test_partial_last_line_waits_until_the_container_ended() -> None:
    raw = LOG + b"2024-05-01T12:00:02.000000000Z half a li"
    assert logcursor.next_chunk(logcursor.parse_entries(raw, complete=False), None).lines[-1] == "three"
    assert logcursor.next_chunk(logcursor.parse_entries(raw, complete=True), None).lines[-1] == "half a li"


def test_empty_log_keeps_the_cursor() -> None:
    assert logcursor.next_chunk([], {"since": 5, "seen": 2}).cursor == {"since": 5, "seen": 2}


# -- connection settings -----------------------------------------------------------------------------------


def test_connection_extras_are_read_as_the_provider_hook_reads_them() -> None:
    extras = {"extra__kubernetes__kube_config_path": "/etc/kube/config", "cluster_context": "prod",
              "namespace": "ml", "disable_verify_ssl": "true", "in_cluster": False}
    settings = resolve_settings({}, extras)
    assert (settings.kubeconfig_path, settings.context, settings.namespace, settings.disable_verify_ssl) == (
        "/etc/kube/config", "prod", "ml", True)
    assert not settings.in_cluster


def test_inline_kube_config_json_and_explicit_settings_win() -> None:
    inline = json.dumps({"apiVersion": "v1", "clusters": [], "contexts": [], "users": []})
    settings = resolve_settings({"namespace": "override", "context": "dev"}, {"kube_config": inline,
                                                                              "namespace": "ml"})
    assert settings.kubeconfig == json.loads(inline)
    assert (settings.namespace, settings.context) == ("override", "dev")


def test_contradictory_connection_sources_are_refused() -> None:
    with pytest.raises(ConfigError, match="mutually exclusive"):
        resolve_settings({}, {"in_cluster": True, "kube_config_path": "/x"})


def test_settings_key_separates_clusters_but_not_namespaces() -> None:
    a = resolve_settings({"kubeconfig_path": "/a"}, None)
    assert a.key() == resolve_settings({"kubeconfig_path": "/a", "namespace": "x"}, None).key()
    assert a.key() != resolve_settings({"kubeconfig_path": "/b"}, None).key()


# -- error mapping and retries -----------------------------------------------------------------------------


class FakeApiException(Exception):
    def __init__(self, status: int, reason: str = "", retry_after: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.body = json.dumps({"kind": "Status", "reason": reason, "message": f"{reason} happened"})
        self.headers = {"Retry-After": retry_after} if retry_after else {}


@pytest.mark.parametrize(("status", "reason", "kind"), [
    (404, "NotFound", NotFound), (409, "AlreadyExists", AlreadyExists), (409, "Conflict", TransientBackendError),
    (410, "Expired", Expired), (429, "TooManyRequests", TransientBackendError),
    (500, "InternalError", TransientBackendError), (503, "ServiceUnavailable", TransientBackendError),
    (422, "Invalid", Invalid), (403, "Forbidden", BackendAPIError), (401, "Unauthorized", BackendAPIError),
])
def test_api_errors_map_to_ours(status: int, reason: str, kind: type) -> None:
    error = map_api_exception(FakeApiException(status, reason), "reading pod p")
    assert type(error) is kind
    assert error.status_code == status and f"{reason} happened" in str(error)


def test_forbidden_points_at_the_rbac() -> None:
    assert "rbac.yaml" in str(map_api_exception(FakeApiException(403, "Forbidden"), "creating pod"))


def test_retries_honour_retry_after_then_succeed() -> None:
    calls: list[int] = []
    sleeps: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise FakeApiException(429, "TooManyRequests", retry_after="7")
        return "ok"

    assert call_with_retries("listing pods", flaky, attempts=5, sleep=sleeps.append) == "ok"
    assert sleeps == [7.0, 7.0]


def test_retries_stop_at_non_transient_errors_and_when_exhausted() -> None:
    sleeps: list[float] = []

    def forbidden() -> None:
        raise FakeApiException(403, "Forbidden")

    with pytest.raises(BackendAPIError):
        call_with_retries("x", forbidden, attempts=5, sleep=sleeps.append)
    assert sleeps == []

    def down() -> None:
        raise ConnectionResetError("reset")

    with pytest.raises(TransientBackendError):
        call_with_retries("x", down, attempts=2, sleep=sleeps.append)
    assert sleeps == [0.5, 1.0]


def test_the_service_account_admission_refusal_says_the_account_does_not_exist() -> None:
    class Refused(Exception):
        status = 403
        reason = "Forbidden"
        headers: dict[str, str] = {}
        body = json.dumps({"kind": "Status", "reason": "Forbidden", "code": 403, "message":
                           'pods "p" is forbidden: error looking up service account ml/steps: '
                           'serviceaccount "steps" not found'})

    error = map_api_exception(Refused(), "creating pod p")
    assert error.status_code == 403 and "does not exist" in str(error) and "Role" not in str(error)
