"""The session's one real Airflow deployment (see harness.py), and its logs on every failure."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import IN_CI
from tests.deployment.harness import Deployment, DeploymentError

_DEPLOYMENTS: list[Deployment] = []


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """PostgreSQL + scheduler + dag-processor + triggerer + api-server on loopback, for the whole session.

    A PostgreSQL that cannot be started, a failed migration or a component that does not become
    healthy fails the test with the reason and the components' logs (bounded waits, no hang). Outside CI
    only, a machine that cannot run PostgreSQL at all (not root, no Debian packages) skips with the way
    to provide it, like the Docker tests without an engine.
    """
    try:
        running = Deployment.start(tmp_path_factory.mktemp("airflow-deployment"))
    except DeploymentError as exc:
        missing = str(exc).startswith(("PostgreSQL could not be started", "psycopg2 is not installed"))
        if missing and not IN_CI:
            pytest.skip(f"{str(exc).splitlines()[0]} (as root: bash .ci/postgres.sh)")
        raise
    _DEPLOYMENTS.append(running)
    try:
        yield running
    finally:
        running.stop()
        _DEPLOYMENTS.remove(running)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report ends with the tails of every component's log (and the migration's)."""
    outcome: Any = yield
    report = outcome.get_result()
    if report.failed and _DEPLOYMENTS:
        report.sections.append(("Airflow deployment logs", _DEPLOYMENTS[-1].log_tails()))
