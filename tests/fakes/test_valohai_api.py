"""Tests of the Valohai v0 API test server, driven over HTTP with ``requests`` and with ``valohai-cli``.

Each test talks to a real server on 127.0.0.1 whose executions run real subprocesses, so these
tests check the behaviour a Valohai backend relies on: create → poll → complete, logs, metadata,
outputs as datums, stop, errors, auth and paging.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.fakes.valohai_api import FakeValohai, build_command

TOKEN = "test-token-123"
PY = shlex.quote(sys.executable)

TRAIN_PY = """\
import argparse, json, os, sys
parser = argparse.ArgumentParser()
parser.add_argument("--learning_rate", type=float)
parser.add_argument("--epochs", type=int)
parser.add_argument("--verbose", action="store_true")
args = parser.parse_args()
print("argv:", json.dumps(sys.argv[1:]))
print(json.dumps({"epoch": 1, "loss": 0.9}))
print(json.dumps({"epoch": 2, "loss": 0.4, "accuracy": 0.8}))
print("a warning", file=sys.stderr)
out = os.environ["VH_OUTPUTS_DIR"]
with open(os.path.join(out, "model.txt"), "w") as fh:
    fh.write(f"lr={args.learning_rate}")
os.makedirs(os.path.join(out, "plots"), exist_ok=True)
with open(os.path.join(out, "plots", "loss.csv"), "w") as fh:
    fh.write("epoch,loss\\n1,0.9\\n2,0.4\\n")
"""

EVALUATE_PY = """\
import glob, json, os
files = sorted(glob.glob(os.path.join(os.environ["VH_INPUTS_DIR"], "model", "*")))
for path in files:
    with open(path) as fh:
        print("input", os.path.basename(path), fh.read())
with open(os.path.join(os.environ["VH_CONFIG_DIR"], "inputs.json")) as fh:
    config = json.load(fh)
print("config-names", json.dumps([f["name"] for f in config["model"]["files"]]))
print("repo", os.getcwd() == os.environ["VH_REPOSITORY_DIR"])
"""

CONFIG: list[dict[str, Any]] = [
    {
        "step": {
            "name": "train",
            "image": "python:3.11",
            "command": [f"{PY} train.py {{parameters}}"],
            "parameters": [
                {"name": "learning_rate", "type": "float", "default": 0.01},
                {"name": "epochs", "type": "integer", "default": 3},
                {"name": "verbose", "type": "flag", "default": False},
            ],
        }
    },
    {
        "step": {
            "name": "fail",
            "image": "python:3.11",
            "command": f"{PY} -c 'import sys; print(\"boom\", file=sys.stderr); sys.exit(3)'",
        }
    },
    {
        "step": {
            "name": "sleep",
            "image": "python:3.11",
            "command": f"{PY} -c 'import time; print(\"sleeping\", flush=True); time.sleep(60)'",
        }
    },
    {
        "step": {
            "name": "evaluate",
            "image": "python:3.11",
            "command": f"{PY} evaluate.py",
            "inputs": [{"name": "model"}],
        }
    },
    {
        "step": {
            "name": "many-outputs",
            "image": "python:3.11",
            "command": 'for i in 1 2 3 4 5; do echo "$i" > "$VH_OUTPUTS_DIR/part-$i.txt"; done',
        }
    },
    {
        "step": {
            "name": "env",
            "image": "python:3.11",
            "command": 'echo "GREETING=$GREETING MODE=$MODE"',
            "environment-variables": [{"name": "MODE", "default": "fast"}],
        }
    },
    {"step": {"name": "quick", "image": "busybox", "command": "echo quick"}},
]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text(TRAIN_PY)
    (code / "evaluate.py").write_text(EVALUATE_PY)
    return code


@pytest.fixture
def vh() -> Iterator[FakeValohai]:
    with FakeValohai(token=TOKEN) as server:
        yield server


@pytest.fixture
def project(vh: FakeValohai, repo: Path) -> dict[str, Any]:
    return vh.add_project("demo", config=CONFIG, repository=repo)


@pytest.fixture
def api(vh: FakeValohai) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Token {TOKEN}"
    return session


def create(vh: FakeValohai, api: requests.Session, project: dict[str, Any], step: str, **body: Any) -> dict[str, Any]:
    resp = api.post(vh.api_url + "executions/", json={"project": project["id"], "commit": "main", "step": step, **body})
    assert resp.status_code == 201, resp.text
    data: dict[str, Any] = resp.json()
    return data


def poll(api: requests.Session, execution: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    """Poll the execution URL as a client would, until a terminal status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data: dict[str, Any] = api.get(execution["url"]).json()
        if data["status"] in ("complete", "error", "crashed", "stopped"):
            return data
        time.sleep(0.05)
    raise AssertionError(f"execution never finished: {data['status']}")


def wait_for_output_line(api: requests.Session, execution: dict[str, Any], text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = api.get(execution["url"] + "events/", params={"limit": 0}).json()["events"]
        if any(e["message"] == text for e in events):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in the events")


# ------------------------------------------------------------------------------------ happy path


def test_create_answers_201_with_the_execution_object(vh, api, project):
    ex = create(vh, api, project, "train", tags=["airflow:dag.task"], title="nightly", time_limit=600)

    assert ex["status"] == "created"
    assert ex["counter"] == 1
    assert ex["step"] == "train"
    assert ex["tags"] == ["airflow:dag.task"]
    assert ex["title"] == "nightly"
    assert ex["time_limit"] == 600
    assert ex["project"]["id"] == project["id"]
    assert len(ex["commit"]["identifier"]) == 40
    assert ex["url"] == f"{vh.api_url}executions/{ex['id']}/"
    assert ex["urls"]["display"].startswith(vh.url + "/p/")
    assert ex["urls"]["stop"] == ex["url"] + "stop/"
    assert ex["link"].endswith(f"/execution/{ex['id']}/")
    assert ex["parameters"] == {"learning_rate": 0.01, "epochs": 3, "verbose": False}


def test_a_step_runs_to_complete_with_logs_metadata_and_outputs(vh, api, project):
    ex = create(vh, api, project, "train", parameters={"learning_rate": 0.5, "verbose": True})

    done = poll(api, ex)

    assert done["status"] == "complete"
    assert done["duration"] is not None
    events = api.get(ex["url"] + "events/", params={"limit": 0}).json()
    stdout = [e["message"] for e in events["events"] if e["stream"] == "stdout"]
    stderr = [e["message"] for e in events["events"] if e["stream"] == "stderr"]
    # {parameters} expands to --name=value in step order, flags as bare --name.
    assert 'argv: ["--learning_rate=0.5", "--epochs=3", "--verbose"]' in stdout
    assert stderr == ["a warning"]
    assert {e["stream"] for e in events["events"]} == {"status", "stdout", "stderr"}
    assert done["cumulative_metadata"] == {"epoch": 2, "loss": 0.4, "accuracy": 0.8}
    assert [m["loss"] for m in done["metadata"]] == [0.9, 0.4]
    assert all("_time" in m for m in done["metadata"])

    data = api.get(vh.api_url + "data/", params={"output_execution": ex["id"]}).json()
    names = sorted(d["name"] for d in data["results"])
    assert names == ["model.txt", "plots/loss.csv"]
    model = next(d for d in data["results"] if d["name"] == "model.txt")
    assert model["output_execution"] == {"id": ex["id"], "counter": ex["counter"], "url": ex["url"]}
    assert model["size"] == len("lr=0.5")
    assert sorted(o["id"] for o in done["outputs"]) == sorted(d["id"] for d in data["results"])

    signed = api.get(f"{vh.api_url}data/{model['id']}/download/").json()["url"]
    assert requests.get(signed).content == b"lr=0.5"  # no token needed, like a presigned URL
    tampered = signed.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    assert requests.get(tampered).status_code == 403


def test_status_goes_created_queued_started_complete(vh, api, project):
    vh.pause_queue()
    ex = create(vh, api, project, "quick")
    vh.wait_status(ex["id"], "queued")
    assert api.get(ex["url"]).json()["status"] == "queued"
    vh.resume_queue()

    done = poll(api, ex)

    statuses = [e["message"] for e in done["events"] if e["stream"] == "status"]
    order = ["created", "queued", "started", "complete"]
    positions = [next(i for i, m in enumerate(statuses) if word in m) for word in order]
    assert positions == sorted(positions)


def test_non_zero_exit_ends_in_error_with_stderr_in_the_log(vh, api, project):
    ex = create(vh, api, project, "fail")

    done = poll(api, ex)

    assert done["status"] == "error"
    events = api.get(ex["url"] + "events/", params={"limit": 0}).json()["events"]
    assert {"stream": "stderr", "message": "boom"}.items() <= next(e for e in events if e["stream"] == "stderr").items()
    assert any("exited with code 3" in e["message"] for e in events if e["stream"] == "status")


def test_environment_variables_from_the_request_and_step_defaults_reach_the_process(vh, api, project):
    ex = create(vh, api, project, "env", environment_variables={"GREETING": "hej"})

    done = poll(api, ex)

    assert "GREETING=hej MODE=fast" in [e["message"] for e in done["events"]]
    assert done["environment_variables"] == {"GREETING": "hej", "MODE": "fast"}


def test_an_output_datum_is_the_input_of_the_next_execution(vh, api, project):
    train = poll(api, create(vh, api, project, "train", parameters={"learning_rate": 0.25}))
    model = next(o for o in train["outputs"] if o["name"] == "model.txt")

    ev = create(vh, api, project, "evaluate", inputs={"model": [f"datum://{model['id']}"]})
    done = poll(api, ev)

    messages = [e["message"] for e in done["events"] if e["stream"] == "stdout"]
    assert "input model.txt lr=0.25" in messages
    assert 'config-names ["model.txt"]' in messages
    assert "repo True" in messages
    assert done["inputs"][0]["name"] == "model"
    assert done["inputs"][0]["urls"] == [f"datum://{model['id']}"]
    assert done["inputs"][0]["files"][0]["datum_id"] == model["id"]


def test_http_inputs_are_fetched(vh, api, project):
    served = vh.serve_file("remote.txt", b"from-http")

    done = poll(api, create(vh, api, project, "evaluate", inputs={"model": [served]}))

    messages = [e["message"] for e in done["events"]]
    assert "input remote.txt from-http" in messages


@pytest.mark.parametrize("url", ["/tmp/model.pkl", "model.pkl", "file:///tmp/model.pkl", "ftp://host/model.pkl",
                                 "datum://", "datum://not-a-uuid", "https:///no-host"])
def test_an_input_that_is_not_a_downloadable_url_is_refused_before_anything_runs(vh, api, project, url):
    before = len(vh.executions)

    resp = api.post(vh.api_url + "executions/", json={"project": project["id"], "commit": "main",
                                                      "step": "evaluate", "inputs": {"model": [url]}})

    assert resp.status_code == 400
    [error] = resp.json()["inputs"]
    assert error["code"] == "invalid" and 'Input "model"' in error["message"]
    assert len(vh.executions) == before


@pytest.mark.parametrize("url", ["s3://bucket/key.csv", "gs://bucket/key.csv", "azure://acct/cont/blob",
                                 "swift://proj/cont/key"])
def test_a_store_url_is_accepted_but_this_server_cannot_download_it(vh, api, project, url):
    done = poll(api, create(vh, api, project, "evaluate", inputs={"model": [url]}))

    assert done["status"] == "error"
    assert any("unsupported URL scheme" in e["message"] for e in done["events"])


def test_a_non_loopback_input_url_fails_the_execution_without_contacting_it(vh, api, project):
    done = poll(api, create(vh, api, project, "evaluate", inputs={"model": ["https://example.com/model.pkl"]}))

    assert done["status"] == "error"
    assert any("only loopback" in e["message"] for e in done["events"])


def test_commit_may_be_a_branch_name_or_an_identifier_and_fetch_reveals_new_commits(vh, api, project):
    first = api.get(vh.api_url + "commits/", params={"project": project["id"]}).json()["results"][0]
    later = vh.add_commit(project["id"], CONFIG, ref="main", fetched=False)
    assert api.get(vh.api_url + "commits/", params={"project": project["id"]}).json()["count"] == 1

    fetched = api.post(f"{vh.api_url}projects/{project['id']}/fetch/").json()

    assert [c["identifier"] for c in fetched["commits"]] == [later["identifier"]]
    by_branch = create(vh, api, project, "quick")
    assert by_branch["commit"]["identifier"] == later["identifier"]
    pinned = create(vh, api, project, "quick", commit=first["identifier"])
    assert pinned["commit"]["identifier"] == first["identifier"]
    detail = api.get(first["url"], params={"include": "config"}).json()
    assert detail["config"] == CONFIG


def test_projects_filter_by_name_and_environments_list(vh, api, project):
    vh.add_project("other")

    found = api.get(vh.api_url + "projects/", params={"name": "demo"}).json()

    assert found["count"] == 1
    assert found["results"][0]["id"] == project["id"]
    assert api.get(f"{vh.api_url}projects/{project['id']}/").json()["name"] == "demo"
    slugs = {e["slug"] for e in api.get(vh.api_url + "environments/").json()["results"]}
    assert {"default", "fake-gpu-1x"} <= slugs


def test_execution_detail_by_project_and_counter_and_exclude(vh, api, project):
    ex = create(vh, api, project, "quick")

    detail = api.get(f"{vh.api_url}executions/{project['id']}:{ex['counter']}/", params={"exclude": "metadata,events"})

    assert detail.status_code == 200
    assert detail.json()["id"] == ex["id"]
    assert "events" not in detail.json() and "metadata" not in detail.json()


# ------------------------------------------------------------------------------------ stop


def test_stop_a_running_execution_is_idempotent_and_ends_stopped(vh, api, project):
    ex = create(vh, api, project, "sleep")
    wait_for_output_line(api, ex, "sleeping")

    first = api.post(ex["urls"]["stop"])
    second = api.post(ex["urls"]["stop"])
    done = poll(api, ex)

    assert first.status_code == 200 and second.status_code == 200
    assert first.json()["status"] == "stopping"
    assert done["status"] == "stopped"
    assert api.post(ex["urls"]["stop"]).status_code == 200  # stopping a finished execution is harmless
    assert api.get(ex["url"]).json()["status"] == "stopped"


def test_stop_a_queued_execution_never_runs_it(vh, api, project):
    vh.pause_queue()
    ex = create(vh, api, project, "quick")
    vh.wait_status(ex["id"], "queued")

    api.post(ex["urls"]["stop"])
    done = poll(api, ex)

    assert done["status"] == "stopped"
    assert "quick" not in [e["message"] for e in done["events"]]


def test_time_limit_stops_the_execution(vh, api, project):
    ex = create(vh, api, project, "sleep", time_limit=1)

    done = poll(api, ex)

    assert done["status"] == "stopped"
    assert done["status_detail"] == "Time limit exceeded"


def test_crash_and_unknown_status_hooks(vh, api, project):
    ex = create(vh, api, project, "sleep")
    wait_for_output_line(api, ex, "sleeping")
    vh.override_status(ex["id"], "pending-reboot")
    assert api.get(ex["url"]).json()["status"] == "pending-reboot"
    vh.override_status(ex["id"], None)

    vh.crash(ex["id"])

    assert api.get(ex["url"]).json()["status"] == "crashed"


# ------------------------------------------------------------------------------------ errors and auth


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({"step": "nope"}, "step", "does_not_exist"),
        ({"environment": "bluup"}, "environment", "does_not_exist"),
        ({"commit": "0" * 40}, "commit", "does_not_exist"),
        ({"step": "train", "parameters": {"epochs": "many"}}, "parameters", "invalid"),
        ({"step": "train", "parameters": {"typo": 1}}, "parameters", "invalid"),
        ({"step": "evaluate"}, "inputs", "required"),
        ({"step": "evaluate", "inputs": {"model": ["datum://" + "0" * 32]}}, "inputs", "does_not_exist"),
        ({"tags": "not-a-list"}, "tags", "not_a_list"),
        ({"time_limit": "soon"}, "time_limit", "invalid"),
    ],
)
def test_a_bad_create_answers_400_with_field_errors(vh, api, project, body, field, code):
    payload = {"project": project["id"], "commit": "main", "step": "quick", **body}

    resp = api.post(vh.api_url + "executions/", json=payload)

    assert resp.status_code == 400
    errors = resp.json()
    assert list(errors) == [field]
    assert errors[field][0]["code"] == code
    assert isinstance(errors[field][0]["message"], str) and errors[field][0]["message"]
    assert api.get(vh.api_url + "executions/").json()["count"] == 0


def test_the_environment_error_reads_like_the_real_one(vh, api, project):
    resp = api.post(
        vh.api_url + "executions/",
        json={"project": project["id"], "commit": "main", "step": "quick", "environment": "bluup"},
    )

    assert resp.json() == {
        "environment": [{"message": "Object with slug or primary key bluup does not exist.", "code": "does_not_exist"}]
    }


def test_missing_fields_are_required(vh, api):
    resp = api.post(vh.api_url + "executions/", json={})

    assert resp.status_code == 400
    assert {k: v[0]["code"] for k, v in resp.json().items()} == {
        "project": "required",
        "commit": "required",
        "step": "required",
    }


def test_form_encoded_create_is_accepted_like_the_docs_example(vh, api, project):
    resp = api.post(vh.api_url + "executions/", data={"project": project["id"], "commit": "main", "step": "quick"})

    assert resp.status_code == 201


def test_bad_or_missing_token_answers_401_with_drf_bodies(vh, project):
    missing = requests.get(vh.api_url + "projects/")
    wrong = requests.get(vh.api_url + "projects/", headers={"Authorization": "Token nope"})
    bearer = requests.get(vh.api_url + "projects/", headers={"Authorization": f"Bearer {TOKEN}"})

    assert missing.status_code == 401
    assert missing.json() == {"detail": "Authentication credentials were not provided."}
    assert missing.headers["WWW-Authenticate"] == "Token"
    assert wrong.status_code == 401
    assert wrong.json() == {"detail": "Invalid token."}
    assert bearer.status_code == 401


def test_unknown_execution_is_404_and_wrong_method_405(vh, api):
    assert api.get(vh.api_url + "executions/00000000-0000-0000-0000-000000000000/").status_code == 404
    resp = api.delete(vh.api_url + "executions/")
    assert resp.status_code == 405
    assert resp.json() == {"detail": 'Method "DELETE" not allowed.'}


# ------------------------------------------------------------------------------------ faults and counting


def test_injected_429_carries_retry_after_then_service_resumes(vh, api, project):
    vh.inject_fault(429, retry_after=7, path="/api/v0/executions/")

    throttled = api.get(vh.api_url + "executions/")
    after = api.get(vh.api_url + "executions/")

    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "7"
    assert throttled.json() == {"detail": "Request was throttled. Expected available in 7 seconds."}
    assert after.status_code == 200


def test_injected_5xx_for_the_next_n_requests_then_ok_and_requests_are_counted(vh, api, project):
    vh.inject_fault(503, count=2, method="GET")

    codes = [api.get(f"{vh.api_url}projects/{project['id']}/").status_code for _ in range(3)]

    assert codes == [503, 503, 200]
    assert vh.count("GET", "/api/v0/projects/{id}/") == 3
    assert vh.count("POST", "/api/v0/executions/") == 0


def test_unknown_list_filters_are_ignored_like_django_filter(vh, api, project):
    create(vh, api, project, "quick", tags=["a"])
    create(vh, api, project, "quick", tags=["b"])

    listed = api.get(vh.api_url + "executions/", params={"project": project["id"], "made_up_filter": "a"}).json()

    assert listed["count"] == 2
    assert vh.ignored_filters["made_up_filter"] == 1


# ------------------------------------------------------------------------------------ paging


def test_executions_page_with_limit_offset_and_next_links(vh, api, project):
    created = [create(vh, api, project, "quick") for _ in range(5)]
    for ex in created:
        vh.wait(ex["id"])

    seen: list[int] = []
    url: str | None = vh.api_url + "executions/"
    params: dict[str, Any] | None = {"project": project["id"], "limit": 2, "ordering": "counter"}
    pages = 0
    while url:
        page = api.get(url, params=params).json()
        assert page["count"] == 5
        seen.extend(e["counter"] for e in page["results"])
        url, params = page["next"], None
        pages += 1

    assert seen == [1, 2, 3, 4, 5]
    assert pages == 3
    last = api.get(vh.api_url + "executions/", params={"limit": 2, "offset": 4, "ordering": "-counter"}).json()
    assert [e["counter"] for e in last["results"]] == [1]
    assert last["next"] is None and last["previous"] is not None
    done = api.get(vh.api_url + "executions/", params={"status": "complete", "counter": "2"}).json()
    assert [e["counter"] for e in done["results"]] == [2]


def test_status_incomplete_filter_matches_the_cli(vh, api, project):
    vh.pause_queue()
    waiting = create(vh, api, project, "quick")
    vh.wait_status(waiting["id"], "queued")

    incomplete = api.get(vh.api_url + "executions/", params={"project": project["id"], "status": "incomplete"}).json()

    assert [e["id"] for e in incomplete["results"]] == [waiting["id"]]


def test_data_list_pages_by_output_execution(vh, api, project):
    ex = poll(api, create(vh, api, project, "many-outputs"))
    other = poll(api, create(vh, api, project, "train"))
    assert other["n_outputs"] == 2

    first = api.get(vh.api_url + "data/", params={"output_execution": ex["id"], "limit": 2}).json()
    rest = api.get(first["next"]).json()
    tail = api.get(rest["next"]).json()

    assert first["count"] == 5
    names = [d["name"] for page in (first, rest, tail) for d in page["results"]]
    assert sorted(names) == [f"part-{i}.txt" for i in range(1, 6)]
    assert tail["next"] is None


def test_events_limit_returns_the_last_events_and_zero_means_all(vh, api, project):
    ex = poll(api, create(vh, api, project, "train"))

    every = api.get(ex["url"] + "events/", params={"limit": 0}).json()
    last_two = api.get(ex["url"] + "events/", params={"limit": 2}).json()

    assert every["truncated"] is False and every["total"] == len(every["events"])
    assert last_two["truncated"] is True and last_two["total"] == every["total"]
    assert last_two["events"] == every["events"][-2:]
    assert all(len(e["time"].split("T")[1]) == len("15:25:33.037000") for e in every["events"])


# ------------------------------------------------------------------------------------ parameter semantics


def test_build_command_matches_valohai_yaml():
    from valohai_yaml.objs import Config

    config = Config.parse(
        [
            {
                "step": {
                    "name": "s",
                    "image": "x",
                    "command": ["run {parameters}", "only {parameter:b} {parameter-value:a} ${HOME}"],
                    "parameters": [
                        {"name": "a", "type": "string", "default": "hello world"},
                        {"name": "b", "type": "integer", "pass-as": "-b {v}", "default": 3},
                        {"name": "c", "type": "flag", "pass-true-as": "--yes", "pass-false-as": "--no"},
                        {"name": "d", "type": "float", "multiple": "repeat", "default": [1.5, 2.5]},
                        {"name": "e", "type": "string", "multiple": "separate", "multiple-separator": ":"},
                        {"name": "f", "type": "string", "optional": True},
                    ],
                }
            }
        ]
    )
    step = config.steps["s"]
    values = {"a": "hello world", "b": 3, "c": False, "d": [1.5, 2.5], "e": ["x", "y"], "f": None}
    expected = step.build_command(values)

    spec = [p.serialize() for p in step.parameters.values()]
    assert build_command(step.command, spec, values) == expected


# ------------------------------------------------------------------------------------ the official client


def _vh(vh: FakeValohai, project: dict[str, Any], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``vh`` command-line client against the fake, in remote-project mode."""
    exe = Path(sys.executable).with_name("vh")
    env = {**os.environ, "VALOHAI_CONFIG_DIR": str(cwd), "NO_COLOR": "1"}
    cmd = [
        str(exe),
        "--valohai-host",
        vh.url,
        "--valohai-token",
        TOKEN,
        "--project",
        project["id"],
        "--project-mode",
        "remote",
        "--project-root",
        str(cwd),
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_valohai_cli_runs_watches_and_downloads_through_the_fake(vh, project, tmp_path):
    work = tmp_path / "cli"
    work.mkdir()

    run = _vh(vh, project, work, "execution", "run", "train", "--learning-rate=0.3", "--epochs=2")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Execution #1 created" in run.stdout + run.stderr
    ex_id = next(iter(vh.executions))
    assert vh.wait(ex_id)["status"] == "complete"

    logs = _vh(vh, project, work, "execution", "logs", "1", "--all")
    assert logs.returncode == 0, logs.stderr
    assert 'argv: ["--learning_rate=0.3", "--epochs=2"]' in logs.stdout

    outputs = _vh(vh, project, work, "execution", "outputs", "1", "--download", str(work / "out"))
    assert outputs.returncode == 0, outputs.stderr
    assert (work / "out" / "model.txt").read_text() == "lr=0.3"
    assert (work / "out" / "plots" / "loss.csv").exists()
    assert vh.count("GET", "/api/v0/data/{id}/download/") == 2

    summary = _vh(vh, project, work, "execution", "summarize", "1")
    assert summary.returncode == 0, summary.stderr
    assert "accuracy" in summary.stdout


def test_valohai_cli_stops_an_execution_and_reports_api_errors(vh, project, tmp_path):
    work = tmp_path / "cli"
    work.mkdir()
    run = _vh(vh, project, work, "execution", "run", "sleep")
    assert run.returncode == 0, run.stdout + run.stderr
    ex_id = next(iter(vh.executions))
    vh.wait_status(ex_id, "started")

    stop = _vh(vh, project, work, "execution", "stop", "1")

    assert stop.returncode == 0, stop.stderr
    assert vh.wait(ex_id)["status"] == "stopped"
    bad = _vh(vh, project, work, "execution", "run", "quick", "--environment", "bluup")
    assert bad.returncode != 0
    assert "Object with slug or primary key bluup does not exist." in bad.stderr
    assert "vh environments" in bad.stderr  # the CLI's hint fires on code does_not_exist


def test_valohai_cli_api_session_reads_paged_lists(vh, project):
    from valohai_cli.api import APISession

    session = APISession(vh.url, TOKEN)
    projects = session.get("/api/v0/projects/", params={"limit": 9000}).json()["results"]

    assert [p["name"] for p in projects] == ["demo"]
    assert json.loads(session.get(f"/api/v0/projects/{project['id']}/").text)["id"] == project["id"]


def test_a_datum_uploaded_by_the_test_is_an_input_and_time_limit_zero_means_none(vh, api, project):
    datum = vh.add_datum("weights.txt", b"w=1", project_id=project["id"])

    done = poll(api, create(vh, api, project, "evaluate", inputs={"model": f"datum://{datum['id']}"}, time_limit=0))

    assert done["status"] == "complete"
    assert "input weights.txt w=1" in [e["message"] for e in done["events"]]
    assert api.get(f"{vh.api_url}data/{datum['id']}/").json()["output_execution"] is None


# ------------------------------------------------------------------------------------ fault knobs


def create_body(project: dict[str, Any], step: str = "quick", **body: Any) -> dict[str, Any]:
    return {"project": project["id"], "commit": "main", "step": step, **body}


def test_a_slow_create_takes_effect_before_its_answer_outlasts_the_client_timeout(vh, api, project):
    vh.slow_create(5)

    with pytest.raises(requests.Timeout):
        api.post(vh.api_url + "executions/", json=create_body(project, tags=["slow"]), timeout=0.5)

    # Already visible while the answer is still on its way.
    listed = api.get(vh.api_url + "executions/", params={"project": project["id"]}).json()["results"]
    assert [e["tags"] for e in listed] == [["slow"]]
    # The knob applies once: the next create answers at once.
    assert api.post(vh.api_url + "executions/", json=create_body(project), timeout=30).status_code == 201


def test_a_slow_create_that_commits_late_appears_only_when_the_server_is_done(vh, api, project):
    vh.slow_create(2, commit_late=True)

    with pytest.raises(requests.Timeout):
        api.post(vh.api_url + "executions/", json=create_body(project, tags=["late"]), timeout=0.5)
    assert api.get(vh.api_url + "executions/", params={"project": project["id"]}).json()["count"] == 0

    deadline = time.monotonic() + 30
    while not vh.executions:  # the server finishes the request although the client has left
        assert time.monotonic() < deadline, "the slow create never took effect"
        time.sleep(0.05)
    listed = api.get(vh.api_url + "executions/", params={"project": project["id"]}).json()["results"]
    assert [e["tags"] for e in listed] == [["late"]]


def test_a_lost_create_response_closes_the_connection_after_the_execution_exists(vh, api, project):
    vh.lose_create_response()

    with pytest.raises(requests.ConnectionError):
        api.post(vh.api_url + "executions/", json=create_body(project, tags=["lost"]), timeout=30)

    listed = api.get(vh.api_url + "executions/", params={"project": project["id"]}).json()["results"]
    assert [e["tags"] for e in listed] == [["lost"]]


def test_a_refused_create_consumes_no_create_fault_effect(vh, api, project):
    vh.lose_create_response()

    resp = api.post(vh.api_url + "executions/", json=create_body(project, step="nope"), timeout=30)

    assert resp.status_code == 400 and not vh.executions


def test_an_outage_answers_503_html_until_it_ends(vh, api, project):
    vh.outage(3600)

    resp = api.get(vh.api_url + "projects/")

    assert resp.status_code == 503 and "text/html" in resp.headers["Content-Type"]
    vh.end_outage()
    assert api.get(vh.api_url + "projects/").status_code == 200


def test_an_outage_of_a_few_seconds_ends_by_itself(vh, api):
    vh.outage(0.5)
    assert api.get(vh.api_url + "projects/").status_code == 503
    deadline = time.monotonic() + 30
    while api.get(vh.api_url + "projects/").status_code == 503:
        assert time.monotonic() < deadline, "the outage never ended"
        time.sleep(0.1)


def test_rate_limit_answers_429_with_retry_after_for_count_requests(vh, api):
    vh.rate_limit(2, retry_after=7)

    answers = [api.get(vh.api_url + "projects/") for _ in range(3)]

    assert [r.status_code for r in answers] == [429, 429, 200]
    assert answers[0].headers["Retry-After"] == "7"
    assert answers[0].json() == {"detail": "Request was throttled. Expected available in 7 seconds."}


def test_a_revoked_token_answers_drf_invalid_token(vh, api, project):
    vh.revoke_token()

    resp = api.get(vh.api_url + "projects/")

    assert resp.status_code == 401 and resp.json() == {"detail": "Invalid token."}
    assert resp.headers["WWW-Authenticate"] == "Token"


def test_a_deleted_execution_stops_and_answers_404(vh, api, project):
    ex = create(vh, api, project, "sleep")
    wait_for_output_line(api, ex, "sleeping")

    vh.delete_execution(ex["id"])

    assert api.get(ex["url"]).status_code == 404
    assert api.get(ex["url"] + "events/").status_code == 404
    assert api.get(vh.api_url + "executions/", params={"project": project["id"]}).json()["count"] == 0


def test_delete_over_the_api_answers_204(vh, api, project):
    ex = create(vh, api, project, "quick")

    assert api.delete(ex["url"]).status_code == 204
    assert api.get(ex["url"]).status_code == 404


def test_a_late_event_lands_among_the_events_already_listed(vh, api, project):
    ex = create(vh, api, project, "sleep")
    wait_for_output_line(api, ex, "sleeping")
    before = api.get(ex["url"] + "events/", params={"limit": 0}).json()["events"]

    vh.late_event(ex["id"], "stdout", "shipped late", seconds_ago=3600)

    after = api.get(ex["url"] + "events/", params={"limit": 0}).json()
    assert after["total"] == len(before) + 1
    assert after["events"][0]["message"] == "shipped late"  # ordered by time, not by arrival
    assert after["events"][1:] == before


def test_a_step_over_the_machine_memory_is_oom_killed_and_ends_in_error(vh, api, repo):
    vh.add_environment("fake-small-64m", memory_mib=64)
    grow = f"{PY} -c 'import time; x = b\"x\" * (512 << 20); time.sleep(60)'"
    project = vh.add_project("oom", config=[{"step": {"name": "grow", "image": "python:3.11", "command": grow}}],
                             repository=repo)

    done = poll(api, create(vh, api, project, "grow", environment="fake-small-64m"))

    assert done["status"] == "error"
    messages = [e["message"] for e in done["events"] if e["stream"] == "status"]
    assert any(m.startswith("Out of memory: the kernel killed process") for m in messages), messages
    assert "Process exited with code -9. Execution failed." in messages or any("code 137" in m for m in messages)
