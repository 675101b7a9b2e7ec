"""The Airflow side of the Valohai backend: a ``valohai`` connection type and its hook.

A connection holds the host and the API token (its password); its extra may hold any other setting of
the backend (``project``, ``branch``, ``profiles``, ``steps``, ...), so a deployment configures Valohai in
one place. The backend itself never imports Airflow: it calls :func:`backend_config_from_connection`
lazily when its config names a ``conn_id``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

try:
    from airflow.sdk import BaseHook
except ImportError:  # pragma: no cover - older Airflow layouts
    from airflow.hooks.base import BaseHook  # type: ignore[no-redef,attr-defined]

from airflow_remote_ml.core.errors import ConfigError

#: Settings that a connection's extra may not carry (they come from the connection's own fields).
_FROM_FIELDS = {"host", "token", "conn_id"}


class ValohaiHook(BaseHook):
    """Reads a Valohai connection and talks to the Valohai API with it.

    Args:
        valohai_conn_id: the Airflow connection (type ``valohai``): host, API token as password,
            other backend settings as JSON in extra.
    """

    conn_name_attr = "valohai_conn_id"
    default_conn_name = "valohai_default"
    conn_type = "valohai"
    hook_name = "Valohai"

    def __init__(self, valohai_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.valohai_conn_id = valohai_conn_id

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Only host, token and extra mean something for Valohai."""
        return {
            "hidden_fields": ["schema", "login", "port"],
            "relabeling": {"host": "Valohai host", "password": "API token"},
            "placeholders": {
                "host": "https://app.valohai.com",
                "password": "token from Valohai: Profile → Authentication",
                "extra": json.dumps({"project": "my-org/my-project", "branch": "main",
                                     "profiles": {"gpu": {"environment": "aws-eu-west-1-p3-2xlarge"}}}),
            },
        }

    def get_backend_config(self) -> dict[str, Any]:
        """The Valohai backend's settings from this hook's connection."""
        conn = self.get_connection(self.valohai_conn_id)
        return config_from_connection_fields(self.valohai_conn_id, conn.host, conn.port, conn.password,
                                             conn.extra_dejson if conn.extra else {})

    def get_conn(self) -> Any:
        """A :class:`~airflow_remote_ml.backends.valohai.ValohaiAPI` client for this connection."""
        from airflow_remote_ml.backends.valohai import ValohaiAPI

        config = self.get_backend_config()
        return ValohaiAPI(config["host"], config["token"], conn_id=self.valohai_conn_id)

    def test_connection(self) -> tuple[bool, str]:
        """The UI's Test button: is the token accepted by the host?"""
        try:
            api = self.get_conn()
            try:
                me = api.request("GET", "users/me/", retry=False)
            finally:
                api.close()
        except Exception as exc:
            return False, str(exc)
        return True, f"Connected to {api.host} as {(me or {}).get('username', 'unknown user')}"


def config_from_connection_fields(conn_id: str, host: str | None, port: int | None, password: str | None,
                                  extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """Backend settings from a connection's fields. Pure, so it is tested without a metadata database."""
    if not password:
        raise ConfigError("conn_id", f"connection {conn_id!r} has no API token",
                          "put the Valohai API token in the connection's password field")
    from airflow_remote_ml.backends.valohai import DEFAULT_HOST, ValohaiConfig

    extra = dict(extra or {})
    known = {f for f in ValohaiConfig.__dataclass_fields__} - _FROM_FIELDS
    for key in extra:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, sorted(known), n=1)
            fix = f"did you mean {close[0]!r}?" if close else f"known settings: {', '.join(sorted(known))}"
            raise ConfigError(f"connection {conn_id!r} extra.{key}", "is not a Valohai backend setting", fix)
    url = (host or "").strip() or DEFAULT_HOST
    if "://" not in url:
        url = "https://" + url
    if port and url.count(":") < 2:
        url = f"{url.rstrip('/')}:{port}"
    return {**extra, "host": url.rstrip("/"), "token": password}


def backend_config_from_connection(conn_id: str) -> dict[str, Any]:
    """The Valohai backend's settings (host, token, extras) from Airflow connection ``conn_id``."""
    try:
        return ValohaiHook(conn_id).get_backend_config()
    except ConfigError:
        raise
    except Exception:
        raise ConfigError("conn_id", f"there is no Airflow connection {conn_id!r}",
                          f"create it (airflow connections add {conn_id} --conn-type valohai "
                          "--conn-host https://app.valohai.com --conn-password <token>)") from None
