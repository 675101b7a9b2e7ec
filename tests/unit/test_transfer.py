"""Signed-URL transfers without I/O: URL lifetime, settings, modes, and the runtime's error wording."""

from __future__ import annotations

import pytest

from airflow_remote_ml import runtime
from airflow_remote_ml.core import ConfigError, transfer
from airflow_remote_ml.core.transfer import TransferSettings, url_lifetime


def test_url_lifetime_is_the_timeout_plus_the_margin_within_sigv4s_seven_days():
    settings = TransferSettings(margin_seconds=600)
    assert url_lifetime(60, settings) == 660
    assert url_lifetime(59.2, settings) == 660  # rounded up: never shorter than the step may run
    assert url_lifetime(None, settings) == transfer.DEFAULT_UNTIMED_SECONDS + 600
    assert url_lifetime(30 * 24 * 3600, settings) == 7 * 24 * 3600


@pytest.mark.parametrize(("env", "field", "problem"), [
    ({"REMOTE_ML_TRANSFER_MARGIN": "1h"}, "REMOTE_ML_TRANSFER_MARGIN", "not a whole number"),
    ({"REMOTE_ML_MULTIPART_PARTS": "-1"}, "REMOTE_ML_MULTIPART_PARTS", "must not be negative"),
    ({"REMOTE_ML_MULTIPART_PARTS": "10001"}, "REMOTE_ML_MULTIPART_PARTS", "at most 10000 parts"),
    ({"REMOTE_ML_MULTIPART_THRESHOLD": "1024"}, "REMOTE_ML_MULTIPART_THRESHOLD", "smaller than 5242880"),
])
def test_bad_worker_settings_name_the_variable(env, field, problem):
    with pytest.raises(ConfigError) as raised:
        TransferSettings.from_env(env)
    assert raised.value.field == field
    assert problem in raised.value.problem


def test_settings_from_the_environment():
    settings = TransferSettings.from_env({"REMOTE_ML_MULTIPART_THRESHOLD": str(8 << 20),
                                          "REMOTE_ML_MULTIPART_PARTS": "0"})
    assert settings.multipart_threshold == 8 << 20 and settings.multipart_parts == 0
    assert TransferSettings.from_env({}) == TransferSettings()


def test_an_unknown_mode_is_a_config_error_on_the_steps_env():
    with pytest.raises(ConfigError) as raised:
        transfer.mode_of({"ARTIFACT_TRANSFER": "magic"})
    assert raised.value.field == "env.ARTIFACT_TRANSFER"
    assert "presigned, fsspec" in str(raised.value)


def test_local_locations_are_left_alone_and_need_no_client():
    config = {"inputs": {"a": "/data/a"}, "outputs": {"b": "/art/b"}, "manifest_uri": "/art/manifest.json"}
    # s3=None and no credentials: a client would only be made for an s3:// location.
    assert transfer.attach(dict(config), {}) == config


def test_fsspec_mode_signs_nothing_and_says_so():
    config = {"inputs": {}, "outputs": {"b": "s3://bkt/art/b"}, "manifest_uri": "s3://bkt/art/manifest.json"}
    attached = transfer.attach(dict(config), {"ARTIFACT_TRANSFER": "fsspec"})
    assert attached["transfer"] == {"mode": "fsspec"}
    assert "transfers" not in attached


def test_other_object_stores_are_not_signed():
    config = {"inputs": {"a": "gs://bkt/a"}, "outputs": {"b": "az://c/b"}, "manifest_uri": "gs://bkt/m.json"}
    assert "transfers" not in transfer.attach(dict(config), {})


EXPIRED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Request has expired'
           b"</Message><X-Amz-Expires>60</X-Amz-Expires></Error>")


def test_the_runtime_reads_s3_error_bodies():
    assert runtime._s3_error(EXPIRED) == ("AccessDenied", "Request has expired")
    assert runtime._s3_error(b"<html>bad gateway</html>") == ("", "")
    assert runtime._s3_error(b"not xml") == ("", "not xml")


def test_an_expired_url_says_how_long_it_was_valid_and_what_to_raise():
    runtime._set_transfers({"transfer": {"mode": "presigned", "expires_at": 0, "lifetime_seconds": 3660}})
    try:
        error = runtime._refused("input 'x' (s3://b/k)", 403, EXPIRED)
    finally:
        runtime._set_transfers({})
    assert error.exit_code == runtime.EXIT_TRANSFER
    assert str(error).startswith("input 'x' (s3://b/k): HTTP 403 AccessDenied: Request has expired (the signed URLs "
                                 "were valid for 3660 s, until 1970-01-01T00:00:00Z")
    assert "REMOTE_ML_TRANSFER_MARGIN" in str(error)


def test_a_refused_signature_points_at_the_workers_credentials():
    body = b"<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature ...</Message></Error>"
    error = runtime._refused("output 'm'", 403, body)
    assert "HTTP 403 SignatureDoesNotMatch" in str(error) and "worker's credentials" in str(error)


def test_the_version_record_names_the_transfer_path():
    runtime._set_transfers({})
    assert runtime._transfer_version(local_only=True) == "local"
    runtime._set_transfers({"transfer": {"mode": "fsspec"}})
    assert runtime._transfer_version(local_only=False) == "fsspec"
    runtime._USED.add("presigned")
    assert runtime._transfer_version(local_only=False) == "presigned"
    runtime._set_transfers({})


def test_every_backends_submit_signs_and_nothing_else_does():
    from airflow_remote_ml.core import Backend, RunHandle

    seen: dict[str, bool] = {}

    class Probe(Backend):
        name = "probe"

        def validate(self, request):
            seen["validate"] = transfer.active()

        def submit(self, request):
            seen["submit"] = transfer.active()
            return RunHandle(backend="probe", job_id="1")

        def find(self, identity):
            return None

        def poll(self, handle):
            raise NotImplementedError

        def cancel(self, handle):
            pass

    class Child(Probe):  # an override of an override is wrapped too, and signing nests
        def submit(self, request):
            seen["child"] = transfer.active()
            return super().submit(request)

    probe = Child.from_config({})
    probe.validate(None)
    probe.submit(None)
    assert seen == {"validate": False, "child": True, "submit": True}
    assert not transfer.active()
