from __future__ import annotations

from airflow_remote_ml.operators import merge_backend_config


def test_task_settings_override_the_deployment_and_profiles_merge_by_name():
    deployment = {"namespace": "ml", "profiles": {"gpu": {"node_selector": {"pool": "gpu"}}}}
    task = {"namespace": "ml-dev", "profiles": {"big": {"node_selector": {"pool": "highmem"}}}}
    merged = merge_backend_config("kubernetes", deployment, task)
    assert merged["namespace"] == "ml-dev"
    assert set(merged["profiles"]) == {"gpu", "big"}


def test_a_mapping_keyed_by_backend_names_applies_the_chosen_backends_section():
    task = {"kubernetes": {"namespace": "ml"}, "docker": {"removal_policy": "always"}}
    assert merge_backend_config("docker", {}, task) == {"removal_policy": "always"}
    assert merge_backend_config("local", {"state_dir": "/x"}, task) == {"state_dir": "/x"}


def test_plain_settings_are_not_mistaken_for_a_per_backend_mapping():
    assert merge_backend_config("docker", {}, {"docker_url": "unix:///x"}) == {"docker_url": "unix:///x"}
