"""The databricks backend refuses before submit what the Jobs API would refuse (issue 9, item 4).

Each case is a documented rule of a ``runs/submit`` field (cited in ``backends/databricks/_validation.py``),
reached from where a user writes it: ``backend_config``, a profile, ``backend_options.databricks`` or the
step's secrets. Every case passed ``validate()`` before (and failed remotely, or crashed with a TypeError,
ValueError or AttributeError). The property test at the end accepts nothing but a ConfigError.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_remote_ml.backends.databricks import DatabricksBackend, DatabricksConfig
from airflow_remote_ml.backends.databricks._payload import NEW_CLUSTER_KEYS, OPTION_NAMES, PROFILE_KEYS
from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec
from airflow_remote_ml.core.errors import ConfigError

CLUSTER = {"spark_version": "15.4.x-scala2.12", "node_type_id": "i3.xlarge", "num_workers": 1}
IDENTITY = StepIdentity("dag", "features", "manual__2026-01-01", 3, 1)
OPTS = "backend_options.databricks"
CFG = "backend_config[databricks]"


def backend(**settings: Any) -> DatabricksBackend:
    settings.setdefault("new_cluster", dict(CLUSTER))
    try:
        return DatabricksBackend(DatabricksConfig.from_mapping(settings, "databricks"))
    except ConfigError as exc:  # refused while the backend is built: earlier still than validate()
        return _Refused(exc)  # type: ignore[return-value]


class _Refused:
    """A backend whose configuration was refused when it was built: validate() raises that error."""

    def __init__(self, error: ConfigError) -> None:
        self.error = error

    def validate(self, request: Any) -> None:
        raise self.error


def req(**spec: Any) -> StepRequest:
    spec.setdefault("command", ["python3", "-c", "print(1)"])
    return StepRequest.create(StepSpec.build(**spec), IDENTITY, ArtifactStore("s3://bucket/ml"))


def options(**values: Any) -> StepRequest:
    return req(backend_options={"databricks": values})


def refused(field: str, b: DatabricksBackend, request: StepRequest) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        b.validate(request)
    assert info.value.field == field, info.value
    return info.value


def test_valid_values_from_every_source_pass() -> None:
    b = backend(libraries=[{"pypi": {"package": "pandas==2.2.2"}}, {"whl": "/Volumes/main/libs/a.whl"},
                           {"maven": {"coordinates": "org.jsoup:jsoup:1.7.2", "exclusions": ["slf4j:slf4j"]}}],
                profiles={"big": {"node_type_id": "i3.2xlarge", "autoscale": {"min_workers": 1, "max_workers": 8},
                                  "custom_tags": {"team": "ml"}}})
    b.validate(req(resources={"profile": "big"}, secrets={"TOKEN": "ml-scope/api.token_v1"},
                   backend_options={"databricks": {"spark_env_vars": {"MODE": "fast"}, "num_workers": 0,
                                                   "libraries": [{"cran": {"package": "forecast"}}]}}))


# -- cluster shape -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["many", -1, 2.5, True, 2**31])
def test_num_workers_is_a_non_negative_int32(value: Any) -> None:
    refused(f"{OPTS}.num_workers", backend(), options(num_workers=value))


def test_num_workers_in_backend_config_and_profiles_is_checked() -> None:
    refused(f"{CFG}.new_cluster.num_workers", backend(new_cluster={**CLUSTER, "num_workers": "many"}), req())
    refused(f"{CFG}.profiles.big.num_workers", backend(profiles={"big": {"num_workers": "4"}}),
            req(resources={"profile": "big"}))


@pytest.mark.parametrize(("autoscale", "field"), [
    ({"min_workers": 4, "max_workers": 2}, "max_workers"),
    ({"min_workers": 2, "max_workers": 2}, "max_workers"),
    ({"min_workers": 1}, "max_workers"),
    ({"min_workers": -1, "max_workers": 2}, "min_workers"),
    ({"min_workers": "1", "max_workers": 2}, "min_workers"),
])
def test_autoscale_needs_whole_min_below_max(autoscale: dict[str, Any], field: str) -> None:
    refused(f"{OPTS}.autoscale.{field}", backend(), options(autoscale=autoscale))


def test_autoscale_must_be_a_mapping_with_known_keys() -> None:
    refused(f"{OPTS}.autoscale", backend(), options(autoscale=[1, 4]))
    refused(f"{OPTS}.autoscale.max", backend(), options(autoscale={"min_workers": 1, "max": 4}))


@pytest.mark.parametrize("key", ["spark_version", "node_type_id"])
def test_spark_version_and_node_type_are_strings(key: str) -> None:
    refused(f"{OPTS}.{key}", backend(), options(**{key: 15.4}))
    refused(f"{CFG}.new_cluster.{key}", backend(new_cluster={**CLUSTER, key: ["a"]}), req())


@pytest.mark.parametrize("key", ["spark_env_vars", "custom_tags", "spark_conf"])
def test_string_maps_are_mappings_of_strings(key: str) -> None:
    refused(f"{OPTS}.new_cluster.{key}.N", backend(), options(new_cluster={key: {"N": 1}}))
    refused(f"{CFG}.profiles.p.{key}", backend(profiles={"p": {key: "N=1"}}), req(resources={"profile": "p"}))


def test_a_list_of_env_vars_is_a_config_error_with_the_mapping_fix() -> None:
    error = refused(f"{OPTS}.spark_env_vars", backend(), options(spark_env_vars=["MODE=fast"]))
    assert "not a list of 'NAME=value' strings" in (error.fix or "")


def test_existing_cluster_and_new_cluster_are_exclusive() -> None:
    refused(f"{OPTS}.existing_cluster_id", backend(),
            options(existing_cluster_id="0923-164208-meows279", new_cluster={"num_workers": 2}))
    refused(f"{OPTS}.existing_cluster_id", backend(), options(existing_cluster_id="0923-164208-meows279",
                                                              num_workers=2))
    refused(f"{CFG}.profiles.p.existing_cluster_id",
            backend(profiles={"p": {"existing_cluster_id": "0923-164208-meows279", "node_type_id": "i3.xlarge"}}),
            req(resources={"profile": "p"}))
    # In the settings both are a layered configuration (the deployment's new_cluster, a task's existing
    # cluster): the existing cluster wins, as _payload.resolve_compute documents.
    backend(existing_cluster_id="0923-164208-meows279").validate(req())


def test_none_where_a_list_belongs_is_a_config_error() -> None:
    # Found by the property test: the payload builder iterated these.
    refused(f"{CFG}.python_path", backend(python_path=None), req())
    refused(f"{CFG}.libraries", backend(libraries=None), req())


def test_existing_cluster_id_is_a_string() -> None:
    refused(f"{OPTS}.existing_cluster_id", backend(), options(existing_cluster_id=1234))


# -- libraries -----------------------------------------------------------------------------------------------


def test_a_library_string_is_refused_with_the_library_spec_fix() -> None:
    error = refused(f"{OPTS}.libraries", backend(), options(libraries="pandas"))
    assert error.fix == "use [{'pypi': {'package': 'pandas'}}]"
    error = refused(f"{OPTS}.libraries[0]", backend(), options(libraries=["pandas"]))
    assert error.fix == "use {'pypi': {'package': 'pandas'}}"


@pytest.mark.parametrize(("library", "field"), [
    ({"pypi": "pandas"}, "[0].pypi"),
    ({"pypi": {"name": "pandas"}}, "[0].pypi.name"),
    ({"pypi": {"package": "pandas"}, "whl": "/x.whl"}, "[0]"),
    ({"npm": {"package": "left-pad"}}, "[0].npm"),
    ({"maven": {"coordinates": 1}}, "[0].maven.coordinates"),
    ({"jar": ""}, "[0].jar"),
])
def test_a_library_spec_has_exactly_one_kind_of_the_right_shape(library: dict[str, Any], field: str) -> None:
    refused(f"{CFG}.libraries{field}", backend(libraries=[library]), req())


# -- secrets -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["ml}}scope/key", "ml-scope/key}}", "ml-scope/k{ey", "ml scope/key".replace(" ", "$"),
                                 "s" * 129 + "/key", "ml-scope/ключ"])
def test_a_secret_scope_or_key_that_cannot_be_referenced_is_refused(ref: str) -> None:
    error = refused("secrets.TOKEN", backend(), req(secrets={"TOKEN": ref}))
    assert "{{secrets/<scope>/<key>}}" in error.problem


# -- run and task fields -------------------------------------------------------------------------------------


@pytest.mark.parametrize("grace", [float("inf"), float("nan"), -1, "60", 10**12, 10**400])
def test_timeout_seconds_stays_a_non_negative_int32(grace: Any) -> None:
    refused(f"{CFG}.timeout_grace_seconds", backend(timeout_grace_seconds=grace), req(timeout=600))


def test_task_parameters_are_strings() -> None:
    refused(f"{OPTS}.parameters[1]", backend(), options(parameters=["--epochs", 3]))
    refused(f"{OPTS}.parameters", backend(), options(parameters="--epochs 3"))
    refused(f"{OPTS}.base_parameters.epochs", backend(),
            options(task="notebook_task", notebook_path="/Workspace/nb", base_parameters={"epochs": {"n": 3}}))


def test_task_fields_are_strings_and_sources_known() -> None:
    refused(f"{OPTS}.python_file", backend(), options(python_file=["/Workspace/a.py"]))
    refused(f"{OPTS}.source", backend(), options(python_file="/Workspace/a.py", source="git"))
    refused(f"{OPTS}.python_path", backend(), options(python_path="/Workspace/Shared"))


def test_node_type_catalogue_entries_are_checked() -> None:
    refused(f"{CFG}.node_types[0].gpu", backend(node_types=[{"node_type_id": "g5", "cpu": 4, "gpu": "one"}]),
            req(resources={"cpu": 2}))


# -- numeric settings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), [("poll_cap", "30"), ("find_max_pages", 2.5), ("watch_interval", -1.0),
                                            ("find_lookback_hours", float("nan"))])
def test_numeric_settings_are_numbers(key: str, value: Any) -> None:
    refused(f"{CFG}.{key}", backend(**{key: value}), req())


# -- any value: only a ConfigError ---------------------------------------------------------------------------

SOAK = os.environ.get("REMOTE_ML_FUZZ_EXAMPLES")
SETTINGS = settings(max_examples=int(SOAK or 150), derandomize=SOAK is None, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


class Opaque:
    """An object of a type no setting accepts."""


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63) + 1, 2**63 - 1),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
              st.sampled_from(["", "pandas", "15.4.x-scala2.12", "i3.xlarge", "notebook_task", "WORKSPACE", "many",
                               "MODE=fast"])),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.sampled_from(["pypi", "package", "whl", "maven", "coordinates",
                                                                "min_workers", "max_workers", "num_workers", "MODE",
                                                                "spark_version", "node_type_id"]) | st.text(max_size=6),
                                               children, max_size=3)),
    max_leaves=10)
python_values = st.one_of(json_values, st.integers(min_value=-(10**400), max_value=10**400), st.floats(),
                          st.builds(Opaque), st.lists(st.builds(Opaque), max_size=2),
                          st.dictionaries(st.integers(), json_values, max_size=2))
CONFIG_FIELDS = ["existing_cluster_id", "new_cluster", "node_types", "libraries", "python_path", "runtime_dir",
                 "timeout_grace_seconds", "max_parameter_bytes", "dbfs_fuse", "upload_runtime", "profiles"]
cluster_values = st.dictionaries(st.sampled_from(sorted(NEW_CLUSTER_KEYS)), json_values, max_size=3)


@SETTINGS
@given(opts=st.dictionaries(st.sampled_from(sorted(OPTION_NAMES)), json_values | cluster_values, max_size=4),
       profile=st.dictionaries(st.sampled_from(sorted(PROFILE_KEYS)), python_values, max_size=4),
       config=st.dictionaries(st.sampled_from(CONFIG_FIELDS), python_values | cluster_values, max_size=3),
       secret=st.text(min_size=1, max_size=8).filter(lambda s: "/" not in s and not any(c.isspace() for c in s)))
def test_validate_raises_nothing_but_config_error(opts: dict[str, Any], profile: dict[str, Any],
                                                 config: dict[str, Any], secret: str) -> None:
    b = backend()
    # DatabricksConfig checks a few fields when built; validate() must hold for whatever configuration it is
    # given, so the fuzzed settings are put in place after construction.
    for key, value in {"profiles": {"p": profile}, **config}.items():
        object.__setattr__(b.config, key, value)
    try:
        request = req(resources={"profile": "p"}, backend_options={"databricks": opts}, secrets={"S": f"{secret}/k"})
    except ConfigError:
        return
    try:
        b.validate(request)
    except ConfigError as exc:
        assert isinstance(exc.field, str) and isinstance(exc.problem, str)
        str(exc)
