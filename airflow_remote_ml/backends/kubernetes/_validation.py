"""What kube-apiserver would refuse in a pod, refused before submit as one ``ConfigError`` per mistake.

Each rule copies the API server's own validation, named by its upstream source:

* ``staging/src/k8s.io/apimachinery/pkg/util/validation/validation.go``: ``IsQualifiedName`` (label and
  annotation keys, node selector keys, toleration keys, resource names), ``IsValidLabelValue``,
  ``IsDNS1123Label`` (namespaces, container names), ``IsDNS1123Subdomain`` (Secret, ServiceAccount and
  PriorityClass names), ``IsConfigMapKey`` (Secret keys) and ``IsEnvVarName``.
* ``staging/src/k8s.io/apimachinery/pkg/api/validation/objectmeta.go``: ``ValidateAnnotations`` (keys are
  qualified names, lower-cased; all annotations together at most 256 KiB).
* ``pkg/apis/core/validation/validation.go``: ``validateTolerations`` (operator ``Exists``/``Equal``,
  effect ``NoSchedule``/``PreferNoSchedule``/``NoExecute``, a value only with ``Equal``, ``tolerationSeconds``
  only with ``NoExecute``, an empty key only with ``Exists``), ``validatePullPolicy`` (``Always``,
  ``IfNotPresent``, ``Never``), ``ValidateResourceRequirements`` (non-negative quantities, integer
  extended resources).
* ``staging/src/k8s.io/apimachinery/pkg/api/resource/quantity.go``: the quantity grammar
  (``<signedNumber><suffix>``, suffixes ``Ki..Ei``, ``n u m k M G T P E``, ``e<exponent>``).

Values are checked where the user wrote them (``backend_config[kubernetes]``, ``profiles.<name>``,
``backend_options.kubernetes``, ``secrets``), so the error names that place; then the built pod is checked
once more, which catches what ``pod_template``/``pod_override`` brought in. Any value of any type gives a
``ConfigError`` and nothing else (``tests/unit/test_kubernetes_validation.py`` proves it with hypothesis).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from airflow_remote_ml.core.errors import ConfigError
from airflow_remote_ml.core.validation import (
    MAX_CPU,
    MAX_GPU,
    MAX_MEMORY_BYTES,
    MAX_NESTING,
    MAX_TIMEOUT_SECONDS,
    check_numeric_settings,
    short_repr,
    type_name,
)

if TYPE_CHECKING:
    from airflow_remote_ml.backends.kubernetes._config import KubernetesConfig
    from airflow_remote_ml.core.backend import StepRequest

JSON = dict[str, Any]
CONFIG = "backend_config[kubernetes]"
OPTIONS = "backend_options.kubernetes"

# -- apimachinery/pkg/util/validation/validation.go ----------------------------------------------------------

#: ``qualifiedNameFmt`` / ``qualifiedNameMaxLength``: the name part of a label or annotation key.
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
QUALIFIED_NAME_MAX = 63
#: ``labelValueFmt`` / ``LabelValueMaxLength``: like a qualified name, and may be empty.
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_VALUE_MAX = 63
#: ``dns1123LabelFmt`` / ``DNS1123LabelMaxLength``.
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL_MAX = 63
#: ``dns1123SubdomainFmt`` / ``DNS1123SubdomainMaxLength``.
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_SUBDOMAIN_MAX = 253
#: ``configMapKeyFmt`` (IsConfigMapKey, used for Secret keys too) with ``DNS1123SubdomainMaxLength``.
_CONFIG_MAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
#: ``envVarNameFmt`` (IsEnvVarName).
_ENV_VAR_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
#: objectmeta.go ``TotalAnnotationSizeLimitB``.
ANNOTATIONS_MAX_BYTES = 256 * 1024

# -- pkg/apis/core/validation/validation.go ------------------------------------------------------------------

PULL_POLICIES = ("Always", "IfNotPresent", "Never")
TOLERATION_OPERATORS = ("Exists", "Equal")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
TOLERATION_KEYS = frozenset({"key", "operator", "value", "effect", "tolerationSeconds"})
#: Resources whose quantities need not be whole numbers (``IsIntegerResourceName`` is false for them).
_FRACTIONAL_RESOURCES = frozenset({"cpu", "memory", "ephemeral-storage", "storage"})

# -- apimachinery/pkg/api/resource/quantity.go ---------------------------------------------------------------

#: ``<signedNumber><suffix>``; the exponent of ``<decimalExponent>`` is parsed as an integer there.
_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_SUFFIX = {"": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": Decimal("1e3"),
           "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"), "P": Decimal("1e15"), "E": Decimal("1e18"),
           **{f"{p}i": Decimal(1024 ** (i + 1)) for i, p in enumerate("KMGTPE")}}
#: The scheduler and kubelet read quantities as int64 (milli-)values; past this they overflow.
_MAX_QUANTITY = {"cpu": Decimal(MAX_CPU), "memory": Decimal(MAX_MEMORY_BYTES)}
_MAX_OTHER_QUANTITY = Decimal(2**63 - 1)


# -- the name rules ------------------------------------------------------------------------------------------


def _text(field: str, value: Any, what: str, example: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(field, f"expected {what} as a string, got {type_name(value)} {short_repr(value)}",
                          f"use e.g. {example}")
    return value


def check_qualified_name(field: str, value: Any, what: str = "key", example: str = "'team' or 'example.com/team'",
                         ) -> str:
    """``IsQualifiedName``: ``[prefix/]name``, prefix a DNS-1123 subdomain, name <= 63 of ``[-A-Za-z0-9_.]``."""
    key = _text(field, value, what, example)
    prefix, slash, name = key.rpartition("/")
    if slash and not prefix:
        raise ConfigError(field, f"{short_repr(key)} has an empty prefix before '/'", f"use e.g. {example}")
    if slash and (len(prefix) > DNS1123_SUBDOMAIN_MAX or not _DNS1123_SUBDOMAIN.match(prefix)):
        raise ConfigError(field, f"the prefix of {short_repr(key)} is not a lower-case DNS subdomain of at most "
                          f"{DNS1123_SUBDOMAIN_MAX} characters", f"use e.g. {example}")
    if not name:
        raise ConfigError(field, f"{short_repr(key)} has an empty name", f"use e.g. {example}")
    if len(name) > QUALIFIED_NAME_MAX:
        raise ConfigError(field, f"the name part of {short_repr(key)} is longer than {QUALIFIED_NAME_MAX} characters",
                          "shorten it")
    if not _QUALIFIED_NAME.match(name):
        raise ConfigError(field, f"{short_repr(key)} must be letters, digits, '-', '_' or '.', starting and ending "
                          "with a letter or digit", f"use e.g. {example}")
    return key


def check_label_value(field: str, value: Any) -> str:
    """``IsValidLabelValue``: at most 63 of ``[-A-Za-z0-9_.]``, starting and ending alphanumeric, or empty."""
    text = _text(field, value, "a label value", "'ml'")
    if len(text) > LABEL_VALUE_MAX:
        raise ConfigError(field, f"{short_repr(text)} is longer than {LABEL_VALUE_MAX} characters", "shorten it")
    if not _LABEL_VALUE.match(text):
        raise ConfigError(field, f"{short_repr(text)} must be letters, digits, '-', '_' or '.', starting and "
                          "ending with a letter or digit (or empty)", "use e.g. 'ml-team'")
    return text


def check_dns_label(field: str, value: Any, what: str, example: str) -> str:
    """``IsDNS1123Label``: at most 63 of ``[a-z0-9-]``, starting and ending alphanumeric."""
    text = _text(field, value, what, example)
    if len(text) > DNS1123_LABEL_MAX or not _DNS1123_LABEL.match(text):
        raise ConfigError(field, f"{short_repr(text)} is not a valid {what}: at most {DNS1123_LABEL_MAX} lower-case "
                          "letters, digits and '-', starting and ending with a letter or digit", f"use e.g. {example}")
    return text


def check_dns_subdomain(field: str, value: Any, what: str, example: str) -> str:
    """``IsDNS1123Subdomain``: at most 253 of ``[a-z0-9-.]``, dot-separated DNS labels."""
    text = _text(field, value, what, example)
    if len(text) > DNS1123_SUBDOMAIN_MAX or not _DNS1123_SUBDOMAIN.match(text):
        raise ConfigError(field, f"{short_repr(text)} is not a valid {what}: at most {DNS1123_SUBDOMAIN_MAX} "
                          "lower-case letters, digits, '-' and '.', starting and ending with a letter or digit",
                          f"use e.g. {example}")
    return text


def check_secret_key(field: str, value: Any) -> str:
    """``IsConfigMapKey`` (Secret data keys use it too): ``[-._a-zA-Z0-9]+``, at most 253, not '.'/'..'."""
    text = _text(field, value, "a Secret key", "'password'")
    if len(text) > DNS1123_SUBDOMAIN_MAX or not _CONFIG_MAP_KEY.match(text) or text in (".", ".."):
        raise ConfigError(field, f"{short_repr(text)} is not a valid Secret key: at most {DNS1123_SUBDOMAIN_MAX} "
                          "letters, digits, '-', '_' or '.'", "use the key as it appears in the Secret's data")
    return text


def check_env_name(field: str, value: Any) -> str:
    """``IsEnvVarName``: ``[-._a-zA-Z][-._a-zA-Z0-9]*``."""
    text = _text(field, value, "an environment variable name", "'MODE'")
    if not _ENV_VAR_NAME.match(text):
        raise ConfigError(field, f"{short_repr(text)} is not a valid environment variable name",
                          "use letters, digits, '_', '-' or '.', not starting with a digit")
    return text


# -- maps and lists ------------------------------------------------------------------------------------------


def _mapping(field: str, value: Any, example: str, *, none: bool = True) -> Mapping[Any, Any]:
    if value is None:
        if not none:
            raise ConfigError(field, "is None", f"use e.g. {example}, or {{}} / leave it out for none")
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(field, f"expected a mapping, got {type_name(value)} {short_repr(value)}",
                          f"use e.g. {example}")
    return value


def check_labels(field: str, value: Any, *, none: bool = True) -> dict[str, str]:
    """Label keys are qualified names and values label values (metav1 ``ValidateLabels``)."""
    labels = _mapping(field, value, "{'team': 'ml'}", none=none)
    for key, item in labels.items():
        name = check_qualified_name(f"{field}.{short_repr(key)}" if not isinstance(key, str) else f"{field}.{key}",
                                    key, "a label key")
        check_label_value(f"{field}.{name}", item)
    return dict(labels)


def check_annotations(field: str, value: Any, *, none: bool = True) -> dict[str, str]:
    """``ValidateAnnotations``: lower-cased keys are qualified names; values strings; 256 KiB in total."""
    annotations = _mapping(field, value, "{'example.com/owner': 'ml'}", none=none)
    total = 0
    for key, item in annotations.items():
        if not isinstance(key, str):
            raise ConfigError(f"{field}.{short_repr(key)}", f"the key {short_repr(key)} is a {type_name(key)}",
                              "use strings as keys")
        check_qualified_name(f"{field}.{key}", key.lower(), "an annotation key", "'example.com/owner'")
        text = _text(f"{field}.{key}", item, "an annotation value", "'ml'")
        total += len(key.encode("utf-8", "surrogatepass")) + len(text.encode("utf-8", "surrogatepass"))
    if total > ANNOTATIONS_MAX_BYTES:
        raise ConfigError(field, f"the annotations take {total} bytes, more than the {ANNOTATIONS_MAX_BYTES} "
                          "Kubernetes allows", "store large values elsewhere (an artifact) and annotate a link")
    return dict(annotations)


def check_node_selector(field: str, value: Any, *, none: bool = True) -> dict[str, str]:
    """``nodeSelector`` is validated as labels (``ValidatePodSpec`` calls ``ValidateLabels`` on it)."""
    selector = _mapping(field, value, "{'pool': 'gpu'}", none=none)
    for key, item in selector.items():
        name = check_qualified_name(f"{field}.{key}" if isinstance(key, str) else f"{field}.{short_repr(key)}",
                                    key, "a node selector key", "'cloud.google.com/gke-nodepool'")
        check_label_value(f"{field}.{name}", item)
    return dict(selector)


def check_tolerations(field: str, value: Any, *, none: bool = True) -> None:
    """``validateTolerations`` of ``pkg/apis/core/validation/validation.go``."""
    example = "[{'key': 'gpu', 'operator': 'Exists', 'effect': 'NoSchedule'}]"
    if value is None:
        if not none:
            raise ConfigError(field, "is None", f"use e.g. {example}, or [] / leave it out for none")
        return
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ConfigError(field, f"expected a list of tolerations, got {type_name(value)} {short_repr(value)}",
                          f"use e.g. {example}")
    for i, toleration in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(toleration, Mapping):
            raise ConfigError(name, f"expected a mapping, got {type_name(toleration)} {short_repr(toleration)}",
                              f"use e.g. {example}")
        for key in toleration:
            if key not in TOLERATION_KEYS:
                raise ConfigError(f"{name}.{key}" if isinstance(key, str) else name,
                                  f"{short_repr(key)} is not a field of a toleration",
                                  f"use {', '.join(sorted(TOLERATION_KEYS))}")
        key = toleration.get("key") or ""
        if key:
            check_qualified_name(f"{name}.key", key, "a taint key", "'nvidia.com/gpu'")
        elif not isinstance(key, str):
            raise ConfigError(f"{name}.key", f"{short_repr(key)} is not a taint key", "use a string")
        operator = toleration.get("operator") or "Equal"
        if operator not in TOLERATION_OPERATORS:
            raise ConfigError(f"{name}.operator", f"{short_repr(operator)} is not a toleration operator",
                              "use 'Exists' or 'Equal'")
        if not key and operator != "Exists":
            raise ConfigError(f"{name}.operator", "must be 'Exists' when the key is empty (it then matches every "
                              "taint)", "set operator='Exists', or name the taint's key")
        tvalue = toleration.get("value")
        if operator == "Exists" and tvalue not in (None, ""):
            raise ConfigError(f"{name}.value", "must be empty when the operator is 'Exists'",
                              "drop the value, or use operator='Equal'")
        if operator == "Equal" and tvalue is not None:
            check_label_value(f"{name}.value", tvalue)
        effect = toleration.get("effect") or ""
        if effect and effect not in TAINT_EFFECTS:
            raise ConfigError(f"{name}.effect", f"{short_repr(effect)} is not a taint effect",
                              f"use one of {', '.join(TAINT_EFFECTS)} (or leave it out to match all)")
        seconds = toleration.get("tolerationSeconds")
        if seconds is not None:
            if isinstance(seconds, bool) or not isinstance(seconds, int) or abs(seconds) > 2**63 - 1:
                raise ConfigError(f"{name}.tolerationSeconds", f"{short_repr(seconds)} is not a whole number of "
                                  "seconds (int64)", "use e.g. 300")
            if effect != "NoExecute":
                raise ConfigError(f"{name}.tolerationSeconds", "is only allowed with effect 'NoExecute'",
                                  "set effect='NoExecute' or drop tolerationSeconds")


def check_pull_policy(field: str, value: Any) -> None:
    if value is not None and value not in PULL_POLICIES:
        raise ConfigError(field, f"{short_repr(value)} is not an image pull policy",
                          "use Always, IfNotPresent or Never")


def _names(field: str, value: Any, what: str, example: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ConfigError(field, f"expected a list of {what}s, got {type_name(value)} {short_repr(value)}",
                          f"use e.g. [{example}]")
    return [check_dns_subdomain(f"{field}[{i}]", item, what, example) for i, item in enumerate(value)]


# -- quantities ----------------------------------------------------------------------------------------------


def parse_quantity(field: str, value: Any, resource: str) -> Decimal:
    """A Kubernetes quantity (``quantity.go`` grammar), non-negative and small enough to be used.

    A JSON number is accepted as the API does (``Quantity.UnmarshalJSON`` parses its text). Beyond the
    grammar, values the scheduler cannot hold in int64 (``10**400``, ``'1e400'``) are refused, and extended
    resources (a GPU) must be whole numbers (``IsIntegerResourceName``).
    """
    fix = "use e.g. '500m' or 2 for cpu, '4Gi' for memory" if resource in ("cpu", "memory") else "use e.g. 1"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(field, f"{short_repr(value)} is not a quantity", fix)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(field, f"{value!r} is not a quantity", fix)
    if isinstance(value, int):
        if abs(value) > _MAX_OTHER_QUANTITY:
            raise ConfigError(field, f"{short_repr(value)} is too large", fix)
        number = Decimal(value)
    else:
        text = value if isinstance(value, str) else repr(value)
        match = _QUANTITY.match(text)
        if match is None:
            raise ConfigError(field, f"{short_repr(value)} is not a Kubernetes quantity", fix)
        digits, suffix = match.group(1), match.group(2) or ""
        try:
            base = Decimal(digits)
            if suffix[:1] in ("e", "E"):
                exponent = int(suffix[1:]) if len(suffix) < 12 else None
                if exponent is None or abs(exponent) > 100:
                    raise ConfigError(field, f"{short_repr(value)} is out of range", fix)
                number = base.scaleb(exponent)
            else:
                number = base * _SUFFIX[suffix]
        except (InvalidOperation, ValueError):
            raise ConfigError(field, f"{short_repr(value)} is not a Kubernetes quantity", fix) from None
    if number < 0:
        raise ConfigError(field, f"{short_repr(value)} is negative", fix)
    maximum = _MAX_QUANTITY.get(resource, _MAX_OTHER_QUANTITY)
    if number > maximum:
        raise ConfigError(field, f"{short_repr(value)} is more than the maximum of {maximum:g}", fix)
    if resource not in _FRACTIONAL_RESOURCES and number != number.to_integral_value():
        raise ConfigError(field, f"{short_repr(value)} must be a whole number for {resource}", "use e.g. 1")
    return number


def check_resource_map(field: str, value: Any) -> None:
    """``requests``/``limits``: resource names (qualified names) to quantities."""
    resources = _mapping(field, value, "{'cpu': '2', 'memory': '4Gi'}")
    for name, quantity in resources.items():
        resource = check_qualified_name(f"{field}.{name}" if isinstance(name, str) else field, name,
                                        "a resource name", "'cpu', 'memory' or 'nvidia.com/gpu'")
        parse_quantity(f"{field}.{resource}", quantity, resource)


# -- the sources ---------------------------------------------------------------------------------------------

_NAME_RULES = {
    "service_account_name": ("ServiceAccount name", "'ml-runner'"),
    "priority_class_name": ("PriorityClass name", "'high-priority'"),
    "runtime_class_name": ("RuntimeClass name", "'nvidia'"),
    "scheduler_name": ("scheduler name", "'default-scheduler'"),
}


def check_pod_settings(prefix: str, settings: Mapping[str, Any]) -> None:
    """The fields a profile, the configuration or a step's options share, each as the API would check it."""
    for key, value in settings.items():
        name = f"{prefix}.{key}"
        # None is refused, not read as "none": the pod builder and the profile checks iterate these.
        if key == "labels":
            check_labels(name, value, none=False)
        elif key == "annotations":
            check_annotations(name, value, none=False)
        elif key == "node_selector":
            check_node_selector(name, value, none=False)
        elif key == "tolerations":
            check_tolerations(name, value, none=False)
        elif key == "namespace" and value is not None:
            check_dns_label(name, value, "namespace name", "'ml-jobs'")
        elif key in _NAME_RULES and value is not None:
            check_dns_subdomain(name, value, *_NAME_RULES[key])
        elif key == "image_pull_policy":
            check_pull_policy(name, value)
        elif key == "image_pull_secrets":
            _names(name, value, "Secret name", "'registry-creds'")
        elif key in ("requests", "limits"):
            check_resource_map(name, value)
        elif key in ("cpu", "memory") and value is not None:
            parse_quantity(name, value, key)
        elif key == "gpu" and value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_GPU:
                raise ConfigError(name, f"{short_repr(value)} is not a GPU count",
                                  f"use a whole number from 0 to {MAX_GPU}")
        elif key == "gpu_resource" and value is not None:
            check_qualified_name(name, value, "an extended resource name", "'nvidia.com/gpu'")
        elif key in ("affinity", "pod_override", "pod_template"):
            check_pod_document(name, value)


def check_pod_document(field: str, value: Any) -> None:
    """A pod template/override/affinity: a mapping (or YAML text of one) the merge can handle.

    The merge indexes lists of named mappings by ``name`` (a strategic merge), so a name there must be a
    string; and nothing may be nested deeper than JSON travels.
    """
    if value is None:
        return
    if isinstance(value, str):  # a pod template file's content: the builder parses it the same way
        import yaml

        try:
            value = yaml.safe_load(value)
        except (yaml.YAMLError, RecursionError, ValueError) as exc:
            raise ConfigError(field, f"is not valid YAML ({short_repr(str(exc), 120)})",
                              "give a mapping in the Pod's JSON shape") from None
        if value is None:
            return
    if not isinstance(value, Mapping):
        raise ConfigError(field, f"expected a mapping, got {type_name(value)} {short_repr(value)}",
                          "give a mapping in the Pod's JSON shape, e.g. {'spec': {'hostNetwork': True}}")
    _check_document(field, value, 0)
    if not field.endswith(".affinity"):
        _check_pod_shape(field, value)


def _check_pod_shape(field: str, pod: Mapping[str, Any]) -> None:
    """The parts of a pod the builder reads back after merging must keep their types."""
    for key in ("metadata", "spec"):
        if pod.get(key) is not None and not isinstance(pod[key], Mapping):
            raise ConfigError(f"{field}.{key}", f"expected a mapping, got {type_name(pod[key])}",
                              "give the Pod's JSON shape")
    meta = pod.get("metadata") or {}
    for key in ("labels", "annotations"):
        if meta.get(key) is not None and not isinstance(meta[key], Mapping):
            raise ConfigError(f"{field}.metadata.{key}", f"expected a mapping, got {type_name(meta[key])}",
                              "use {'key': 'value'}")
    spec = pod.get("spec") or {}
    containers = spec.get("containers")
    if containers is None:
        return
    if not isinstance(containers, list) or not all(isinstance(c, Mapping) for c in containers):
        raise ConfigError(f"{field}.spec.containers", "is not a list of containers",
                          "use [{'name': 'step', ...}] to override fields of the step's container")
    for i, container in enumerate(containers):
        mounts = container.get("volumeMounts")
        if mounts is None:
            continue
        if not isinstance(mounts, list) or not all(isinstance(m, Mapping) and isinstance(m.get("mountPath"), str)
                                                   for m in mounts):
            raise ConfigError(f"{field}.spec.containers[{i}].volumeMounts", "is not a list of mounts with a "
                              "mountPath", "use [{'name': 'data', 'mountPath': '/data'}]")


def _check_document(field: str, value: Any, depth: int) -> None:
    if depth > MAX_NESTING:
        raise ConfigError(field, f"is nested more than {MAX_NESTING} levels deep (or refers to itself)",
                          "flatten it")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{field}.{short_repr(key)}", f"the key {short_repr(key)} is a {type_name(key)}",
                                  "use strings as keys")
            _check_document(f"{field}.{key}", item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if isinstance(item, Mapping) and "name" in item and not isinstance(item["name"], str):
                raise ConfigError(f"{field}[{i}].name", f"{short_repr(item['name'])} is not a name",
                                  "use a string")
            _check_document(f"{field}[{i}]", item, depth + 1)


def _number(field: str, value: Any, *, minimum: float, maximum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            isinstance(value, int) or math.isfinite(value)) or not minimum <= value <= maximum:
        raise ConfigError(field, f"{short_repr(value)} is not a number from {minimum:g} to {maximum:g}",
                          "fix the value")


def check_numbers(config: Any) -> None:
    """Every numeric setting is a number in range (the shared check, named for this backend)."""
    check_numeric_settings(config, CONFIG)


def check_config(config: KubernetesConfig) -> None:
    """The configuration's pod settings and profiles, as the API server would check them."""
    check_numbers(config)
    from airflow_remote_ml.backends.kubernetes._pod import PROFILE_NAMES
    from airflow_remote_ml.core.spec import reject_unknown_options

    if config.image_pull_secrets is None:  # the builder iterates it (a profile's None means none)
        raise ConfigError(f"{CONFIG}.image_pull_secrets", "is None", "use [] or leave it out for none")
    check_pod_settings(CONFIG, {
        "namespace": config.namespace, "service_account_name": config.service_account_name,
        "image_pull_policy": config.image_pull_policy, "image_pull_secrets": config.image_pull_secrets,
        "labels": config.labels, "annotations": config.annotations, "node_selector": config.node_selector,
        "tolerations": config.tolerations, "pod_template": config.pod_template, "pod_override": config.pod_override,
    })
    if not isinstance(config.container_name, str) or not config.container_name:
        raise ConfigError(f"{CONFIG}.container_name", f"{short_repr(config.container_name)} is not a name",
                          "use e.g. 'step'")
    check_dns_label(f"{CONFIG}.container_name", config.container_name, "container name", "'step'")
    if not isinstance(config.python, str) or not config.python.strip():
        raise ConfigError(f"{CONFIG}.python", f"{short_repr(config.python)} is not an interpreter",
                          "use e.g. 'python3'")
    _number(f"{CONFIG}.deadline_grace_seconds", config.deadline_grace_seconds, minimum=0,
            maximum=MAX_TIMEOUT_SECONDS)
    if config.artifact_volume is not None:
        volume = _mapping(f"{CONFIG}.artifact_volume", config.artifact_volume,
                          "{'claim_name': 'ml-artifacts', 'mount_path': '/artifacts'}")
        reject_unknown_options(f"{CONFIG}.artifact_volume", volume, {"claim_name", "mount_path", "sub_path",
                                                                       "read_only"})
        check_dns_subdomain(f"{CONFIG}.artifact_volume.claim_name", volume.get("claim_name"),
                            "PersistentVolumeClaim name", "'ml-artifacts'")
        mount = volume.get("mount_path")
        if not isinstance(mount, str) or not mount.startswith("/"):
            raise ConfigError(f"{CONFIG}.artifact_volume.mount_path", f"{short_repr(mount)} is not an absolute path",
                              "use the artifact root's path, e.g. '/artifacts'")
        if volume.get("sub_path") is not None and not isinstance(volume.get("sub_path"), str):
            raise ConfigError(f"{CONFIG}.artifact_volume.sub_path", "is not a path", "use a relative path")
    profiles = _mapping("profiles", config.profiles, "{'gpu': {'node_selector': {'pool': 'gpu'}}}")
    for name, settings in profiles.items():
        prefix = f"profiles.{name}" if isinstance(name, str) else f"profiles.{short_repr(name)}"
        if not isinstance(name, str):
            raise ConfigError(prefix, f"the profile name {short_repr(name)} is a {type_name(name)}", "use a string")
        reject_unknown_options(prefix, settings or {}, set(PROFILE_NAMES))
        check_pod_settings(prefix, settings or {})
    if config.default_profile is not None and not isinstance(config.default_profile, str):
        raise ConfigError(f"{CONFIG}.default_profile", f"{short_repr(config.default_profile)} is not a profile name",
                          "name one of the profiles")


def check_sources(config: KubernetesConfig, request: StepRequest) -> None:
    """The configuration, the step's options, secrets and env: each value where the user wrote it."""
    check_config(config)
    check_pod_settings(OPTIONS, request.spec.options_for("kubernetes"))
    for name, ref in request.spec.secrets.items():
        # env[].valueFrom.secretKeyRef: name is a Secret's (ValidateSecretName), key IsConfigMapKey.
        check_dns_subdomain(f"secrets.{name}", ref.name, "Secret name", "'db-creds/password'")
        if ref.key is not None:
            check_secret_key(f"secrets.{name}", ref.key)
    for name in request.spec.env:
        check_env_name(f"env.{name}", name)


def check_request(config: KubernetesConfig, request: StepRequest, profile: Mapping[str, Any]) -> JSON:
    """Build ``request``'s pod (after :func:`check_sources`) and check it as a whole; returns the pod."""
    from airflow_remote_ml.backends.kubernetes._pod import build_pod

    namespace = config.namespace or "default"
    pod = build_pod(config, request, profile, namespace)
    check_pod(pod, config.container_name)
    return pod


def check_pod(pod: Mapping[str, Any], container_name: str) -> None:
    """The merged pod, for what ``pod_template``/``pod_override`` may have brought in."""
    where = "pod (after pod_template/pod_override)"
    meta = _mapping(f"{where}.metadata", pod.get("metadata"), "{'labels': {}}")
    check_labels(f"{where}.metadata.labels", meta.get("labels"))
    check_annotations(f"{where}.metadata.annotations", meta.get("annotations"))
    spec = _mapping(f"{where}.spec", pod.get("spec"), "{'containers': [...]}")
    check_node_selector(f"{where}.spec.nodeSelector", spec.get("nodeSelector"))
    check_tolerations(f"{where}.spec.tolerations", spec.get("tolerations"))
    for key, (what, example) in (("serviceAccountName", _NAME_RULES["service_account_name"]),
                                 ("priorityClassName", _NAME_RULES["priority_class_name"])):
        if spec.get(key) is not None:
            check_dns_subdomain(f"{where}.spec.{key}", spec[key], what, example)
    containers = spec.get("containers")
    if not isinstance(containers, list):
        raise ConfigError(f"{where}.spec.containers", "is not a list", "override fields of the step's container")
    for i, container in enumerate(containers):
        field = f"{where}.spec.containers[{i}]"
        if not isinstance(container, Mapping):
            raise ConfigError(field, f"{short_repr(container)} is not a container", "use a mapping")
        check_dns_label(f"{field}.name", container.get("name"), "container name", f"{container_name!r}")
        check_pull_policy(f"{field}.imagePullPolicy", container.get("imagePullPolicy"))
        resources = _mapping(f"{field}.resources", container.get("resources"), "{'limits': {'cpu': '2'}}")
        check_resource_map(f"{field}.resources.requests", resources.get("requests"))
        check_resource_map(f"{field}.resources.limits", resources.get("limits"))
        env = container.get("env") or []
        if not isinstance(env, list):
            raise ConfigError(f"{field}.env", "is not a list", "use [{'name': 'X', 'value': '1'}]")
        for j, item in enumerate(env):
            if not isinstance(item, Mapping):
                raise ConfigError(f"{field}.env[{j}]", f"{short_repr(item)} is not a variable", "use a mapping")
            check_env_name(f"{field}.env[{j}].name", item.get("name"))
