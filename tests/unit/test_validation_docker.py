"""Docker: settings and option values the engine would refuse are refused before a container is created; an
engine 400 names the field and fails once (issue 9, items 1 and 4).

The rules live in ``airflow_remote_ml/backends/docker/_validation.py``. The engine texts below are the
ones Docker 20.10 answered on this machine for these requests (see the module's comments).
"""

from __future__ import annotations

from typing import Any

import pytest

from airflow_remote_ml.backends.docker import DockerBackend
from airflow_remote_ml.core import BackendAPIError, ConfigError, InvalidRequestError, TransientBackendError
from tests.unit.test_docker_backend import api_error, backend, make_request

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize("image", ["python:3.12", "ubuntu", "localhost:5000/team/runner:1.0",
                                   f"registry.example.com/a/b-c__d.e@{DIGEST}", f"python:3.12@{DIGEST}",
                                   "[::1]:5000/x:latest"])
def test_image_references_the_engine_parses_are_accepted(tmp_path, image):
    b, _ = backend()
    b.validate(make_request(tmp_path, image=image))


@pytest.mark.parametrize("image", ["Airflow/Runner:1", "runner:", "runner:-bad", "a//b", "x@sha256:12", "-x",
                                   "a" * 256])
def test_an_image_reference_the_engine_cannot_parse_is_refused_before_submit(tmp_path, image):
    """Before: sent to the engine, which answered 400 'invalid reference format'."""
    b, api = backend()
    with pytest.raises(ConfigError) as info:
        b.validate(make_request(tmp_path, image=image))
    assert info.value.field == "image" and info.value.fix
    assert api.calls == []


@pytest.mark.parametrize(("options", "field"), [
    ({"ipc_mode": "weird"}, "backend_options.docker.ipc_mode"),   # the engine: 500 "Invalid IPC mode: weird"
    ({"ipc_mode": "container:"}, "backend_options.docker.ipc_mode"),
    ({"extra_hosts": {"db": "notanip"}}, "backend_options.docker.extra_hosts.db"),
    ({"extra_hosts": ["db:1.2.3.4"]}, "backend_options.docker.extra_hosts"),
    ({"mounts": "/data:/data"}, "backend_options.docker.mounts"),
    ({"user": ["1000"]}, "backend_options.docker.user"),
    ({"shm_size": "lots"}, "backend_options.docker.shm_size"),
])
def test_an_option_value_the_engine_refuses_is_refused_before_submit(tmp_path, options, field):
    b, api = backend()
    with pytest.raises(ConfigError) as info:
        b.validate(make_request(tmp_path, backend_options={"docker": options}))
    assert info.value.field == field, info.value
    assert api.calls == []


def test_option_values_the_engine_takes_pass(tmp_path):
    b, _ = backend()
    b.validate(make_request(tmp_path, backend_options={"docker": {
        "ipc_mode": "shareable", "extra_hosts": {"gw": "host-gateway", "v6": "::1", "db": "10.0.0.2"}}}))


@pytest.mark.parametrize(("settings", "field"), [
    ({"python": 5}, "backend_config[docker].python"),
    ({"python": ""}, "backend_config[docker].python"),
    ({"timeout": "60"}, "backend_config[docker].timeout"),
    ({"stop_timeout": float("inf")}, "backend_config[docker].stop_timeout"),
    ({"base_url": 5}, "backend_config[docker].base_url"),
    ({"tls_verify": "yes"}, "backend_config[docker].tls_verify"),
    ({"user": [1000]}, "backend_config[docker].user"),
    ({"labels": {"team": 1}}, "backend_config[docker].labels.team"),
    ({"labels": {"remote-ml.airflow.apache.org/step-id": "x"}},
     "backend_config[docker].labels.remote-ml.airflow.apache.org/step-id"),
    ({"removal_policy": "sometimes"}, "backend_config[docker].removal_policy"),
    ({"profiles": {"gpu": {"ipc_mode": "weird"}}}, "profiles.gpu.ipc_mode"),
])
def test_a_malformed_setting_is_refused_when_the_backend_is_built(settings, field):
    with pytest.raises(ConfigError) as info:
        DockerBackend.from_config(settings)
    assert info.value.field == field, info.value


# -- what only the engine knows: its 400 names the field, once ------------------------------------------------


def refuse_create(api: Any, status: int, message: str) -> None:
    def fail(kwargs: dict[str, Any]) -> None:
        raise api_error(status, message)
    api.on_create = fail


@pytest.mark.parametrize(("settings", "spec", "message", "field"), [
    ({}, {"backend_options": {"docker": {"mounts": ["/missing:/data"]}}},
     'invalid mount config for type "bind": bind source path does not exist: /missing',
     "backend_options.docker.mounts"),
    ({"mounts": ["/missing:/data"]}, {}, 'invalid mount config for type "bind": bind source path does not exist: '
     "/missing", "backend_config[docker].mounts"),
    ({"profiles": {"gpu": {"runtime": "nvidia"}}}, {"resources": {"profile": "gpu"}},
     "Unknown runtime specified nvidia", "profiles.gpu.runtime"),
    ({}, {"backend_options": {"docker": {"working_dir": "/opt/x"}}},
     "the working directory '/opt/x' is invalid, it needs to be an absolute path", "backend_options.docker.working_dir"),
    ({}, {"resources": {"memory": "1Ki"}}, "Minimum memory limit allowed is 6MB", "compute.memory"),
    ({}, {"resources": {"cpu": 64}}, "Range of CPUs is from 0.01 to 2.00, as there are only 2 CPUs available",
     "compute.cpu"),
    ({}, {}, "invalid reference format: repository name must be lowercase", "image"),
    ({}, {}, "something new the engine says", "backend_options.docker"),
])
def test_an_engine_400_on_create_is_an_invalid_request_naming_the_field(tmp_path, settings, spec, message, field):
    b, api = backend(**settings)
    refuse_create(api, 400, message)
    with pytest.raises(InvalidRequestError) as info:
        b.submit(make_request(tmp_path, **spec))
    assert isinstance(info.value, ConfigError) and isinstance(info.value, BackendAPIError)
    assert info.value.field == field and info.value.status_code == 400 and message in str(info.value)
    assert [c[0] for c in api.calls] == ["create"]  # created once, never started, never retried


def test_a_start_that_fails_on_the_user_names_it_and_a_plain_500_stays_transient(tmp_path):
    b, api = backend()

    def no_user(container: str) -> None:
        raise api_error(500, "unable to find user ml: no matching entries in passwd file")

    api.start = no_user  # type: ignore[method-assign]
    with pytest.raises(InvalidRequestError) as info:
        b.submit(make_request(tmp_path, backend_options={"docker": {"user": "ml"}}))
    assert info.value.field == "backend_options.docker.user"

    b, api = backend()
    refuse_create(api, 500, "containerd: connection reset")
    with pytest.raises(TransientBackendError):
        b.submit(make_request(tmp_path))
