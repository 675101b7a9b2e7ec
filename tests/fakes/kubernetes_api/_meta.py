"""Pure helpers of the fake API server: Status errors, time formats, selectors, patches, validation.

Nothing here does I/O, so every rule the fake enforces can be read (and unit-tested) in one place.
Messages are the ones the real kube-apiserver, scheduler and kubelet produce, so code that parses or
shows them behaves the same against the fake and against a cluster.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

JSON = dict[str, Any]

# Resource plural -> (Kind, ListKind). Only core/v1 namespaced kinds the fake stores.
KINDS: dict[str, str] = {
    "pods": "Pod",
    "events": "Event",
    "secrets": "Secret",
    "configmaps": "ConfigMap",
    "persistentvolumeclaims": "PersistentVolumeClaim",
    "serviceaccounts": "ServiceAccount",
}
CLUSTER_KINDS: dict[str, str] = {"namespaces": "Namespace", "nodes": "Node"}
#: rbac.authorization.k8s.io/v1 objects: stored for the RBAC authorizer (tests load them with ``apply``).
RBAC_KINDS: dict[str, str] = {"roles": "Role", "rolebindings": "RoleBinding", "clusterroles": "ClusterRole",
                              "clusterrolebindings": "ClusterRoleBinding"}


class ApiError(Exception):
    """An error the API answers with a ``Status`` body."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: JSON | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = dict(headers or {})

    def status(self) -> JSON:
        """The ``metav1.Status`` object as the apiserver serialises it."""
        return status_body(self.code, self.reason, self.message, self.details)


def status_body(code: int, reason: str, message: str, details: JSON | None = None) -> JSON:
    """A failure ``Status``; ``details`` is omitted when empty, as the apiserver does."""
    body: JSON = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details:
        body["details"] = details
    body["code"] = code
    return body


def not_found(resource: str, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{resource} "{name}" not found', {"name": name, "kind": resource})


def already_exists(resource: str, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{resource} "{name}" already exists', {"name": name, "kind": resource})


def conflict(resource: str, name: str, why: str | None = None) -> ApiError:
    why = why or "the object has been modified; please apply your changes to the latest version and try again"
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource} "{name}": {why}',
        {"name": name, "kind": resource},
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def expired(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def invalid(kind: str, name: str, causes: list[tuple[str, str, str]]) -> ApiError:
    """A 422 ``Invalid``; ``causes`` are (field, reason, message-without-field)."""
    text = ", ".join(f"{field}: {msg}" for field, _, msg in causes)
    message = f'{kind} "{name}" is invalid: {text}' if len(causes) == 1 else f'{kind} "{name}" is invalid: [{text}]'
    return ApiError(
        422,
        "Invalid",
        message,
        {
            "name": name,
            "kind": kind,
            "causes": [{"reason": r, "message": m, "field": f} for f, r, m in causes],
        },
    )


def too_many_requests(retry_after: int) -> ApiError:
    return ApiError(
        429,
        "TooManyRequests",
        "Too many requests, please try again later.",
        {"retryAfterSeconds": retry_after},
        {"Retry-After": str(retry_after)},
    )


def injected_error(code: int, *, resource: str = "pods", name: str = "", retry_after: int | None = None,
                   message: str | None = None) -> ApiError:
    """The error a real apiserver gives for ``code``, used by the failure-injection hooks."""
    if code == 429:
        err = too_many_requests(retry_after if retry_after is not None else 1)
    elif code == 409:
        err = conflict(resource, name or "unknown")
    elif code == 500:
        msg = message or "injected fault"
        err = ApiError(500, "InternalError", f"Internal error occurred: {msg}", {"causes": [{"message": msg}]})
    elif code == 503:
        err = ApiError(503, "ServiceUnavailable", message or "the server is currently unable to handle the request")
    elif code == 504:
        err = ApiError(504, "Timeout", message or "the server was unable to return a response in the time allotted, "
                       "but may still be processing the request")
    elif code == 401:
        err = ApiError(401, "Unauthorized", "Unauthorized")
    elif code == 403:
        err = ApiError(403, "Forbidden", message or f'{resource} is forbidden: User "system:serviceaccount:'
                       f'default:default" cannot perform this action', {"kind": resource})
    elif code == 404:
        err = not_found(resource, name or "unknown")
    else:
        err = ApiError(code, "Unknown", message or f"injected HTTP {code}")
    if message and code in (409, 429):
        err.message = message
    if retry_after is not None and code != 429:
        err.headers["Retry-After"] = str(retry_after)
        err.details = {**(err.details or {}), "retryAfterSeconds": retry_after}
    return err


# --------------------------------------------------------------------------------- media types

#: What kube-apiserver's serializers offer for core/v1 (json, yaml, protobuf), in its order. Every endpoint
#: negotiates against this list BEFORE the handler runs -- pods/log included, which then writes text/plain:
#: staging/src/k8s.io/apiserver/pkg/endpoints/handlers/negotiation/negotiate.go (NegotiateOutputMediaType)
#: answers a 406 from errors.go (errNotAcceptable: "only the following media types are accepted: ...",
#: reason NotAcceptable). So ``Accept: text/plain`` on pods/log is a 406 on a real cluster (seen on v1.36),
#: while kubectl's ``application/json, */*`` gets the log as text/plain.
SERVED_MEDIA_TYPES = ("application/json", "application/yaml", "application/vnd.kubernetes.protobuf")


def not_acceptable() -> ApiError:
    return ApiError(406, "NotAcceptable",
                    f"only the following media types are accepted: {', '.join(SERVED_MEDIA_TYPES)}")


def negotiate_media_type(accept: str | None) -> str:
    """The media type to answer with for an ``Accept`` header, or a 406 :class:`ApiError`.

    No header (or an empty one) means anything, as in munnerz/goautoneg which the apiserver uses; ranges
    are tried by descending ``q`` (a ``q=0`` range excludes), ``*/*`` and ``application/*`` pick JSON, and
    parameters such as ``;stream=watch`` or ``;as=Table`` are ignored by the double.
    """
    if accept is None or not accept.strip():
        return SERVED_MEDIA_TYPES[0]
    ranges: list[tuple[float, int, str]] = []
    for index, part in enumerate(accept.split(",")):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        if not media:
            continue
        q = 1.0
        for param in fields[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0:
            ranges.append((-q, index, media))
    for _, _, media in sorted(ranges):
        if media in ("*/*", "application/*"):
            return SERVED_MEDIA_TYPES[0]
        if media in SERVED_MEDIA_TYPES:
            return media
    raise not_acceptable()


# --------------------------------------------------------------------------------------------- time


def now_ns() -> int:
    return time.time_ns()


def fmt_time(ns: int) -> str:
    """``metav1.Time``: RFC 3339 with second precision, UTC."""
    return dt.datetime.fromtimestamp(ns // 1_000_000_000, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_micro_time(ns: int) -> str:
    """``metav1.MicroTime``: microsecond precision, used by ``eventTime``."""
    seconds, rest = divmod(ns, 1_000_000_000)
    base = dt.datetime.fromtimestamp(seconds, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{rest // 1000:06d}Z"


def fmt_log_time(ns: int) -> str:
    """The kubelet's log timestamp: RFC3339Nano with fixed-width nanoseconds (``RFC3339NanoFixed``)."""
    seconds, rest = divmod(ns, 1_000_000_000)
    base = dt.datetime.fromtimestamp(seconds, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{rest:09d}Z"


_RFC3339 = re.compile(r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def parse_time(value: str) -> int:
    """Parse an RFC 3339 time (``sinceTime``) to nanoseconds since the epoch."""
    m = _RFC3339.match(value.strip())
    if not m:
        raise bad_request(f'parsing time "{value}" as "2006-01-02T15:04:05Z07:00": cannot parse')
    date, clock, frac, zone = m.groups()
    zone = "+00:00" if zone in ("Z", "z") else zone
    base = dt.datetime.fromisoformat(f"{date}T{clock}{zone}")
    frac_ns = int((frac or ".0")[1:].ljust(9, "0")[:9])
    return int(base.timestamp()) * 1_000_000_000 + frac_ns


# ------------------------------------------------------------------------------------------ selectors

Requirement = tuple[str, str, tuple[str, ...]]  # (key, op, values); op in = != in notin exists !exists

_LABEL_KEY_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _tokenize_selector(text: str) -> list[str]:
    tokens: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif text.startswith(("==", "!="), i):
            tokens.append(text[i : i + 2])
            i += 2
        elif c in "=(),!":
            tokens.append(c)
            i += 1
        else:
            j = i
            while j < len(text) and not text[j].isspace() and text[j] not in "=(),!":
                j += 1
            tokens.append(text[i:j])
            i = j
    return tokens


def parse_label_selector(text: str | None) -> list[Requirement]:
    """Parse a ``labelSelector`` (``a=b``, ``a!=b``, ``a in (x,y)``, ``a notin (x)``, ``a``, ``!a``)."""
    if not text or not text.strip():
        return []
    tokens = _tokenize_selector(text)
    reqs: list[Requirement] = []
    i = 0

    def fail(why: str) -> ApiError:
        return bad_request(f"unable to parse requirement: {why}")

    while i < len(tokens):
        if tokens[i] == "!":
            if i + 1 >= len(tokens):
                raise fail("found '', expected: identifier")
            reqs.append((tokens[i + 1], "!exists", ()))
            i += 2
        else:
            key = tokens[i]
            if key in "=(),!" or key in ("==", "!="):
                raise fail(f"found '{key}', expected: !, identifier, or 'end of string'")
            i += 1
            if i >= len(tokens) or tokens[i] == ",":
                reqs.append((key, "exists", ()))
            elif tokens[i] in ("=", "==", "!="):
                op = "!=" if tokens[i] == "!=" else "="
                i += 1
                value = ""
                if i < len(tokens) and tokens[i] != ",":
                    value = tokens[i]
                    i += 1
                reqs.append((key, op, (value,)))
            elif tokens[i] in ("in", "notin"):
                op = tokens[i]
                i += 1
                if i >= len(tokens) or tokens[i] != "(":
                    raise fail(f"found '{tokens[i] if i < len(tokens) else ''}', expected: '('")
                i += 1
                values: list[str] = []
                while i < len(tokens) and tokens[i] != ")":
                    if tokens[i] != ",":
                        values.append(tokens[i])
                    i += 1
                if i >= len(tokens):
                    raise fail("found '', expected: ')'")
                i += 1
                reqs.append((key, op, tuple(values)))
            else:
                raise fail(f"found '{tokens[i]}', expected: in, notin, =, ==, !=, gt, lt, or 'end of string'")
            k_name = key.rsplit("/", 1)[-1]
            if not _LABEL_KEY_NAME.match(k_name) or len(k_name) > 63:
                raise fail(f'key: Invalid value: "{key}": name part must consist of alphanumeric characters')
        if i < len(tokens):
            if tokens[i] != ",":
                raise fail(f"found '{tokens[i]}', expected: ',' or 'end of string'")
            i += 1
    return reqs


def labels_match(reqs: list[Requirement], labels: Mapping[str, str] | None) -> bool:
    labels = labels or {}
    for key, op, values in reqs:
        present = key in labels
        if op == "=" and (not present or labels[key] != values[0]):
            return False
        if op == "!=" and present and labels[key] == values[0]:
            return False
        if op == "in" and (not present or labels[key] not in values):
            return False
        if op == "notin" and present and labels[key] in values:
            return False
        if op == "exists" and not present:
            return False
        if op == "!exists" and present:
            return False
    return True


FieldReq = tuple[str, bool, str]  # (field, equal?, value)

_POD_FIELDS: dict[str, Callable[[JSON], str]] = {
    "spec.nodeName": lambda o: o.get("spec", {}).get("nodeName", ""),
    "spec.restartPolicy": lambda o: o.get("spec", {}).get("restartPolicy", ""),
    "spec.schedulerName": lambda o: o.get("spec", {}).get("schedulerName", ""),
    "spec.serviceAccountName": lambda o: o.get("spec", {}).get("serviceAccountName", ""),
    "spec.hostNetwork": lambda o: str(bool(o.get("spec", {}).get("hostNetwork", False))).lower(),
    "status.phase": lambda o: o.get("status", {}).get("phase", ""),
    "status.podIP": lambda o: o.get("status", {}).get("podIP", ""),
    "status.nominatedNodeName": lambda o: o.get("status", {}).get("nominatedNodeName", ""),
}


def _event_field(path: str) -> Callable[[JSON], str]:
    parts = path.split(".")

    def get(o: JSON) -> str:
        cur: Any = o
        for p in parts:
            cur = cur.get(p, "") if isinstance(cur, dict) else ""
        if isinstance(cur, dict):  # "source" selects source.component, as the apiserver does
            cur = cur.get("component", "")
        return "" if cur is None else str(cur)

    return get


_EVENT_FIELDS: dict[str, Callable[[JSON], str]] = {
    f: _event_field(f)
    for f in (
        "involvedObject.kind", "involvedObject.namespace", "involvedObject.name", "involvedObject.uid",
        "involvedObject.apiVersion", "involvedObject.resourceVersion", "involvedObject.fieldPath",
        "reason", "reportingComponent", "source", "type",
    )
}
_SECRET_FIELDS: dict[str, Callable[[JSON], str]] = {"type": lambda o: o.get("type", "")}
_PVC_FIELDS: dict[str, Callable[[JSON], str]] = {}
_NS_FIELDS: dict[str, Callable[[JSON], str]] = {"status.phase": lambda o: o.get("status", {}).get("phase", "")}
_NODE_FIELDS: dict[str, Callable[[JSON], str]] = {
    "spec.unschedulable": lambda o: str(bool(o.get("spec", {}).get("unschedulable", False))).lower()
}

FIELD_GETTERS: dict[str, dict[str, Callable[[JSON], str]]] = {
    "pods": _POD_FIELDS,
    "events": _EVENT_FIELDS,
    "secrets": _SECRET_FIELDS,
    "configmaps": {},
    "persistentvolumeclaims": _PVC_FIELDS,
    "namespaces": _NS_FIELDS,
    "nodes": _NODE_FIELDS,
}


def parse_field_selector(resource: str, text: str | None) -> list[FieldReq]:
    """Parse a ``fieldSelector``; unknown fields are a 400, worded like the apiserver."""
    if not text or not text.strip():
        return []
    known = FIELD_GETTERS.get(resource, {})
    reqs: list[FieldReq] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.match(r"^([^=!]+)(==|=|!=)(.*)$", part)
        if not m:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{part}'")
        field, op, value = m.group(1).strip(), m.group(2), m.group(3).strip()
        if field not in ("metadata.name", "metadata.namespace") and field not in known:
            raise bad_request(f'"{field}" is not a known field selector: only "metadata.name", "metadata.namespace"'
                              if not known else f"field label not supported: {field}")
        reqs.append((field, op != "!=", value))
    return reqs


def fields_match(resource: str, reqs: list[FieldReq], obj: JSON) -> bool:
    getters = FIELD_GETTERS.get(resource, {})
    for field, equal, value in reqs:
        if field == "metadata.name":
            actual = obj.get("metadata", {}).get("name", "")
        elif field == "metadata.namespace":
            actual = obj.get("metadata", {}).get("namespace", "")
        else:
            actual = getters[field](obj)
        if (actual == value) != equal:
            return False
    return True


# --------------------------------------------------------------------------------------------- paging


def encode_continue(rv: int, last_key: str) -> str:
    """A continue token shaped like the apiserver's (base64 JSON with ``rv`` and ``start``)."""
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": last_key + "\x00"}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_continue(token: str) -> tuple[int, str]:
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if data.get("v") != "meta.k8s.io/v1":
            raise ValueError("version")
        return int(data["rv"]), str(data["start"])
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise bad_request(f"continue key is not valid: {exc}") from exc


CONTINUE_EXPIRED = (
    "The provided continue parameter is too old to display a consistent list result. You can start a new "
    "list without the continue parameter, or use the continue token in this response to retrieve the "
    "remainder of the results. Continuing with the provided token results in an inconsistent list - objects "
    "that were created, modified, or deleted between the time the first chunk was returned and now may show "
    "up in the list."
)


# -------------------------------------------------------------------------------------------- patches


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """A subset of strategic merge patch: maps merge, lists of named objects merge by ``name``.

    Enough for the fields clients patch on pods (labels, annotations, finalizers, container images);
    ``$patch: delete`` on a list element and ``$retainKeys`` are honoured where simple.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list) and _named_list(value) \
                and _named_list(result[key]):
            merged = [copy.deepcopy(x) for x in result[key]]
            for item in value:
                idx = next((i for i, x in enumerate(merged) if x.get("name") == item.get("name")), None)
                if item.get("$patch") == "delete":
                    if idx is not None:
                        merged.pop(idx)
                elif idx is None:
                    merged.append(copy.deepcopy(item))
                else:
                    merged[idx] = strategic_merge_patch(merged[idx], item)
            result[key] = merged
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def _named_list(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(x, dict) and "name" in x for x in items)


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(target: Any, ops: list[JSON]) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test)."""
    doc = copy.deepcopy(target)

    def walk(parts: list[str]) -> tuple[Any, str]:
        cur = doc
        for p in parts[:-1]:
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]
        return cur, parts[-1]

    def get(path: str) -> Any:
        cur = doc
        for p in _pointer(path):
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]
        return copy.deepcopy(cur)

    def add(path: str, value: Any) -> None:
        parent, last = walk(_pointer(path))
        if isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), value)
        else:
            parent[last] = value

    def remove(path: str) -> None:
        parent, last = walk(_pointer(path))
        if isinstance(parent, list):
            parent.pop(int(last))
        else:
            del parent[last]

    try:
        for op in ops:
            kind, path = op.get("op"), op.get("path", "")
            if kind == "add":
                add(path, copy.deepcopy(op.get("value")))
            elif kind == "remove":
                remove(path)
            elif kind == "replace":
                remove(path)
                add(path, copy.deepcopy(op.get("value")))
            elif kind == "move":
                value = get(op["from"])
                remove(op["from"])
                add(path, value)
            elif kind == "copy":
                add(path, get(op["from"]))
            elif kind == "test":
                if get(path) != op.get("value"):
                    raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our "
                                   f"request: testing value {path} failed")
            else:
                raise ApiError(422, "Invalid", f"Unexpected kind: {kind}")
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {exc}") \
            from exc
    return doc


# ----------------------------------------------------------------------------------------- validation

_LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must "
    "start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for "
    "validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
_QUALIFIED_NAME_MSG = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
    "alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is "
    "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
    "start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and "
    "end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)


def validate_metadata(meta: JSON) -> list[tuple[str, str, str]]:
    """Name, label and annotation-key rules (``apimachinery/pkg/api/validation``)."""
    causes: list[tuple[str, str, str]] = []
    name = meta.get("name", "")
    if name:
        if len(name) > 253:
            causes.append(("metadata.name", "FieldValueInvalid",
                           f'Invalid value: "{name}": must be no more than 253 characters'))
        elif not _DNS1123_SUBDOMAIN.match(name):
            causes.append(("metadata.name", "FieldValueInvalid", f'Invalid value: "{name}": {_SUBDOMAIN_MSG}'))
    for field in ("labels", "annotations"):
        for key, value in (meta.get(field) or {}).items():
            key_name = key.rsplit("/", 1)[-1]
            if not key_name or len(key_name) > 63 or not _LABEL_KEY_NAME.match(key_name):
                causes.append((f"metadata.{field}", "FieldValueInvalid", f'Invalid value: "{key}": '
                               f"{_QUALIFIED_NAME_MSG}"))
            if field == "labels":
                if not isinstance(value, str):
                    causes.append(("metadata.labels", "FieldValueInvalid", f'Invalid value: "{value}": must be a '
                                   "string"))
                elif len(value) > 63:
                    causes.append(("metadata.labels", "FieldValueInvalid",
                                   f'Invalid value: "{value}": must be no more than 63 characters'))
                elif not _LABEL_VALUE.match(value):
                    causes.append(("metadata.labels", "FieldValueInvalid", f'Invalid value: "{value}": '
                                   f"{_LABEL_VALUE_MSG}"))
    return causes


def validate_pod(pod: JSON) -> list[tuple[str, str, str]]:
    """The pod validation rules a backend can trip over."""
    causes = validate_metadata(pod.get("metadata", {}))
    spec = pod.get("spec") or {}
    containers = spec.get("containers") or []
    if not containers:
        causes.append(("spec.containers", "FieldValueRequired", "Required value"))
    seen: set[str] = set()
    for group in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(group) or []):
            name = c.get("name") or ""
            where = f"spec.{group}[{i}]"
            if not name:
                causes.append((f"{where}.name", "FieldValueRequired", "Required value"))
            elif not _DNS1123_LABEL.match(name) or len(name) > 63:
                causes.append((f"{where}.name", "FieldValueInvalid", f'Invalid value: "{name}": {_LABEL_MSG}'))
            elif name in seen:
                causes.append((f"{where}.name", "FieldValueDuplicate", f'Duplicate value: "{name}"'))
            seen.add(name)
            if not c.get("image"):
                causes.append((f"{where}.image", "FieldValueRequired", "Required value"))
            policy = c.get("terminationMessagePolicy", "File")
            if policy not in ("File", "FallbackToLogsOnError"):
                causes.append((f"{where}.terminationMessagePolicy", "FieldValueNotSupported",
                               f'Unsupported value: "{policy}": supported values: "File", "FallbackToLogsOnError"'))
            volume_names = {v.get("name") for v in spec.get("volumes") or []}
            for j, m in enumerate(c.get("volumeMounts") or []):
                if m.get("name") not in volume_names:
                    causes.append((f"{where}.volumeMounts[{j}].name", "FieldValueNotFound",
                                   f'Not found: "{m.get("name")}"'))
    policy = spec.get("restartPolicy", "Always")
    if policy not in ("Always", "OnFailure", "Never"):
        causes.append(("spec.restartPolicy", "FieldValueNotSupported",
                       f'Unsupported value: "{policy}": supported values: "Always", "OnFailure", "Never"'))
    ads = spec.get("activeDeadlineSeconds")
    if ads is not None and (not isinstance(ads, int) or ads <= 0):
        causes.append(("spec.activeDeadlineSeconds", "FieldValueInvalid",
                       f"Invalid value: {ads}: must be between 1 and 2147483647, inclusive"))
    return causes


# ---------------------------------------------------------------------------------------- quantities

_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
    "E": 1e18,
}


def parse_quantity(value: str | int | float) -> float:
    """Parse a resource quantity (``500m``, ``2Gi``, ``1e3``) to a float in base units."""
    if isinstance(value, (int, float)):
        return float(value)
    m = re.match(r"^([+-]?[0-9.]+(?:[eE][+-]?\d+)?)([a-zA-Z]*)$", value.strip())
    if not m or m.group(2) not in _SUFFIX:
        raise bad_request(f"quantities must match the regular expression "
                          f"'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {value!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]
