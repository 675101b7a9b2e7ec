"""An S3-compatible server on loopback for the tests: moto's server app behind a presigned-request check.

moto's server mode (the S3 double the s3fs project tests against) implements the S3 REST API, but it does
not check presigned URLs or POST policies: an expired URL or a key outside a policy would simply work.
Real S3 refuses both, and the runtime's error handling depends on that, so this front copies S3's checks
before handing the request to moto unchanged:

* a presigned URL (``X-Amz-Algorithm=AWS4-HMAC-SHA256`` in the query) past ``X-Amz-Date`` +
  ``X-Amz-Expires`` -> 403 ``AccessDenied`` "Request has expired" (S3 API reference, "Authenticating
  Requests: Using Query Parameters"); one whose signature does not match -> 403 ``SignatureDoesNotMatch``;
* a POST upload whose policy has expired -> 403 ``AccessDenied`` "Invalid according to Policy: Policy
  expired."; a field that breaks a condition (``starts-with $key``, ``content-length-range``) -> 403
  ``AccessDenied`` "Invalid according to Policy: Policy Condition failed: ..." (S3 API reference,
  "Creating a POST Policy"); a bad policy signature -> 403 ``SignatureDoesNotMatch``.

``clock_offset`` moves the server's clock, so an expiry is tested without waiting for it; ``fail_next(n)``
answers the next ``n`` requests with 503 ``SlowDown`` "Please reduce your request rate.", S3's answer when
a prefix gets more requests than it can take (S3 docs, "Error responses"; clients are to retry it).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"
REGION = "us-east-1"


def _error(start_response: Any, status: str, code: str, message: str, **extra: str) -> list[bytes]:
    fields = "".join(f"<{k}>{v}</{k}>" for k, v in extra.items())
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"{fields}<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>").encode()
    start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body]


def _amz_time(value: float) -> str:
    return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _signing_key(date: str) -> bytes:
    key = ("AWS4" + SECRET_KEY).encode()
    for part in (date, REGION, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


class PresignCheck:
    """WSGI middleware: S3's presigned-URL and POST-policy checks in front of moto's app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.clock_offset = 0.0
        self.refused: list[str] = []
        self._failures = 0
        self._lock = threading.Lock()

    def fail_next(self, count: int) -> None:
        with self._lock:
            self._failures = count

    def _take_failure(self) -> bool:
        with self._lock:
            if self._failures <= 0:
                return False
            self._failures -= 1
            return True

    def now(self) -> float:
        return time.time() + self.clock_offset

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if self._take_failure():
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            self.refused.append("slowdown")
            return _error(start_response, "503 Slow Down", "SlowDown", "Please reduce your request rate.")
        query = dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
        if query.get("X-Amz-Algorithm") == "AWS4-HMAC-SHA256":
            refusal = self._check_query(environ, query, start_response)
            if refusal is not None:
                # S3 answers before reading an upload's body; the body is drained here so the client,
                # which sends all of it before reading the answer, sees the 403 rather than a hang.
                environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
                return refusal
        elif environ["REQUEST_METHOD"] == "POST" and environ.get("CONTENT_TYPE", "").startswith("multipart/form-data"):
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length)
            environ["wsgi.input"] = io.BytesIO(body)  # moto reads the form again
            refusal = self._check_post(environ, body, start_response)
            if refusal is not None:
                return refusal
        return self.app(environ, start_response)

    def _check_query(self, environ: dict[str, Any], query: dict[str, str], start_response: Any) -> Any:
        from botocore.auth import S3SigV4QueryAuth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        signed_at = datetime.datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.UTC).timestamp()
        expires = int(query["X-Amz-Expires"])
        if self.now() > signed_at + expires:
            self.refused.append("expired")
            return _error(start_response, "403 Forbidden", "AccessDenied", "Request has expired",
                          **{"X-Amz-Expires": str(expires), "Expires": _amz_time(signed_at + expires),
                             "ServerTime": _amz_time(self.now())})
        # Recompute the signature the way S3 does (SigV4 query auth, UNSIGNED-PAYLOAD) over what arrived.
        host = environ.get("HTTP_HOST", "")
        unsigned = [(k, v) for k, v in parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
                    if k != "X-Amz-Signature"]
        url = f"http://{host}{environ.get('RAW_URI') or environ.get('PATH_INFO', '')}"
        url = url.split("?", 1)[0] + "?" + urlencode(unsigned)
        headers = {name: environ.get("HTTP_" + name.upper().replace("-", "_"), "")
                   for name in query.get("X-Amz-SignedHeaders", "host").split(";")}
        headers["host"] = host
        request = AWSRequest(method=environ["REQUEST_METHOD"], url=url, headers=headers)
        request.context["timestamp"] = query["X-Amz-Date"]
        auth = S3SigV4QueryAuth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", REGION, expires=expires)
        canonical = auth.canonical_request(request)
        expected = auth.signature(auth.string_to_sign(request, canonical), request)
        if not hmac.compare_digest(expected, query.get("X-Amz-Signature", "")):
            self.refused.append("signature")
            return _error(start_response, "403 Forbidden", "SignatureDoesNotMatch",
                          "The request signature we calculated does not match the signature you provided. "
                          "Check your key and signing method.")
        return None

    def _check_post(self, environ: dict[str, Any], body: bytes, start_response: Any) -> Any:
        from werkzeug.formparser import parse_form_data

        probe = dict(environ, **{"wsgi.input": io.BytesIO(body)})
        _, form, files = parse_form_data(probe)
        if "policy" not in form:
            return None
        fields = {k.lower(): v for k, v in form.items()}
        expected = hmac.new(_signing_key(fields["x-amz-date"][:8]), form["policy"].encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, fields.get("x-amz-signature", "")):
            self.refused.append("post-signature")
            return _error(start_response, "403 Forbidden", "SignatureDoesNotMatch",
                          "The request signature we calculated does not match the signature you provided.")
        policy = json.loads(base64.b64decode(form["policy"]))
        expiration = datetime.datetime.strptime(policy["expiration"], "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.UTC).timestamp()
        if self.now() > expiration:
            self.refused.append("post-expired")
            return _error(start_response, "403 Forbidden", "AccessDenied", "Invalid according to Policy: Policy expired.")
        upload = files.get("file")
        size = len(upload.read()) if upload is not None else 0
        bucket = environ.get("PATH_INFO", "/").strip("/").split("/", 1)[0]
        for condition in policy["conditions"]:
            ok = True
            if isinstance(condition, dict):
                (name, value), = condition.items()
                ok = (bucket if name == "bucket" else fields.get(name.lower())) == value
            elif condition[0] == "starts-with":
                ok = str(fields.get(condition[1].lstrip("$").lower(), "")).startswith(condition[2])
            elif condition[0] == "eq":
                ok = fields.get(condition[1].lstrip("$").lower()) == condition[2]
            elif condition[0] == "content-length-range":
                ok = int(condition[1]) <= size <= int(condition[2])
            if not ok:
                self.refused.append("post-condition")
                return _error(start_response, "403 Forbidden", "AccessDenied",
                              f"Invalid according to Policy: Policy Condition failed: {json.dumps(condition)}")
        return None


class S3Server:
    """moto's S3 app with :class:`PresignCheck` in front, on 127.0.0.1 and a free port."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass  # one line per request would drown the test output

        self.check = PresignCheck(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", 0, self.check, threaded=True, request_handler=Quiet)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> S3Server:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._thread.join(timeout=30)

    def env(self) -> dict[str, str]:
        """The worker's environment for this server: credentials, region and endpoint, as AWS tools read them."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
                "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)


def s3_server(monkeypatch: Any, bucket: str = "ml-artifacts") -> Iterator[S3Server]:
    """A running server with ``bucket``, its settings in the worker's environment (for a fixture)."""
    with S3Server() as server:
        # moto keeps its state per process, not per server: start every test from an empty store.
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{server.endpoint}/moto-api/reset", method="POST")).close()
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            monkeypatch.delenv(key, raising=False)
        server.client().create_bucket(Bucket=bucket)
        _reset_fsspec_cache()
        yield server
    _reset_fsspec_cache()


def _reset_fsspec_cache() -> None:
    # s3fs caches filesystem instances (and their endpoint) per argument set; a new server is a new port.
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:
        pass
