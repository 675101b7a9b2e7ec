"""Errors of the Jobs and DBFS APIs as the provider's ``DatabricksHook`` raises them, mapped to ours at one place.

The hook retries 429, 5xx, timeouts and dropped connections itself, then raises ``AirflowException("API
requests to Databricks failed N times (last error: ...). Giving up.")`` from a tenacity ``RetryError``; an
HTTP error it does not retry becomes ``DatabricksApiError("Response: <body>, Status Code: N")``; anything else
(``ChunkedEncodingError``, a reset in the middle of a body, an aiohttp disconnect) comes through raw.
:func:`map_error` turns each into a :class:`TransientBackendError` (worth retrying: the outcome may be
unknown) or a :class:`BackendAPIError` (refused: nothing happened).
"""

from __future__ import annotations

import asyncio
from typing import Any

import requests
from tenacity import wait_exponential

from airflow_remote_ml.backends.databricks._states import ApiErrorInfo, parse_error_body
from airflow_remote_ml.backends.databricks._storage import NotFound
from airflow_remote_ml.core.errors import (
    BackendAPIError,
    ConfigError,
    InvalidRequestError,
    RemoteMLError,
    TransientBackendError,
)
from airflow_remote_ml.core.poll import parse_retry_after

#: Error codes of a 400 that refuse the request's content (Databricks REST API error codes).
INVALID_REQUEST_CODES = frozenset({"INVALID_PARAMETER_VALUE", "MALFORMED_REQUEST", "INVALID_REQUEST"})

# -- retries that honour Retry-After --------------------------------------------------------------------


def retry_after_of(exc: BaseException | None) -> float | None:
    """Seconds from the ``Retry-After`` header of a ``requests`` or ``aiohttp`` HTTP error, if any."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) if response is not None else getattr(exc, "headers", None)
    if not headers:
        return None
    return parse_retry_after(headers.get("Retry-After"))


class RetryAfterWait:
    """A tenacity ``wait`` for the hook: exponential backoff, but never shorter than ``Retry-After``.

    The hook retries 429/5xx by itself yet ignores ``Retry-After``; plugging this in keeps its retries
    and makes them polite.
    """

    def __init__(self, minimum: float, maximum: float, max_retry_after: float) -> None:
        self._backoff = wait_exponential(min=minimum, max=maximum)
        self.max_retry_after = max_retry_after

    def __call__(self, retry_state: Any) -> float:
        base = float(self._backoff(retry_state))
        outcome = retry_state.outcome
        retry_after = retry_after_of(outcome.exception()) if outcome is not None and outcome.failed else None
        if retry_after is not None:
            return max(base, min(retry_after, self.max_retry_after))
        return base


def error_info(exc: BaseException) -> ApiErrorInfo | None:
    """What went wrong in a hook call, or None for errors that are not about HTTP (bugs, config)."""
    from tenacity import RetryError

    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, RetryError):
        if cause is not exc and isinstance(cause, requests.HTTPError | requests.ConnectionError):
            break
        cause = cause.__cause__
    if isinstance(cause, RetryError):
        # The hook gave up after its retries: the last attempt says why.
        cause = cause.last_attempt.exception()
    if cause is None:
        cause = exc
    status = getattr(exc, "http_status_code", None)
    response = getattr(cause, "response", None)
    if response is not None and getattr(response, "status_code", None) is not None:
        status = response.status_code
        code, message = parse_error_body(response.text or "")
        return ApiErrorInfo(status, code, message, retry_after_of(cause))
    aiohttp_status = getattr(cause, "status", None)
    if aiohttp_status is not None and hasattr(cause, "request_info"):  # aiohttp.ClientResponseError
        reason = str(getattr(cause, "message", ""))
        return ApiErrorInfo(int(aiohttp_status), "", reason, retry_after_of(cause))
    if isinstance(
        cause, requests.ConnectionError | requests.Timeout | asyncio.TimeoutError | ConnectionError
    ):
        return ApiErrorInfo(None, "", f"{type(cause).__name__}: {cause}")
    if type(cause).__name__ in ("ClientConnectorError", "ServerDisconnectedError", "ClientOSError"):
        return ApiErrorInfo(None, "", f"{type(cause).__name__}: {cause}")
    if status is not None:
        code, message = parse_error_body(str(exc))
        return ApiErrorInfo(int(status), code, message)
    return None



def map_error(
    exc: BaseException, action: str, *, backend: str, conn_id: str, ambiguous: bool = False
) -> BaseException:
    """Our error for a hook failure. ``ambiguous``: the request may have taken effect (a submit) unless the
    service surely refused it, so every failure without a 4xx answer is transient ("outcome unknown")."""
    if isinstance(exc, RemoteMLError | NotFound):
        return exc
    if "AirflowNotFoundException" in {c.__name__ for c in type(exc).__mro__}:
        return ConfigError(
            "databricks_conn_id",
            f"{exc}",
            f"create the Airflow connection {conn_id!r} (type databricks)",
        )
    info = error_info(exc)
    if info is None:
        if ambiguous and _network_failure(exc):
            # A transport failure the hook did not classify (a body cut off, a protocol error): the request
            # may have been served, so the caller must look before it submits again.
            return TransientBackendError(backend, f"{action}: outcome unknown: {type(exc).__name__}: {exc}")
        return BackendAPIError(backend, f"{action}: {exc}")
    if info.not_found:
        return NotFound(info.message)
    text = f"{action}: {info.error_code + ': ' if info.error_code else ''}{info.message or exc}"
    if info.transient:
        if ambiguous:
            text += " (outcome unknown: the request may have taken effect)"
        return TransientBackendError(backend, text, info.status, info.retry_after)
    if info.status in (401, 403):
        text += f" (check the credentials of the Airflow connection {conn_id!r})"
    if info.status == 400 and info.error_code in INVALID_REQUEST_CODES:
        # The Jobs API's own refusal of a field ("python_file must be ...", "Invalid spark version"):
        # no retry can help, so the task fails once with the service's words.
        return InvalidRequestError(backend, "databricks", text, info.status,
                                   "fix the setting the message names (backend_config, backend_options or the step)")
    return BackendAPIError(backend, text, info.status)


def _network_failure(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, requests.RequestException | ConnectionError | TimeoutError | asyncio.TimeoutError):
            return True
        if type(cause).__module__.startswith(("aiohttp", "urllib3", "http.client")):
            return True
        cause = cause.__cause__ or cause.__context__
    return False
