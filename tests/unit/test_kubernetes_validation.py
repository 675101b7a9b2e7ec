"""The kubernetes backend refuses before submit what kube-apiserver would refuse (issue 9, item 4).

Each case is one rule of the API server's validation (cited in ``backends/kubernetes/_validation.py``),
reached from the place a user writes it: ``backend_config``, a profile, ``backend_options.kubernetes``,
the step's secrets, or a pod override. Every case here passed ``validate()`` before, and was refused only
by the API server after submit (or crashed with a TypeError). The property test at the end feeds arbitrary
values to every option and setting and accepts nothing but a ConfigError.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_remote_ml.backends.kubernetes import KubernetesBackend, KubernetesConfig
from airflow_remote_ml.backends.kubernetes._pod import OPTION_NAMES, PROFILE_NAMES
from airflow_remote_ml.backends.kubernetes._validation import parse_quantity
from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec
from airflow_remote_ml.core.errors import ConfigError

ROOT = "s3://bucket/ml"
GOOD_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def backend(**config: Any) -> KubernetesBackend:
    try:
        return KubernetesBackend(KubernetesConfig.from_mapping({"namespace": "ml", **config}, "kubernetes"),
                                 core_v1=object())
    except ConfigError as exc:  # refused while the backend is built: earlier still than validate()
        return _Refused(exc)  # type: ignore[return-value]


class _Refused:
    """A backend whose configuration was refused when it was built: validate() raises that error."""

    def __init__(self, error: ConfigError) -> None:
        self.error = error

    def validate(self, request: Any) -> None:
        raise self.error


def req(**spec: Any) -> StepRequest:
    spec.setdefault("image", "ghcr.io/acme/train:1")
    spec.setdefault("command", ["python", "train.py"])
    return StepRequest.create(StepSpec.build(**spec), StepIdentity("dag", "train", "manual__2024-01-01T00:00:00+00:00"),
                              ArtifactStore(ROOT))


def options(**values: Any) -> StepRequest:
    return req(backend_options={"kubernetes": values})


def refused(field: str, b: KubernetesBackend, request: StepRequest) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        b.validate(request)
    assert info.value.field == field, info.value
    return info.value


def test_valid_values_from_every_source_pass() -> None:
    b = backend(labels={"example.com/team": "ml", "tier": ""}, annotations={"Example.com/Owner": "x" * 1000},
                service_account_name="ml.runner", image_pull_policy="IfNotPresent",
                image_pull_secrets=["registry-creds"], tolerations=[GOOD_TOLERATION],
                profiles={"gpu": {"requests": {"cpu": "500m", "memory": "1.5Gi", "nvidia.com/gpu": 1},
                                  "limits": {"memory": "4e9", "ephemeral-storage": "10G"}}})
    b.validate(req(resources={"profile": "gpu"}, secrets={"DB": "db-creds/pass_word.v1"},
                   backend_options={"kubernetes": {"node_selector": {"cloud.google.com/gke-nodepool": "gpu-a100"},
                                                   "tolerations": [{"key": "k", "operator": "Equal", "value": "v",
                                                                    "effect": "NoExecute", "tolerationSeconds": 60}]}}))


# -- label keys and values: IsQualifiedName / IsValidLabelValue ---------------------------------------------


@pytest.mark.parametrize("key", ["team ml", "-team", "team-", "a/b/c", "/team", "Example.com/team", "x" * 64,
                                 f"{'a' * 254}/team", "team_"])
def test_a_label_key_the_api_refuses_is_refused(key: str) -> None:
    refused(f"backend_options.kubernetes.labels.{key}", backend(), options(labels={key: "v"}))


@pytest.mark.parametrize("value", ["ml team", "-ml", "ml.", "x" * 64, "a/b"])
def test_a_label_value_the_api_refuses_is_refused(value: str) -> None:
    refused("backend_options.kubernetes.labels.team", backend(), options(labels={"team": value}))


def test_labels_from_backend_config_and_profiles_are_checked_too() -> None:
    refused("backend_config[kubernetes].labels.bad key", backend(labels={"bad key": "v"}), req())
    refused("profiles.gpu.labels.team", backend(profiles={"gpu": {"labels": {"team": "a b"}}}),
            req(resources={"profile": "gpu"}))


def test_none_or_a_list_of_labels_is_a_config_error_not_a_type_error() -> None:
    refused("backend_options.kubernetes.labels", backend(), options(labels=None))
    refused("backend_options.kubernetes.labels", backend(), options(labels=["team=ml"]))
    refused("backend_options.kubernetes.labels.team", backend(), options(labels={"team": 5}))
    # Found by the property test: the pod builder iterated these.
    refused("backend_config[kubernetes].image_pull_secrets", backend(image_pull_secrets=None), req())
    refused("backend_config[kubernetes].tolerations", backend(tolerations=None), req())


def test_annotation_keys_are_qualified_names_and_all_fit_256_kib() -> None:
    refused("backend_options.kubernetes.annotations.owner name", backend(),
            options(annotations={"owner name": "x"}))
    refused("backend_options.kubernetes.annotations", backend(),
            options(annotations={"a": "x" * 200_000, "b": "y" * 70_000}))


# -- names: IsDNS1123Label / IsDNS1123Subdomain --------------------------------------------------------------


@pytest.mark.parametrize("namespace", ["ML", "ml_jobs", "ml.jobs", "x" * 64, "-ml"])
def test_a_namespace_from_backend_config_must_be_a_dns_label(namespace: str) -> None:
    refused("backend_config[kubernetes].namespace", backend(namespace=namespace), req())


@pytest.mark.parametrize("name", ["ML-runner", "ml_runner", "ml..runner", "x" * 254])
def test_a_service_account_name_must_be_a_dns_subdomain(name: str) -> None:
    refused("backend_options.kubernetes.service_account_name", backend(), options(service_account_name=name))


def test_image_pull_secret_names_must_be_dns_subdomains() -> None:
    refused("backend_config[kubernetes].image_pull_secrets[0]", backend(image_pull_secrets=["Registry_Creds"]), req())


@pytest.mark.parametrize(("ref", "problem"), [("DB_Creds/password", "Secret name"), ("db-creds/pass:word", "Secret key"),
                                              ("db-creds/" + "k" * 254, "Secret key")])
def test_secret_names_and_keys_follow_kubernetes_rules(ref: str, problem: str) -> None:
    error = refused("secrets.DB", backend(), req(secrets={"DB": ref}))
    assert problem in error.problem


def test_env_var_names_brought_in_by_an_override_are_checked() -> None:
    override = {"spec": {"containers": [{"name": "step", "env": [{"name": "A=B", "value": "1"}]}]}}
    with pytest.raises(ConfigError) as info:
        backend().validate(options(pod_override=override))
    # The override's entry is merged by name after the step's own variables.
    assert info.value.field.startswith("pod (after pod_template/pod_override).spec.containers[0].env[")
    assert info.value.field.endswith("].name") and "'A=B'" in info.value.problem


# -- node selectors and tolerations --------------------------------------------------------------------------


def test_node_selector_keys_and_values_are_label_syntax() -> None:
    refused("backend_options.kubernetes.node_selector.pool", backend(), options(node_selector={"pool": "gpu pool"}))
    refused("backend_config[kubernetes].node_selector.bad/key/x", backend(node_selector={"bad/key/x": "v"}), req())


@pytest.mark.parametrize(("toleration", "field"), [
    ({"key": "gpu", "operator": "exists"}, "operator"),
    ({"key": "gpu", "operator": "In"}, "operator"),
    ({"key": "gpu", "effect": "NoScheduled"}, "effect"),
    ({"key": "gpu", "operator": "Exists", "value": "yes"}, "value"),
    ({"operator": "Equal", "value": "x"}, "operator"),
    ({"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 60}, "tolerationSeconds"),
    ({"key": "gpu", "effect": "NoExecute", "tolerationSeconds": "60"}, "tolerationSeconds"),
    ({"key": "bad key", "operator": "Exists"}, "key"),
    ({"key": "gpu", "value": "a b"}, "value"),
    ({"key": "gpu", "operater": "Exists"}, "operater"),
])
def test_a_toleration_the_api_refuses_is_refused(toleration: dict[str, Any], field: str) -> None:
    refused(f"backend_options.kubernetes.tolerations[0].{field}", backend(), options(tolerations=[toleration]))


def test_tolerations_from_config_and_overrides_are_checked() -> None:
    refused("backend_config[kubernetes].tolerations[0].effect",
            backend(tolerations=[{"key": "gpu", "effect": "Never"}]), req())
    refused("pod (after pod_template/pod_override).spec.tolerations[0].operator", backend(),
            options(pod_override={"spec": {"tolerations": [{"key": "g", "operator": "Maybe"}]}}))


# -- image pull policy ---------------------------------------------------------------------------------------


def test_an_image_pull_policy_from_backend_config_must_be_one_the_api_knows() -> None:
    refused("backend_config[kubernetes].image_pull_policy", backend(image_pull_policy="always"), req())
    refused("pod (after pod_template/pod_override).spec.containers[0].imagePullPolicy", backend(),
            options(pod_override={"spec": {"containers": [{"name": "step", "imagePullPolicy": "Sometimes"}]}}))


# -- quantities: resource.Quantity ---------------------------------------------------------------------------


@pytest.mark.parametrize(("resource", "value"), [("cpu", "1e400"), ("cpu", 10**400), ("memory", "1e400"),
                                                 ("memory", "4GG"), ("memory", "-1Gi"), ("cpu", "2 cores"),
                                                 ("nvidia.com/gpu", "0.5"), ("memory", float("inf")),
                                                 ("memory", "9Ei"), ("cpu", True)])
def test_an_absurd_or_malformed_quantity_in_a_profile_is_refused(resource: str, value: Any) -> None:
    refused(f"profiles.big.requests.{resource}", backend(profiles={"big": {"requests": {resource: value}}}),
            req(resources={"profile": "big"}))


def test_quantities_in_an_override_are_checked() -> None:
    override = {"spec": {"containers": [{"name": "step", "resources": {"limits": {"cpu": "lots"}}}]}}
    refused("pod (after pod_template/pod_override).spec.containers[0].resources.limits.cpu", backend(),
            options(pod_override=override))


@pytest.mark.parametrize(("text", "resource", "value"), [("500m", "cpu", "0.5"), ("1.5Gi", "memory", str(1.5 * 2**30)),
                                                         ("4e3", "memory", "4000"), ("2", "nvidia.com/gpu", "2"),
                                                         (".5", "cpu", "0.5"), ("100n", "cpu", "1E-7")])
def test_quantity_grammar_accepts_what_the_api_accepts(text: str, resource: str, value: str) -> None:
    from decimal import Decimal

    assert parse_quantity("q", text, resource) == Decimal(value)


# -- numeric settings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), [("watch_timeout", "300"), ("log_interval", float("inf")),
                                            ("delete_grace_seconds", 2.5), ("session_linger", -1)])
def test_numeric_settings_are_numbers(key: str, value: Any) -> None:
    refused(f"backend_config[kubernetes].{key}", backend(**{key: value}), req())


# -- any value: only a ConfigError ---------------------------------------------------------------------------

SOAK = os.environ.get("REMOTE_ML_FUZZ_EXAMPLES")
SETTINGS = settings(max_examples=int(SOAK or 150), derandomize=SOAK is None, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


class Opaque:
    """An object of a type no setting accepts."""


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63) + 1, 2**63 - 1), st.floats(allow_nan=False,
              allow_infinity=False), st.text(max_size=12),
              st.sampled_from(["", "Exists", "Equal", "NoSchedule", "NoExecute", "500m", "1e400", "4Gi", "step",
                               "Always", "ml", "a/b", "x" * 70])),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.sampled_from(["name", "key", "operator", "value", "effect", "cpu",
                                                                "memory", "labels", "spec", "metadata", "containers",
                                                                "env", "tolerationSeconds", "a b", "x/y"]) | st.text(
                                   max_size=6), children, max_size=3)),
    max_leaves=10)
python_values = st.one_of(json_values, st.integers(min_value=-(10**400), max_value=10**400), st.floats(),
                          st.builds(Opaque), st.lists(st.builds(Opaque), max_size=2),
                          st.dictionaries(st.integers(), json_values, max_size=2))

CONFIG_FIELDS = ["namespace", "service_account_name", "image_pull_secrets", "image_pull_policy", "labels",
                 "annotations", "node_selector", "tolerations", "default_profile", "container_name", "python",
                 "artifact_volume", "pod_template", "pod_override", "deadline_grace_seconds", "profiles"]


@SETTINGS
@given(opts=st.dictionaries(st.sampled_from(sorted(OPTION_NAMES)), json_values, max_size=4),
       profile=st.dictionaries(st.sampled_from(sorted(PROFILE_NAMES)), python_values, max_size=4),
       config=st.dictionaries(st.sampled_from(CONFIG_FIELDS), python_values, max_size=3))
def test_validate_raises_nothing_but_config_error(opts: dict[str, Any], profile: dict[str, Any],
                                                 config: dict[str, Any]) -> None:
    b = backend()
    # The constructor's own checks are not this test's subject: validate() must hold for whatever
    # configuration it is given, so the fuzzed settings are put in place after construction.
    b.config = dataclasses.replace(b.config, **{**config, "profiles": config.get("profiles", {"p": profile})})
    request = req(resources={"profile": "p"}, backend_options={"kubernetes": opts})
    try:
        b.validate(request)
    except ConfigError as exc:
        assert isinstance(exc.field, str) and isinstance(exc.problem, str)
        str(exc)
