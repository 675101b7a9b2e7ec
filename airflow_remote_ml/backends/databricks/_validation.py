"""What the Databricks Jobs API would refuse in a ``runs/submit`` body, refused before submit.

Each rule copies the documented shape of a Jobs API 2.1/2.2 field (``POST /api/2.2/jobs/runs/submit``,
``tasks[].new_cluster`` is a Clusters API ``ClusterSpec``), named in a comment by the rule. Values are checked
where the user wrote them (``backend_config[databricks]``, ``profiles.<name>``, ``backend_options.databricks``,
``secrets``) so the error names that place. Any value of any type gives a ``ConfigError`` and nothing else:
``tests/unit/test_databricks_validation.py`` proves it with hypothesis.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow_remote_ml.core.errors import ConfigError
from airflow_remote_ml.core.spec import parse_cpu, parse_gpu, parse_memory, reject_unknown_options
from airflow_remote_ml.core.validation import MAX_TIMEOUT_SECONDS, check_numeric_settings, short_repr, type_name

if TYPE_CHECKING:
    from airflow_remote_ml.backends.databricks._payload import DatabricksConfig
    from airflow_remote_ml.core.backend import StepRequest

CONFIG = "backend_config[databricks]"
OPTIONS = "backend_options.databricks"
#: Jobs API integers (num_workers, min/max_workers, timeout_seconds) are int32.
INT32_MAX = 2**31 - 1
#: Secrets API (``secrets/scopes/create``, ``secrets/put``): scope names and keys "must consist of alphanumeric
#: characters, dashes, underscores, and periods, and may not exceed 128 characters". A ``{{secrets/scope/key}}``
#: reference with anything else (``}}``, ``/``, spaces) cannot name a secret.
_SECRET_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
#: ``Library``: exactly one of these (Jobs API ``libraries[]``).
LIBRARY_KINDS = ("jar", "egg", "whl", "pypi", "maven", "cran", "requirements")
#: ``source`` of a spark_python_task / notebook_task.
SOURCES = ("WORKSPACE", "GIT")

#: ClusterSpec fields by JSON type.
_CLUSTER_STRINGS = frozenset({"spark_version", "node_type_id", "driver_node_type_id", "instance_pool_id",
                              "driver_instance_pool_id", "policy_id", "data_security_mode", "single_user_name",
                              "runtime_engine", "cluster_name", "kind"})
_CLUSTER_BOOLS = frozenset({"apply_policy_default_values", "enable_elastic_disk", "enable_local_disk_encryption",
                            "is_single_node", "use_ml_runtime"})
_CLUSTER_STRING_MAPS = frozenset({"spark_conf", "spark_env_vars", "custom_tags"})
_CLUSTER_OBJECTS = frozenset({"aws_attributes", "azure_attributes", "gcp_attributes", "docker_image",
                              "cluster_log_conf", "workload_type"})
#: Option values that are Jobs API strings.
_OPTION_STRINGS = ("task", "python_file", "package_name", "entry_point", "notebook_path", "main_class_name",
                   "jar_uri", "run_name", "existing_cluster_id")


def _where(field: str, key: Any) -> str:
    return f"{field}.{key}" if isinstance(key, str) else f"{field}.{short_repr(key)}"


def _string(field: str, value: Any, example: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(field, f"expected a non-empty string, got {type_name(value)} {short_repr(value)}",
                          f"use e.g. {example}")
    return value


def _mapping(field: str, value: Any, example: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        fix = f"use a mapping such as {example}"
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and "=" in v for v in value):
            fix = f"write it as a mapping, e.g. {example}, not a list of 'NAME=value' strings"
        raise ConfigError(field, f"expected a mapping, got {type_name(value)} {short_repr(value)}", fix)
    return value


def _list(field: str, value: Any, example: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
        raise ConfigError(field, f"expected a list, got {type_name(value)} {short_repr(value)}", f"use e.g. {example}")
    return value


def check_string_map(field: str, value: Any, example: str) -> None:
    """``spark_conf``, ``spark_env_vars``, ``custom_tags``, ``base_parameters``: ``map<string, string>``."""
    for key, item in _mapping(field, value, example).items():
        if not isinstance(key, str) or not key:
            raise ConfigError(_where(field, key), f"the key {short_repr(key)} is not a non-empty string",
                              "use string keys")
        if not isinstance(item, str):
            raise ConfigError(f"{field}.{key}", f"expected a string, got {type_name(item)} {short_repr(item)}",
                              f"quote it: {key!r}: {str(item)!r}" if isinstance(item, (int, float)) else
                              "use a string")


def check_int(field: str, value: Any, *, minimum: int = 0, maximum: int = INT32_MAX, example: str = "2") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"expected a whole number, got {type_name(value)} {short_repr(value)}",
                          f"use e.g. {example}")
    if not minimum <= value <= maximum:
        raise ConfigError(field, f"{short_repr(value)} is not from {minimum} to {maximum}", f"use e.g. {example}")
    return value


def check_autoscale(field: str, value: Any) -> None:
    """``AutoScale``: ``min_workers`` and ``max_workers``; "max_workers must be strictly greater than min_workers"."""
    example = "{'min_workers': 1, 'max_workers': 4}"
    scale = _mapping(field, value, example)
    reject_unknown_options(field, scale, {"min_workers", "max_workers"})
    for key in ("min_workers", "max_workers"):
        if key not in scale:
            raise ConfigError(f"{field}.{key}", "is missing", f"use e.g. {example}")
        check_int(f"{field}.{key}", scale[key], example=example)
    if scale["max_workers"] <= scale["min_workers"]:
        raise ConfigError(f"{field}.max_workers", f"{scale['max_workers']} is not greater than min_workers "
                          f"{scale['min_workers']} (the Clusters API requires it)",
                          "raise max_workers, or use num_workers for a fixed size")


def check_libraries(field: str, value: Any) -> None:
    """``libraries``: a list of ``Library`` objects, each exactly one of jar/egg/whl/pypi/maven/cran/requirements."""
    if isinstance(value, str):
        raise ConfigError(field, f"expected a list of library specs, got the string {short_repr(value)}",
                          f"use [{{'pypi': {{'package': {value!r}}}}}]")
    for i, library in enumerate(_list(field, value, "[{'pypi': {'package': 'pandas'}}]")):
        name = f"{field}[{i}]"
        if isinstance(library, str):
            raise ConfigError(name, f"{short_repr(library)} is a string, not a library spec",
                              f"use {{'pypi': {{'package': {library!r}}}}}")
        spec = _mapping(name, library, "{'pypi': {'package': 'pandas'}}")
        kinds = [k for k in spec if k in LIBRARY_KINDS]
        reject_unknown_options(name, spec, set(LIBRARY_KINDS))
        if len(kinds) != 1:
            raise ConfigError(name, f"names {len(kinds)} library kinds; a library is exactly one",
                              f"use one of {', '.join(LIBRARY_KINDS)} per entry")
        kind = kinds[0]
        item = spec[kind]
        if kind in ("jar", "egg", "whl", "requirements"):
            _string(f"{name}.{kind}", item, "'/Volumes/main/libs/app.whl'")
        elif kind in ("pypi", "cran"):
            package = _mapping(f"{name}.{kind}", item, "{'package': 'pandas'}")
            reject_unknown_options(f"{name}.{kind}", package, {"package", "repo"})
            _string(f"{name}.{kind}.package", package.get("package"), "'pandas==2.2.2'")
            if package.get("repo") is not None:
                _string(f"{name}.{kind}.repo", package["repo"], "'https://pypi.example/simple'")
        else:
            maven = _mapping(f"{name}.maven", item, "{'coordinates': 'org.jsoup:jsoup:1.7.2'}")
            reject_unknown_options(f"{name}.maven", maven, {"coordinates", "repo", "exclusions"})
            _string(f"{name}.maven.coordinates", maven.get("coordinates"), "'org.jsoup:jsoup:1.7.2'")
            if maven.get("repo") is not None:
                _string(f"{name}.maven.repo", maven["repo"], "'https://repo.example/maven'")
            if maven.get("exclusions") is not None:
                for j, ex in enumerate(_list(f"{name}.maven.exclusions", maven["exclusions"], "['slf4j:slf4j']")):
                    _string(f"{name}.maven.exclusions[{j}]", ex, "'slf4j:slf4j'")


def check_cluster(field: str, cluster: Mapping[str, Any]) -> None:
    """The fields of a ``ClusterSpec`` (``new_cluster``) by their Jobs API types."""
    for key, value in cluster.items():
        name = _where(field, key)
        if value is None:
            continue
        if key in _CLUSTER_STRINGS:
            _string(name, value, "'15.4.x-scala2.12'" if key == "spark_version" else "'i3.xlarge'")
        elif key in _CLUSTER_BOOLS and not isinstance(value, bool):
            raise ConfigError(name, f"expected True or False, got {type_name(value)} {short_repr(value)}",
                              "use True or False")
        elif key in _CLUSTER_STRING_MAPS:
            check_string_map(name, value, "{'MODE': 'fast'}")
        elif key in _CLUSTER_OBJECTS:
            _mapping(name, value, "{...} in the Jobs API's shape")
        elif key == "num_workers":
            check_int(name, value, example="2 (0 for a single-node cluster)")
        elif key == "autoscale":
            check_autoscale(name, value)
        elif key == "init_scripts":
            for i, script in enumerate(_list(name, value, "[{'volumes': {'destination': '/Volumes/x/init.sh'}}]")):
                _mapping(f"{name}[{i}]", script, "{'volumes': {'destination': '/Volumes/x/init.sh'}}")
        elif key == "ssh_public_keys":
            for i, item in enumerate(_list(name, value, "['ssh-rsa AAAA...']")):
                _string(f"{name}[{i}]", item, "'ssh-rsa AAAA...'")


def _python_path(field: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str):
        raise ConfigError(field, f"expected a list of directories, got the string {short_repr(value)}",
                          f"use [{value!r}]")
    for i, item in enumerate(_list(field, value, "['/Workspace/Shared/ml']")):
        _string(f"{field}[{i}]", item, "'/Workspace/Shared/ml'")


def check_compute_source(field: str, settings: Mapping[str, Any], *, cluster_field: str | None = None) -> None:
    """A profile, the settings or a step's options: cluster fields, libraries, exclusive cluster choice.

    A run's task takes ``existing_cluster_id`` *or* ``new_cluster`` (Jobs API: "If existing_cluster_id, the ID of
    an existing cluster that is used for all runs. ... If new_cluster, a description of a new cluster"): a
    source that sets both leaves it unclear which one the author meant.
    """
    from airflow_remote_ml.backends.databricks._payload import NEW_CLUSTER_KEYS

    cluster_keys = sorted(k for k in settings if k in NEW_CLUSTER_KEYS and settings[k] is not None)
    existing = settings.get("existing_cluster_id")
    if existing is not None:
        _string(f"{field}.existing_cluster_id", existing, "'0923-164208-meows279'")
        new = settings.get("new_cluster") if cluster_field else None
        if cluster_keys or new:
            both = cluster_field or (cluster_keys[0] if cluster_keys else "new_cluster")
            raise ConfigError(f"{field}.existing_cluster_id", f"is set together with {both}: a task runs on an "
                              "existing cluster or a new job cluster, not both",
                              f"drop existing_cluster_id or {both}")
    check_cluster(field, {k: settings[k] for k in cluster_keys})
    if settings.get("libraries") is not None:
        check_libraries(f"{field}.libraries", settings["libraries"])
    _python_path(f"{field}.python_path", settings.get("python_path"))


def check_numbers(config: Any) -> None:
    """Every numeric setting is a number in range (the shared check, named for this backend)."""
    check_numeric_settings(config, CONFIG)


def check_config(config: DatabricksConfig) -> None:
    """The settings and their profiles."""
    check_numbers(config)
    from airflow_remote_ml.backends.databricks._payload import NEW_CLUSTER_KEYS, PROFILE_KEYS

    new_cluster = _mapping(f"{CONFIG}.new_cluster", config.new_cluster, "{'spark_version': '15.4.x-scala2.12'}")
    reject_unknown_options(f"{CONFIG}.new_cluster", new_cluster, set(NEW_CLUSTER_KEYS))
    check_cluster(f"{CONFIG}.new_cluster", new_cluster)
    if config.existing_cluster_id is not None:
        # Both in the settings is a layered configuration (the deployment's new_cluster, a task's existing
        # cluster): the existing cluster wins unless a profile or the step asks for a new one (_payload).
        _string(f"{CONFIG}.existing_cluster_id", config.existing_cluster_id, "'0923-164208-meows279'")
    check_libraries(f"{CONFIG}.libraries", config.libraries)
    if config.python_path is None:  # the payload builder iterates it (a profile's None means none)
        raise ConfigError(f"{CONFIG}.python_path", "is None", "use [] or leave it out for none")
    _python_path(f"{CONFIG}.python_path", config.python_path)
    for i, node in enumerate(_list(f"{CONFIG}.node_types", config.node_types,
                                   "[{'node_type_id': 'i3.xlarge', 'cpu': 4, 'memory': '30Gi'}]")):
        name = f"{CONFIG}.node_types[{i}]"
        node = _mapping(name, node, "{'node_type_id': 'i3.xlarge', 'cpu': 4, 'memory': '30Gi', 'gpu': 0}")
        reject_unknown_options(name, node, {"node_type_id", "cpu", "memory", "gpu"})
        _string(f"{name}.node_type_id", node.get("node_type_id"), "'i3.xlarge'")
        parse_cpu(node.get("cpu"), f"{name}.cpu")
        parse_memory(node.get("memory"), f"{name}.memory")
        parse_gpu(node.get("gpu"), f"{name}.gpu")
    # timeout_seconds (int32) = ceil(step timeout + this): a NaN, infinite or huge grace cannot be sent.
    grace = config.timeout_grace_seconds
    # (math.isfinite of a huge int raises OverflowError: test floats only; ints compare exactly.)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) \
            or (isinstance(grace, float) and not math.isfinite(grace)) \
            or not 0 <= grace <= INT32_MAX - MAX_TIMEOUT_SECONDS - 1:
        raise ConfigError(f"{CONFIG}.timeout_grace_seconds", f"{short_repr(grace)} is not a number of seconds "
                          "from 0 to a few days", "use e.g. 60")
    check_int(f"{CONFIG}.max_parameter_bytes", config.max_parameter_bytes, minimum=1, maximum=10**9,
              example="10000")
    if config.runtime_dir is not None:
        _string(f"{CONFIG}.runtime_dir", config.runtime_dir, "'/Volumes/main/ml/runtime'")
    for key in ("dbfs_fuse", "upload_runtime"):
        if not isinstance(getattr(config, key), bool):
            raise ConfigError(f"{CONFIG}.{key}", f"expected True or False, got {short_repr(getattr(config, key))}",
                              "use True or False")
    profiles = _mapping("profiles", config.profiles, "{'big': {'node_type_id': 'i3.2xlarge', 'num_workers': 4}}")
    for name, profile in profiles.items():
        field = _where(f"{CONFIG}.profiles", name)
        if not isinstance(name, str):
            raise ConfigError(field, f"the profile name {short_repr(name)} is a {type_name(name)}", "use a string")
        profile = _mapping(field, profile, "{'node_type_id': 'i3.xlarge', 'num_workers': 2}")
        reject_unknown_options(field, profile, set(PROFILE_KEYS))
        check_compute_source(field, profile)


def check_options(options: Mapping[str, Any]) -> None:
    """``backend_options["databricks"]``: types of the task fields and the per-step cluster settings."""
    for key in _OPTION_STRINGS:
        if options.get(key) is not None:
            _string(f"{OPTIONS}.{key}", options[key], "'/Workspace/Users/me/train.py'")
    if options.get("source") is not None and options["source"] not in SOURCES:
        raise ConfigError(f"{OPTIONS}.source", f"{short_repr(options['source'])} is not a task source",
                          "use 'WORKSPACE' or 'GIT'")
    if options.get("new_cluster") is not None:
        from airflow_remote_ml.backends.databricks._payload import NEW_CLUSTER_KEYS

        cluster = _mapping(f"{OPTIONS}.new_cluster", options["new_cluster"], "{'num_workers': 4}")
        reject_unknown_options(f"{OPTIONS}.new_cluster", cluster, set(NEW_CLUSTER_KEYS))
        check_cluster(f"{OPTIONS}.new_cluster", cluster)
    check_compute_source(OPTIONS, options, cluster_field="new_cluster")
    # Task parameters: spark_python_task/spark_jar_task/python_wheel_task ``parameters`` are arrays of strings;
    # notebook ``base_parameters`` a map of strings (Jobs API).
    if options.get("parameters") is not None:
        for i, item in enumerate(_list(f"{OPTIONS}.parameters", options["parameters"], "['--epochs', '3']")):
            if not isinstance(item, str):
                raise ConfigError(f"{OPTIONS}.parameters[{i}]", f"{short_repr(item)} is not a string",
                                  "task parameters are strings: quote numbers, json.dumps structures")
    if options.get("base_parameters") is not None:
        check_string_map(f"{OPTIONS}.base_parameters", options["base_parameters"], "{'epochs': '3'}")
    if options.get("named_parameters") is not None and not isinstance(options["named_parameters"], bool):
        raise ConfigError(f"{OPTIONS}.named_parameters", f"{short_repr(options['named_parameters'])} is not True or "
                          "False", "set True to pass params as the wheel's named parameters")


def check_secrets(request: StepRequest) -> None:
    for name, ref in request.spec.secrets.items():
        for part, text in (("scope", ref.name), ("key", ref.key)):
            if text is not None and not _SECRET_NAME.match(text):
                raise ConfigError(f"secrets.{name}", f"the secret {part} {short_repr(text)} cannot be named in a "
                                  "{{secrets/<scope>/<key>}} reference",
                                  "Databricks secret scopes and keys are at most 128 letters, digits, '-', '_' "
                                  "or '.'")


def check_sources(config: DatabricksConfig, request: StepRequest) -> None:
    """Everything the payload builder reads, checked before it reads it."""
    check_config(config)
    check_options(request.spec.options_for("databricks"))
    check_secrets(request)
