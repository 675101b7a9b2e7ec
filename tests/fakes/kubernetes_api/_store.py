"""The fake's etcd + watch cache: objects, one monotonically increasing resourceVersion, watch fan-out.

Everything here runs on the server's event loop thread, so no locks are needed: a change is
recorded and offered to every watcher in one synchronous step, which is what makes "list, then
watch from the list's resourceVersion" lossless, as it is against a real apiserver.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._meta import (
    CLUSTER_KINDS,
    JSON,
    KINDS,
    RBAC_KINDS,
    FieldReq,
    Requirement,
    expired,
    fields_match,
    labels_match,
)


def kind_of(resource: str) -> str:
    return KINDS.get(resource) or CLUSTER_KINDS.get(resource) or RBAC_KINDS[resource]


@dataclass
class Change:
    """One recorded write, as the watch cache keeps it."""

    rv: int
    resource: str
    type: str  # ADDED | MODIFIED | DELETED
    obj: JSON
    prev: JSON | None
    _json: str | None = None

    def obj_json(self) -> str:
        # Serialised once per change, however many watchers receive it (500 waiting pods).
        if self._json is None:
            self._json = json.dumps(self.obj, separators=(",", ":"))
        return self._json


CLOSE = object()  # queue sentinel: end the stream cleanly
RESET = object()  # queue sentinel: drop the TCP connection


@dataclass(eq=False)
class Watcher:
    """One open watch request."""

    resource: str
    namespace: str | None
    label_reqs: list[Requirement]
    field_reqs: list[FieldReq]
    bookmarks: bool = False
    last_rv: int = 0
    items: deque[Any] = field(default_factory=deque)
    signal: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, item: Any) -> None:
        self.items.append(item)
        self.signal.set()

    async def next(self, timeout: float) -> Any:
        """The next queued line or sentinel, or None after ``timeout`` seconds."""
        if not self.items:
            self.signal.clear()
            try:
                await asyncio.wait_for(self.signal.wait(), timeout)
            except TimeoutError:
                return None
        return self.items.popleft() if self.items else None

    def matches(self, obj: JSON | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return labels_match(self.label_reqs, meta.get("labels")) and fields_match(
            self.resource, self.field_reqs, obj
        )

    def offer(self, change: Change) -> None:
        """Translate a change into what this watcher sees (a filtered watch turns edges into ADDED/DELETED)."""
        if change.type == "ADDED":
            event = "ADDED" if self.matches(change.obj) else None
        elif change.type == "DELETED":
            event = "DELETED" if self.matches(change.prev or change.obj) else None
        else:
            was, now = self.matches(change.prev), self.matches(change.obj)
            event = "MODIFIED" if was and now else "ADDED" if now else "DELETED" if was else None
        if event is not None:
            self.push(f'{{"type":"{event}","object":{change.obj_json()}}}\n')
        self.last_rv = change.rv


class Store:
    """Objects by resource and (namespace, name), the change history, and the open watches."""

    def __init__(self, history_limit: int = 100_000, first_rv: int = 1000) -> None:
        self.rv = first_rv
        self.objects: dict[str, dict[tuple[str, str], JSON]] = {
            r: {} for r in (*KINDS, *CLUSTER_KINDS, *RBAC_KINDS)}
        self.history: deque[Change] = deque()
        self.history_limit = history_limit
        # A watch or continue token older than this is answered with 410, like a compacted etcd.
        self.floor = first_rv
        self.watchers: set[Watcher] = set()
        self.listeners: list[Callable[[Change], None]] = []

    # ------------------------------------------------------------------------------------ writes

    def _record(self, resource: str, type_: str, obj: JSON, prev: JSON | None) -> Change:
        change = Change(self.rv, resource, type_, copy.deepcopy(obj), prev)
        self.history.append(change)
        while len(self.history) > self.history_limit:
            self.floor = self.history.popleft().rv
        for w in list(self.watchers):
            if w.resource == resource:
                w.offer(change)
        for listener in self.listeners:
            listener(change)
        return change

    def _bump(self, obj: JSON) -> None:
        self.rv += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)

    def create(self, resource: str, obj: JSON) -> JSON:
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        obj.setdefault("kind", kind_of(resource))
        obj.setdefault("apiVersion", "v1")
        self._bump(obj)
        self.objects[resource][key] = obj
        self._record(resource, "ADDED", obj, None)
        return copy.deepcopy(obj)

    def replace(self, resource: str, obj: JSON) -> JSON:
        """Store ``obj`` as the new version (the caller has done all checks); no-op writes bump nothing."""
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        prev = self.objects[resource][key]
        candidate = copy.deepcopy(obj)
        candidate["metadata"]["resourceVersion"] = prev["metadata"]["resourceVersion"]
        if candidate == prev:
            return copy.deepcopy(prev)
        self._bump(candidate)
        self.objects[resource][key] = candidate
        self._record(resource, "MODIFIED", candidate, copy.deepcopy(prev))
        return copy.deepcopy(candidate)

    def mutate(self, resource: str, namespace: str, name: str, fn: Callable[[JSON], None]) -> JSON | None:
        """Apply ``fn`` to a copy of the object and store it if anything changed."""
        current = self.objects[resource].get((namespace, name))
        if current is None:
            return None
        candidate = copy.deepcopy(current)
        fn(candidate)
        return self.replace(resource, candidate)

    def delete(self, resource: str, namespace: str, name: str) -> JSON | None:
        obj = self.objects[resource].pop((namespace, name), None)
        if obj is None:
            return None
        prev = copy.deepcopy(obj)
        self._bump(obj)
        self._record(resource, "DELETED", obj, prev)
        return copy.deepcopy(obj)

    # ------------------------------------------------------------------------------------- reads

    def get(self, resource: str, namespace: str, name: str) -> JSON | None:
        obj = self.objects[resource].get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def peek(self, resource: str, namespace: str, name: str) -> JSON | None:
        """The stored object itself, not a copy; callers must not mutate it."""
        return self.objects[resource].get((namespace, name))

    def select(self, resource: str, namespace: str | None, label_reqs: list[Requirement],
               field_reqs: list[FieldReq]) -> list[tuple[str, JSON]]:
        """Matching objects with their storage keys, in etcd key order."""
        out = []
        for (ns, name), obj in self.objects[resource].items():
            if namespace is not None and ns != namespace:
                continue
            meta = obj["metadata"]
            if labels_match(label_reqs, meta.get("labels")) and fields_match(resource, field_reqs, obj):
                out.append((f"{ns}/{name}" if ns else name, obj))
        out.sort(key=lambda kv: kv[0])
        return out

    # ------------------------------------------------------------------------------------- watch

    def open_watch(self, resource: str, namespace: str | None, label_reqs: list[Requirement],
                   field_reqs: list[FieldReq], resource_version: str | None, bookmarks: bool) -> Watcher:
        """Register a watch and queue what it must replay first.

        Semantics of the apiserver's watch cache: an unset or "0" resourceVersion starts with a
        synthetic ADDED for every matching object; a given one replays the changes after it, or
        answers 410 Expired when it is older than the retained history.
        """
        w = Watcher(resource, namespace, label_reqs, field_reqs, bookmarks=bookmarks, last_rv=self.rv)
        if resource_version in (None, "", "0"):
            for _, obj in self.select(resource, namespace, label_reqs, field_reqs):
                w.push('{"type":"ADDED","object":' + json.dumps(obj, separators=(",", ":")) + "}\n")
        else:
            try:
                rv = int(resource_version)
            except ValueError:
                raise expired(f"invalid resource version: {resource_version}") from None
            if rv < self.floor:
                err = expired(f"too old resource version: {rv} ({self.floor})")
                w.push('{"type":"ERROR","object":' + json.dumps(err.status()) + "}\n")
                w.push(CLOSE)
                return w
            for change in self.history:
                if change.rv > rv and change.resource == resource:
                    w.offer(change)
            w.last_rv = max(rv, self.rv)
        self.watchers.add(w)
        return w

    def close_watch(self, w: Watcher) -> None:
        self.watchers.discard(w)

    def drop_watches(self, abrupt: bool = False) -> int:
        count = 0
        for w in list(self.watchers):
            w.push(RESET if abrupt else CLOSE)
            self.watchers.discard(w)
            count += 1
        return count

    def compact(self) -> None:
        """Forget all history: every resourceVersion before now is "too old" (etcd compaction)."""
        self.history.clear()
        self.floor = self.rv

    def bookmark(self, w: Watcher) -> str:
        obj = {"kind": kind_of(w.resource), "apiVersion": "v1",
               "metadata": {"resourceVersion": str(self.rv), "creationTimestamp": None}}
        if w.resource == "pods":
            obj["spec"] = {"containers": None}
            obj["status"] = {}
        return '{"type":"BOOKMARK","object":' + json.dumps(obj, separators=(",", ":")) + "}\n"
