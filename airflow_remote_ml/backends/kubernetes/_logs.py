"""The log cursor of pods: the shared timestamped-log cursor of :mod:`airflow_remote_ml.core.logs`.

Logs are read with ``timestamps=true`` and ``sinceTime`` (``PodLogOptions.sinceTime``, an RFC 3339 time
that the kubelet compares with each line's timestamp, inclusively).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow_remote_ml.backends.kubernetes._states import parse_time
from airflow_remote_ml.core.logs import next_chunk, parse_entries, since_rfc3339

__all__ = ["entries_since", "format_since", "next_chunk", "parse_entries", "since_of"]


def format_since(seconds: int) -> str:
    """``sinceTime`` for a whole second since the epoch."""
    return since_rfc3339({"since": seconds}) or ""


def since_of(cursor: Mapping[str, Any] | None) -> str | None:
    """The ``sinceTime`` to ask for, or None for the whole log."""
    return since_rfc3339(cursor)


def entries_since(entries: list[tuple[int, str]], since: str | None) -> list[tuple[int, str]]:
    """The entries a read with ``sinceTime=since`` would return (the kubelet compares each line's stamp)."""
    if not since:
        return entries
    floor = int(parse_time(since) or 0) * 1_000_000_000
    return [e for e in entries if e[0] >= floor]
