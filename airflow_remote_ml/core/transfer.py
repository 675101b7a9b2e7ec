"""Signed URLs that let the stdlib-only runtime read and write an object store without credentials.

The runtime (:mod:`airflow_remote_ml.runtime`) speaks plain HTTP only. For an ``s3://`` input, output or
manifest, the *worker* signs short-lived URLs with its own credentials (boto3, from the ``s3`` extra) and
puts them in the runtime configuration under ``"transfers"``; the step never sees a credential:

* an input file: one presigned ``GetObject`` URL; an input directory (a key prefix): one per object,
  listed by the worker when the step is submitted;
* an output: a presigned POST policy limited to keys under the output's key (``starts-with``), so a file
  *or* a directory of any names can be uploaded, each file in one request of at most 5 GiB; plus, for a
  large file, a multipart upload created by the worker with ``multipart_parts`` presigned ``UploadPart``
  URLs and its ``Complete``/``Abort`` URLs. S3 accepts parts of 5 MiB to 5 GiB, any size but the last
  (docs: "Amazon S3 multipart upload limits"), so the runtime picks the part size from the file's size
  and ``multipart_parts`` URLs carry a file of up to ``multipart_parts`` x 5 GiB;
* the manifest: one presigned ``PutObject`` URL.

Every URL lives for the step's timeout plus ``margin_seconds`` (time to be queued and start), or
:data:`DEFAULT_UNTIMED_SECONDS` plus the margin for a step without a timeout, and never longer than SigV4's
limit of 7 days. URLs signed with temporary credentials (an instance role, IRSA, STS) stop working when
those credentials expire, whatever their own lifetime.

A step whose image has fsspec and the store's implementation (s3fs, gcsfs, adlfs) and its own credentials
can instead set ``env={"ARTIFACT_TRANSFER": "fsspec"}``: nothing is signed and the runtime uses fsspec.
Other schemes (``gs://``, ``az://``) are not signed and always take that fsspec path.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from airflow_remote_ml.core.errors import BackendUnavailableError, ConfigError, TransientBackendError

#: Schemes the worker signs URLs for.
SIGNED_SCHEMES = frozenset({"s3", "s3a"})
#: Inputs in a platform's own storage that a step on another backend cannot reach: the worker copies
#: them into the consuming step's prefix of the store first (see :func:`_stage`).
STAGED_SCHEMES = frozenset({"dbfs"})
#: The step-side switch, in the step's env: "presigned" (default) or "fsspec" (the image brings fsspec and
#: credentials). Not REMOTE_ML_*: those names are reserved for what the runtime sets itself.
MODE_ENV = "ARTIFACT_TRANSFER"
MODES = ("presigned", "fsspec")
#: SigV4 presigned URLs are valid for at most 7 days.
MAX_LIFETIME_SECONDS = 7 * 24 * 3600
#: Lifetime given to the URLs of a step that has no timeout.
DEFAULT_UNTIMED_SECONDS = 24 * 3600
#: S3's limits: a single PUT/POST carries at most 5 GiB; a multipart part is 5 MiB..5 GiB (not the last).
MAX_SINGLE_UPLOAD = 5 * 1024**3
MIN_PART_SIZE = 5 * 1024**2
MAX_PARTS = 10_000


@dataclass(frozen=True)
class TransferSettings:
    """How the worker signs. Read from the worker's environment by :meth:`from_env`."""

    #: A file output at least this large is uploaded as a multipart upload.
    multipart_threshold: int = 64 * 1024**2
    #: Presigned ``UploadPart`` URLs per output (0: no multipart upload is prepared).
    multipart_parts: int = 8
    #: Seconds added to the step's timeout for queueing and start-up.
    margin_seconds: int = 3600
    #: The most objects an input directory may hold (each needs its own signed URL in the step's config).
    max_input_files: int = 1000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TransferSettings:
        env = os.environ if env is None else env
        values: dict[str, int] = {}
        for name, var in (("multipart_threshold", "REMOTE_ML_MULTIPART_THRESHOLD"),
                          ("multipart_parts", "REMOTE_ML_MULTIPART_PARTS"),
                          ("margin_seconds", "REMOTE_ML_TRANSFER_MARGIN"),
                          ("max_input_files", "REMOTE_ML_MAX_INPUT_FILES")):
            if env.get(var):
                try:
                    values[name] = int(env[var])
                except ValueError:
                    raise ConfigError(var, f"{env[var]!r} is not a whole number", "use e.g. 3600") from None
                if values[name] < 0:
                    raise ConfigError(var, "must not be negative", "use 0 or more")
        settings = cls(**values)
        if settings.multipart_parts > MAX_PARTS:
            raise ConfigError("REMOTE_ML_MULTIPART_PARTS", f"S3 allows at most {MAX_PARTS} parts",
                              f"use at most {MAX_PARTS}")
        if settings.multipart_parts and settings.multipart_threshold < MIN_PART_SIZE:
            raise ConfigError("REMOTE_ML_MULTIPART_THRESHOLD",
                              f"S3 refuses parts smaller than {MIN_PART_SIZE} bytes (but the last)",
                              f"use at least {MIN_PART_SIZE}")
        return settings


#: Set while a backend submits (see :func:`signing`): only then are URLs signed.
_signing: contextvars.ContextVar[bool] = contextvars.ContextVar("remote_ml_signing", default=False)


@contextlib.contextmanager
def signing() -> Iterator[None]:
    """Sign the s3:// locations of every runtime config built inside this block.

    :class:`~airflow_remote_ml.core.backend.Backend` wraps every backend's ``submit`` in it, so building a
    payload anywhere else (``validate``, a dry run, a unit test) stays free of I/O and credentials: signing
    lists inputs and opens multipart uploads, which belongs to submitting a step, not to checking one.
    """
    token = _signing.set(True)
    try:
        yield
    finally:
        _signing.reset(token)


def active() -> bool:
    return _signing.get()


def is_signed_scheme(uri: str) -> bool:
    return urlparse(uri).scheme in SIGNED_SCHEMES


def mode_of(env: Mapping[str, str]) -> str:
    mode = env.get(MODE_ENV) or "presigned"
    if mode not in MODES:
        raise ConfigError(f"env.{MODE_ENV}", f"{mode!r} is not a transfer mode", f"use one of {', '.join(MODES)}")
    return mode


def url_lifetime(timeout: float | None, settings: TransferSettings) -> int:
    """Seconds the step's URLs stay valid: its timeout (or a day) plus the margin, at most 7 days."""
    base = math.ceil(timeout) if timeout else DEFAULT_UNTIMED_SECONDS
    return min(MAX_LIFETIME_SECONDS, base + settings.margin_seconds)


def split(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


#: What a worker's S3 client depends on in its environment (a client is reused while these stay the same).
_CLIENT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION",
               "AWS_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
_clients: dict[tuple[str | None, ...], Any] = {}
_clients_lock = threading.Lock()


def client() -> Any:
    """A boto3 S3 client from the worker's own configuration (credential chain, ``AWS_ENDPOINT_URL_S3``).

    Made once per process and configuration: creating one loads botocore's service model, which costs
    more than signing every URL of a step. boto3 clients are thread-safe and refresh expiring credentials.
    """
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise BackendUnavailableError("s3 artifacts", "s3", "boto3") from None
    key = tuple(os.environ.get(name) for name in _CLIENT_ENV)
    with _clients_lock:
        if key not in _clients:
            session = boto3.session.Session()
            if session.get_credentials() is None:
                # botocore signs a POST policy without credentials by failing with an AttributeError.
                from botocore.exceptions import NoCredentialsError

                raise NoCredentialsError()
            # SigV4 always: the only signature S3 accepts in every region, and the one POST policies use.
            _clients[key] = session.client("s3", config=Config(signature_version="s3v4"))
        return _clients[key]


def attach(config: dict[str, Any], env: Mapping[str, str], *, settings: TransferSettings | None = None,
           s3: Any = None) -> dict[str, Any]:
    """Add signed URLs for the s3:// inputs, outputs and manifest of a runtime config (in place).

    Also records the mode in ``config["transfer"]``. Does nothing when no location is an s3:// URI.
    """
    mode = mode_of(env)
    staged = {k: v for k, v in (config.get("inputs") or {}).items()
              if isinstance(v, str) and urlparse(v).scheme in STAGED_SCHEMES}
    inputs = {k: v for k, v in (config.get("inputs") or {}).items() if isinstance(v, str) and is_signed_scheme(v)}
    outputs = {k: v for k, v in (config.get("outputs") or {}).items() if isinstance(v, str) and is_signed_scheme(v)}
    manifest = config.get("manifest_uri")
    manifest = manifest if isinstance(manifest, str) and is_signed_scheme(manifest) else None
    if not (inputs or outputs or manifest):
        return config
    if mode == "presigned" and staged and manifest:
        # A platform-internal input (a Databricks dbfs:/ output) that a step elsewhere cannot reach: the
        # worker copies it into this step's prefix of the store and signs the copy like any s3:// input.
        prefix = manifest.rsplit("/", 1)[0]
        for name, uri in staged.items():
            try:
                inputs[name] = _stage(name, uri, f"{prefix}/inputs/{name}", s3)
            except ConfigError:
                raise
            except Exception as exc:
                raise _mapped(exc, f"inputs.{name}") from exc
        config.setdefault("transfer", {})["staged"] = {name: {"from": uri, "to": inputs[name]}
                                                       for name, uri in staged.items()}
    if mode == "fsspec":
        config["transfer"] = {"mode": "fsspec"}
        return config
    settings = settings or TransferSettings.from_env()
    lifetime = url_lifetime(config.get("timeout"), settings)
    transfers: dict[str, Any] = {"inputs": {}, "outputs": {}}
    field = "artifact_root"
    try:
        signer = _Signer(s3 or client(), lifetime, settings)
        for name, uri in inputs.items():
            field = f"inputs.{name}"
            transfers["inputs"][name] = signer.input(name, uri)
        for name, uri in outputs.items():
            field = f"outputs.{name}"
            transfers["outputs"][name] = signer.output(uri)
        if manifest:
            field = "artifact_root"
            transfers["manifest"] = {"put": signer.put(manifest)}
    except ConfigError:
        raise
    except Exception as exc:
        raise _mapped(exc, field) from exc
    config["transfers"] = transfers
    config["transfer"] = {**(config.get("transfer") or {}), "mode": "presigned",
                          "expires_at": int(time.time()) + lifetime, "lifetime_seconds": lifetime,
                          "multipart_threshold": settings.multipart_threshold}
    return config


def _stage(name: str, uri: str, target: str, s3: Any = None) -> str:
    """Copy ``uri`` (a file or a directory) to ``target`` in the store, streamed; returns ``target``.

    Read through fsspec with its own configuration (for ``dbfs:/``: fsspec's Databricks implementation,
    ``instance`` and ``token`` in fsspec's config, e.g. ``FSSPEC_DBFS_INSTANCE``/``FSSPEC_DBFS_TOKEN``).
    """
    field = f"inputs.{name}"
    try:
        import fsspec

        if uri.startswith("dbfs:"):
            # fsspec reads "dbfs:/x" as a local path named "dbfs:"; its DBFS filesystem wants "/x".
            fs, path = fsspec.filesystem("dbfs"), "/" + uri[len("dbfs:"):].lstrip("/")
        else:
            fs, path = fsspec.core.url_to_fs(uri)
        files = [(f, f[len(path.rstrip("/")) + 1:]) for f in fs.find(path)] if fs.isdir(path) else [(path, "")]
    except Exception as exc:
        raise ConfigError(field, f"the worker cannot read {uri!r} to copy it into the store: {exc}",
                          "configure fsspec for it on the worker (for dbfs:/, fsspec's 'dbfs' instance and token)"
                          ) from exc
    if not files:
        raise ConfigError(field, f"nothing exists at {uri!r}", "check the URI: it should be an earlier step's output")
    bucket, key = split(target)
    s3 = s3 or client()
    for source, relative in files:
        with fs.open(source, "rb") as fh:
            # boto3's managed upload streams the file object, in parts when it is large.
            s3.upload_fileobj(fh, bucket, f"{key}/{relative}" if relative else key)
    return target


def _mapped(exc: Exception, field: str) -> Exception:
    """botocore's failures as this package's errors: what to fix, or that trying again may help."""
    from botocore import exceptions as boto

    if isinstance(exc, (boto.NoCredentialsError, boto.PartialCredentialsError)):
        return ConfigError(field, f"the worker has no usable AWS credentials to sign the step's URLs ({exc})",
                           "give the worker credentials (a role, AWS_PROFILE, AWS_ACCESS_KEY_ID...), or set env "
                           f"{{'{MODE_ENV}': 'fsspec'}} for a step that brings its own")
    if isinstance(exc, boto.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status and (status >= 500 or status == 429):
            return TransientBackendError("s3", f"{field}: the object store answered {error.get('Code')}", status)
        return ConfigError(field, f"the object store refused the worker: {error.get('Code')}: {error.get('Message')}",
                           "check the bucket and that the worker's credentials may write under the artifact root")
    if isinstance(exc, boto.BotoCoreError):  # endpoint unreachable, connection closed, read timeout
        return TransientBackendError("s3", f"{field}: the object store could not be reached: {exc}")
    return exc


class _Signer:
    def __init__(self, s3: Any, lifetime: int, settings: TransferSettings) -> None:
        self.s3 = s3
        self.lifetime = lifetime
        self.settings = settings

    def _url(self, method: str, **params: Any) -> str:
        return str(self.s3.generate_presigned_url(method, Params=params, ExpiresIn=self.lifetime))

    def put(self, uri: str) -> str:
        bucket, key = split(uri)
        return self._url("put_object", Bucket=bucket, Key=key)

    def input(self, name: str, uri: str) -> dict[str, Any]:
        """A GET URL for the object at ``uri``, or one per object under it when it is a prefix."""
        from botocore.exceptions import ClientError

        bucket, key = split(uri)
        field = f"inputs.{name}"
        try:
            if key and not key.endswith("/"):
                try:
                    self.s3.head_object(Bucket=bucket, Key=key)
                    return {"kind": "file", "get": self._url("get_object", Bucket=bucket, Key=key)}
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                        raise
            prefix = f"{key.rstrip('/')}/" if key else ""
            files: dict[str, str] = {}
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents") or []:
                    relative = obj["Key"][len(prefix):]
                    if not relative or relative.endswith("/"):
                        continue  # a "folder" marker object some tools create
                    files[relative] = self._url("get_object", Bucket=bucket, Key=obj["Key"])
                    if len(files) > self.settings.max_input_files:
                        raise ConfigError(
                            field, f"{uri!r} holds more than {self.settings.max_input_files} objects, each of "
                            "which would need a signed URL in the step's configuration",
                            f"pack it into one archive, raise REMOTE_ML_MAX_INPUT_FILES on the worker, or set "
                            f"env {{'{MODE_ENV}': 'fsspec'}} with fsspec and s3fs in the image")
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise ConfigError(field, f"the worker cannot read {uri!r}: {error.get('Code')}: {error.get('Message')}",
                              "check the URI and that the worker's AWS credentials may read it") from None
        if not files:
            raise ConfigError(field, f"nothing exists at {uri!r} (no object and no objects under it)",
                              "check the URI: it should be an output of an earlier step")
        return {"kind": "directory", "files": files}

    def output(self, uri: str) -> dict[str, Any]:
        bucket, key = split(uri)
        # "${filename}" makes boto3 write a ["starts-with", "$key", key] condition: the step may create the
        # object `key` itself (a file output) or any `key/...` (a directory output), and nothing else.
        post = self.s3.generate_presigned_post(
            bucket, key + "${filename}", Conditions=[["content-length-range", 0, MAX_SINGLE_UPLOAD]],
            ExpiresIn=self.lifetime)
        post["fields"].pop("key", None)
        out: dict[str, Any] = {"key": key, "post": {"url": post["url"], "fields": post["fields"]},
                               "max_single_upload": MAX_SINGLE_UPLOAD}
        parts = self.settings.multipart_parts
        if parts:
            # An upload id is part of every UploadPart signature, so the upload is created here; the
            # runtime completes it for a large file and aborts it otherwise (an S3 lifecycle rule
            # AbortIncompleteMultipartUpload removes one a killed step left behind).
            upload_id = self.s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
            ids = {"Bucket": bucket, "Key": key, "UploadId": upload_id}
            out["multipart"] = {
                "threshold": self.settings.multipart_threshold,
                "min_part_size": MIN_PART_SIZE,
                "parts": [self._url("upload_part", PartNumber=n, **ids) for n in range(1, parts + 1)],
                "complete": self._url("complete_multipart_upload", **ids),
                "abort": self._url("abort_multipart_upload", **ids),
            }
        return out
