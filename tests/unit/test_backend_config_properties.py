"""No backend configuration, however malformed, gets anything but a ConfigError from building the backend.

A backend is built on the worker and again in the triggerer from plain data (``backend_config``, the
deployment's ``[remote_ml] backend_config``, a connection's extras): a TypeError there would be retried
and would name no setting (issue 9, item 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_remote_ml.core import ConfigError, available_backends, get_backend_class

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _settings(name: str) -> st.SearchStrategy[dict[str, Any]]:
    fields = [f.name for f in dataclasses.fields(get_backend_class(name).config_class)]
    return st.dictionaries(st.sampled_from(fields), JSON, max_size=4)


def _build(name: str, data: dict[str, Any]) -> None:
    try:
        backend = get_backend_class(name).from_config(data)
    except ConfigError:
        return
    backend.close()


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(sorted(available_backends())), data=st.data())
def test_building_a_backend_raises_nothing_but_config_error(name: str, data: st.DataObject) -> None:
    _build(name, data.draw(_settings(name)))


def test_a_list_where_the_profiles_mapping_belongs_names_the_setting() -> None:
    for name in sorted(available_backends()):
        try:
            get_backend_class(name).from_config({"profiles": [{"gpu": 1}]})
        except ConfigError as exc:
            assert exc.field == f"backend_config[{name}].profiles", (name, exc)
        else:
            raise AssertionError(f"{name} accepted a list of profiles")
