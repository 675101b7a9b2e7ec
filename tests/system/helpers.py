"""A stand-in for the task runner's context: enough to drive the operator without a scheduler."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any


class FileStateStore:
    """The task state store's interface, kept in a JSON file so it survives a killed process."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _load(self) -> dict[str, Any]:
        if not os.path.exists(self.path):
            return {}
        with open(self.path, encoding="utf-8") as fh:
            return json.load(fh)

    def get(self, key: str, default: Any = None) -> Any:
        return self._load().get(key, default)

    def set(self, key: str, value: Any, **_: Any) -> None:
        data = self._load()
        data[key] = value
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        os.replace(tmp, self.path)


@dataclass
class FakeTI:
    dag_id: str = "dag"
    task_id: str = "step"
    run_id: str = "manual__run"
    map_index: int = -1
    try_number: int = 1
    xcoms: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        json.dumps(value)  # XCom values must be JSON: fail here like the real thing would
        self.xcoms[key] = value


def context(ti: FakeTI, store: Any) -> dict[str, Any]:
    return {"ti": ti, "task_state_store": store}
