"""StepRequest + configuration + profile → the Pod manifest. Pure: no I/O, no client objects.

The manifest is the API's JSON (camelCase), which the ``kubernetes`` client sends as it is. Settings
apply in this order, later winning: ``pod_template`` (a base), the backend configuration, the resource
profile, the step's resources, the step's ``backend_options["kubernetes"]``, then the ``pod_override``
mappings (profile, configuration, step). The step identity labels are applied last and cannot be
overridden: they are how a pod is found again.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airflow_remote_ml import runtime
from airflow_remote_ml.core.artifacts import is_local, local_path
from airflow_remote_ml.core.errors import ConfigError
from airflow_remote_ml.core.identity import LABEL_MAP_INDEX, LABEL_PREFIX
from airflow_remote_ml.core.spec import parse_cpu, parse_memory, reject_unknown_options

if TYPE_CHECKING:
    from airflow_remote_ml.backends.kubernetes._config import KubernetesConfig
    from airflow_remote_ml.core.backend import StepRequest

JSON = dict[str, Any]

ANNOTATION_MANIFEST = f"{LABEL_PREFIX}/manifest-uri"
ANNOTATION_OUTPUTS = f"{LABEL_PREFIX}/outputs"
ANNOTATION_IDENTITY = f"{LABEL_PREFIX}/identity"
ARTIFACT_VOLUME = "remote-ml-artifacts"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"

#: ``backend_options["kubernetes"]`` keys a step may set.
OPTION_NAMES = frozenset({
    "namespace", "service_account_name", "labels", "annotations", "node_selector", "tolerations", "affinity",
    "priority_class_name", "image_pull_policy", "pod_override", "pod_template",
})
#: Keys of a resource profile (a node pool).
PROFILE_NAMES = frozenset({
    "node_selector", "tolerations", "affinity", "labels", "annotations", "service_account_name",
    "priority_class_name", "scheduler_name", "runtime_class_name", "image_pull_secrets", "cpu", "memory", "gpu",
    "gpu_resource", "requests", "limits", "pod_override",
})
ARTIFACT_VOLUME_KEYS = frozenset({"claim_name", "mount_path", "sub_path", "read_only"})

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def identity_labels(request: StepRequest) -> dict[str, str]:
    """``identity.labels()`` made valid for Kubernetes.

    The core gives ``map-index: "-1"`` for an unmapped task, which the API server refuses (a label value
    must start and end with an alphanumeric character); it becomes ``"none"``. Any other invalid value is
    trimmed to its valid core. The step-id label, the one lookups use, is a hex digest and always valid.
    """
    labels = {}
    for key, value in request.identity.labels().items():
        if not _LABEL_VALUE.match(value):
            if key == LABEL_MAP_INDEX and value.startswith("-"):
                value = "none"
            else:
                value = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", re.sub(r"[^-A-Za-z0-9_.]", "_", value))[:63] \
                    or "none"
        labels[key] = value
    return labels


# -- small helpers ---------------------------------------------------------------------------------------


def deep_merge(base: Any, override: Any) -> Any:
    """Merge ``override`` into ``base`` (neither is changed).

    Mappings merge key by key (a ``None`` value deletes the key, as in a JSON merge patch); lists of
    mappings that all have a ``name`` merge by name (as Kubernetes' strategic merge does for containers,
    env, volumes and volumeMounts); any other value in ``override`` replaces the one in ``base``.
    """
    if isinstance(base, Mapping) and isinstance(override, Mapping):
        merged = {k: copy.deepcopy(v) for k, v in base.items()}
        for key, value in override.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = deep_merge(merged[key], value)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if _named_list(base) and _named_list(override):
        merged_list = [copy.deepcopy(item) for item in base]
        index = {item["name"]: i for i, item in enumerate(merged_list)}
        for item in override:
            if item["name"] in index:
                merged_list[index[item["name"]]] = deep_merge(merged_list[index[item["name"]]], item)
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(override)


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, Mapping) and "name" in i for i in value)


def cpu_quantity(cpu: float) -> str:
    """A Kubernetes CPU quantity: whole cores as ``"2"``, fractions in millicores (``"500m"``)."""
    millis = math.ceil(round(cpu * 1000, 6))
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def memory_quantity(size: int) -> str:
    """A Kubernetes memory quantity in binary units when exact (``"4Gi"``, ``"512Mi"``), else bytes."""
    for unit, factor in (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _as_mapping(value: Any, name: str) -> JSON:
    if value is None:
        return {}
    if isinstance(value, str):  # a YAML/JSON document, as a pod template file's content
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(name, f"is not valid YAML ({exc})", "give a mapping in the Pod's JSON shape") from None
    if not isinstance(value, Mapping):
        raise ConfigError(name, f"expected a mapping, got {type(value).__name__}",
                          "give a mapping in the Pod's JSON shape, e.g. {'spec': {'hostNetwork': True}}")
    return dict(value)


def _string_map(value: Any, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(name, f"{value!r} is not a mapping of strings", "use {'key': 'value'}")
    return dict(value)


def _list_of_mappings(value: Any, name: str, example: str) -> list[JSON]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise ConfigError(name, f"{value!r} is not a list of mappings", f"use e.g. {example}")
    return [dict(v) for v in value]


TOLERATION_EXAMPLE = "[{'key': 'gpu', 'operator': 'Exists', 'effect': 'NoSchedule'}]"


def check_settings(prefix: str, settings: Mapping[str, Any], allowed: frozenset[str]) -> None:
    """Type checks of profile settings and step options: a bad value fails before anything runs."""
    reject_unknown_options(prefix, settings, set(allowed))
    for key, value in settings.items():
        name = f"{prefix}.{key}"
        if key in ("labels", "annotations", "node_selector"):
            _string_map(value, name)
            if key == "labels" and any(k.startswith(LABEL_PREFIX) or k == "app.kubernetes.io/managed-by"
                                       for k in value):
                raise ConfigError(name, f"keys starting with {LABEL_PREFIX!r} are reserved for the step identity",
                                  "choose another label key")
        elif key == "tolerations":
            _list_of_mappings(value, name, TOLERATION_EXAMPLE)
        elif key in ("affinity", "pod_override", "pod_template", "requests", "limits"):
            _as_mapping(value, name)
        elif key in ("service_account_name", "priority_class_name", "scheduler_name", "runtime_class_name",
                     "image_pull_policy", "gpu_resource", "namespace"):
            if not isinstance(value, str) or not value:
                raise ConfigError(name, f"{value!r} is not a name", "give a non-empty string")
            if key == "namespace" and not _DNS_LABEL.match(value):
                raise ConfigError(name, f"{value!r} is not a valid namespace name", "use e.g. 'ml-jobs'")
            if key == "image_pull_policy" and value not in ("Always", "IfNotPresent", "Never"):
                raise ConfigError(name, f"{value!r} is not a pull policy", "use Always, IfNotPresent or Never")
        elif key == "image_pull_secrets":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(name, f"{value!r} is not a list of Secret names", "use e.g. ['registry-creds']")
        elif key == "cpu":
            parse_cpu(value, name)
        elif key == "memory":
            parse_memory(value, name)
        elif key == "gpu" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(name, f"{value!r} is not a GPU count", "use a whole number such as 1")


def check_artifact_volume(value: Mapping[str, Any] | None) -> None:
    if value is None:
        return
    name = "backend_config[kubernetes].artifact_volume"
    if not isinstance(value, Mapping):
        raise ConfigError(name, "expected a mapping", "use {'claim_name': 'ml-artifacts', 'mount_path': '/artifacts'}")
    reject_unknown_options(name, value, set(ARTIFACT_VOLUME_KEYS))
    if not value.get("claim_name"):
        raise ConfigError(f"{name}.claim_name", "is missing", "name the PersistentVolumeClaim, e.g. 'ml-artifacts'")
    mount = value.get("mount_path")
    if not isinstance(mount, str) or not mount.startswith("/"):
        raise ConfigError(f"{name}.mount_path", f"{mount!r} is not an absolute path",
                          "use the artifact root's path, e.g. '/artifacts'")


def _under(path: str, root: str) -> bool:
    path, root = os.path.normpath(path), os.path.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


# -- the pod ---------------------------------------------------------------------------------------------


def resources_block(request: StepRequest, profile: Mapping[str, Any], prefix: str) -> JSON:
    """``requests``/``limits`` from the profile's defaults overridden by the step's own resources.

    CPU and memory are requested and limited alike (a step gets what it asked for and a clear OOMKilled
    past it); GPUs are an extended resource, which Kubernetes takes from ``limits``.
    """
    res = request.spec.resources
    requests: JSON = dict(_as_mapping(profile.get("requests"), f"{prefix}.requests"))
    limits: JSON = dict(_as_mapping(profile.get("limits"), f"{prefix}.limits"))
    cpu = res.cpu or parse_cpu(profile.get("cpu"), f"{prefix}.cpu")
    if cpu:
        requests["cpu"] = limits["cpu"] = cpu_quantity(cpu)
    memory = res.memory or parse_memory(profile.get("memory"), f"{prefix}.memory")
    if memory:
        requests["memory"] = limits["memory"] = memory_quantity(memory)
    gpu = res.gpu or int(profile.get("gpu") or 0)
    if gpu:
        limits[str(profile.get("gpu_resource") or DEFAULT_GPU_RESOURCE)] = str(gpu)
    block: JSON = {}
    if requests:
        block["requests"] = requests
    if limits:
        block["limits"] = limits
    return block


def env_block(request: StepRequest) -> list[JSON]:
    spec = request.spec
    env: list[JSON] = [{"name": k, "value": v} for k, v in spec.env.items()]
    for name, ref in spec.secrets.items():
        if not ref.key:
            raise ConfigError(f"secrets.{name}", f"{ref.name!r} names no key; a Kubernetes secretKeyRef needs one",
                              f"use '{ref.name}/<key>'")
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    env.append({"name": "REMOTE_ML_STEP", "value": json.dumps(request.runtime_config(), sort_keys=True)})
    env.append({"name": "PYTHONUNBUFFERED", "value": "1"})
    return env


def build_pod(config: KubernetesConfig, request: StepRequest, profile: Mapping[str, Any], namespace: str) -> JSON:
    """The Pod to create for ``request`` in ``namespace``.

    Raises:
        ConfigError: a setting cannot become a valid pod (a secret without key, a local artifact root no
            volume mounts, a malformed override...).
    """
    spec = request.spec
    options = spec.options_for("kubernetes")
    profile_name = spec.resources.profile or config.default_profile
    pprefix = f"profiles.{profile_name}"
    name = request.identity.name()
    container_name = config.container_name

    labels = {**config.labels, **_string_map(profile.get("labels"), f"{pprefix}.labels"),
              **_string_map(options.get("labels"), "backend_options.kubernetes.labels"), **request.extra_labels}
    annotations = {**config.annotations, **_string_map(profile.get("annotations"), f"{pprefix}.annotations"),
                   **_string_map(options.get("annotations"), "backend_options.kubernetes.annotations")}

    container: JSON = {
        "name": container_name,
        "image": spec.image,
        "command": runtime.launch_command(config.python),
        "env": env_block(request),
        # The runtime writes its manifest there; on a crash before it can, the log tail stands in.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pull_policy = options.get("image_pull_policy") or config.image_pull_policy
    if pull_policy:
        container["imagePullPolicy"] = pull_policy
    resources = resources_block(request, profile, pprefix)
    if resources:
        container["resources"] = resources

    pod_spec: JSON = {"restartPolicy": "Never", "containers": [container]}
    volumes: list[JSON] = []
    mounts: list[JSON] = []
    av = config.artifact_volume
    if av:
        volumes.append({"name": ARTIFACT_VOLUME, "persistentVolumeClaim": {
            "claimName": av["claim_name"], **({"readOnly": True} if av.get("read_only") else {})}})
        mount: JSON = {"name": ARTIFACT_VOLUME, "mountPath": av["mount_path"]}
        if av.get("sub_path"):
            mount["subPath"] = av["sub_path"]
        if av.get("read_only"):
            mount["readOnly"] = True
        mounts.append(mount)
    if mounts:
        container["volumeMounts"] = mounts
    if volumes:
        pod_spec["volumes"] = volumes

    if spec.timeout:
        # The runtime stops the step at its timeout and records why; the deadline is the hard stop behind it.
        pod_spec["activeDeadlineSeconds"] = math.ceil(spec.timeout + config.deadline_grace_seconds)
    sa = options.get("service_account_name") or profile.get("service_account_name") or config.service_account_name
    if sa:
        pod_spec["serviceAccountName"] = sa
    pull_secrets = [*config.image_pull_secrets, *(profile.get("image_pull_secrets") or [])]
    if pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in dict.fromkeys(pull_secrets)]
    node_selector = {**config.node_selector, **_string_map(profile.get("node_selector"), f"{pprefix}.node_selector"),
                     **_string_map(options.get("node_selector"), "backend_options.kubernetes.node_selector")}
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = [*config.tolerations,
                   *_list_of_mappings(profile.get("tolerations"), f"{pprefix}.tolerations", TOLERATION_EXAMPLE),
                   *_list_of_mappings(options.get("tolerations"), "backend_options.kubernetes.tolerations",
                                      TOLERATION_EXAMPLE)]
    if tolerations:
        pod_spec["tolerations"] = tolerations
    affinity = deep_merge(_as_mapping(profile.get("affinity"), f"{pprefix}.affinity"),
                          _as_mapping(options.get("affinity"), "backend_options.kubernetes.affinity"))
    if affinity:
        pod_spec["affinity"] = affinity
    for key, field in (("priority_class_name", "priorityClassName"), ("scheduler_name", "schedulerName"),
                       ("runtime_class_name", "runtimeClassName")):
        value = options.get(key) or profile.get(key)
        if value:
            pod_spec[field] = value

    metadata: JSON = {"name": name, "namespace": namespace, "labels": labels, "annotations": {
        **annotations,
        ANNOTATION_MANIFEST: request.manifest_uri,
        ANNOTATION_OUTPUTS: ",".join(spec.outputs),
        ANNOTATION_IDENTITY: json.dumps(request.identity.to_json(), sort_keys=True),
    }}
    pod: JSON = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}

    template = deep_merge(_as_mapping(config.pod_template, "backend_config[kubernetes].pod_template"),
                          _as_mapping(options.get("pod_template"), "backend_options.kubernetes.pod_template"))
    pod = deep_merge(template, pod)
    for source, value in ((pprefix, profile.get("pod_override")),
                          ("backend_config[kubernetes]", config.pod_override),
                          ("backend_options.kubernetes", options.get("pod_override"))):
        pod = deep_merge(pod, _as_mapping(value, f"{source}.pod_override"))
    # Identity is not negotiable: it is how the pod is found, reattached and never duplicated.
    pod.setdefault("metadata", {})
    pod["metadata"]["name"] = name
    pod["metadata"]["namespace"] = namespace
    pod["metadata"]["labels"] = {**(pod["metadata"].get("labels") or {}), **identity_labels(request)}
    if not any(c.get("name") == container_name for c in (pod.get("spec") or {}).get("containers") or []):
        raise ConfigError("pod_override", f"removed the step's container {container_name!r}",
                          "override fields of the container, do not replace the containers list")
    _check_artifact_root(pod, request, container_name)
    return pod


def _check_artifact_root(pod: Mapping[str, Any], request: StepRequest, container_name: str) -> None:
    """A local artifact root must be a volume mounted at that same path, or outputs would vanish with the pod."""
    if not is_local(request.artifact_root):
        return
    root = local_path(request.artifact_root)
    container = next(c for c in pod["spec"]["containers"] if c.get("name") == container_name)
    if any(_under(root, m.get("mountPath") or "/nonexistent") for m in container.get("volumeMounts") or []):
        return
    raise ConfigError(
        "artifact_root", f"{root!r} is a local path, but no volume is mounted there in the pod",
        f"set backend_config artifact_volume={{'claim_name': '<pvc>', 'mount_path': {root!r}}} (mounted at the "
        "same path on the workers), or use an object-storage artifact root such as 's3://bucket/ml'")
