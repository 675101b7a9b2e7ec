"""The Valohai v0 API client: token auth, retries honouring ``Retry-After``, and the one choke point
(:meth:`ValohaiAPI.error_for`) that maps HTTP answers to our errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urljoin, urlparse

import requests
import tenacity

from airflow_remote_ml.core.errors import (
    ArtifactError,
    BackendAPIError,
    ConfigError,
    InvalidRequestError,
    TransientBackendError,
)
from airflow_remote_ml.core.poll import parse_retry_after

log = logging.getLogger(__name__)

# What to do about a refused field of the create request (DRF field errors name Valohai's fields).
_FIELD_FIXES = {
    "project": "set 'project' of the valohai backend to a project name, 'owner/name' or the project id",
    "commit": "set 'commit' or 'branch' to one Valohai knows; after a push set 'fetch': true",
    "step": "name a step of the commit's valohai.yaml in backend_options.valohai.step or the 'steps' setting",
    "environment": "use an environment slug of your organisation in the profile or backend_options",
    "parameters": "declare each of the step's params as a parameter of the Valohai step in valohai.yaml",
    "inputs": "declare the step's inputs in valohai.yaml and pass datum:// URIs or URLs the project can read",
}


class _NotFound(BackendAPIError):
    """A 404: the object does not exist (or the token may not see it)."""


class ValohaiAPI:
    """A small client of the Valohai v0 API: token auth, retries honouring ``Retry-After``, error mapping."""

    def __init__(self, host: str, token: str, *, conn_id: str | None = None, timeout: float = 30.0,
                 max_retries: int = 5, max_retry_wait: float = 60.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        host = host.strip().rstrip("/")
        if "://" not in host:
            host = "https://" + host
        self.host = host
        self.base = host + "/api/v0/"
        self.conn_id = conn_id
        self.timeout = timeout
        self.max_retries = max(0, int(max_retries))
        self.max_retry_wait = max_retry_wait
        self.sleep = sleep
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Token {token}", "Accept": "application/json",
                                     "User-Agent": "airflow-remote-ml"})

    def url(self, path: str) -> str:
        return path if "://" in path else urljoin(self.base, path.lstrip("/"))

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                json_body: Any = None, retry: bool = True) -> Any:
        """Send one request (retried when transient) and return its JSON body (None when empty)."""
        def once() -> Any:
            return self._once(method, self.url(path), params, json_body)

        if not retry:
            return once()
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientBackendError),
            stop=tenacity.stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            sleep=self.sleep,
            before_sleep=lambda state: log.warning("valohai: %s %s: %s; retrying", method, path,
                                                   state.outcome.exception() if state.outcome else "?"),
            reraise=True,
        )
        return retrying(once)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        backoff = min(self.max_retry_wait, 0.5 * 2 ** (state.attempt_number - 1))
        retry_after = getattr(exc, "retry_after", None)
        return min(self.max_retry_wait, max(backoff, retry_after)) if retry_after is not None else backoff

    def _once(self, method: str, url: str, params: Mapping[str, Any] | None, json_body: Any) -> Any:
        try:
            resp = self.session.request(method, url, params=params, json=json_body, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientBackendError("valohai", f"{method} {urlparse(url).path}: {exc}") from exc
        except requests.RequestException as exc:
            raise BackendAPIError("valohai", f"{method} {urlparse(url).path}: {exc}") from exc
        error = self.error_for(method, url, resp)
        if error is not None:
            raise error
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise BackendAPIError("valohai", f"{method} {urlparse(url).path} answered non-JSON",
                                  resp.status_code) from None

    def error_for(self, method: str, url: str, resp: requests.Response) -> Exception | None:
        """The exception an HTTP answer means, or None for a success. The one choke point of error mapping."""
        code = resp.status_code
        if code < 400:
            return None
        try:
            body: Any = resp.json()
        except ValueError:
            body = None
        where = f"{method} {urlparse(url).path}"
        detail = body.get("detail") if isinstance(body, dict) else None
        if not isinstance(detail, str):
            html = "<html" in resp.text[:500].lower()
            detail = _field_text(body) if body else ("an HTML error page" if html
                                                     else resp.text[:200].strip())
        if code == 429 or code >= 500:
            return TransientBackendError("valohai", f"{where}: {detail}", code,
                                         parse_retry_after(resp.headers.get("Retry-After")))
        if code == 401:
            fix = (f"check the Valohai API token in connection {self.conn_id!r}" if self.conn_id
                   else "check the 'token' setting of the valohai backend")
            return ConfigError("conn_id" if self.conn_id else "token",
                               f"Valohai at {self.host} refused the API token ({detail})", fix)
        if code == 400 and isinstance(body, dict) and body and "detail" not in body:
            # DRF's field errors, {"<field>": [{"message", "code"}]} (valohai-cli's error formatter and its
            # find_error(..., code="does_not_exist") read this shape): the request is wrong, retrying cannot
            # help. An InvalidRequestError is a ConfigError, so the task fails once, naming Valohai's field.
            name = next(iter(body))
            problems = "; ".join(f"{k}: {_field_text(v)}" for k, v in body.items())
            # valohai-cli's ErrorFormatter treats these keys as errors of no one field.
            field = "valohai" if name in ("non_field_errors", "error") else f"valohai.{name}"
            inner = body[name]
            if isinstance(inner, dict) and inner and not {"message", "code"} & set(inner):
                # A nested serializer or a DictField (parameters, inputs) keys its errors by the item.
                field += f".{next(iter(inner))}"
            return InvalidRequestError("valohai", field, f"{where}: {problems}", code,
                                       _FIELD_FIXES.get(name, "fix the field Valohai names"))
        if code == 403:
            return BackendAPIError("valohai", f"{where}: permission denied ({detail}); the token's user "
                                   "needs access to the project", code)
        if code == 404:
            return _NotFound("valohai", f"{where}: not found", code)
        return BackendAPIError("valohai", f"{where}: {detail}", code)

    def paged(self, path: str, params: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Every item of a list endpoint, following DRF's absolute ``next`` links."""
        page = self.request("GET", path, params=dict(params or {}))
        while True:
            if isinstance(page, list):  # a few endpoints answer a bare list
                yield from page
                return
            yield from page.get("results") or []
            nxt = page.get("next")
            if not nxt:
                return
            page = self.request("GET", nxt)

    def download(self, datum_id: str) -> bytes:
        """A datum's content. The short-lived signed URL is used at once and never stored or logged."""
        resp = self.session.get(self.url(f"data/{datum_id}/download/"), timeout=self.timeout)
        error = self.error_for("GET", resp.url, resp)
        if error is not None:
            raise error
        if resp.headers.get("Content-Disposition", "").startswith("attachment"):
            return resp.content
        signed = resp.json()["url"]
        # A plain GET without our Authorization header: the URL carries its own signature.
        data = requests.get(signed, timeout=max(self.timeout, 300))
        if data.status_code >= 400:
            if data.status_code == 429 or data.status_code >= 500:
                raise TransientBackendError("valohai", f"downloading datum {datum_id}", data.status_code)
            raise ArtifactError(f"downloading datum://{datum_id} failed with HTTP {data.status_code}")
        return data.content

    def close(self) -> None:
        self.session.close()


def _field_text(value: Any) -> str:
    """Messages of a DRF error value: ``[{"message", "code"}]``, ``["text"]`` or nested mappings."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "; ".join(_field_text(v) for v in value)
    if isinstance(value, dict):
        if "message" in value:
            return str(value["message"])
        return "; ".join(f"{k}: {_field_text(v)}" for k, v in value.items())
    return str(value)
