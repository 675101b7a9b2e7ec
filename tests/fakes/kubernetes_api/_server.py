"""The aiohttp application: core/v1 REST routes, watches, logs, request counting and fault injection."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ._kubelet import Kubelet, PodRuntime, _qos_class
from ._meta import (
    CLUSTER_KINDS,
    CONTINUE_EXPIRED,
    JSON,
    KINDS,
    ApiError,
    already_exists,
    bad_request,
    conflict,
    decode_continue,
    encode_continue,
    expired,
    fmt_log_time,
    fmt_time,
    injected_error,
    invalid,
    json_merge_patch,
    json_patch,
    negotiate_media_type,
    not_found,
    now_ns,
    parse_field_selector,
    parse_label_selector,
    parse_time,
    status_body,
    strategic_merge_patch,
    validate_metadata,
    validate_pod,
)
from ._rbac import Authorizer
from ._store import CLOSE, RESET, Store, kind_of

_TRUE = {"1", "t", "T", "true", "True", "TRUE"}
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the apiserver's name generator alphabet
_PATCH_TYPES = (
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
)


@dataclass
class Fault:
    """A failure-injection rule: the next ``remaining`` matching requests get ``status``."""

    status: int
    remaining: int
    method: str | None = None
    kind: str | None = None
    watch: bool | None = None
    retry_after: int | None = None
    message: str | None = None

    def matches(self, method: str, kind: str, watch: bool) -> bool:
        return (self.remaining > 0 and (self.method is None or self.method == method)
                and (self.kind is None or self.kind == kind) and (self.watch is None or self.watch == watch))


@dataclass
class RequestRecord:
    """One request the fake answered (for benchmarks counting API calls)."""

    time: float
    method: str
    path: str
    query: dict[str, str]
    kind: str
    watch: bool
    status: int = 0


def _json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), status=status,
                        content_type="application/json", headers=headers)


def _error_response(err: ApiError) -> web.Response:
    return _json_response(err.status(), err.code, err.headers)


def _strip_list_item(obj: JSON) -> JSON:
    # Typed lists carry kind/apiVersion once, on the list; items omit them.
    item = dict(obj)
    item.pop("kind", None)
    item.pop("apiVersion", None)
    return item


class ApiServer:
    """Routes requests to the store and the kubelet; owns counting, auth and fault injection."""

    def __init__(self, store: Store, kubelet: Kubelet, *, token: str, require_token: bool,
                 auto_create_namespaces: bool, bookmark_interval: float, watch_timeout: float) -> None:
        self.store = store
        self.kubelet = kubelet
        self.token = token
        self.require_token = require_token
        self.auto_create_namespaces = auto_create_namespaces
        self.bookmark_interval = bookmark_interval
        self.watch_timeout = watch_timeout
        self.counts: Counter[tuple[str, str, bool]] = Counter()
        self.records: list[RequestRecord] = []
        self.faults: list[Fault] = []
        #: Requests that take effect but answer late (status 200, ``message`` = seconds) or never (status 0).
        self.late_answers: list[Fault] = []
        self.outage_until = 0.0
        #: Every pod ever created (a copy as created): what the fault contract counts as "jobs".
        self.created_pods: list[JSON] = []
        self.rbac = Authorizer()
        self.active_watches = 0
        self.app = web.Application(client_max_size=64 * 2**20)
        self.app.router.add_route("*", "/{tail:.*}", self.dispatch)

    # ------------------------------------------------------------------------------- dispatch

    def _route(self, method: str, parts: list[str]) -> tuple[str, Any, dict[str, Any]]:
        """Map a path to (count kind, handler, args)."""
        if parts == ["version"]:
            return "version", self.version, {}
        if parts == ["api"]:
            return "api", self.api_versions, {}
        if parts == ["api", "v1"]:
            return "api/v1", self.api_resources, {}
        if parts == ["apis"]:
            return "apis", self.api_groups, {}
        if len(parts) < 3 or parts[:2] != ["api", "v1"]:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        rest = parts[2:]
        if rest[0] in CLUSTER_KINDS:
            resource = rest[0]
            if len(rest) == 1:
                return resource, self.collection, {"resource": resource, "namespace": None, "cluster": True}
            if len(rest) == 2:
                return f"{resource}/{{name}}", self.item, {"resource": resource, "namespace": "", "name": rest[1]}
            if resource == "namespaces" and len(rest) >= 3 and rest[2] in KINDS:
                ns, resource = rest[1], rest[2]
                if len(rest) == 3:
                    return resource, self.collection, {"resource": resource, "namespace": ns, "cluster": False}
                if len(rest) == 4:
                    return f"{resource}/{{name}}", self.item, {"resource": resource, "namespace": ns,
                                                              "name": rest[3]}
                if len(rest) == 5 and resource == "pods" and rest[4] in ("log", "status"):
                    handler = self.pod_log if rest[4] == "log" else self.pod_status
                    return f"pods/{{name}}/{rest[4]}", handler, {"namespace": ns, "name": rest[3]}
        elif rest[0] in KINDS and len(rest) == 1:
            return rest[0], self.collection, {"resource": rest[0], "namespace": None, "cluster": False}
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        query = dict(request.query)
        watch = query.get("watch", "") in _TRUE
        method = request.method
        record = RequestRecord(time.time(), method, request.path, query, "unknown", watch)
        try:
            try:
                kind, handler, args = self._route(method, parts)
            finally:
                record.kind = locals().get("kind", "unknown")
                self.counts[(method, record.kind, watch)] += 1
                self.records.append(record)
            subject = self.authenticate(request)
            # Negotiation happens before authorization and before the handler, on every endpoint
            # (see _meta.negotiate_media_type for the upstream code this copies).
            media_type = negotiate_media_type(request.headers.get("Accept"))
            if media_type == "application/vnd.kubernetes.protobuf":
                # A real apiserver would answer in protobuf; the double cannot encode it, and says so
                # loudly rather than answering JSON the client did not ask for.
                raise ApiError(406, "NotAcceptable", "the Kubernetes API test double does not encode protobuf")
            if time.monotonic() < self.outage_until:
                # The apiserver is down behind its load balancer: 503 for every request until it is back.
                raise ApiError(503, "ServiceUnavailable", "the server is currently unable to handle the request")
            self.authorize(subject, method, kind, watch, args)
            for fault in self.faults:
                if fault.matches(method, kind, watch):
                    fault.remaining -= 1
                    if fault.status == 0:  # connection reset without an answer
                        record.status = 0
                        if request.transport is not None:
                            request.transport.abort()
                        raise web.HTTPInternalServerError()
                    raise injected_error(fault.status, resource=args.get("resource", "pods"),
                                         name=args.get("name", ""), retry_after=fault.retry_after,
                                         message=fault.message)
            late = next((f for f in self.late_answers if f.matches(method, kind, watch)), None)
            if late is not None:
                late.remaining -= 1
            response = await handler(request, query=query, watch=watch, **args)
            if late is not None:
                # The request took effect (the handler ran: the object is stored and visible); only the
                # answer is late -- slower than the client's timeout -- or never comes at all.
                if late.status == 0:
                    record.status = 0
                    if request.transport is not None:
                        request.transport.abort()
                    raise web.HTTPInternalServerError()
                await asyncio.sleep(float(late.message or 0))
            if media_type == "application/yaml" and isinstance(response, web.Response) \
                    and response.content_type == "application/json" and response.body:
                import yaml

                response = web.Response(body=yaml.safe_dump(json.loads(bytes(response.body))).encode(),  # type: ignore[arg-type]
                                        status=response.status, content_type="application/yaml")
            record.status = response.status
            return response
        except ApiError as err:
            record.status = err.code
            return _error_response(err)

    # ------------------------------------------------------------------------------- authn/z

    def authenticate(self, request: web.Request) -> tuple[str, tuple[str, ...]] | None:
        """The user and groups a ServiceAccount token stands for; None for the admin token (no RBAC check).

        An unknown token is a 401 when tokens are required, as the apiserver's authenticators answer.
        """
        header = request.headers.get("Authorization") or ""
        token = header[7:] if header.startswith("Bearer ") else None
        if token is not None and token in self.rbac.tokens:
            return self.rbac.tokens[token]
        if token == self.token or not self.require_token:
            return None
        raise ApiError(401, "Unauthorized", "Unauthorized")

    def authorize(self, subject: tuple[str, tuple[str, ...]] | None, method: str, kind: str, watch: bool,
                  args: dict[str, Any]) -> None:
        """403 unless the RBAC objects allow ``subject`` the request (the admin token is never checked)."""
        if subject is None:
            return
        self.rbac.authorize(self.store, subject, method, kind, watch, args)

    # ------------------------------------------------------------------------------ discovery

    async def version(self, request: web.Request, **_: Any) -> web.Response:
        return _json_response({"major": "1", "minor": "31", "gitVersion": "v1.31.0", "gitCommit": "fake",
                               "gitTreeState": "clean", "buildDate": "2024-08-13T07:28:49Z", "goVersion": "go1.22.5",
                               "compiler": "gc", "platform": "linux/amd64"})

    async def api_versions(self, request: web.Request, **_: Any) -> web.Response:
        return _json_response({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{request.host}"}]})

    async def api_groups(self, request: web.Request, **_: Any) -> web.Response:
        return _json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})

    async def api_resources(self, request: web.Request, **_: Any) -> web.Response:
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        resources = [{"name": r, "singularName": "", "namespaced": True, "kind": k, "verbs": verbs}
                     for r, k in KINDS.items()]
        resources += [{"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get"]},
                      {"name": "pods/status", "singularName": "", "namespaced": True, "kind": "Pod",
                       "verbs": ["get", "patch", "update"]}]
        resources += [{"name": r, "singularName": "", "namespaced": False, "kind": k, "verbs": verbs}
                      for r, k in CLUSTER_KINDS.items()]
        return _json_response({"kind": "APIResourceList", "groupVersion": "v1", "resources": resources})

    # ----------------------------------------------------------------------------- collection

    def _ensure_namespace(self, ns: str) -> None:
        if self.store.peek("namespaces", "", ns) is not None:
            return
        if not self.auto_create_namespaces:
            raise not_found("namespaces", ns)
        self.create_namespace(ns)

    def create_namespace(self, ns: str) -> JSON:
        existing = self.store.peek("namespaces", "", ns)
        if existing is not None:
            return copy.deepcopy(existing)
        created = self.store.create("namespaces", {
            "metadata": {"name": ns, "uid": str(uuid.uuid4()), "creationTimestamp": fmt_time(now_ns()),
                         "labels": {"kubernetes.io/metadata.name": ns}},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
        # kube-controller-manager's serviceaccounts controller creates "default" in every namespace
        # (pkg/controller/serviceaccount/serviceaccounts_controller.go); pods that name no account use it.
        self.create_service_account(ns, "default")
        return created

    def create_service_account(self, ns: str, name: str) -> JSON:
        existing = self.store.peek("serviceaccounts", ns, name)
        if existing is not None:
            return copy.deepcopy(existing)
        return self.store.create("serviceaccounts", {
            "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4()),
                         "creationTimestamp": fmt_time(now_ns())}})

    def _admit_pod(self, pod: JSON, namespace: str) -> None:
        """The ServiceAccount admission plugin: the pod's account must exist, it is never created.

        plugin/pkg/admission/serviceaccount/admission.go: ``admission.NewForbidden(a, fmt.Errorf("error
        looking up service account %s/%s: %w", ...))`` around the lister's NotFound, i.e. a 403 Forbidden
        ``pods "<name>" is forbidden: error looking up service account ns/sa: serviceaccount "sa" not found``.
        """
        spec = pod.get("spec") or {}
        sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        if self.store.peek("serviceaccounts", namespace, sa) is None:
            name = (pod.get("metadata") or {}).get("name") or ""
            raise ApiError(403, "Forbidden", f'pods "{name}" is forbidden: error looking up service account '
                           f'{namespace}/{sa}: serviceaccount "{sa}" not found', {"name": name, "kind": "pods"})

    async def collection(self, request: web.Request, *, query: dict[str, str], watch: bool, resource: str,
                         namespace: str | None, cluster: bool) -> web.StreamResponse:
        if request.method == "GET":
            if watch:
                return await self.watch(request, resource, namespace, query)
            return _json_response(self.list_objects(resource, namespace, query))
        if request.method == "POST":
            if namespace is None and not cluster:
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested "
                               "resource")
            body = await self._read_json(request)
            created = self.create_object(resource, namespace or "", body, query)
            return _json_response(created, 201)
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def list_objects(self, resource: str, namespace: str | None, query: dict[str, str]) -> JSON:
        lreqs = parse_label_selector(query.get("labelSelector"))
        freqs = parse_field_selector(resource, query.get("fieldSelector"))
        try:
            limit = int(query.get("limit") or 0)
        except ValueError:
            raise bad_request(f"invalid limit: {query.get('limit')}") from None
        list_rv = self.store.rv
        start = ""
        if query.get("continue"):
            token_rv, start = decode_continue(query["continue"])
            if token_rv < self.store.floor:
                raise expired(CONTINUE_EXPIRED)
            list_rv = token_rv
        items = [(key, obj) for key, obj in self.store.select(resource, namespace, lreqs, freqs) if key >= start]
        meta: JSON = {"resourceVersion": str(list_rv)}
        if limit > 0 and len(items) > limit:
            meta["continue"] = encode_continue(list_rv, items[limit - 1][0])
            if not lreqs and not freqs:  # the apiserver only counts the rest when it need not filter
                meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {"kind": f"{kind_of(resource)}List", "apiVersion": "v1", "metadata": meta,
                "items": [_strip_list_item(copy.deepcopy(obj)) for _, obj in items]}

    async def _read_json(self, request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            return None
        ctype = request.content_type
        if ctype.endswith("yaml"):
            import yaml

            return yaml.safe_load(raw)
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise bad_request(f"the object provided is unrecognized (must be of type {ctype}): {exc}") from exc

    def create_object(self, resource: str, namespace: str, body: Any, query: dict[str, str]) -> JSON:
        kind = kind_of(resource)
        if not isinstance(body, dict):
            raise bad_request(f"the object provided is unrecognized (must be of type {kind})")
        if body.get("kind") not in (None, kind):
            raise bad_request(f"the kind of the provided object ({body.get('kind')}) does not match the requested "
                              f"resource ({resource})")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {}) or {}
        obj["metadata"] = meta
        if resource in KINDS:
            if meta.get("namespace") and meta["namespace"] != namespace:
                raise bad_request("the namespace of the provided object does not match the namespace sent on the "
                                  "request")
            meta["namespace"] = namespace
            self._ensure_namespace(namespace)
        if not meta.get("name"):
            if meta.get("generateName"):
                for _ in range(10):
                    suffix = "".join(_GENERATE_ALPHABET[b % len(_GENERATE_ALPHABET)] for b in uuid.uuid4().bytes[:5])
                    meta["name"] = meta["generateName"] + suffix
                    if self.store.peek(resource, namespace if resource in KINDS else "", meta["name"]) is None:
                        break
            else:
                raise invalid(kind, "", [("metadata.name", "FieldValueRequired",
                                          "Required value: name or generateName is required")])
        causes = validate_pod(obj) if resource == "pods" else validate_metadata(meta)
        if causes:
            raise invalid(kind, meta["name"], causes)
        store_ns = namespace if resource in KINDS else ""
        if self.store.peek(resource, store_ns, meta["name"]) is not None:
            raise already_exists(resource, meta["name"])
        for server_field in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(server_field, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = fmt_time(now_ns())
        obj["kind"], obj["apiVersion"] = kind, "v1"
        if resource == "pods":
            self._admit_pod(obj, namespace)
            _default_pod(obj)
        elif resource == "secrets":
            _normalise_secret(obj)
        elif resource == "persistentvolumeclaims":
            obj["status"] = {"phase": "Bound", "accessModes": obj.get("spec", {}).get("accessModes", []),
                             "capacity": (obj.get("spec", {}).get("resources") or {}).get("requests", {})}
        elif resource == "namespaces":
            obj.setdefault("status", {"phase": "Active"})
        if query.get("dryRun") == "All":
            obj["metadata"].pop("uid", None)
            return obj
        stored = self.store.create(resource, obj)
        if resource == "pods":
            self.created_pods.append(copy.deepcopy(stored))
            self.kubelet.on_created(stored)
        return stored

    # ----------------------------------------------------------------------------------- item

    async def item(self, request: web.Request, *, query: dict[str, str], watch: bool, resource: str,
                   namespace: str, name: str) -> web.StreamResponse:
        if request.method == "GET":
            obj = self.store.get(resource, namespace, name)
            if obj is None:
                raise not_found(resource, name)
            return _json_response(obj)
        if request.method == "DELETE":
            body = await self._read_json(request)
            return _json_response(self.delete_object(resource, namespace, name, query, body))
        if request.method in ("PATCH", "PUT"):
            body = await self._read_json(request)
            return _json_response(self.update_object(resource, namespace, name, request.method,
                                                     request.content_type, body))
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def delete_object(self, resource: str, namespace: str, name: str, query: dict[str, str], body: Any) -> JSON:
        obj = self.store.peek(resource, namespace, name)
        if obj is None:
            raise not_found(resource, name)
        options: JSON = {}
        if query.get("gracePeriodSeconds") not in (None, ""):
            try:
                options["gracePeriodSeconds"] = int(query["gracePeriodSeconds"])
            except ValueError:
                raise bad_request(f"invalid gracePeriodSeconds: {query['gracePeriodSeconds']}") from None
        if query.get("propagationPolicy"):
            options["propagationPolicy"] = query["propagationPolicy"]
        if isinstance(body, dict):  # a DeleteOptions body wins over query parameters
            options.update({k: v for k, v in body.items() if v is not None and k not in ("kind", "apiVersion")})
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != obj["metadata"].get("uid"):
            raise conflict(resource, name, f"Precondition failed: UID in precondition: {pre['uid']}, UID in object "
                                           f"meta: {obj['metadata'].get('uid')}")
        if pre.get("resourceVersion") and pre["resourceVersion"] != obj["metadata"].get("resourceVersion"):
            raise conflict(resource, name, f"Precondition failed: ResourceVersion in precondition: "
                                           f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                                           f"{obj['metadata'].get('resourceVersion')}")
        if query.get("dryRun") == "All" or options.get("dryRun"):
            return copy.deepcopy(obj)
        if resource == "pods":
            return self.kubelet.request_delete(namespace, name, options.get("gracePeriodSeconds"))
        deleted = self.store.delete(resource, namespace, name)
        assert deleted is not None
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": name, "kind": resource, "uid": deleted["metadata"].get("uid")}}

    def update_object(self, resource: str, namespace: str, name: str, method: str, content_type: str,
                      body: Any) -> JSON:
        current = self.store.get(resource, namespace, name)
        if current is None:
            raise not_found(resource, name)
        kind = kind_of(resource)
        if method == "PUT":
            if not isinstance(body, dict):
                raise bad_request(f"the object provided is unrecognized (must be of type {kind})")
            new = copy.deepcopy(body)
        elif content_type == "application/json-patch+json":
            if not isinstance(body, list):
                raise bad_request("the server rejected our request due to an error in our request")
            new = json_patch(current, body)
        elif content_type == "application/merge-patch+json":
            new = json_merge_patch(current, body)
        elif content_type in ("application/strategic-merge-patch+json", "application/apply-patch+yaml"):
            new = strategic_merge_patch(current, body)
        else:
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                           f"accepted media types include: {', '.join(_PATCH_TYPES)}")
        if not isinstance(new, dict):
            raise bad_request("the patch did not produce an object")
        new_meta = new.setdefault("metadata", {})
        sent_rv = new_meta.get("resourceVersion") if method == "PUT" else (
            (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None)
        if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
            raise conflict(resource, name)
        if new_meta.get("name", name) != name:
            raise bad_request(f'the name of the object ({new_meta.get("name")}) does not match the name on the URL '
                              f"({name})")
        # Server-owned metadata cannot be changed by a client.
        for f in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                  "deletionGracePeriodSeconds", "generateName"):
            if f in current["metadata"]:
                new_meta[f] = current["metadata"][f]
            else:
                new_meta.pop(f, None)
        for f in ("labels", "annotations", "finalizers", "ownerReferences"):
            if not new_meta.get(f):  # Go's omitempty: an emptied map or list disappears
                new_meta.pop(f, None)
        new["kind"], new["apiVersion"] = kind, "v1"
        if resource == "pods":
            new["status"] = current.get("status", {})  # status only changes through pods/status
            _check_pod_update(name, current["spec"], new.get("spec", {}))
            causes = validate_pod(new)
        else:
            causes = validate_metadata(new_meta)
        if causes:
            raise invalid(kind, name, causes)
        if resource == "secrets":
            _normalise_secret(new)
        stored = self.store.replace(resource, new)
        if resource == "pods" and new.get("spec", {}).get("activeDeadlineSeconds") != \
                current["spec"].get("activeDeadlineSeconds"):
            self.kubelet.deadline_changed(namespace, name)
        return stored

    async def pod_status(self, request: web.Request, *, query: dict[str, str], watch: bool, namespace: str,
                         name: str) -> web.Response:
        if request.method != "GET":
            raise ApiError(405, "MethodNotAllowed", "the fake only serves GET on pods/status")
        obj = self.store.get("pods", namespace, name)
        if obj is None:
            raise not_found("pods", name)
        return _json_response(obj)

    # ---------------------------------------------------------------------------------- watch

    async def watch(self, request: web.Request, resource: str, namespace: str | None,
                    query: dict[str, str]) -> web.StreamResponse:
        lreqs = parse_label_selector(query.get("labelSelector"))
        freqs = parse_field_selector(resource, query.get("fieldSelector"))
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else self.watch_timeout
        except ValueError:
            raise bad_request(f"invalid timeoutSeconds: {query['timeoutSeconds']}") from None
        bookmarks = query.get("allowWatchBookmarks", "") in _TRUE
        w = self.store.open_watch(resource, namespace, lreqs, freqs, query.get("resourceVersion"), bookmarks)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                           "Cache-Control": "no-cache, private"})
        response.enable_chunked_encoding()
        loop = asyncio.get_running_loop()
        self.active_watches += 1
        try:
            await response.prepare(request)
            deadline = loop.time() + timeout
            last_write = loop.time()
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                item = await w.next(min(remaining, 1.0))
                if item is None:
                    transport = request.transport
                    if transport is None or transport.is_closing():
                        break
                    if w.bookmarks and self.bookmark_interval and loop.time() - last_write >= self.bookmark_interval:
                        await response.write(self.store.bookmark(w).encode())
                        last_write = loop.time()
                    continue
                if item is CLOSE:
                    break
                if item is RESET:
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                if item == "BOOKMARK":
                    item = self.store.bookmark(w)
                await response.write(item.encode())
                last_write = loop.time()
            await response.write_eof()
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.store.close_watch(w)
            self.active_watches -= 1
        return response

    # ----------------------------------------------------------------------------------- logs

    async def pod_log(self, request: web.Request, *, query: dict[str, str], watch: bool, namespace: str,
                      name: str) -> web.StreamResponse:
        pod = self.store.get("pods", namespace, name)
        if pod is None:
            raise not_found("pods", name)
        spec = pod["spec"]
        container = query.get("container") or ""
        names = [c["name"] for c in spec["containers"]]
        init_names = [c["name"] for c in spec.get("initContainers") or []]
        if not container:
            if len(names) != 1:
                msg = f"a container name must be specified for pod {name}, choose one of: [{' '.join(names)}]"
                if init_names:
                    msg += f" or one of the init containers: [{' '.join(init_names)}]"
                raise bad_request(msg)
            container = names[0]
        elif container not in names and container not in init_names:
            raise bad_request(f"container {container} is not valid for pod {name}")
        follow = query.get("follow", "") in _TRUE
        previous = query.get("previous", "") in _TRUE
        timestamps = query.get("timestamps", "") in _TRUE
        since_ns = None
        if query.get("sinceSeconds") and query.get("sinceTime"):
            raise invalid("PodLogOptions", "", [("sinceSeconds", "FieldValueForbidden",
                                                 "Forbidden: at most one of `sinceTime` or `sinceSeconds` may be "
                                                 "specified")])
        try:
            if query.get("sinceSeconds"):
                seconds = int(query["sinceSeconds"])
                if seconds < 1:
                    raise invalid("PodLogOptions", "", [("sinceSeconds", "FieldValueInvalid",
                                                         "Invalid value: must be greater than 0")])
                since_ns = now_ns() - seconds * 1_000_000_000
            elif query.get("sinceTime"):
                since_ns = parse_time(query["sinceTime"])
            tail = int(query["tailLines"]) if query.get("tailLines") not in (None, "") else None
            limit = int(query["limitBytes"]) if query.get("limitBytes") not in (None, "") else None
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        if not spec.get("nodeName"):
            # No node yet: the apiserver has no kubelet to ask and answers with an empty body.
            return web.Response(body=b"", content_type="text/plain")
        rt = self.kubelet.pods.get((namespace, name))
        if rt is None or rt.uid != pod["metadata"]["uid"]:
            return web.Response(body=b"", content_type="text/plain")
        c = rt.find(container)
        assert c is not None
        if previous:
            if c.prev_logs is None:
                raise bad_request(f'previous terminated container "{container}" in pod "{name}" not found')
            entries, follow = list(c.prev_logs), False
        else:
            waiting = c.state.get("waiting")
            if waiting is not None:
                if c.prev_logs is not None:  # restarting: the kubelet serves the last terminated instance
                    entries, follow = list(c.prev_logs), False
                else:
                    reason = waiting.get("reason", "")
                    why = {"ErrImagePull": "image can't be pulled",
                           "ImagePullBackOff": "trying and failing to pull image"}.get(reason, reason)
                    raise bad_request(f'container "{container}" in pod "{name}" is waiting to start: {why}')
            else:
                entries = list(c.logs)
                follow = follow and c.running
        if tail is not None and tail >= 0:
            entries = entries[-tail:] if tail else []
        if since_ns is not None:
            entries = [e for e in entries if e[0] >= since_ns]

        def render(batch: list[tuple[int, bytes]]) -> bytes:
            if timestamps:
                return b"".join(fmt_log_time(t).encode() + b" " + d for t, d in batch)
            return b"".join(d for _, d in batch)

        budget = limit if limit is not None and limit > 0 else None
        if not follow:
            data = render(entries)
            if budget is not None:
                data = data[:budget]
            return web.Response(body=data, content_type="text/plain")
        return await self._follow_log(request, rt, c, entries, render, budget, since_ns)

    async def _follow_log(self, request: web.Request, rt: PodRuntime, c: Any, entries: list[tuple[int, bytes]],
                          render: Any, budget: int | None, since_ns: int | None) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        logs = c.logs
        index = len(logs)
        try:
            pending = entries
            while True:
                if pending:
                    data = render(pending)
                    if budget is not None:
                        data = data[:budget]
                        budget -= len(data)
                    await response.write(data)
                    if budget is not None and budget <= 0:
                        break
                if c.logs is not logs or not c.running:
                    # Drain whatever arrived before the container ended, then close the stream.
                    if index < len(logs):
                        pending = logs[index:]
                        index = len(logs)
                        continue
                    break
                changed = c.changed
                if index >= len(logs):
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(changed.wait(), 1.0)
                    transport = request.transport
                    if transport is None or transport.is_closing():
                        break
                if time.monotonic() < self.outage_until:  # the apiserver went away: the stream breaks
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                pending = [e for e in logs[index:] if since_ns is None or e[0] >= since_ns]
                index = len(logs)
            await response.write_eof()
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            pass
        return response


def _default_pod(pod: JSON) -> None:
    """Apply the apiserver's defaulting and admission (ServiceAccount, DefaultTolerationSeconds)."""
    spec = pod.setdefault("spec", {})
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    spec["serviceAccountName"] = spec["serviceAccount"] = sa
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("priority", 0)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    tolerations = spec.setdefault("tolerations", [])
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        if not any(t.get("key") == key for t in tolerations):
            tolerations.append({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300})
    automount = spec.get("automountServiceAccountToken", True)
    volume_name = f"kube-api-access-{uuid.uuid4().hex[:5]}"
    if automount:
        spec.setdefault("volumes", []).append({"name": volume_name, "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1",
                                                                         "fieldPath": "metadata.namespace"}}]}}]}})
    for group in ("initContainers", "containers"):
        for c in spec.get(group) or []:
            image = c.get("image", "")
            last = image.rsplit("/", 1)[-1]
            c.setdefault("imagePullPolicy", "Always" if ":" not in last or last.endswith(":latest") else "IfNotPresent")
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            c.setdefault("resources", {})
            if automount and not any(m.get("mountPath") == "/var/run/secrets/kubernetes.io/serviceaccount"
                                     for m in c.get("volumeMounts") or []):
                c.setdefault("volumeMounts", []).append({"name": volume_name, "readOnly": True,
                                                         "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"})
    pod["status"] = {"phase": "Pending", "qosClass": _qos_class(spec)}


def _normalise_secret(secret: JSON) -> None:
    secret.setdefault("type", "Opaque")
    string_data = secret.pop("stringData", None) or {}
    data = secret.setdefault("data", {}) or {}
    secret["data"] = data
    for k, v in string_data.items():
        data[k] = base64.b64encode(str(v).encode()).decode()


_MUTABLE_POD_SPEC = ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds")


def _check_pod_update(name: str, old: JSON, new: JSON) -> None:
    """Pod specs are immutable except images, activeDeadlineSeconds and added tolerations."""
    a, b = copy.deepcopy(old), copy.deepcopy(new)
    for spec in (a, b):
        for f in _MUTABLE_POD_SPEC:
            spec.pop(f, None)
        for group in ("initContainers", "containers"):
            for c in spec.get(group) or []:
                c.pop("image", None)
    if a != b:
        raise invalid("Pod", name, [("spec", "FieldValueForbidden",
                                     "Forbidden: pod updates may not change fields other than "
                                     "`spec.containers[*].image`,`spec.initContainers[*].image`,"
                                     "`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing "
                                     "tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if "
                                     "it was previously negative)")])
    old_ads, new_ads = old.get("activeDeadlineSeconds"), new.get("activeDeadlineSeconds")
    if old_ads is not None and (new_ads is None or new_ads > old_ads):
        raise invalid("Pod", name, [("spec.activeDeadlineSeconds", "FieldValueInvalid",
                                     f"Invalid value: {new_ads}: must be less than or equal to previous value")])


__all__ = ["ApiServer", "Fault", "RequestRecord", "status_body"]
