"""Where step outputs live, and the result manifest that describes them.

Outputs never travel through XCom: each lands under a deterministic per-step prefix of the artifact
root (a local directory by default, any fsspec URI for deployments), and only its URI moves on.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from airflow_remote_ml.core.errors import ArtifactError, ConfigError
from airflow_remote_ml.core.identity import StepIdentity

MANIFEST_NAME = "manifest.json"
_SEGMENT_BAD = re.compile(r"[^A-Za-z0-9._=+-]+")

# Schemes a process can read as plain files (after mapping) without an fsspec implementation.
_LOCAL_SCHEMES = {"", "file"}


def default_artifact_root() -> str:
    """``$REMOTE_ML_ARTIFACT_ROOT`` or ``~/airflow-remote-ml/artifacts``."""
    root = os.environ.get("REMOTE_ML_ARTIFACT_ROOT")
    if root:
        return root
    return os.path.join(os.path.expanduser("~"), "airflow-remote-ml", "artifacts")


def is_local(uri: str) -> bool:
    return urlparse(uri).scheme in _LOCAL_SCHEMES or _is_windows_drive(uri)


def local_path(uri: str) -> str:
    """The filesystem path of a local URI (``/x`` or ``file:///x``)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return parsed.path
    if parsed.scheme == "" or _is_windows_drive(uri):
        return uri
    raise ArtifactError(f"{uri!r} is not a local path")


def _is_windows_drive(uri: str) -> bool:
    return len(uri) > 2 and uri[1] == ":" and uri[0].isalpha()


def _segment(value: str) -> str:
    return _SEGMENT_BAD.sub("_", value).strip(".") or "_"


@dataclass(frozen=True)
class ArtifactStore:
    """An artifact root plus the layout of step prefixes under it."""

    root: str

    def __post_init__(self) -> None:
        if not isinstance(self.root, str) or not self.root.strip():
            raise ConfigError("artifact_root", f"{self.root!r} is not a path or URI",
                              "use a directory such as '/data/artifacts' or a URI such as 's3://bucket/ml'")
        if is_local(self.root) and not os.path.isabs(local_path(self.root)):
            raise ConfigError("artifact_root", f"{self.root!r} is a relative path",
                              "use an absolute path so every step sees the same place")

    @property
    def local(self) -> bool:
        return is_local(self.root)

    def step_prefix(self, identity: StepIdentity) -> str:
        map_part = "map_-1" if identity.map_index < 0 else f"map_{identity.map_index}"
        parts = [_segment(identity.dag_id), _segment(identity.run_id), _segment(identity.task_id),
                 map_part, f"gen_{identity.generation}"]
        return self._join(*parts)

    def output_uri(self, identity: StepIdentity, name: str) -> str:
        return self._join_to(self.step_prefix(identity), "outputs", name)

    def manifest_uri(self, identity: StepIdentity) -> str:
        return self._join_to(self.step_prefix(identity), MANIFEST_NAME)

    def _join(self, *parts: str) -> str:
        return self._join_to(self.root, *parts)

    @staticmethod
    def _join_to(base: str, *parts: str) -> str:
        if is_local(base):
            return os.path.join(local_path(base), *parts)
        return "/".join([base.rstrip("/"), *parts])


def read_json(uri: str) -> dict[str, Any] | None:
    """Read a JSON document from a local path or an fsspec URI; ``None`` when it does not exist."""
    try:
        if is_local(uri):
            with open(local_path(uri), encoding="utf-8") as fh:
                return json.load(fh)
        import fsspec

        with fsspec.open(uri, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except ImportError:
        raise ArtifactError(f"reading {uri!r} needs fsspec; pip install fsspec (and its {urlparse(uri).scheme} "
                            "implementation)") from None
    except (ValueError, OSError) as exc:
        raise ArtifactError(f"the result manifest at {uri!r} is unreadable: {exc}") from exc


def exists(uri: str) -> bool:
    if is_local(uri):
        return os.path.exists(local_path(uri))
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return bool(fs.exists(path))
