"""What ``airflow providers list`` shows about airflow-remote-ml (the ``apache_airflow_provider`` entry point)."""

from __future__ import annotations

from typing import Any


def get_provider_info() -> dict[str, Any]:
    from airflow_remote_ml import __version__

    return {
        "package-name": "airflow-remote-ml",
        "name": "Remote ML",
        "description": "Run each ML pipeline step on the compute it needs (local, Docker, Kubernetes, "
        "Databricks, Valohai) from one operator or the TaskFlow decorator @task.remote_ml, with artifacts "
        "passed between steps as URIs (and published as Assets).",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Remote ML",
                "external-doc-url": "https://pypi.org/project/airflow-remote-ml/",
                "tags": ["software"],
            }
        ],
        "operators": [{"integration-name": "Remote ML", "python-modules": ["airflow_remote_ml.operators"]}],
        "triggers": [{"integration-name": "Remote ML", "python-modules": ["airflow_remote_ml.triggers"]}],
        "hooks": [
            {
                "integration-name": "Remote ML",
                "python-modules": ["airflow_remote_ml.hooks", "airflow_remote_ml.valohai_hook"],
            }
        ],
        "connection-types": [
            {
                "connection-type": "valohai",
                "hook-class-name": "airflow_remote_ml.valohai_hook.ValohaiHook",
                "hook-name": "Valohai",
            }
        ],
        "extra-links": ["airflow_remote_ml.links.RemoteJobLink"],
        "plugins": [{"name": "remote_ml", "plugin-class": "airflow_remote_ml.ui.plugin.RemoteMLPlugin"}],
        # `airflow remote-ml jobs list|cancel|gc` (Airflow >= 3.3 reads provider CLI commands from here).
        "cli": ["airflow_remote_ml.cli.get_cli_commands"],
        # @task.remote_ml, the way the Docker and Kubernetes providers register @task.docker/@task.kubernetes.
        "task-decorators": [{"class-name": "airflow_remote_ml.decorators.remote_ml_task", "name": "remote_ml"}],
        "config": {
            "remote_ml": {
                "description": "Settings of the airflow-remote-ml provider.",
                "options": {
                    "default_backend": {
                        "description": "Backend used when a task names none.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "kubernetes",
                        "default": "local",
                    },
                    "artifact_root": {
                        "description": "Where step outputs are written: a directory shared with the steps, "
                        "or an fsspec URI such as s3://bucket/ml. Default: ~/airflow-remote-ml/artifacts.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "s3://ml-artifacts/airflow",
                        "default": None,
                    },
                    "backend_config": {
                        "description": "JSON mapping backend names to their settings (connections, profiles, "
                        "removal policies). Task-level backend_config is merged over it.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": '{"kubernetes": {"namespace": "ml"}}',
                        "default": None,
                    },
                    "backend_config_file": {
                        "description": "Path of a JSON file holding the same mapping as backend_config.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/opt/airflow/remote_ml.json",
                        "default": None,
                    },
                },
            }
        },
    }
