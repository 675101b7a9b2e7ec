"""RBAC in the double: ServiceAccount tokens and an authorizer that evaluates Roles and RoleBindings.

It copies kube-apiserver's RBAC authorizer (plugin/pkg/auth/authorizer/rbac/rbac.go, with the rule
matching of pkg/apis/rbac/v1/evaluation_helpers.go):

* A request is allowed when ANY rule of ANY role bound to the user (or to one of its groups) allows it;
  there are no deny rules. RoleBindings in the request's namespace count (their roleRef a Role of that
  namespace or a ClusterRole); ClusterRoleBindings count everywhere.
* A rule matches when the verb (or ``*``), the API group (``""`` for core, or ``*``), the resource and
  the resourceNames (when the rule lists any) all match. The resource of a subresource request is
  ``pods/log``: a rule for ``pods`` does NOT grant ``pods/log``; ``*`` and ``*/log`` do (ResourceMatches).
* The verb comes from the request as the RequestInfoFactory
  (staging/src/k8s.io/apiserver/pkg/endpoints/request/requestinfo.go) derives it: GET of an item ``get``,
  of a collection ``list``, with ``watch=true`` ``watch``; POST ``create``; PUT ``update``; PATCH
  ``patch``; DELETE of an item ``delete``, of a collection ``deletecollection``.
* A ServiceAccount token authenticates as ``system:serviceaccount:<ns>:<name>`` with the groups
  ``system:serviceaccounts``, ``system:serviceaccounts:<ns>`` and ``system:authenticated``
  (pkg/serviceaccount/util.go). Discovery (``/version``, ``/api``, ``/apis``) is allowed to every
  authenticated user, as the bootstrap ClusterRole ``system:discovery`` does.
* A denial is a 403 ``Forbidden`` worded as the apiserver words it (endpoints/handlers/responsewriters
  ``forbiddenMessage``): ``pods "x" is forbidden: User "system:serviceaccount:airflow:airflow-worker" cannot
  get resource "pods/log" in API group "" in the namespace "ml-steps"``.

The admin token of the kubeconfig is not an RBAC subject (it stands for a cluster-admin, as kind's
``kubernetes-admin`` user does), so tests that do not care about RBAC are not affected.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ._meta import JSON, ApiError

DISCOVERY_KINDS = ("version", "api", "api/v1", "apis")


@dataclass(frozen=True)
class Attributes:
    """What the authorizer is asked: who does which verb on which resource, where."""

    user: str
    groups: tuple[str, ...]
    verb: str
    resource: str  # "pods", "pods/log", "namespaces"
    namespace: str
    name: str


def service_account_user(namespace: str, name: str) -> tuple[str, tuple[str, ...]]:
    return (f"system:serviceaccount:{namespace}:{name}",
            ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"))


def request_verb(method: str, kind: str, watch: bool) -> str:
    """The RBAC verb of a request (RequestInfoFactory); ``kind`` is the route's count kind."""
    is_item = "{name}" in kind
    if method == "GET":
        return "watch" if watch else "get" if is_item else "list"
    if method == "DELETE":
        return "delete" if is_item else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


def request_resource(kind: str) -> str:
    """``pods/{name}/log`` -> ``pods/log``; ``pods/{name}`` -> ``pods``."""
    parts = [p for p in kind.split("/") if p != "{name}"]
    return "/".join(parts)


def _subject_matches(subject: JSON, binding_ns: str, user: str, groups: Iterable[str]) -> bool:
    kind = subject.get("kind")
    if kind == "ServiceAccount":
        # A ServiceAccount subject without a namespace means the binding's own (rbac/v1 defaulting).
        ns = subject.get("namespace") or binding_ns
        return user == f"system:serviceaccount:{ns}:{subject.get('name')}"
    if kind == "User":
        return user == subject.get("name")
    if kind == "Group":
        return subject.get("name") in set(groups)
    return False


def rule_allows(rule: JSON, attrs: Attributes) -> bool:
    verbs = rule.get("verbs") or []
    if "*" not in verbs and attrs.verb not in verbs:
        return False
    groups = rule.get("apiGroups") or []
    if "*" not in groups and "" not in groups:
        return False
    resources = rule.get("resources") or []
    sub = attrs.resource.split("/", 1)[1] if "/" in attrs.resource else ""
    if not any(r == "*" or r == attrs.resource or (sub and r == f"*/{sub}") for r in resources):
        return False
    names = rule.get("resourceNames") or []
    return not names or attrs.name in names


class Authorizer:
    """Tokens of ServiceAccounts, and the RBAC decision over the store's Roles and bindings."""

    def __init__(self) -> None:
        self.tokens: dict[str, tuple[str, tuple[str, ...]]] = {}

    def issue_token(self, namespace: str, name: str) -> str:
        token = f"sa-{secrets.token_hex(12)}"
        self.tokens[token] = service_account_user(namespace, name)
        return token

    def _roles(self, store: Any, attrs: Attributes) -> Iterable[JSON]:
        bindings: list[tuple[str, JSON]] = [
            (ns, b) for (ns, _), b in store.objects["rolebindings"].items() if ns == attrs.namespace]
        bindings += [("", b) for b in store.objects["clusterrolebindings"].values()]
        for ns, binding in bindings:
            if not any(_subject_matches(s, ns, attrs.user, attrs.groups) for s in binding.get("subjects") or []):
                continue
            ref = binding.get("roleRef") or {}
            if ref.get("kind") == "Role" and ns:
                role = store.objects["roles"].get((ns, ref.get("name")))
            elif ref.get("kind") == "ClusterRole":
                role = store.objects["clusterroles"].get(("", ref.get("name")))
            else:
                role = None
            if role is not None:  # a binding to a missing role grants nothing (and is not an error)
                yield role

    def allowed(self, store: Any, attrs: Attributes) -> bool:
        return any(rule_allows(rule, attrs) for role in self._roles(store, attrs) for rule in role.get("rules") or [])

    def authorize(self, store: Any, subject: tuple[str, tuple[str, ...]], method: str, kind: str, watch: bool,
                  args: dict[str, Any]) -> None:
        if kind in DISCOVERY_KINDS:
            return
        user, groups = subject
        resource = request_resource(kind)
        attrs = Attributes(user, groups, request_verb(method, kind, watch), resource,
                           args.get("namespace") or "", args.get("name") or "")
        if self.allowed(store, attrs):
            return
        base = resource.split("/", 1)[0]
        where = f' in the namespace "{attrs.namespace}"' if attrs.namespace else " at the cluster scope"
        reason = f'User "{user}" cannot {attrs.verb} resource "{resource}" in API group ""{where}'
        prefix = f'{base} "{attrs.name}"' if attrs.name else base
        details: JSON = {"kind": base}
        if attrs.name:
            details["name"] = attrs.name
        raise ApiError(403, "Forbidden", f"{prefix} is forbidden: {reason}", details)
