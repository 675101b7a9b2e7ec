"""A step's result as one XCom row, and the hand-off syntax that reads into it.

A succeeded step leaves one XCom row, ``return_value``: ``{"outputs": {name: uri}, "metrics": {...},
"backend", "job_id", "url"}``. The documented hand-off, ``upstream.output["outputs"]["model"]``, is a key
path into that row.

Airflow's own ``XComArg.__getitem__`` (airflow/sdk/definitions/xcom_arg.py, ``PlainXComArg``) does not
index into the value: ``op.output["outputs"]["model"]`` is ``PlainXComArg(op, key="model")``, a pull of a
separate XCom row named ``model`` (the last key wins). Keeping that syntax with Airflow's class would need
a row per output (and one for ``outputs`` and ``metrics``); :class:`StepResultArg` keeps the syntax and
reads the one ``return_value`` row instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
from airflow.sdk.definitions.xcom_arg import PlainXComArg

__all__ = ["StepResultArg"]


@attrs.define
class StepResultArg(PlainXComArg):
    """``RemoteExecutionOperator.output``: its ``return_value``, indexed by a key path on resolve.

    It is a ``PlainXComArg`` of key ``return_value`` to everything but its own resolution: Airflow's
    DAG serialization (``serialize_xcom_arg`` picks the type by ``isinstance``) stores it as a reference
    to the upstream's ``return_value``, which is what the scheduler needs for the dependency. The path
    is applied where the value is resolved: on the worker, which runs the DAG file's own objects.
    """

    path: tuple[str, ...] = ()

    def __getitem__(self, item: str) -> StepResultArg:
        if not isinstance(item, str):
            raise ValueError(f"XComArg only supports str lookup, received {type(item).__name__}")
        return StepResultArg(operator=self.operator, key=self.key, path=(*self.path, item))

    def resolve(self, context: Mapping[str, Any]) -> Any:
        value = super().resolve(context)
        for depth, part in enumerate(self.path):
            if not isinstance(value, Mapping) or part not in value:
                from airflow.sdk.exceptions import XComNotFound

                # The upstream's result has no such key (a typo in the output name, or a step that
                # declared other outputs): name what it does have.
                where = "".join(f"[{p!r}]" for p in self.path[:depth])
                have = sorted(value) if isinstance(value, Mapping) else type(value).__name__
                raise XComNotFound(self.operator.dag_id, self.operator.task_id,
                                   f"{self.key}{where}[{part!r}] (it has {have})")
            value = value[part]
        return value

    def __repr__(self) -> str:
        return f"XComArg({self.operator!r}){''.join(f'[{p!r}]' for p in self.path)}"

    def __str__(self) -> str:
        # The Jinja form (f"... {op.output['outputs']['model']} ..."): the same path, on the pulled value.
        pull = f"task_instance.xcom_pull(task_ids='{self.operator.task_id}', dag_id='{self.operator.dag_id}')"
        return "{{ " + pull + "".join(f"[{p!r}]" for p in self.path) + " }}"

    # Airflow maps only over a task's whole return value; a path into it is not something to map over.
    def map(self, f: Callable[[Any], Any]) -> Any:
        self._refuse_path("map")
        return super().map(f)

    def zip(self, *others: Any, fillvalue: Any = attrs.NOTHING) -> Any:
        self._refuse_path("zip")
        return super().zip(*others) if fillvalue is attrs.NOTHING else super().zip(*others, fillvalue=fillvalue)

    def concat(self, *others: Any) -> Any:
        self._refuse_path("concat")
        return super().concat(*others)

    def _refuse_path(self, what: str) -> None:
        if self.path:
            raise ValueError(f"cannot {what} over a key of a step's result ({self!r}); "
                             f"{what} over the step's output itself")
