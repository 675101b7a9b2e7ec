"""The attach stream on a real engine: a chatty step relayed whole without reading its log back, and an
attach broken mid-step (closed on our side, dropped under the reader, a worker without the stream, a
worker killed while attached) that goes on from the engine's log with no line lost and none twice.

Without the engine these fail under CI (``CI`` set) and skip elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_remote_ml.backends.docker import DockerBackend
from airflow_remote_ml.core import RunHandle, RunState
from airflow_remote_ml.core.wait import wait_for_completion
from tests.conftest import RUNNER_IMAGE
from tests.integration.test_docker_backend import TEST_LABEL, request_for

pytestmark = [pytest.mark.docker, pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def make_backend(docker_engine) -> Iterator[Any]:
    """Backends on the real engine; their containers (labelled with this test's run) removed after."""
    run, made = uuid.uuid4().hex[:12], []

    def make(**config: Any) -> DockerBackend:
        backend = DockerBackend.from_config({"network_mode": "none", "pull": "never", "stop_timeout": 2,
                                             "labels": {TEST_LABEL: run}, **config})
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()
    for container in docker_engine.containers.list(all=True, filters={"label": f"{TEST_LABEL}={run}"}):
        container.remove(force=True)


def count_log_reads(backend: DockerBackend) -> list[str]:
    """Record every ``GET /containers/{id}/logs`` the backend sends."""
    reads: list[str] = []
    api = backend.api
    get = api.get

    def counted(url: str, *args: Any, **kwargs: Any) -> Any:
        if url.endswith("/logs"):
            reads.append(url)
        return get(url, *args, **kwargs)

    api.get = counted  # type: ignore[method-assign]
    return reads


def read_until(backend: DockerBackend, handle: Any, cursor: Any, count: int) -> tuple[list[str], Any]:
    """Relay until ``count`` lines came; bounded by a generous deadline, never a fixed sleep."""
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while len(lines) < count:
        assert time.monotonic() < deadline, f"{len(lines)} of {count} lines arrived"
        chunk = backend.read_logs(handle, cursor)
        lines += chunk.lines
        cursor = chunk.cursor
        if len(lines) < count:
            time.sleep(0.02)
    return lines, cursor


def test_a_chatty_step_is_relayed_whole_and_its_log_is_never_read_back(make_backend, tmp_path):
    backend = make_backend()
    reads = count_log_reads(backend)
    code = ("import sys\n"
            "for i in range(20000):\n"
            "    print(f'out {i}')\n"
            "    if i % 10 == 0: print(f'err {i}', file=sys.stderr)\n"
            "print('x' * 100000)\n"  # longer than the engine's 16 KiB log entries: one line on the stream
            "sys.stdout.write('last, no newline')\n")
    request = request_for(tmp_path, code)
    backend.validate(request)
    handle = backend.submit(request)
    lines: list[str] = []
    outcome = wait_for_completion(backend, handle, on_line=lines.append, deadline=time.monotonic() + 240)
    assert outcome.status.is_successful
    assert [x for x in lines if x.startswith("out ")] == [f"out {i}" for i in range(20000)]
    assert [x for x in lines if x.startswith("err ")] == [f"err {i}" for i in range(0, 20000, 10)]
    assert lines.count("x" * 100000) == 1
    assert [x for x in lines if not x.startswith("err ")][-1] == "last, no newline"
    assert len(lines) == 20000 + 2000 + 2
    assert reads == []


STEP_WITH_A_PAUSE = ("import os, sys, time\n"
                     "for i in range(300):\n"
                     "    print(f'out {i}', flush=True)\n"
                     "    if i % 3 == 0: print(f'err {i}', file=sys.stderr, flush=True)\n"
                     "while not os.path.exists({flag!r}): time.sleep(0.02)\n"
                     "for i in range(300, 600):\n"
                     "    print(f'out {i}')\n"
                     "    if i % 3 == 0: print(f'err {i}', file=sys.stderr)\n")

ALL_LINES = sorted([f"out {i}" for i in range(600)] + [f"err {i}" for i in range(0, 600, 3)])


def check_exactly_once(lines: list[str]) -> None:
    assert sorted(lines) == ALL_LINES  # every line, once
    assert [x for x in lines if x.startswith("out ")] == [f"out {i}" for i in range(600)]  # in order per stream
    assert [x for x in lines if x.startswith("err ")] == [f"err {i}" for i in range(0, 600, 3)]


def break_by_closing(backend: DockerBackend, handle: Any) -> None:
    backend._attached[handle.data["container_id"]].close()


def break_under_the_reader(backend: DockerBackend, handle: Any) -> None:
    # The connection ends under the reader (as when the engine drops it): an end of stream although the
    # container still runs, which the next wait finds out.
    session = backend._attached[handle.data["container_id"]]
    session._raw.shutdown(socket.SHUT_RDWR)
    status = backend.wait(handle, 2)
    assert status.state is RunState.RUNNING
    assert not session.usable


@pytest.mark.parametrize("breaks", [break_by_closing, break_under_the_reader])
def test_an_attach_broken_mid_step_goes_on_from_the_log_without_loss_or_repeat(make_backend, tmp_path, breaks):
    backend = make_backend()
    flag = str(tmp_path / "artifacts" / "go-on")
    request = request_for(tmp_path, STEP_WITH_A_PAUSE.replace("{flag!r}", repr(flag)))
    backend.validate(request)
    handle = backend.submit(request)
    seen, cursor = read_until(backend, handle, None, 400)  # all the first part, from the stream
    assert set(cursor) == {"stdout", "stderr"}
    breaks(backend, handle)
    with open(flag, "w"):
        pass
    rest: list[str] = []
    outcome = wait_for_completion(backend, handle, on_line=rest.append, cursor=cursor,
                                  deadline=time.monotonic() + 240)
    assert outcome.status.is_successful
    check_exactly_once(seen + rest)
    assert "since" in outcome.cursor


def test_a_worker_without_the_stream_goes_on_from_the_counts_it_was_handed(make_backend, tmp_path):
    first, second = make_backend(), make_backend()
    flag = str(tmp_path / "artifacts" / "go-on")
    request = request_for(tmp_path, STEP_WITH_A_PAUSE.replace("{flag!r}", repr(flag)))
    first.validate(request)
    handle = first.submit(request)
    seen, cursor = read_until(first, handle, None, 400)
    first.close()  # the first worker is gone; the container runs on, detached
    assert second.poll(handle).state is RunState.RUNNING
    with open(flag, "w"):
        pass
    rest: list[str] = []
    outcome = wait_for_completion(second, handle, on_line=rest.append, cursor=cursor,
                                  deadline=time.monotonic() + 240)
    assert outcome.status.is_successful
    check_exactly_once(seen + rest)
    assert os.path.exists(flag)


WORKER = """
import json, sys, time
from airflow_remote_ml.backends.docker import DockerBackend
from airflow_remote_ml.core import ArtifactStore, StepIdentity, StepRequest, StepSpec

config, image, code, root, run = json.loads(sys.argv[1])
backend = DockerBackend.from_config(config)
request = StepRequest.create(StepSpec.build(image=image, command=["python3", "-c", code]),
                             StepIdentity("integration", "killed", run), ArtifactStore(root))
backend.validate(request)
handle = backend.submit(request)
lines, cursor = [], None
while len(lines) < 400:
    chunk = backend.read_logs(handle, cursor)
    lines += chunk.lines
    cursor = chunk.cursor
    time.sleep(0.02)
print(json.dumps({"handle": handle.to_json(), "cursor": cursor, "lines": lines}), flush=True)
sys.stdin.read()  # attached until killed
"""


def test_a_killed_worker_leaves_the_step_running_and_the_next_goes_on_from_its_cursor(make_backend, tmp_path):
    backend = make_backend()  # its labels, so the fixture removes the container
    flag = str(tmp_path / "artifacts" / "go-on")
    config = {"network_mode": "none", "pull": "never", "labels": dict(backend.config.labels)}
    argv = json.dumps([config, RUNNER_IMAGE, STEP_WITH_A_PAUSE.replace("{flag!r}", repr(flag)), str(tmp_path / "artifacts"),
                       f"run-{uuid.uuid4().hex[:12]}"])
    worker = subprocess.Popen([sys.executable, "-c", WORKER, argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert worker.stdout is not None
        state = json.loads(worker.stdout.readline())
    finally:
        worker.send_signal(signal.SIGKILL)  # no close(), no detach: the kernel drops its connection
        worker.wait()
    handle = RunHandle.from_json(state["handle"])
    assert backend.poll(handle).state is RunState.RUNNING
    with open(flag, "w"):
        pass
    rest: list[str] = []
    # The step was not held up by the dead worker's attach: it runs to its end.
    outcome = wait_for_completion(backend, handle, on_line=rest.append, cursor=state["cursor"],
                                  deadline=time.monotonic() + 240)
    assert outcome.status.is_successful
    check_exactly_once(state["lines"] + rest)
