"""The docker backend without an engine: state mapping, request building, log cursor, error mapping.

Engine calls go to :class:`FakeAPI`, a stand-in for ``docker.APIClient`` handed to the backend through its
public ``api_client`` argument; it answers as the engine's API does (inspect documents, 404/409 errors).
"""

from __future__ import annotations

import json
import logging
import socket
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
from docker.errors import APIError, ImageNotFound, NotFound
from urllib3.exceptions import ReadTimeoutError

from airflow_remote_ml import runtime
from airflow_remote_ml.backends.docker import (
    LABEL_MANIFEST,
    LABEL_OUTPUTS,
    DockerBackend,
    DockerConfig,
    container_request,
    demux,
    marks,
    next_log_chunk,
    parse_log_entries,
    parse_mount,
    settings_from_connection,
    status_after_removal,
    status_from_inspect,
)
from airflow_remote_ml.core import (
    ArtifactStore,
    BackendAPIError,
    ConfigError,
    RunState,
    RunStatus,
    StepIdentity,
    StepRequest,
    StepSpec,
    TransientBackendError,
)
from airflow_remote_ml.core.identity import LABEL_STEP_ID

IMAGE = "airflow-remote-ml/runner:latest"


def make_request(tmp_path, **spec: Any) -> StepRequest:
    spec.setdefault("image", IMAGE)
    spec.setdefault("command", ["python3", "-c", "pass"])
    identity = StepIdentity("dag", "train", "manual__1", 2)
    return StepRequest.create(StepSpec.build(**spec), identity, ArtifactStore(str(tmp_path / "artifacts")))


def api_error(status: int, message: str = "engine says no", cls: type[APIError] = APIError) -> APIError:
    response = requests.Response()
    response.status_code = status
    return cls(message, response=response, explanation=message)


def inspect_doc(status: str, code: int = 0, *, name: str = "/dag-train-abc", oom: bool = False, error: str = "",
                memory: int = 0) -> dict[str, Any]:
    return {"Id": "f" * 64, "Name": name,
            "State": {"Status": status, "ExitCode": code, "OOMKilled": oom, "Error": error},
            "HostConfig": {"Memory": memory}, "Config": {"Labels": {}}}


# -- state mapping: every engine state ---------------------------------------------------------------------

STATE_TABLE = [
    # (inspect document, expected state, expected exit code, text expected in the message)
    (inspect_doc("created"), RunState.QUEUED, None, "not started"),
    (inspect_doc("created", 127, error="exec: \"python3\": executable file not found"), RunState.FAILED, 127,
     "could not start"),
    (inspect_doc("created", name="/dag-train-abc.cancelled"), RunState.CANCELLED, None, "before it started"),
    (inspect_doc("running"), RunState.RUNNING, None, ""),
    (inspect_doc("restarting"), RunState.RUNNING, None, "restart"),
    (inspect_doc("paused"), RunState.RUNNING, None, "unpause"),
    (inspect_doc("exited", 0), RunState.SUCCEEDED, 0, ""),
    (inspect_doc("exited", 7), RunState.FAILED, 7, "exited with code 7"),
    (inspect_doc("exited", 137), RunState.FAILED, 137, "SIGKILL"),
    (inspect_doc("exited", 137, oom=True, memory=64 * 1024**2), RunState.FAILED, 137,
     "OOMKilled: the step used more than its memory limit of 64 MiB and the kernel killed it (exit 137); "
     "raise compute.memory"),
    (inspect_doc("exited", 143, name="/dag-train-abc.cancelled"), RunState.CANCELLED, 143, "cancelled"),
    # It finished on its own just before the cancel landed: its own outcome stands.
    (inspect_doc("exited", 0, name="/dag-train-abc.cancelled"), RunState.SUCCEEDED, 0, ""),
    (inspect_doc("exited", 143, name="/dag-train-abc.cancelled.finished"), RunState.CANCELLED, 143, ""),
    (inspect_doc("exited", 0, name="/dag-train-abc.finished"), RunState.SUCCEEDED, 0, ""),
    (inspect_doc("removing", 0), RunState.SUCCEEDED, 0, ""),
    (inspect_doc("removing", 2), RunState.FAILED, 2, "code 2"),
    (inspect_doc("dead", 1, error="device or resource busy"), RunState.FAILED, 1, "dead"),
    (inspect_doc("exited", 1, error="some engine error"), RunState.FAILED, 1, "some engine error"),
]


@pytest.mark.parametrize(("doc", "state", "code", "text"), STATE_TABLE,
                         ids=[f"{d['State']['Status']}-{d['State']['ExitCode']}-{d['Name']}" for d, *_ in STATE_TABLE])
def test_every_engine_state_maps(doc, state, code, text):
    status = status_from_inspect(doc)
    assert status.state is state
    assert status.exit_code == code
    assert text in status.message
    assert status.remote_state == doc["State"]["Status"]


def test_oom_killed_is_the_statuss_reason_and_other_failures_have_none():
    # RunStatus.reason carries the engine's own word, so the task's error leads with it (issue 8 item 6).
    assert status_from_inspect(inspect_doc("exited", 137, oom=True, memory=64 * 1024**2)).reason == "OOMKilled"
    assert status_from_inspect(inspect_doc("exited", 137)).reason == ""
    assert status_from_inspect(inspect_doc("exited", 1)).reason == ""


def test_unknown_engine_state_keeps_waiting_and_warns(caplog):
    with caplog.at_level(logging.WARNING):
        status = status_from_inspect(inspect_doc("hibernating"))
    assert status.state is RunState.RUNNING
    assert status.remote_state == "hibernating"
    assert "hibernating" in caplog.text


def test_marks_are_the_dot_suffixes_of_the_name():
    assert marks("/dag-train-0123456789ab") == set()
    assert marks("/dag-train-0123456789ab.cancelled.finished") == {"cancelled", "finished"}


def test_a_removed_container_is_lost_unless_its_manifest_tells():
    identity = {"dag_id": "d", "task_id": "t", "run_id": "r", "map_index": -1, "generation": 0}
    assert status_after_removal(None, identity).state is RunState.LOST
    ok = {"status": "succeeded", "exit_code": 0, "identity": identity}
    assert status_after_removal(ok, identity).state is RunState.SUCCEEDED
    failed = {"status": "failed", "exit_code": 3, "error": "declared output 'model' not produced", "identity": identity}
    status = status_after_removal(failed, identity)
    assert (status.state, status.exit_code) == (RunState.FAILED, 3)
    assert "'model'" in status.message
    other = {**ok, "identity": {**identity, "generation": 1}}
    assert status_after_removal(other, identity).state is RunState.LOST


# -- logs: the cursor neither duplicates nor loses lines ---------------------------------------------------


def test_log_timestamps_parse_to_nanoseconds():
    raw = (b"2026-11-24T17:34:48.048084288Z line 0\n2026-11-24T17:34:48.5Z err 0\n"
           b"2026-11-24T17:34:49Z \n2026-11-24T17:34:50.000000001+00:00 last")
    entries = parse_log_entries(raw)
    base = int(datetime(2026, 11, 24, 17, 34, 48, tzinfo=UTC).timestamp()) * 10**9
    assert entries == [(base + 48084288, "line 0"), (base + 500000000, "err 0"), (base + 10**9, ""),
                       (base + 2 * 10**9 + 1, "last")]


class GrowingLog:
    """The engine's log of one container: appended in arrival order, read with an inclusive ``since``."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, str]] = []

    def write(self, seconds: float, text: str) -> None:
        self.entries.append((round(seconds * 1e9), text))

    def read(self, since: int) -> list[tuple[int, str]]:
        return [e for e in self.entries if e[0] >= since * 10**9]


def read_all(log: GrowingLog, cursor: Any) -> tuple[list[str], Any]:
    chunk = next_log_chunk(log.read(int((cursor or {}).get("since", 0))), cursor)
    json.dumps(chunk.cursor)  # the cursor crosses the trigger boundary
    return chunk.lines, chunk.cursor


def test_log_cursor_hands_out_every_line_once_across_reads():
    log = GrowingLog()
    seen: list[str] = []
    cursor = None
    t = 1000.0
    for i in range(60):
        # Bursts within one second, lines with identical timestamps, and stderr stamped a little
        # earlier than the stdout line written before it (the engine's two readers race).
        log.write(t, f"out {i}")
        log.write(t, f"same-stamp {i}")
        log.write(t - 0.0004, f"err {i}")
        t += 0.13 if i % 7 else 1.7
        if i % 3 == 0:
            lines, cursor = read_all(log, cursor)
            seen += lines
    lines, cursor = read_all(log, cursor)
    seen += lines
    assert seen == [text for _, text in log.entries]
    assert read_all(log, cursor)[0] == []
    assert cursor["since"] > 1000  # the window moved on: reads do not grow with the log


def test_a_line_stamped_before_the_last_read_second_but_written_after_it_is_not_lost():
    log = GrowingLog()
    log.write(1002.0001, "stdout line")
    lines, cursor = read_all(log, None)
    assert lines == ["stdout line"]
    log.write(1001.9999, "stderr line stamped a moment earlier, written later")
    lines, cursor = read_all(log, cursor)
    assert lines == ["stderr line stamped a moment earlier, written later"]


def test_log_cursor_when_nothing_was_logged():
    chunk = next_log_chunk([], None)
    assert chunk.lines == []
    assert next_log_chunk([(5 * 10**9, "a")], chunk.cursor).lines == ["a"]


# -- building the container --------------------------------------------------------------------------------


def test_container_carries_runtime_step_identity_and_mounts(tmp_path):
    config = DockerConfig(network_mode="none", labels={"team": "ml"}, python="/usr/bin/python3")
    request = make_request(tmp_path, outputs=["model", "report"], env={"GREETING": "hi"})
    built = container_request(config, request, {}, {"DB_PASSWORD": "s3cret"})
    create, host = built["create"], built["host"]
    assert create["image"] == IMAGE
    assert create["name"] == request.identity.name()
    assert create["entrypoint"] == runtime.launch_command("/usr/bin/python3")
    step = json.loads(create["environment"]["REMOTE_ML_STEP"])
    assert step["manifest_uri"] == request.manifest_uri
    assert step["outputs"] == request.outputs
    assert create["environment"]["GREETING"] == "hi"
    assert create["environment"]["DB_PASSWORD"] == "s3cret"
    assert create["labels"][LABEL_STEP_ID] == request.identity.digest
    assert create["labels"][LABEL_MANIFEST] == request.manifest_uri
    assert create["labels"][LABEL_OUTPUTS] == "model,report"
    assert create["labels"]["team"] == "ml"
    root = str(tmp_path / "artifacts")
    assert {"Target": root, "Source": root, "Type": "bind", "ReadOnly": False}.items() <= host["mounts"][0].items()
    assert host["network_mode"] == "none"
    assert host["init"] is True  # SIGTERM reaches the runtime even before it installs its handlers
    assert "init" not in container_request(DockerConfig(init=False), request, {}, {})["host"]
    assert "user" not in create and "nano_cpus" not in host and "device_requests" not in host


def test_artifact_root_on_a_different_host_path(tmp_path):
    config = DockerConfig(artifact_host_path="/srv/airflow/artifacts")
    mount = container_request(config, make_request(tmp_path), {}, {})["host"]["mounts"][0]
    assert (mount["Source"], mount["Target"]) == ("/srv/airflow/artifacts", str(tmp_path / "artifacts"))


def test_no_artifact_mount_when_disabled_or_remote(tmp_path):
    assert container_request(DockerConfig(artifact_mount=False), make_request(tmp_path), {}, {})["host"]["mounts"] == []
    remote = StepRequest.create(StepSpec.build(image=IMAGE, command=["true"]), StepIdentity("d", "t", "r"),
                                ArtifactStore("s3://bucket/ml"))
    assert container_request(DockerConfig(), remote, {}, {})["host"]["mounts"] == []


def test_local_input_outside_the_artifact_root_is_mounted_read_only(tmp_path):
    data = tmp_path / "datasets" / "iris.csv"
    data.parent.mkdir()
    data.write_text("a,b\n")
    request = make_request(tmp_path, inputs={"data": str(data), "remote": "s3://bucket/x.csv"})
    mounts = container_request(DockerConfig(), request, {}, {})["host"]["mounts"]
    assert [(m["Target"], m["ReadOnly"]) for m in mounts] == [(str(tmp_path / "artifacts"), False), (str(data), True)]


def test_resources_profile_and_options_apply_in_order(tmp_path):
    config = DockerConfig(user="1000", profiles={"gpu": {"cpu": 8, "memory": "16Gi", "gpus": "all",
                                                           "runtime": "nvidia", "shm_size": "1Gi", "user": "0"}})
    request = make_request(tmp_path, resources={"memory": "2Gi", "profile": "gpu"},
                           backend_options={"docker": {"shm_size": "2Gi", "extra_hosts": {"db": "10.0.0.5"},
                                                       "working_dir": "/opt/code", "init": True,
                                                       "entrypoint_prefix": ["tini", "--"]}})
    built = container_request(config, request, config.profiles["gpu"], {})
    host, create = built["host"], built["create"]
    assert host["nano_cpus"] == 8 * 10**9  # from the profile
    assert host["mem_limit"] == 2 * 1024**3  # the step's own resources win over the profile
    assert host["shm_size"] == 2 * 1024**3  # the step's option wins over the profile
    assert host["runtime"] == "nvidia"
    (gpus,) = host["device_requests"]
    assert (gpus["Count"], gpus["Capabilities"]) == (-1, [["gpu"]])
    assert host["extra_hosts"] == {"db": "10.0.0.5"} and host["init"] is True
    assert create["user"] == "0" and create["working_dir"] == "/opt/code"
    assert create["entrypoint"][:2] == ["tini", "--"] and create["entrypoint"][2:5] == ["python3", "-S", "-c"]


def test_gpu_count_becomes_a_device_request(tmp_path):
    host = container_request(DockerConfig(), make_request(tmp_path, resources={"gpu": 2, "cpu": "500m"}), {}, {})["host"]
    assert host["device_requests"][0]["Count"] == 2
    assert host["device_requests"][0]["Capabilities"] == [["gpu"]]
    assert host["nano_cpus"] == 500_000_000


def test_user_labels_cannot_override_the_identity(tmp_path):
    request = make_request(tmp_path, backend_options={"docker": {"labels": {LABEL_STEP_ID: "forged"}}})
    with pytest.raises(ConfigError, match="reserved"):
        DockerBackend(DockerConfig(), api_client=FakeAPI()).validate(request)


@pytest.mark.parametrize(("value", "message"), [
    ("/data:/data:rx", "source:target"),
    ({"source": "/data", "target": "relative"}, "absolute"),
    ({"source": "/d", "target": "/d", "kind": "bind"}, "kind"),
    ({"target": "/cache", "type": "nfs", "source": "x"}, "mount type"),
])
def test_bad_mounts_are_config_errors(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_mount(value, "mounts[0]")


def test_mount_forms():
    assert parse_mount("/data:/mnt/data:ro", "m")["ReadOnly"] is True
    assert parse_mount({"source": "cache", "target": "/cache"}, "m")["Type"] == "volume"
    assert parse_mount({"target": "/scratch", "type": "tmpfs"}, "m")["Type"] == "tmpfs"


# -- validation before submit ------------------------------------------------------------------------------


def backend(**config: Any) -> tuple[DockerBackend, FakeAPI]:
    api = FakeAPI()
    return DockerBackend(DockerConfig(**config), api_client=api), api


def test_missing_image_is_a_config_error_naming_the_fix(tmp_path):
    b, api = backend()
    with pytest.raises(ConfigError) as info:
        b.validate(make_request(tmp_path, image=None))
    assert str(info.value).startswith("image: ")
    assert "the docker backend needs an image" in str(info.value) and "set image='" in str(info.value)
    assert api.calls == []


@pytest.mark.parametrize(("options", "field"), [
    ({"no_such": 1}, "backend_options.docker.no_such"),
    ({"shm_size": "lots"}, "backend_options.docker.shm_size"),
    ({"working_dir": "code"}, "backend_options.docker.working_dir"),
    ({"extra_hosts": ["db:1.2.3.4"]}, "backend_options.docker.extra_hosts"),
    ({"init": "yes"}, "backend_options.docker.init"),
    ({"mounts": [{"source": "/a"}]}, "backend_options.docker.mounts[0].target"),
])
def test_bad_step_options_fail_validation(tmp_path, options, field):
    b, _ = backend()
    with pytest.raises(ConfigError) as info:
        b.validate(make_request(tmp_path, backend_options={"docker": options}))
    assert info.value.field == field


def test_bad_profile_settings_fail_when_the_backend_is_built():
    with pytest.raises(ConfigError, match=r"profiles\.gpu\.gpu_count"):
        DockerBackend(DockerConfig(profiles={"gpu": {"gpu_count": 1}}))
    with pytest.raises(ConfigError, match=r"profiles\.big\.memory"):
        DockerBackend(DockerConfig(profiles={"big": {"memory": "a lot"}}))


@pytest.mark.parametrize(("config", "field"), [
    ({"removal_policy": "sometimes"}, "removal_policy"),
    ({"pull": "maybe"}, "pull"),
    ({"secrets_from": "vault"}, "secrets_from"),
    ({"mounts": ["nope"]}, "mounts[0]"),
])
def test_bad_backend_config_fails_at_construction(config, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        DockerBackend.from_config(config)


def test_unknown_config_key_is_refused():
    with pytest.raises(ConfigError, match="removal_polcy"):
        DockerBackend.from_config({"removal_polcy": "always"})


def test_artifact_root_that_cannot_be_created_names_artifact_root(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    request = StepRequest.create(StepSpec.build(image=IMAGE, command=["true"]), StepIdentity("d", "t", "r"),
                                 ArtifactStore(str(blocker / "artifacts")))
    b, _ = backend()
    with pytest.raises(ConfigError) as info:
        b.validate(request)
    assert info.value.field == "artifact_root"


def test_validate_creates_the_artifact_root(tmp_path):
    b, _ = backend()
    b.validate(make_request(tmp_path))
    assert (tmp_path / "artifacts").is_dir()


def test_more_gpus_than_the_profile_has(tmp_path):
    b, _ = backend(profiles={"one-gpu": {"gpus": 1}})
    with pytest.raises(ConfigError, match="resources.gpu"):
        b.validate(make_request(tmp_path, resources={"gpu": 2, "profile": "one-gpu"}))


# -- the connection ------------------------------------------------------------------------------------------


def test_connection_gives_engine_tls_and_registry_credentials():
    settings, auth = settings_from_connection(
        "registry.internal", 5000, "bot", "pw",
        {"docker_url": "tcp://engine:2376", "tls_ca_cert": "/certs/ca.pem", "tls_client_cert": "/certs/cert.pem",
         "tls_client_key": "/certs/key.pem", "tls_verify": "false", "timeout": "30"})
    assert settings == {"base_url": "tcp://engine:2376", "tls_ca_cert": "/certs/ca.pem",
                        "tls_client_cert": "/certs/cert.pem", "tls_client_key": "/certs/key.pem",
                        "tls_verify": False, "timeout": 30.0}
    assert auth == {"username": "bot", "password": "pw", "serveraddress": "registry.internal:5000"}


def test_connection_without_registry_login_has_no_credentials():
    settings, auth = settings_from_connection(None, None, None, None, {})
    assert settings == {} and auth is None


def test_engine_address_and_tls_come_from_the_airflow_connection(tmp_path, monkeypatch):
    pems = {}
    for name in ("ca", "cert", "key"):
        pems[name] = tmp_path / f"{name}.pem"
        pems[name].write_text("-----BEGIN PLACEHOLDER-----\n")
    monkeypatch.setenv("AIRFLOW_CONN_DOCKER_REMOTE", json.dumps({
        "conn_type": "docker", "host": "registry.internal", "login": "bot", "password": "registry-pw",
        "extra": {"docker_url": "tcp://127.0.0.1:2376", "api_version": "1.41", "tls_ca_cert": str(pems["ca"]),
                  "tls_client_cert": str(pems["cert"]), "tls_client_key": str(pems["key"])}}))
    b = DockerBackend.from_config({"conn_id": "docker_remote"})
    api = b.api  # built from the connection; a pinned API version means nothing is contacted yet
    assert api.base_url == "https://127.0.0.1:2376"
    assert api.cert == (str(pems["cert"]), str(pems["key"]))
    assert api.verify == str(pems["ca"])
    assert "registry-pw" not in json.dumps(b.config_json())  # credentials never travel with the config
    b.close()


def test_config_wins_over_the_connection(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_DOCKER_REMOTE", json.dumps({
        "conn_type": "docker", "extra": {"docker_url": "tcp://127.0.0.1:2376", "api_version": "1.41"}}))
    b = DockerBackend.from_config({"conn_id": "docker_remote", "base_url": "tcp://127.0.0.1:2375"})
    assert b.api.base_url == "http://127.0.0.1:2375"
    b.close()


def test_https_engine_without_client_certificates_gets_the_tls_settings():
    b = DockerBackend.from_config({"base_url": "https://127.0.0.1:2376", "api_version": "1.41", "tls_verify": False})
    assert b.api.base_url == "https://127.0.0.1:2376"
    assert b.api.verify is False  # the TLS settings were applied (requests verifies by default)
    b.close()


def test_missing_tls_file_is_a_config_error(tmp_path):
    b = DockerBackend.from_config({"base_url": "tcp://127.0.0.1:2376", "api_version": "1.41",
                                   "tls_ca_cert": str(tmp_path / "missing-ca.pem")})
    with pytest.raises(ConfigError, match="tls_ca_cert"):
        b.api  # noqa: B018 - the property builds the client


def test_client_cert_without_key_is_a_config_error():
    b = DockerBackend(DockerConfig(base_url="tcp://engine:2376", tls_client_cert="/c.pem"))
    with pytest.raises(ConfigError, match="tls_client_key"):
        b.api  # noqa: B018 - the property builds the client


# -- engine calls through a fake client ---------------------------------------------------------------------


class FakeAPI:
    """Answers as ``docker.APIClient`` does for the calls the backend makes; records them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.containers_by_id: dict[str, dict[str, Any]] = {}
        self.on_create: Any = None
        self.on_wait: Any = None
        self.list_result: list[dict[str, Any]] = []
        # What containers wrote (emit), per container id: the log endpoint's entries, stamped.
        self.logs: dict[str, list[tuple[int, bytes]]] = {}
        # The engine's ends of the open attach streams, per container id, with the streams each asked for.
        self.attached: dict[str, list[tuple[socket.socket, dict[str, Any]]]] = {}

    def add(self, doc: dict[str, Any]) -> dict[str, Any]:
        self.containers_by_id[doc["Id"]] = doc
        return doc

    def _get(self, ref: str) -> dict[str, Any]:
        for doc in self.containers_by_id.values():
            if ref in (doc["Id"], doc["Name"].lstrip("/")):
                return doc
        raise api_error(404, f"No such container: {ref}", NotFound)

    def create_host_config(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs

    def create_container(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("create", kwargs["name"]))
        if self.on_create:
            self.on_create(kwargs)
        doc = self.add({"Id": f"{len(self.containers_by_id):064d}", "Name": "/" + kwargs["name"],
                        "State": {"Status": "created", "ExitCode": 0},
                        "Config": {"Labels": kwargs["labels"]}})
        return {"Id": doc["Id"]}

    def start(self, container: str) -> None:
        self.calls.append(("start", container))
        self._get(container)["State"]["Status"] = "running"

    def attach_socket(self, container: str, params: dict[str, Any] | None = None) -> socket.socket:
        """``POST /containers/{id}/attach`` hijacked: the engine's end of the stream is kept on the container.

        As the engine: 404 for a container that does not exist; a paused or restarting container is a 409
        (moby daemon/attach.go ContainerAttach: "container is paused, unpause first"); only stdout and
        stderr that were asked for are sent; the stream ends when the container stops (:meth:`exit`).
        """
        self.calls.append(("attach", container))
        doc = self._get(container)
        if doc["State"]["Status"] in ("paused", "restarting"):
            raise api_error(409, f"container {container} is {doc['State']['Status']}, unpause first")
        ours, engine = socket.socketpair()
        self.attached.setdefault(doc["Id"], []).append((engine, dict(params or {})))
        return ours

    def emit(self, container: str, stream: int, text: bytes, stamp: str = "2026-11-24T17:34:48.1Z") -> None:
        """The container writes ``text``: one log entry per line (with its stamp) and the raw bytes to every
        attach stream, as the engine's log copier and attach broadcaster both read the container's stdio."""
        doc = self._get(container)
        for line in text.splitlines(keepends=True):
            self.logs.setdefault(doc["Id"], []).append((stream, f"{stamp} ".encode() + line))
        for attached in list(self.attached.get(doc["Id"], [])):
            engine, params = attached
            if params.get({1: "stdout", 2: "stderr"}[stream]):
                try:
                    engine.sendall(frame(stream, text))
                except OSError:  # the client went away: the engine drops that attach, the container runs on
                    self.attached[doc["Id"]].remove(attached)

    def exit(self, container: str, code: int = 0) -> None:
        """The container's process ended: the engine closes its stdio (every attach stream ends) and marks
        it exited (daemon/monitor.go handleContainerExit)."""
        doc = self._get(container)
        for engine, _ in self.attached.pop(doc["Id"], []):
            engine.close()
        doc["State"].update(Status="exited", ExitCode=code)

    def inspect_container(self, container: str) -> dict[str, Any]:
        self.calls.append(("inspect", container))
        return json.loads(json.dumps(self._get(container)))

    def wait(self, container: str, timeout: float | None = None, condition: str | None = None) -> dict[str, Any]:
        self.calls.append(("wait", condition))
        if self.on_wait:
            self.on_wait(container, condition)
        return {"StatusCode": self._get(container)["State"]["ExitCode"], "Error": None}

    def stop(self, container: str, timeout: int | None = None) -> None:
        self.calls.append(("stop", timeout))
        self.exit(container, 143)

    def rename(self, container: str, name: str) -> None:
        self.calls.append(("rename", name))
        if any(d["Name"] == "/" + name for d in self.containers_by_id.values()):
            raise api_error(409, f"Conflict. The name \"/{name}\" is already in use")
        self._get(container)["Name"] = "/" + name

    def remove_container(self, container: str, v: bool = False, force: bool = False) -> None:
        self.calls.append(("remove", force))
        doc = self._get(container)
        for engine, _ in self.attached.pop(doc["Id"], []):
            engine.close()
        del self.containers_by_id[doc["Id"]]

    def containers(self, all: bool = False, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:  # noqa: A002
        self.calls.append(("list", filters))
        return self.list_result

    base_url = "http+docker://localhost"
    api_version = "1.41"
    timeout = 60

    def get(self, url: str, params: dict[str, Any], timeout: float) -> requests.Response:
        self.calls.append(("logs", params.get("since")))
        response = requests.Response()
        response.url = url
        container = url.split("/containers/")[1].split("/")[0]
        try:
            doc = self._get(container)
        except NotFound:
            response.status_code = 404
            response._content = json.dumps({"message": f"No such container: {container}"}).encode()
            return response
        response.status_code = 200
        entries = doc.get("Logs", []) + self.logs.get(doc["Id"], [])
        response._content = b"".join(frame(stream, text) for stream, text in entries)
        return response

    def pull(self, repository: str, tag: str | None = None, auth_config: Any = None) -> None:
        self.calls.append(("pull", f"{repository}:{tag}"))
        raise api_error(500, "Get \"https://registry/v2/\": dial tcp: lookup registry: no such host")

    def close(self) -> None:
        self.calls.append(("close", None))


def frame(stream: int, text: bytes) -> bytes:
    """One frame of the engine's multiplexed log stream (1 = stdout, 2 = stderr)."""
    return bytes([stream, 0, 0, 0]) + len(text).to_bytes(4, "big") + text


def test_demux_drops_frame_headers_in_order():
    stream = frame(1, b"2026-11-24T17:34:48.1Z out\n") + frame(2, b"2026-11-24T17:34:48.2Z err\n") + frame(1, b"")
    assert demux(stream) == b"2026-11-24T17:34:48.1Z out\n2026-11-24T17:34:48.2Z err\n"
    assert demux(stream[:-3]) == b"2026-11-24T17:34:48.1Z out\n2026-11-24T17:34:48.2Z err\n"  # torn tail


def test_read_logs_through_the_fake_engine(tmp_path):
    b, api, _, handle = submitted(tmp_path, attach=False)  # the log endpoint itself (attached: below)
    doc = api.containers_by_id[handle.data["container_id"]]
    doc["Logs"] = [(1, b"2026-11-24T17:34:48.100000000Z preparing\n"), (2, b"2026-11-24T17:34:48.2Z warn\n")]
    first = b.read_logs(handle, None)
    assert first.lines == ["preparing", "warn"]
    doc["Logs"].append((1, b"2026-11-24T17:34:49.5Z done\n"))
    assert b.read_logs(handle, first.cursor).lines == ["done"]


def submitted(tmp_path, **config: Any):
    b, api = backend(**config)
    request = make_request(tmp_path)
    handle = b.submit(request)
    return b, api, request, handle


def test_submit_creates_then_starts_once(tmp_path):
    b, api, request, handle = submitted(tmp_path)
    # Attached before the start, as `docker run` does, so the stream holds the container's first byte.
    assert [c[0] for c in api.calls] == ["create", "attach", "start"]
    assert handle.job_id == handle.data["container_id"][:12]
    assert handle.data["manifest_uri"] == request.manifest_uri
    assert json.loads(json.dumps(handle.to_json())) == handle.to_json()


def test_submit_after_a_crash_between_create_and_start_reuses_the_container(tmp_path):
    b, api = backend()
    request = make_request(tmp_path)
    existing = api.add({"Id": "e" * 64, "Name": "/" + request.identity.name(), "State": {"Status": "created"},
                        "Config": {"Labels": request.identity.labels()}})

    def conflict(kwargs: dict[str, Any]) -> None:
        raise api_error(409, f"Conflict. The container name \"/{kwargs['name']}\" is already in use")

    api.on_create = conflict
    handle = b.submit(request)
    assert handle.data["container_id"] == existing["Id"]
    assert [c for c in api.calls if c[0] in ("create", "start")] == [("create", request.identity.name()),
                                                                     ("start", existing["Id"])]
    assert len(api.containers_by_id) == 1

    # And when that container already runs, submit neither creates nor starts anything.
    api.calls.clear()
    assert b.submit(request).data["container_id"] == existing["Id"]
    assert [c[0] for c in api.calls if c[0] in ("start",)] == []


def test_submit_refuses_a_foreign_container_holding_the_name(tmp_path):
    b, api = backend()
    request = make_request(tmp_path)
    api.add({"Id": "e" * 64, "Name": "/" + request.identity.name(), "State": {"Status": "running"},
             "Config": {"Labels": {}}})
    api.on_create = lambda kwargs: (_ for _ in ()).throw(api_error(409, "Conflict"))
    with pytest.raises(BackendAPIError, match="does not belong to this step"):
        b.submit(request)


def test_missing_image_that_cannot_be_pulled(tmp_path):
    b, api = backend(pull="never")
    api.on_create = lambda kwargs: (_ for _ in ()).throw(api_error(404, "No such image: nope:1", ImageNotFound))
    with pytest.raises(ConfigError, match="not found locally and could not be pulled"):
        b.submit(make_request(tmp_path, image="nope:1"))
    assert not [c for c in api.calls if c[0] == "pull"]

    b, api = backend()  # pull="if_missing": tries, then says why it failed
    api.on_create = lambda kwargs: (_ for _ in ()).throw(api_error(404, "No such image: nope:1", ImageNotFound))
    with pytest.raises(ConfigError, match="nope:1' not found locally and could not be pulled.*no such host"):
        b.submit(make_request(tmp_path, image="nope:1"))
    assert ("pull", "nope:1") in api.calls


def test_secrets_are_resolved_on_the_worker_and_never_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DB_CREDS_PASSWORD", "hunter2-secret")
    b, api = backend(secrets_from="env")
    created: dict[str, Any] = {}
    api.on_create = created.update
    with caplog.at_level(logging.DEBUG):
        b.submit(make_request(tmp_path, secrets={"DB_PASSWORD": "DB_CREDS/PASSWORD"}))
    assert created["environment"]["DB_PASSWORD"] == "hunter2-secret"
    assert "hunter2-secret" not in caplog.text
    assert "hunter2-secret" not in json.dumps(created["labels"])


@pytest.mark.parametrize(("error", "expected"), [
    (api_error(500, "server error"), TransientBackendError),
    (api_error(503, "busy"), TransientBackendError),
    (api_error(429, "slow down"), TransientBackendError),
    (api_error(409, "conflict"), BackendAPIError),
    (requests.exceptions.ConnectionError("connection refused"), TransientBackendError),
])
def test_engine_errors_map_at_one_place(tmp_path, error, expected):
    b, api = backend()
    api.add(inspect_doc("running"))

    def fail(container: str) -> None:
        raise error

    api.inspect_container = fail  # type: ignore[method-assign]
    with pytest.raises(BackendAPIError) as info:
        b.poll(handle_for("f" * 64))
    assert type(info.value) is expected


def handle_for(container_id: str, manifest_uri: str | None = None):
    from airflow_remote_ml.core import RunHandle

    return RunHandle("docker", container_id[:12], None, {"container_id": container_id, "name": "dag-train-abc",
                                                          "manifest_uri": manifest_uri, "identity": None})


def test_poll_of_a_removed_container_is_lost(tmp_path):
    b, _ = backend()
    status = b.poll(handle_for("a" * 64, str(tmp_path / "no-manifest.json")))
    assert status.state is RunState.LOST


def test_wait_returns_the_status_when_the_wait_api_answers(tmp_path):
    b, api = backend()
    api.add(inspect_doc("running"))
    api.on_wait = lambda cid, cond: api.containers_by_id[cid]["State"].update(Status="exited", ExitCode=0)
    assert b.wait(handle_for("f" * 64), 30).state is RunState.SUCCEEDED
    assert ("wait", "not-running") in api.calls


def test_wait_timeout_is_not_an_error(tmp_path):
    b, api = backend()
    api.add(inspect_doc("running"))

    def time_out(cid: str, cond: str) -> None:
        raise requests.exceptions.ConnectionError(ReadTimeoutError(None, None, "Read timed out."))

    api.on_wait = time_out
    assert b.wait(handle_for("f" * 64), 0.5).state is RunState.RUNNING


def test_wait_on_a_created_container_waits_for_its_next_exit(tmp_path):
    b, api = backend()
    doc = api.add(inspect_doc("created"))

    def wait(cid: str, cond: str) -> None:
        if cond == "next-exit":
            doc["State"].update(Status="exited", ExitCode=0)

    api.on_wait = wait
    assert b.wait(handle_for("f" * 64), 5).state is RunState.SUCCEEDED
    assert [c[1] for c in api.calls if c[0] == "wait"] == ["not-running", "next-exit"]


def test_cancel_marks_then_stops_and_is_idempotent(tmp_path):
    b, api, request, handle = submitted(tmp_path, stop_timeout=3)
    api.calls.clear()
    b.cancel(handle)
    assert [c for c in api.calls if c[0] in ("rename", "stop")] == [
        ("rename", f"{request.identity.name()}.cancelled"), ("stop", 3)]
    assert b.poll(handle).state is RunState.CANCELLED
    api.calls.clear()
    b.cancel(handle)
    assert [c for c in api.calls if c[0] in ("rename", "stop")] == []


def test_cancel_of_a_finished_or_removed_container_does_nothing(tmp_path):
    b, api, _, handle = submitted(tmp_path)
    api.containers_by_id[handle.data["container_id"]]["State"].update(Status="exited", ExitCode=0)
    b.cancel(handle)
    assert b.poll(handle).state is RunState.SUCCEEDED
    b.cleanup(handle, RunStatus(RunState.SUCCEEDED))
    b.cancel(handle)  # gone: no error


def test_mark_finished_hides_the_container_from_find(tmp_path):
    b, api, request, handle = submitted(tmp_path)
    b.mark_finished(handle)
    doc = api.containers_by_id[handle.data["container_id"]]
    assert doc["Name"] == f"/{request.identity.name()}.finished"
    b.mark_finished(handle)  # idempotent
    assert doc["Name"] == f"/{request.identity.name()}.finished"
    api.list_result = [{"Id": doc["Id"], "Names": [doc["Name"]], "State": "exited", "Labels": {}, "Created": 1}]
    assert b.find(request.identity) is None
    assert ("list", {"label": f"{LABEL_STEP_ID}={request.identity.digest}"}) in api.calls


@pytest.mark.parametrize(("policy", "code", "outcome"), [
    ("on_success", 0, "removed"),
    ("on_success", 1, "renamed"),
    ("always", 1, "removed"),
    ("never", 0, "renamed"),
])
def test_mark_finished_removes_what_the_policy_would_remove_anyway(tmp_path, policy, code, outcome):
    b, api, request, handle = submitted(tmp_path, removal_policy=policy)
    api.containers_by_id[handle.data["container_id"]]["State"].update(Status="exited", ExitCode=code)
    b.mark_finished(handle)
    doc = api.containers_by_id.get(handle.data["container_id"])
    if outcome == "removed":
        assert doc is None
        b.cleanup(handle, b.poll(handle))  # already gone: nothing to do, no error
    else:
        assert doc["Name"] == f"/{request.identity.name()}.finished"


def test_find_skips_never_started_containers_and_rebuilds_the_handle(tmp_path):
    b, api = backend()
    request = make_request(tmp_path, outputs=["model"])
    labels = container_request(DockerConfig(), request, {}, {})["create"]["labels"]
    api.list_result = [{"Id": "1" * 64, "Names": ["/x"], "State": "created", "Labels": labels, "Created": 2}]
    assert b.find(request.identity) is None
    api.list_result.append({"Id": "2" * 64, "Names": ["/y"], "State": "running", "Labels": labels, "Created": 1})
    found = b.find(request.identity)
    assert found is not None and found.job_id == "2" * 12
    assert found.data["manifest_uri"] == request.manifest_uri
    assert found.data["declared_outputs"] == ["model"]


def test_mark_with_a_taken_name_still_marks(tmp_path):
    b, api, request, handle = submitted(tmp_path)
    api.add({"Id": "9" * 64, "Name": f"/{request.identity.name()}.finished", "State": {"Status": "exited"}})
    b.mark_finished(handle)
    name = api.containers_by_id[handle.data["container_id"]]["Name"]
    assert name.startswith(f"/{request.identity.name()}.finished.") and "finished" in marks(name)


@pytest.mark.parametrize(("policy", "state", "removed"), [
    ("on_success", RunState.SUCCEEDED, True),
    ("on_success", RunState.FAILED, False),
    ("on_success", RunState.CANCELLED, False),
    ("always", RunState.FAILED, True),
    ("always", RunState.SUCCEEDED, True),
    ("never", RunState.SUCCEEDED, False),
])
def test_cleanup_follows_the_removal_policy(tmp_path, policy, state, removed):
    b, api, _, handle = submitted(tmp_path, removal_policy=policy)
    b.cleanup(handle, RunStatus(state))
    assert (handle.data["container_id"] not in api.containers_by_id) is removed


def test_read_logs_sends_since_only_after_the_first_read(tmp_path):
    b, api, _, handle = submitted(tmp_path, attach=False)
    b.read_logs(handle, None)
    b.read_logs(handle, {"since": 1795542888, "seen": 3})
    assert [c[1] for c in api.calls if c[0] == "logs"] == [None, 1795542888]


def test_logs_of_a_removed_container_are_empty_and_keep_the_cursor(tmp_path):
    b, _ = backend()
    chunk = b.read_logs(handle_for("a" * 64), {"since": 5, "seen": 1})
    assert chunk.lines == [] and chunk.cursor == {"since": 5, "seen": 1}


def test_close_leaves_an_injected_client_open(tmp_path):
    b, api = backend()
    b.close()
    assert ("close", None) not in api.calls


def test_find_adopts_the_oldest_of_several_containers_deterministically(tmp_path):
    # The contract (core.backend.Backend.find): with several jobs for one identity, every caller adopts
    # the oldest; the engine's list order is not creation order, so it must not decide.
    b, api = backend()
    request = make_request(tmp_path)
    labels = container_request(DockerConfig(), request, {}, {})["create"]["labels"]
    api.list_result = [
        {"Id": "3" * 64, "Names": ["/c"], "State": "running", "Labels": labels, "Created": 30},
        {"Id": "2" * 64, "Names": ["/b"], "State": "running", "Labels": labels, "Created": 10},
        {"Id": "1" * 64, "Names": ["/a"], "State": "exited", "Labels": labels, "Created": 10},
    ]
    found = b.find(request.identity)
    assert found is not None and found.job_id == "1" * 12
    api.list_result.reverse()
    assert b.find(request.identity).job_id == "1" * 12


def test_submit_is_idempotent_by_the_containers_name():
    # A deterministic name and the engine's 409 Conflict on a second create (covered by the reuse tests
    # above) make a retried submit adopt the first container: the lifecycle may retry at once.
    assert DockerBackend.idempotent_submit is True
    assert DockerBackend.create_settle_seconds > 0


def test_default_stop_timeout_is_shorter_than_the_task_supervisors_escalation():
    # airflow/sdk/execution_time/supervisor.py WatchedSubprocess.kill(escalation_delay=5.0): a cancel
    # that takes longer is cut short by the SIGKILL of the task process before it is confirmed.
    assert DockerConfig().stop_timeout < 5.0


def test_log_lines_stamped_in_a_second_already_seen_parse_like_the_first():
    """The per-second shortcut of parse_entries (a chatty log's lines share a few seconds) gives what the
    full parse gives, and still refuses a stamp that only looks like one."""
    second = int(datetime(2026, 12, 1, 17, 57, 58, tzinfo=UTC).timestamp()) * 10**9
    raw = ("2026-12-01T17:57:58.003896554Z first\n"
           "2026-12-01T17:57:58.5Z half\n"
           "2026-12-01T17:57:58Z whole\n"
           "2026-12-01T17:57:58.25Z\n"
           "2026-12-01T17:57:58.1234567890Z ten digits\n"
           "2026-12-01T17:57:58.12ab5Z not digits\n"
           "2026-12-01T19:57:58.7+02:00 offset\n"
           "2026-12-01T17:57:58.000000001Z  two spaces\r\n")
    assert parse_log_entries(raw.encode()) == [
        (second + 3896554, "first"),
        (second + 500_000_000, "half"),
        (second, "whole"),
        (second + 250_000_000, "\n2026-12-01T17:57:58.1234567890Z ten digits\n2026-12-01T17:57:58.12ab5Z not digits"),
        (second + 700_000_000, "offset"),
        (second + 1, " two spaces"),
    ]
