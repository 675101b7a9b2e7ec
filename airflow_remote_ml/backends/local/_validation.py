"""What a local step cannot run with, refused before its process starts.

The step runs on the worker itself, so what would only fail inside the step elsewhere is knowable here:
a local input that does not exist on this machine, a working directory that is not one. Pure apart from
looking at the worker's filesystem; only :class:`ConfigError` escapes
(``tests/unit/test_validation_properties.py``).
"""

from __future__ import annotations

import os

from airflow_remote_ml.core.artifacts import is_local, local_path
from airflow_remote_ml.core.backend import StepRequest
from airflow_remote_ml.core.errors import ConfigError
from airflow_remote_ml.core.validation import expect_text


def check_request(request: StepRequest) -> None:
    """The local root, the ``cwd`` option and the step's local inputs."""
    spec = request.spec
    cwd = expect_text("backend_options.local.cwd", spec.options_for("local").get("cwd"), "a directory",
                      "'/opt/project'")
    if cwd is not None and not os.path.isdir(cwd):
        raise ConfigError("backend_options.local.cwd", f"{cwd!r} is not a directory", "give an existing directory")
    for name, uri in spec.inputs.items():
        # A local input is read where the step runs: here. An upstream output already exists when this step
        # runs (its task succeeded), so a missing file is a wrong path, not a race.
        if is_local(uri) and not os.path.exists(local_path(uri)):
            raise ConfigError(f"inputs.{name}", f"{uri!r} does not exist on the worker",
                              "check the path, or pass the upstream output's URI (upstream.output['outputs']"
                              f"[{name!r}])")
    if not is_local(request.artifact_root):
        return  # the runtime uploads through fsspec; nothing to check here
    if not os.path.isabs(local_path(request.artifact_root)):
        raise ConfigError("artifact_root", f"{request.artifact_root!r} is relative", "use an absolute path")
