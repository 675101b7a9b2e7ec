"""The local backend's settings, and the environment a local step starts with.

A step runs on the worker, where the environment holds every ``AIRFLOW_CONN_*`` URI (tokens included),
``AIRFLOW__*`` settings and cloud credentials. A step gets none of that by default: only the variables
listed in :data:`BASE_ENV` (and the ``LC_*`` locale ones), what the spec names (``env`` and ``secrets``)
and the runtime's own ``REMOTE_ML_*`` settings. ``inherit_env`` passes more, by name or on purpose all.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from airflow_remote_ml.core.backend import BackendConfig
from airflow_remote_ml.core.errors import ConfigError

#: What every local step gets from the worker's environment (when set there): enough to find programs,
#: write temporary files, format text and times the way the worker does, and import the worker's code.
BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH")
#: Prefixes of worker variables every step gets too (the locale categories: LC_ALL, LC_CTYPE, ...).
BASE_ENV_PREFIXES = ("LC_",)
#: Default seconds between SIGTERM and SIGKILL on cancel. Airflow's task supervisor SIGKILLs a task
#: process 5 s after its SIGTERM; the kill must happen before that, while the task can still make it.
DEFAULT_KILL_GRACE = 3.0
#: The most the grace may be: the supervisor's 5 s, less the kill's confirmation (_procs.KILL_CONFIRM_SECONDS)
#: and the task's own exit.
MAX_KILL_GRACE = 3.5

_NAME = re.compile(r"^[A-Za-z_*?][A-Za-z0-9_*?]*$")


def default_state_dir() -> str:
    return os.environ.get("REMOTE_ML_LOCAL_STATE_DIR") or os.path.join(
        os.path.expanduser("~"), "airflow-remote-ml", "local-jobs")


@dataclass(frozen=True)
class LocalConfig(BackendConfig):
    """Settings of the local backend.

    Attributes:
        state_dir: where job directories live; must survive a worker restart for reattachment.
        python: the interpreter that runs the step (default: the worker's own).
        inherit_sys_path: give the step the worker's ``sys.path`` (so DAG-folder code imports).
        kill_grace_seconds: time between SIGTERM and SIGKILL on cancel (at most 3.5 s: the task
            supervisor kills the task process 5 s after SIGTERM).
        secrets_from: ``'airflow'`` (Airflow Variables) or ``'env'`` (the worker's environment).
        inherit_env: more of the worker's environment for the step: a list of names (``*``/``?``
            wildcards allowed, e.g. ``["AWS_*"]``), or ``True`` for all of it (connections and tokens
            included). Default: only the minimal environment (see :data:`BASE_ENV`).
    """

    state_dir: str = field(default_factory=default_state_dir)
    python: str = field(default_factory=lambda: sys.executable)
    inherit_sys_path: bool = True
    kill_grace_seconds: float = DEFAULT_KILL_GRACE
    secrets_from: str = "airflow"
    inherit_env: bool | Sequence[str] = False

    strict_profiles: ClassVar[bool] = False

    def check(self) -> None:
        """A ConfigError for any setting that cannot work, naming it and the fix."""
        if self.secrets_from not in ("airflow", "env"):
            raise ConfigError("backend_config[local].secrets_from", f"{self.secrets_from!r} is not known",
                              "use 'airflow' or 'env'")
        grace = self.kill_grace_seconds
        if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace <= MAX_KILL_GRACE:
            raise ConfigError("backend_config[local].kill_grace_seconds", f"{grace!r} is not a number of seconds "
                              f"from 0 to {MAX_KILL_GRACE:g}",
                              "Airflow's task supervisor SIGKILLs a task 5 s after SIGTERM, so the step's kill must "
                              f"come sooner; use e.g. {DEFAULT_KILL_GRACE:g}")
        inherit = self.inherit_env
        if isinstance(inherit, bool):
            return
        fix = "use true (all of the worker's environment) or a list of names such as ['AWS_PROFILE', 'HF_*']"
        if isinstance(inherit, str | bytes) or not isinstance(inherit, Sequence):
            raise ConfigError("backend_config[local].inherit_env", f"{inherit!r} is not true/false or a list", fix)
        for i, name in enumerate(inherit):
            if not isinstance(name, str) or not _NAME.match(name):
                raise ConfigError(f"backend_config[local].inherit_env[{i}]",
                                  f"{name!r} is not an environment variable name or pattern", fix)


def step_environment(worker_env: Mapping[str, str], inherit: bool | Sequence[str],
                     spec_env: Mapping[str, str], secrets: Mapping[str, str],
                     runtime_env: Mapping[str, str]) -> dict[str, str]:
    """The environment a local step starts with; later sources win: worker, spec env, secrets, runtime."""
    if inherit is True:
        env = dict(worker_env)
    else:
        patterns = list(inherit or [])
        env = {k: v for k, v in worker_env.items()
               if k in BASE_ENV or k.startswith(BASE_ENV_PREFIXES)
               or any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    # The worker's own runtime settings (a step file of another job) must never leak into this one.
    for key in [k for k in env if k.startswith("REMOTE_ML_")]:
        del env[key]
    return {**env, **spec_env, **secrets, **runtime_env}

