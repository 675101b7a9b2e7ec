"""Connecting to a cluster, and the one place API errors become ours.

Connection settings are read the way the cncf-kubernetes provider's ``KubernetesHook`` reads an Airflow
connection of type ``kubernetes`` (extras ``in_cluster``, ``kube_config_path``, ``kube_config``,
``cluster_context``, ``namespace``, ``disable_verify_ssl``, ``disable_tcp_keepalive``, with or without the
old ``extra__kubernetes__`` prefix), so an existing ``kubernetes_default`` works unchanged. Explicit backend
settings win over the connection's, as the hook's constructor arguments do. Without a connection the
backend uses plain settings (``kubeconfig_path``, ``kubeconfig``, ``context``, ``in_cluster``), and with
none at all the hook's default: in-cluster when running in a pod, else ``~/.kube/config``.

Unlike the hook, each backend loads into its *own* ``Configuration`` object (never the process-wide
default), so two connections in one process do not clobber each other.

Retries: urllib3's automatic retries are turned off (``Configuration.retries = False``) so that one policy
owns them: :func:`call_with_retries` retries 409 Conflict, 429, 5xx and broken connections with
exponential backoff, honouring ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from airflow_remote_ml.core.errors import BackendAPIError, ConfigError, InvalidRequestError, TransientBackendError
from airflow_remote_ml.core.poll import PollPolicy, parse_retry_after

log = logging.getLogger(__name__)

T = TypeVar("T")
BACKEND = "kubernetes"
RBAC_HINT = ("the identity Airflow uses (the worker's/triggerer's service account or the connection's user) needs "
             "the Role airflow-remote-ml of backends/kubernetes/rbac.yaml, bound in the step namespace")
#: Backoff between retries of one API call.
RETRY_POLICY = PollPolicy(first_delay=0.5, factor=2.0, cap=10.0)


# -- errors ----------------------------------------------------------------------------------------------


class NotFound(BackendAPIError):
    """HTTP 404: the object does not exist (any more)."""


class AlreadyExists(BackendAPIError):
    """HTTP 409 with reason AlreadyExists: an object of that name exists."""


class Expired(BackendAPIError):
    """HTTP 410 Gone / Expired: a watch's resourceVersion is too old; list again."""


class Invalid(InvalidRequestError):
    """HTTP 422 (or 400 on create): the API refused the object as invalid. Retrying cannot help, so it
    fails the task once (a ConfigError) with the apiserver's own words, which name the field."""

    def __init__(self, backend: str, message: str, status_code: int | None = None) -> None:
        super().__init__(backend, "pod", message, status_code,
                         "fix the setting the message names (backend_config, backend_options or the step)")


def _status_body(body: Any) -> dict[str, Any]:
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    if isinstance(body, str):
        try:
            value = json.loads(body)
        except ValueError:
            return {"message": body[:500]}
        return value if isinstance(value, dict) else {}
    return {}


def map_api_exception(exc: Any, action: str) -> BackendAPIError:
    """An ``ApiException`` (``kubernetes`` or ``kubernetes_asyncio``) as one of our errors."""
    code = getattr(exc, "status", None) or None
    body = _status_body(getattr(exc, "body", None))
    reason = body.get("reason") or getattr(exc, "reason", "") or ""
    message = f"{action}: {body.get('message') or reason or exc}"
    headers = getattr(exc, "headers", None) or {}
    retry_after = parse_retry_after(headers.get("Retry-After") if hasattr(headers, "get") else None)
    if retry_after is None:
        retry_after = (body.get("details") or {}).get("retryAfterSeconds")
    if code == 404:
        return NotFound(BACKEND, message, 404)
    if code == 409 and reason == "AlreadyExists":
        return AlreadyExists(BACKEND, message, 409)
    if code == 410:
        return Expired(BACKEND, message, 410)
    if code in (409, 429) or (code is not None and code >= 500):
        return TransientBackendError(BACKEND, message, code, retry_after)
    if code == 403 and "error looking up service account" in message:
        # The ServiceAccount admission plugin, not RBAC: the pod names an account the namespace lacks.
        return BackendAPIError(BACKEND, f"{message}; the step's service account does not exist in that namespace: "
                               "create it (kubectl create serviceaccount NAME -n NAMESPACE, or apply "
                               "backends/kubernetes/rbac.yaml) or fix service_account_name", code)
    if code in (401, 403):
        hint = "check the connection's credentials" if code == 401 else RBAC_HINT
        return BackendAPIError(BACKEND, f"{message}; {hint}", code)
    if code == 422 or (code == 400 and reason == "Invalid"):
        return Invalid(BACKEND, message, code)
    return BackendAPIError(BACKEND, message, code)


class HTTPStatusError(Exception):
    """A non-2xx answer read from a raw response, shaped like an ``ApiException`` for :func:`map_api_exception`."""

    def __init__(self, status: int, reason: str, body: bytes, headers: Mapping[str, str]) -> None:
        super().__init__(f"HTTP {status} {reason}")
        self.status = status
        self.reason = reason
        self.body = body
        self.headers = headers


async def check_response(resp: Any, action: str) -> None:
    """Raise our error for a non-2xx ``kubernetes_asyncio`` response read with ``_preload_content=False``.

    With ``_preload_content=False`` that client returns the aiohttp response as it is and never raises
    (its rest.py checks the status only when it preloads), so a 403, 429, 5xx or 406 would otherwise be
    read as a body. The sync ``kubernetes`` client raises ``ApiException`` in both modes.
    """
    status = int(getattr(resp, "status", 200) or 0)
    if 200 <= status <= 299:
        return
    try:
        body = await resp.read()
    finally:
        resp.release()
    raise map_api_exception(HTTPStatusError(status, str(getattr(resp, "reason", "") or ""), body,
                                            dict(getattr(resp, "headers", {}) or {})), action)


def map_exception(exc: BaseException, action: str) -> BackendAPIError | None:
    """Our error for any client or transport exception, or None when it is not one of those."""
    if type(exc).__name__ == "ApiException" or (hasattr(exc, "status") and hasattr(exc, "body")):
        return map_api_exception(exc, action)
    transport: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, asyncio.TimeoutError, OSError)
    with contextlib.suppress(ImportError):
        import urllib3

        transport += (urllib3.exceptions.HTTPError,)
    with contextlib.suppress(ImportError):
        import aiohttp

        transport += (aiohttp.ClientError,)
    if isinstance(exc, transport):
        return TransientBackendError(BACKEND, f"{action}: {type(exc).__name__}: {exc}")
    return None


@contextlib.contextmanager
def mapped(action: str) -> Iterator[None]:
    """Raise our errors for the client's: the choke point every API call goes through."""
    try:
        yield
    except BackendAPIError:
        raise
    except Exception as exc:
        ours = map_exception(exc, action)
        if ours is None:
            raise
        raise ours from exc


def call_with_retries(action: str, fn: Callable[[], T], attempts: int,
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()`` with our errors, retrying transient ones ``attempts`` times with backoff (Retry-After wins)."""
    for attempt in range(attempts + 1):
        try:
            with mapped(action):
                return fn()
        except TransientBackendError as exc:
            if attempt >= attempts:
                raise
            delay = RETRY_POLICY.delay(attempt, exc.retry_after)
            log.info("kubernetes: %s; retrying in %.1fs", exc, delay)
            sleep(delay)
    raise AssertionError("unreachable")


async def acall_with_retries(action: str, fn: Callable[[], Awaitable[T]], attempts: int) -> T:
    """The async twin of :func:`call_with_retries`."""
    for attempt in range(attempts + 1):
        try:
            with mapped(action):
                return await fn()
        except TransientBackendError as exc:
            if attempt >= attempts:
                raise
            delay = RETRY_POLICY.delay(attempt, exc.retry_after)
            log.info("kubernetes: %s; retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


# -- connection settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionSettings:
    """Where the cluster is and how to authenticate: at most one of the first three is set."""

    in_cluster: bool = False
    kubeconfig_path: str | None = None
    kubeconfig: dict[str, Any] | None = None
    context: str | None = None
    namespace: str | None = None
    disable_verify_ssl: bool = False
    disable_tcp_keepalive: bool = False

    def key(self) -> str:
        """A stable key for "the same cluster and credentials" (inline kubeconfigs are hashed)."""
        data = json.dumps([self.in_cluster, self.kubeconfig_path, self.kubeconfig, self.context,
                           self.disable_verify_ssl], sort_keys=True, default=str)
        return hashlib.sha256(data.encode()).hexdigest()[:24]


def _get_bool(value: Any) -> bool | None:
    """As the provider's ``_get_bool``: only clear true/false values count."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _extra_field(extras: Mapping[str, Any], name: str) -> Any:
    """As ``KubernetesHook._get_field``: the plain key, else the pre-2.3 ``extra__kubernetes__`` one."""
    if name in extras:
        return extras[name] or None
    return extras.get(f"extra__kubernetes__{name}") or None


def _parse_kubeconfig(value: Any, field: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    import yaml

    try:
        parsed = yaml.safe_load(str(value))
    except yaml.YAMLError as exc:
        raise ConfigError(field, f"is not a kubeconfig document ({exc})",
                          "paste the kubeconfig as JSON or YAML") from None
    if not isinstance(parsed, dict):
        raise ConfigError(field, "is not a kubeconfig mapping", "paste the kubeconfig as JSON or YAML")
    return parsed


def resolve_settings(plain: Mapping[str, Any], extras: Mapping[str, Any] | None) -> ConnectionSettings:
    """Merge plain backend settings over a connection's extras, refusing contradictory sources.

    ``plain`` has the backend's keys (``in_cluster``, ``kubeconfig_path``, ``kubeconfig``, ``context``,
    ``namespace``, ``disable_verify_ssl``, ``disable_tcp_keepalive``); ``extras`` the connection's.
    """
    extras = extras or {}

    def pick(key: str, extra_key: str) -> Any:
        value = plain.get(key)
        return value if value is not None else _extra_field(extras, extra_key)

    in_cluster = _get_bool(pick("in_cluster", "in_cluster")) or False
    path = pick("kubeconfig_path", "kube_config_path")
    inline = pick("kubeconfig", "kube_config")
    chosen = [name for name, value in (("in_cluster", in_cluster), ("kubeconfig_path", path),
                                       ("kubeconfig", inline)) if value]
    if len(chosen) > 1:
        raise ConfigError("connection", f"{' and '.join(chosen)} are both set; they are mutually exclusive",
                          "use only one of in_cluster, kubeconfig_path (kube_config_path) and kubeconfig (kube_config)")
    return ConnectionSettings(
        in_cluster=in_cluster,
        kubeconfig_path=str(path) if path else None,
        kubeconfig=_parse_kubeconfig(inline, "kubeconfig") if inline else None,
        context=pick("context", "cluster_context"),
        namespace=pick("namespace", "namespace"),
        disable_verify_ssl=bool(_get_bool(pick("disable_verify_ssl", "disable_verify_ssl"))),
        disable_tcp_keepalive=bool(_get_bool(pick("disable_tcp_keepalive", "disable_tcp_keepalive"))),
    )


# -- the Airflow connection (imports Airflow lazily; the backend works without it) -----------------------
# Kubernetes-specific parsing of the connection; the lookup itself is airflow_remote_ml.hooks.get_connection.

DEFAULT_CONN_ID = "kubernetes_default"


def read_connection_extras(conn_id: str) -> dict[str, Any]:
    """The extras of the Airflow connection ``conn_id`` (of type ``kubernetes``).

    As ``KubernetesHook.get_connection``: a missing ``kubernetes_default`` is an empty connection, meaning
    "in-cluster, else the default kubeconfig"; any other missing connection is an error.
    """
    from airflow_remote_ml.hooks import get_connection

    try:
        conn = get_connection(conn_id)
    except ConfigError:
        if conn_id == DEFAULT_CONN_ID:
            return {}
        raise
    if conn.conn_type and conn.conn_type != "kubernetes":
        raise ConfigError("conn_id", f"connection {conn_id!r} is of type {conn.conn_type!r}",
                          "use a connection of type 'kubernetes'")
    return dict(conn.extra_dejson or {})


# -- client configurations ------------------------------------------------------------------------------


def sync_configuration(settings: ConnectionSettings) -> Any:
    """A fresh ``kubernetes.client.Configuration`` for ``settings`` (never the process-wide default)."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    cfg = client.Configuration()
    try:
        if settings.in_cluster:
            config.load_incluster_config(client_configuration=cfg)
        elif settings.kubeconfig_path:
            config.load_kube_config(config_file=settings.kubeconfig_path, context=settings.context,
                                    client_configuration=cfg, persist_config=False)
        elif settings.kubeconfig:
            config.load_kube_config_from_dict(settings.kubeconfig, context=settings.context, client_configuration=cfg)
        else:
            try:
                config.load_incluster_config(client_configuration=cfg)
            except ConfigException:
                config.load_kube_config(context=settings.context, client_configuration=cfg, persist_config=False)
    except (ConfigException, OSError, TypeError, ValueError) as exc:
        raise ConfigError("connection", f"cannot load the Kubernetes configuration: {exc}",
                          "check kubeconfig_path/kube_config, the context name, or set in_cluster") from None
    _finish_configuration(cfg, settings)
    return cfg


async def async_configuration(settings: ConnectionSettings) -> Any:
    """A fresh ``kubernetes_asyncio.client.Configuration`` for ``settings``."""
    from kubernetes_asyncio import client, config
    from kubernetes_asyncio.config.config_exception import ConfigException

    cfg = client.Configuration()
    try:
        if settings.in_cluster:
            config.load_incluster_config(client_configuration=cfg)
        elif settings.kubeconfig_path:
            await config.load_kube_config(config_file=settings.kubeconfig_path, context=settings.context,
                                          client_configuration=cfg, persist_config=False)
        elif settings.kubeconfig:
            await config.load_kube_config_from_dict(settings.kubeconfig, context=settings.context,
                                                    client_configuration=cfg)
        else:
            try:
                config.load_incluster_config(client_configuration=cfg)
            except ConfigException:
                await config.load_kube_config(context=settings.context, client_configuration=cfg,
                                              persist_config=False)
    except (ConfigException, OSError, TypeError, ValueError) as exc:
        raise ConfigError("connection", f"cannot load the Kubernetes configuration: {exc}",
                          "check kubeconfig_path/kube_config, the context name, or set in_cluster") from None
    _finish_configuration(cfg, settings)
    return cfg


def _finish_configuration(cfg: Any, settings: ConnectionSettings) -> None:
    if settings.disable_verify_ssl:
        cfg.verify_ssl = False
    # One retry policy (ours), not urllib3's three silent retries under it.
    cfg.retries = False


def default_namespace(settings: ConnectionSettings) -> str:
    """The namespace to use when none is configured: the kubeconfig context's, the pod's own, or default."""
    if settings.namespace:
        return settings.namespace
    if settings.in_cluster:
        with contextlib.suppress(OSError), open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as fh:
            return fh.read().strip() or "default"
        return "default"
    try:
        if settings.kubeconfig_path or settings.kubeconfig or not settings.in_cluster:
            from kubernetes import config

            if settings.kubeconfig:
                contexts, current = _contexts_of(settings.kubeconfig)
            else:
                contexts, current = config.list_kube_config_contexts(config_file=settings.kubeconfig_path)
            chosen = next((c for c in contexts if c.get("name") == settings.context), None) if settings.context \
                else current
            namespace = ((chosen or {}).get("context") or {}).get("namespace")
            if namespace:
                return str(namespace)
    except Exception:  # no kubeconfig to read a namespace from: the API's default namespace
        log.debug("kubernetes: no namespace in the kubeconfig; using 'default'", exc_info=True)
    return "default"


def _contexts_of(kubeconfig: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    contexts = list(kubeconfig.get("contexts") or [])
    current = next((c for c in contexts if c.get("name") == kubeconfig.get("current-context")), None)
    return contexts, current
