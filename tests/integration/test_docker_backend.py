"""Docker-only behaviour of the docker backend, against a real engine and the locally built runner image.

Reattachment after a crash between create and start, marks, a container removed behind our back, OOM,
resources, cancel, the log cursor on a chatty step, an event-driven wait that does not block the event loop.
Without the engine these fail under CI (``CI`` set) and skip elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import docker
import pytest

from airflow_remote_ml.backends.docker import DockerBackend, container_request
from airflow_remote_ml.core import (
    ArtifactStore,
    ConfigError,
    RunState,
    StepIdentity,
    StepRequest,
    StepSpec,
)
from airflow_remote_ml.core.identity import LABEL_STEP_ID
from airflow_remote_ml.core.wait import wait_for_completion
from tests.conftest import RUNNER_IMAGE, require_or_skip

TEST_LABEL = "org.airflow-remote-ml.test"

pytestmark = [pytest.mark.docker, pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def engine(docker_engine):
    return docker_engine


@pytest.fixture
def label() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
def make_backend(engine, label) -> Iterator[Any]:
    made: list[DockerBackend] = []

    def make(**config: Any) -> DockerBackend:
        backend = DockerBackend.from_config({"network_mode": "none", "pull": "never", "stop_timeout": 2,
                                             "labels": {TEST_LABEL: label}, **config})
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()
    for container in engine.containers.list(all=True, filters={"label": f"{TEST_LABEL}={label}"}):
        container.remove(force=True)


@pytest.fixture
def backend(make_backend) -> DockerBackend:
    return make_backend()


def request_for(tmp_path, code: str, **spec: Any) -> StepRequest:
    spec.setdefault("image", RUNNER_IMAGE)
    identity = StepIdentity("integration", spec.pop("task_id", "step"), f"run-{uuid.uuid4().hex[:12]}")
    return StepRequest.create(StepSpec.build(command=["python3", "-c", code], **spec), identity,
                              ArtifactStore(str(tmp_path / "artifacts")))


def containers_of(engine, request: StepRequest) -> list[Any]:
    return engine.containers.list(all=True, filters={"label": f"{LABEL_STEP_ID}={request.identity.digest}"})


def run_to_end(backend: DockerBackend, request: StepRequest):
    backend.validate(request)
    handle = backend.submit(request)
    outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 120)
    assert not outcome.timed_out
    return handle, outcome


# -- reattachment and marks -----------------------------------------------------------------------------


def test_retry_after_a_crash_between_create_and_start_reuses_the_container(engine, backend, tmp_path):
    request = request_for(tmp_path, "print('ran once')")
    backend.validate(request)
    # The worker created the container and died before starting it.
    built = container_request(backend.config, request, {}, {})
    engine.api.create_container(host_config=engine.api.create_host_config(**built["host"]), **built["create"])
    assert backend.find(request.identity) is None  # never started: the retry submits ...
    handle = backend.submit(request)  # ... which starts the existing container instead of a duplicate
    outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 120)
    assert outcome.status.is_successful
    assert [c.id for c in containers_of(engine, request)] == [handle.data["container_id"]]
    assert backend.submit(request).data["container_id"] == handle.data["container_id"]  # and again
    assert len(containers_of(engine, request)) == 1


def test_a_finished_container_is_never_reattached(engine, make_backend, tmp_path):
    backend = make_backend(removal_policy="never")  # kept, so only its mark hides it
    request = request_for(tmp_path, "print('first')")
    handle, outcome = run_to_end(backend, request)
    assert backend.find(request.identity).job_id == handle.job_id
    backend.mark_finished(handle)
    assert engine.containers.get(handle.data["container_id"]).name.endswith(".finished")
    assert backend.find(request.identity) is None
    # The name is free again: a deliberate new job for the same identity does not collide.
    again = backend.submit(request)
    assert again.data["container_id"] != handle.data["container_id"]
    assert backend.find(request.identity).job_id == again.job_id


def test_container_removed_by_someone_else_is_lost(engine, backend, tmp_path):
    request = request_for(tmp_path, "import time; time.sleep(300)")
    backend.validate(request)
    handle = backend.submit(request)
    engine.containers.get(handle.data["container_id"]).remove(force=True)
    status = backend.poll(handle)
    assert status.state is RunState.LOST
    assert backend.wait(handle, 5).state is RunState.LOST
    assert backend.read_logs(handle, None).lines == []
    backend.cancel(handle)  # nothing left to cancel: no error


def test_removal_after_success_still_reads_as_success(backend, tmp_path):
    request = request_for(tmp_path, "print('ok')")
    handle, outcome = run_to_end(backend, request)
    backend.cleanup(handle, outcome.status)  # removal_policy on_success: removed
    status = backend.poll(handle)
    assert (status.state, status.remote_state) == (RunState.SUCCEEDED, "removed")


def test_failed_containers_are_kept_for_debugging_by_default(engine, make_backend, tmp_path):
    keep = make_backend()
    request = request_for(tmp_path, "import sys; sys.exit(4)")
    handle, outcome = run_to_end(keep, request)
    keep.cleanup(handle, outcome.status)
    assert engine.containers.get(handle.data["container_id"]).status == "exited"
    always = make_backend(removal_policy="always")
    always.cleanup(handle, outcome.status)
    with pytest.raises(docker.errors.NotFound):
        engine.containers.get(handle.data["container_id"])


# -- resources, OOM, cancel -----------------------------------------------------------------------------


def test_resources_reach_the_engine(engine, backend, tmp_path):
    request = request_for(tmp_path, "print('x')", resources={"cpu": 0.5, "memory": "256Mi"},
                          backend_options={"docker": {"shm_size": "32Mi", "labels": {"team": "ml"}}})
    handle, _ = run_to_end(backend, request)
    attrs = engine.api.inspect_container(handle.data["container_id"])
    assert attrs["HostConfig"]["NanoCpus"] == 500_000_000
    assert attrs["HostConfig"]["Memory"] == 256 * 1024**2
    assert attrs["HostConfig"]["ShmSize"] == 32 * 1024**2
    assert attrs["Config"]["Labels"]["team"] == "ml"
    root = str(tmp_path / "artifacts")
    assert {"Type": "bind", "Source": root, "Destination": root, "RW": True}.items() <= attrs["Mounts"][0].items()


def test_out_of_memory_says_so(engine, backend, tmp_path):
    # The engine reports MemoryLimit false when the kernel has no memory cgroup controller: then nothing can
    # be OOM-killed, and in CI that is a failure (require_or_skip), never a silent pass.
    require_or_skip(bool(engine.info().get("MemoryLimit")),
                    "this Docker engine cannot enforce memory limits (no cgroup memory controller)")
    request = request_for(tmp_path, "blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 1024 * 1024))",
                          resources={"memory": "64Mi"})
    handle, outcome = run_to_end(backend, request)
    assert outcome.status.state is RunState.FAILED
    assert outcome.status.reason == "OOMKilled", outcome.status
    assert outcome.status.exit_code == 137
    assert "raise compute.memory" in outcome.status.message
    # The kernel killed the biggest process, the step's command; the runtime lived to record it in words.
    manifest = json.loads(open(request.manifest_uri).read())
    assert manifest["exit_code"] == 137
    assert "killed by SIGKILL (exit 137; often the kernel's OOM killer" in manifest["error"]


def test_cancel_stops_within_the_grace_period_and_marks(engine, make_backend, tmp_path):
    backend = make_backend(stop_timeout=5)
    request = request_for(tmp_path, "import time; print('up', flush=True); time.sleep(300)")
    backend.validate(request)
    handle = backend.submit(request)
    started = time.monotonic()
    backend.cancel(handle)
    assert time.monotonic() - started < 30
    status = backend.poll(handle)
    assert status.state is RunState.CANCELLED
    assert status.exit_code == 143  # the runtime forwarded SIGTERM: stopped cleanly, not killed
    assert engine.containers.get(handle.data["container_id"]).name.endswith(".cancelled")


def test_cancel_kills_a_step_that_ignores_sigterm(engine, backend, tmp_path):
    """Issue 8 item 5 on docker: the engine SIGKILLs the whole container after stop_timeout."""
    request = StepRequest.create(
        StepSpec.build(image=RUNNER_IMAGE, command="trap '' TERM; sleep 150", shell=True),
        StepIdentity("integration", "stubborn", f"run-{uuid.uuid4().hex[:12]}"),
        ArtifactStore(str(tmp_path / "artifacts")))
    backend.validate(request)
    handle = backend.submit(request)
    deadline = time.monotonic() + 60
    # The step is ready when its own sleep runs (the runtime's argv holds its source, which says "sleep" too).
    while not any(row[-1] == "sleep 150" for row in engine.api.top(handle.data["container_id"])["Processes"]):
        assert time.monotonic() < deadline, "the step's sleep never started"
        time.sleep(0.1)
    backend.cancel(handle)
    attrs = engine.api.inspect_container(handle.data["container_id"])
    assert attrs["State"]["Status"] == "exited" and attrs["State"]["ExitCode"] == 137
    assert backend.poll(handle).state is RunState.CANCELLED


# -- images and interpreters ---------------------------------------------------------------------------


def test_missing_image_with_pull_never(backend, tmp_path):
    request = request_for(tmp_path, "pass", image="airflow-remote-ml/no-such-image:1")
    with pytest.raises(ConfigError, match="not found locally and could not be pulled"):
        backend.submit(request)


@pytest.mark.parametrize(("options", "field"), [
    # Only the Docker host knows whether a bind source exists there.
    ({"mounts": ["/nonexistent/remote-ml-data:/data:ro"]}, "backend_options.docker.mounts"),
    # Only the engine knows its runtimes (a profile setting: the error names the profile's).
    ({"profile": {"runtime": "no-such-runtime"}}, "profiles.odd.runtime"),
])
def test_an_engine_refusal_on_create_names_the_field_and_is_not_retried(engine, backend, make_backend, tmp_path,
                                                                         options, field):
    """Issue 9, item 4: the engine's 400 was a plain BackendAPIError, retried by Airflow."""
    from airflow_remote_ml.core import InvalidRequestError

    profile = options.pop("profile", None)
    if profile is not None:
        backend = make_backend(profiles={"odd": profile})
    request = request_for(tmp_path, "pass", backend_options={"docker": options},
                          resources={"profile": "odd"} if profile else {})
    backend.validate(request)  # nothing in the spec can tell
    with pytest.raises(InvalidRequestError) as info:
        backend.submit(request)
    assert isinstance(info.value, ConfigError) and info.value.status_code == 400
    assert info.value.field == field  # the engine's own words are quoted in the message, not asserted on
    assert containers_of(engine, request) == []  # refused at create: nothing to clean up


def test_image_without_the_interpreter(make_backend, tmp_path):
    # Without an init the engine itself cannot start the container: refused at submit.
    with pytest.raises(ConfigError, match="'python9' is not in image"):
        make_backend(python="python9", init=False).submit(request_for(tmp_path, "pass"))
    # With the init (the default) the init starts and then cannot run it: the step fails saying why.
    handle, outcome = run_to_end(make_backend(python="python9"), request_for(tmp_path, "pass"))
    assert (outcome.status.state, outcome.status.exit_code) == (RunState.FAILED, 127)
    assert "python interpreter" in outcome.status.message


# -- env, secrets, inputs ------------------------------------------------------------------------------


def test_secret_from_the_worker_reaches_the_step(make_backend, tmp_path, monkeypatch):
    monkeypatch.setenv("API_TOKEN", "t0ken-value")
    backend = make_backend(secrets_from="env")
    request = request_for(tmp_path, "import os; open(os.environ['REMOTE_ML_OUTPUT_OUT'], 'w')"
                                    ".write(os.environ['TOKEN'])", secrets={"TOKEN": "API_TOKEN"}, outputs=["out"])
    handle, outcome = run_to_end(backend, request)
    assert outcome.status.is_successful
    assert open(backend.fetch_result(handle).outputs["out"]).read() == "t0ken-value"


def test_local_input_outside_the_artifact_root_is_readable_but_not_writable(backend, tmp_path):
    data = tmp_path / "datasets" / "rows.csv"
    data.parent.mkdir()
    data.write_text("a,b\n1,2\n")
    code = ("import os\n"
            "rows = open(os.environ['REMOTE_ML_INPUT_DATA']).read()\n"
            "try:\n    open(os.environ['REMOTE_ML_INPUT_DATA'], 'a').write('x'); ro = False\n"
            "except OSError:\n    ro = True\n"
            "open(os.environ['REMOTE_ML_OUTPUT_OUT'], 'w').write(f'{len(rows)} {ro}')")
    request = request_for(tmp_path, code, inputs={"data": str(data)}, outputs=["out"])
    handle, outcome = run_to_end(backend, request)
    assert outcome.status.is_successful, outcome
    assert open(backend.fetch_result(handle).outputs["out"]).read() == "8 True"


# -- logs and waiting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("attach", [True, False], ids=["attached", "log read back"])
def test_chatty_step_logs_arrive_once_and_complete(make_backend, tmp_path, attach):
    backend = make_backend(attach=attach)
    code = ("import sys, time\n"
            "for i in range(3000):\n"
            "    print(f'out {i}', flush=True)\n"
            "    print(f'err {i}', file=sys.stderr, flush=True)\n"
            "    if i % 500 == 0: time.sleep(0.3)\n")
    request = request_for(tmp_path, code)
    backend.validate(request)
    handle = backend.submit(request)
    lines: list[str] = []
    cursor = None
    while True:  # read while it runs, as the operator does
        terminal = backend.poll(handle).is_terminal
        chunk = backend.read_logs(handle, cursor)
        lines += chunk.lines
        cursor = chunk.cursor
        json.dumps(cursor)
        if terminal:
            break
        time.sleep(0.05)
    assert [x for x in lines if x.startswith("out ")] == [f"out {i}" for i in range(3000)]
    assert [x for x in lines if x.startswith("err ")] == [f"err {i}" for i in range(3000)]
    assert len(lines) == 6000


def _finished_at(engine, container_id: str) -> float:
    stamp = engine.api.inspect_container(container_id)["State"]["FinishedAt"]
    head, _, fraction = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float(f"0.{fraction or 0}")


def test_wait_returns_when_the_container_exits_not_at_its_timeout(engine, backend, tmp_path):
    request = request_for(tmp_path, "import time; time.sleep(1)")
    backend.validate(request)
    handle = backend.submit(request)
    status = backend.wait(handle, 60)
    returned = time.time()
    assert status.is_successful
    # Event-driven: the wait API answered at the exit, far from its 60-second timeout.
    assert returned - _finished_at(engine, handle.data["container_id"]) < 5


def test_async_wait_leaves_the_event_loop_free(backend, tmp_path):
    request = request_for(tmp_path, "import time; time.sleep(2)")
    backend.validate(request)
    handle = backend.submit(request)

    async def main() -> tuple[Any, int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.05)

        task = asyncio.create_task(ticker())
        status = await backend.await_change(handle, 60)
        done.set()
        await task
        return status, ticks

    status, ticks = asyncio.run(main())
    assert status.is_successful
    assert ticks >= 10  # the loop kept running while the wait API blocked in its thread


class _CountingClient(docker.APIClient):
    """The real engine client, recording each request's method and path (``/v1.41/containers/ID/json``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.calls: list[tuple[str, str]] = []  # before super(): with version="auto" it asks the engine
        super().__init__(*args, **kwargs)

    def request(self, method, url, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls.append((method.upper(), url.split("?")[0].split("/v1.", 1)[-1]))
        return super().request(method, url, *args, **kwargs)


def test_the_container_imports_a_bytecode_cached_runtime_from_the_artifact_mount(engine, label, tmp_path):
    """The runtime's source in the argv was compiled on every start (~8 ms in the runner image): the
    container imports a copy on the mounted artifact root instead, whose bytecode is reused."""
    from airflow_remote_ml.backends.docker import DockerConfig

    client = _CountingClient(base_url="unix:///var/run/docker.sock", version="auto")
    backend = DockerBackend(DockerConfig.from_mapping({"network_mode": "none", "pull": "never",
                                                       "labels": {TEST_LABEL: label}}, "docker"), api_client=client)
    try:
        request = request_for(tmp_path, "print('{\"ran\": 1}')")
        handle = backend.submit(request)
        entrypoint = engine.api.inspect_container(handle.data["container_id"])["Config"]["Entrypoint"]
        outcome = wait_for_completion(backend, handle, deadline=time.monotonic() + 120)
        assert outcome.status.is_successful, outcome
        assert backend.fetch_result(handle).metrics == {"ran": 1}
        runtime_dir = tmp_path / "artifacts" / ".remote-ml" / "runtime"
        (copy,) = runtime_dir.glob("remote_ml_runtime_*.py")
        assert entrypoint[:3] == ["python3", "-S", "-c"] and copy.stem in entrypoint[3]
        assert len(entrypoint[3]) < 500  # a few lines of boot code, not the runtime's source
        assert list((runtime_dir / "__pycache__").glob(f"{copy.stem}.*.pyc"))
        # Finishing: a stopped container's last inspect answers mark_finished, and the container removed
        # there is not removed again by cleanup: one DELETE and no inspect after the wait's.
        del client.calls[:]
        backend.mark_finished(handle)
        backend.cleanup(handle, outcome.status)
        assert client.calls == [("DELETE", f"41/containers/{handle.data['container_id']}")]
        assert not containers_of(engine, request)
    finally:
        backend.close()


def test_without_a_mounted_artifact_root_the_runtime_travels_in_the_argv(make_backend, engine, tmp_path):
    backend = make_backend(artifact_mount=False)
    request = request_for(tmp_path, "print('ok')")
    built = container_request(backend.config, request, {}, {}, backend._install_runtime(request))
    assert built["create"]["entrypoint"][3].startswith('"""The runtime that runs *inside* the remote step')
    assert not (tmp_path / "artifacts" / ".remote-ml").exists()
