"""The Airflow side of configuration: deployment settings, connections and secrets.

Backends stay usable without Airflow (plain configuration mappings); this module is what turns an Airflow
deployment's settings into those mappings. Every function imports Airflow lazily.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from airflow_remote_ml.core.errors import ConfigError
from airflow_remote_ml.core.spec import SecretRef

log = logging.getLogger(__name__)

SECTION = "remote_ml"


def _conf() -> Any:
    try:
        from airflow.sdk.configuration import conf
    except ImportError:  # pragma: no cover - older layouts
        from airflow.configuration import conf  # type: ignore[no-redef]
    return conf


def get_setting(key: str, fallback: str | None = None) -> str | None:
    """``[remote_ml] key`` from the Airflow configuration (``AIRFLOW__REMOTE_ML__KEY`` also works)."""
    try:
        return _conf().get(SECTION, key, fallback=fallback)
    except Exception:  # no Airflow configuration at all (plain scripts)
        return os.environ.get(f"AIRFLOW__{SECTION.upper()}__{key.upper()}", fallback)


def default_backend() -> str:
    return get_setting("default_backend", "local") or "local"


def default_artifact_root() -> str:
    from airflow_remote_ml.core.artifacts import default_artifact_root as core_default

    return get_setting("artifact_root", None) or core_default()


def deployment_backend_config(backend: str) -> dict[str, Any]:
    """The deployment's settings for ``backend``: ``[remote_ml] backend_config`` is JSON
    ``{"kubernetes": {...}, "docker": {...}}``, or ``[remote_ml] backend_config_file`` names such a file.
    Profiles (resource profile → node pool, cluster shape, ...) usually live here."""
    raw = get_setting("backend_config", None)
    path = get_setting("backend_config_file", None)
    data: Any = {}
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ConfigError("[remote_ml] backend_config_file", f"cannot read {path!r}: {exc}",
                              "point it at a JSON file mapping backend names to settings") from None
    elif raw:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ConfigError("[remote_ml] backend_config", f"is not JSON: {exc}",
                              'use e.g. {"docker": {"removal_policy": "always"}}') from None
    if not isinstance(data, Mapping):
        raise ConfigError("[remote_ml] backend_config", "must map backend names to settings",
                          'use e.g. {"docker": {"removal_policy": "always"}}')
    section = data.get(backend) or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"[remote_ml] backend_config.{backend}", "must be a mapping", "use {...}")
    return dict(section)


def resolve_secret(ref: SecretRef, source: str = "airflow") -> str:
    """The value of a secret reference for backends that pass secrets as environment values.

    ``airflow``: the Airflow Variable ``ref.name`` (through any secrets backend the deployment uses);
    with ``ref.key`` the Variable holds JSON and the key is looked up in it. ``env``: the worker's
    environment variable ``ref.name`` (``ref.key`` appended with an underscore when given).
    The value is never logged, and it is registered with Airflow's secrets masker, so a step that
    prints it (``echo $DB_PASSWORD``) shows ``***`` in the task log and in an error's log tail.
    """
    return _masked(_resolve_secret(ref, source), ref)


def _masked(value: str, ref: SecretRef) -> str:
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:  # pragma: no cover - Airflow < 3
        return value
    # No name: with one, the masker masks only values whose name looks sensitive ("password", "token"...),
    # and a reference like "db_creds/password" names a Variable, not a key it would recognise.
    mask_secret(value)
    return value


def _resolve_secret(ref: SecretRef, source: str) -> str:
    if source == "env":
        name = f"{ref.name}_{ref.key}" if ref.key else ref.name
        if name not in os.environ:
            raise ConfigError(f"secrets ({ref.name})", f"environment variable {name!r} is not set on the worker",
                              "set it, or use secrets_from='airflow' with an Airflow Variable")
        return os.environ[name]
    from airflow.sdk import Variable

    try:
        value = Variable.get(ref.name)
    except Exception:
        raise ConfigError(f"secrets ({ref.name})", f"there is no Airflow Variable {ref.name!r}",
                          f"create it (airflow variables set {ref.name} ...) or fix the reference") from None
    if ref.key is None:
        return str(value)
    try:
        mapping = json.loads(value) if isinstance(value, str) else value
        return str(mapping[ref.key])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"secrets ({ref.name}/{ref.key})",
                          f"Variable {ref.name!r} holds no JSON object with key {ref.key!r}",
                          "store a JSON object in the Variable or drop the key") from None


def get_connection(conn_id: str) -> Any:
    """An Airflow connection, with an error that says what to create when it is missing."""
    from airflow.sdk import BaseHook

    try:
        return BaseHook.get_connection(conn_id)
    except Exception:
        raise ConfigError("conn_id", f"there is no Airflow connection {conn_id!r}",
                          f"create it (airflow connections add {conn_id} ...) or fix the name") from None
