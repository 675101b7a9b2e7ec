"""Backends by name, found through the ``airflow_remote_ml.backends`` entry-point group.

A third party registers a backend in its own package::

    [project.entry-points."airflow_remote_ml.backends"]
    mybackend = "my_package.backend:MyBackend"

Loading is lazy: naming a backend imports its module and nothing else.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from airflow_remote_ml.core.errors import BackendNotFoundError, BackendUnavailableError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from airflow_remote_ml.core.backend import Backend

ENTRY_POINT_GROUP = "airflow_remote_ml.backends"

# Backends shipped with this package and the extra that brings each one's SDK. Kept here too so the
# package works from a source checkout that was never pip-installed (no entry-point metadata).
BUILTIN_BACKENDS: dict[str, tuple[str, str | None]] = {
    "local": ("airflow_remote_ml.backends.local:LocalBackend", None),
    "docker": ("airflow_remote_ml.backends.docker:DockerBackend", "docker"),
    "kubernetes": ("airflow_remote_ml.backends.kubernetes:KubernetesBackend", "kubernetes"),
    "databricks": ("airflow_remote_ml.backends.databricks:DatabricksBackend", "databricks"),
    "valohai": ("airflow_remote_ml.backends.valohai:ValohaiBackend", "valohai"),
}

_extra_backends: dict[str, type[Backend]] = {}


def register_backend(name: str, cls: type[Backend]) -> None:
    """Register a backend class at run time (tests, notebooks); entry points are the normal way."""
    _extra_backends[name] = cls


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_backends() -> list[str]:
    return sorted({*BUILTIN_BACKENDS, *_entry_points(), *_extra_backends})


def get_backend_class(name: str) -> type[Backend]:
    """Load the backend class registered as ``name``.

    Raises:
        BackendNotFoundError: nothing is registered under that name (with a "did you mean").
        BackendUnavailableError: its optional dependencies are missing (with the pip extra).
    """
    if not isinstance(name, str) or not name:
        raise BackendNotFoundError(repr(name), available_backends())
    if name in _extra_backends:
        return _extra_backends[name]
    eps = _entry_points()
    target = eps[name].value if name in eps else BUILTIN_BACKENDS.get(name, (None, None))[0]
    if target is None:
        raise BackendNotFoundError(name, available_backends())
    extra = BUILTIN_BACKENDS.get(name, (None, name))[1] or name
    module_name, _, attr = target.partition(":")
    try:
        module = __import__(module_name, fromlist=[attr])
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("airflow_remote_ml"):
            raise BackendUnavailableError(name, extra, exc.name) from exc
        raise
    return getattr(module, attr)


def create_backend(name: str, config: Mapping[str, Any] | None = None) -> Backend:
    """Instantiate backend ``name`` from its plain-data configuration."""
    return get_backend_class(name).from_config(dict(config or {}))
