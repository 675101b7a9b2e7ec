"""A deterministic identity for every remote job.

The identity of a step run is (dag_id, task_id, run_id, map_index, generation). It is known *before*
anything is submitted, so a retry after a worker crash can find the job even if the worker died
between submitting it and recording its handle. ``generation`` starts at 0 and grows each time the
same task instance deliberately starts a new job (after a user clear or after a finished attempt), so
an old, finished job is never mistaken for the current one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any

# Label keys shared by every backend that has labels or tags.
LABEL_PREFIX = "remote-ml.airflow.apache.org"
LABEL_STEP_ID = f"{LABEL_PREFIX}/step-id"
LABEL_DAG_ID = f"{LABEL_PREFIX}/dag-id"
LABEL_TASK_ID = f"{LABEL_PREFIX}/task-id"
LABEL_RUN_ID = f"{LABEL_PREFIX}/run-id"
LABEL_MAP_INDEX = f"{LABEL_PREFIX}/map-index"
LABEL_GENERATION = f"{LABEL_PREFIX}/generation"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "airflow-remote-ml"

_LABEL_VALUE_BAD = re.compile(r"[^A-Za-z0-9._-]+")
_DNS_BAD = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class StepIdentity:
    """Who a remote job belongs to. Equal identities mean the same job."""

    dag_id: str
    task_id: str
    run_id: str
    map_index: int = -1
    generation: int = 0

    @property
    def key(self) -> str:
        """A readable, unique key (may be long)."""
        return f"{self.dag_id}/{self.task_id}/{self.run_id}/{self.map_index}/{self.generation}"

    @property
    def digest(self) -> str:
        """A 40-hex-digit hash of :attr:`key`: fits any label, tag or token."""
        return hashlib.sha256(self.key.encode()).hexdigest()[:40]

    @property
    def idempotency_token(self) -> str:
        """At most 64 characters, as the Databricks Jobs API demands."""
        return f"remote-ml-{self.digest}"

    def name(self, max_length: int = 63) -> str:
        """A DNS-1123 name (pods, containers) that is readable and still unique."""
        readable = _DNS_BAD.sub("-", f"{self.dag_id}-{self.task_id}".lower()).strip("-") or "step"
        suffix = f"-{self.digest[:12]}"
        return (readable[: max_length - len(suffix)].rstrip("-") or "step") + suffix

    def labels(self) -> dict[str, str]:
        """Labels valid on Kubernetes and Docker objects; the step id is the one used for lookups."""
        return {
            LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_STEP_ID: self.digest,
            LABEL_DAG_ID: _label_value(self.dag_id),
            LABEL_TASK_ID: _label_value(self.task_id),
            LABEL_RUN_ID: _label_value(self.run_id),
            # A label value must start and end with a letter or digit: "-1" would be refused.
            LABEL_MAP_INDEX: "none" if self.map_index < 0 else str(self.map_index),
            LABEL_GENERATION: str(self.generation),
        }

    def next_generation(self) -> StepIdentity:
        return StepIdentity(self.dag_id, self.task_id, self.run_id, self.map_index, self.generation + 1)

    def with_generation(self, generation: int) -> StepIdentity:
        return StepIdentity(self.dag_id, self.task_id, self.run_id, self.map_index, generation)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepIdentity:
        return cls(**data)


def _label_value(value: str) -> str:
    """Kubernetes label values: at most 63 of [A-Za-z0-9._-], starting and ending alphanumeric."""
    cleaned = _LABEL_VALUE_BAD.sub("_", value)[:63]
    return cleaned.strip("._-") or "x"
