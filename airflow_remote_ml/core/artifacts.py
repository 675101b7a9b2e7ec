"""Where step outputs live, and the result manifest that describes them.

Outputs never travel through XCom: each lands under a deterministic per-step prefix of the artifact
root (a local directory by default, any fsspec URI for deployments), and only its URI moves on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from airflow_remote_ml.core.errors import ArtifactError, ConfigError
from airflow_remote_ml.core.identity import StepIdentity

MANIFEST_NAME = "manifest.json"
# Characters kept as they are in a prefix segment: safe in every filesystem and object store path,
# and no URL-escaping is needed for them. Everything else is escaped (see encode_segment).
_SEGMENT_SAFE = re.compile(r"[A-Za-z0-9._=+-]")
_ESCAPE = "~"
_ESCAPED = re.compile(r"~([0-9A-F]{2})")
#: Longest segment kept whole: filesystems allow 255 bytes per name; the rest is left for a hash.
MAX_SEGMENT = 200

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


def encode_segment(value: str) -> str:
    """A readable path segment that maps different values to different segments (injective).

    Safe characters stay as they are; every other byte of the UTF-8 text becomes ``~XX`` (its hex
    value), ``~`` itself included, so ``12:00`` is ``12~3A00`` and can never meet the literal
    ``12_00``. A leading or trailing dot is escaped too (``..`` must never be a segment, and Windows
    drops trailing dots). A segment longer than :data:`MAX_SEGMENT` keeps its readable start and
    ends in ``~~`` plus a hash of the whole value (``~~`` never appears in an escaped segment).
    """
    if value == "":
        return _ESCAPE  # '~' alone is no escape sequence, so no other value encodes to it
    out = []
    last = len(value) - 1
    for i, char in enumerate(value):
        if _SEGMENT_SAFE.fullmatch(char) and not (char == "." and i in (0, last)):
            out.append(char)
        else:
            out.extend(f"{_ESCAPE}{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    encoded = "".join(out)
    if len(encoded) <= MAX_SEGMENT:
        return encoded
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    head = encoded[: MAX_SEGMENT - 18]
    head = re.sub(r"~[0-9A-F]?$", "", head)  # never end on half an escape
    return f"{head}~~{digest}"


def decode_segment(segment: str) -> str | None:
    """The value :func:`encode_segment` made ``segment`` from; ``None`` for a hashed (cut) segment."""
    if segment == _ESCAPE:
        return ""
    if "~~" in segment:
        return None
    raw = bytearray()
    i = 0
    while i < len(segment):
        match = _ESCAPED.match(segment, i)
        if match:
            raw.append(int(match.group(1), 16))
            i = match.end()
        else:
            raw.extend(segment[i].encode("utf-8"))
            i += 1
    return raw.decode("utf-8", "surrogatepass")


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
        # Every part is encoded injectively: two runs whose ids differ only in characters a path cannot
        # hold ('manual__...T12:00:00' and 'manual__...T12_00_00') must not share a folder, since the
        # runtime clears leftover outputs before it runs.
        parts = [encode_segment(identity.dag_id), encode_segment(identity.run_id), encode_segment(identity.task_id),
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
