"""What the Docker engine would refuse, refused before a container is created; and the engine's own 400s.

Before submit: the settings by type and range (:func:`check_config`), the image reference by the grammar
the engine parses it with (:func:`check_image`), and the step options' values the engine validates
without looking at the host (:func:`check_option_values`: IPC modes, ``extra_hosts`` addresses). The
option types themselves are checked by :func:`._containers._check_options`.

After submit: what only the engine knows (a bind source missing on the Docker host, a runtime it does not
have, a CPU count above the host's) is a 400 whose text names the setting. :func:`engine_refusal` turns
it into an :class:`InvalidRequestError` for the field the user wrote, so the task fails once.

Pure functions, no I/O; only :class:`ConfigError` escapes (``tests/unit/test_validation_properties.py``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from airflow_remote_ml.backends.docker._config import PULL_POLICIES, REMOVAL_POLICIES, DockerConfig
from airflow_remote_ml.core.errors import ConfigError, InvalidRequestError
from airflow_remote_ml.core.identity import LABEL_PREFIX
from airflow_remote_ml.core.validation import (
    check_numeric_settings,
    expect_bool,
    expect_mapping,
    expect_text,
    require_text,
    short_repr,
    type_name,
)

CONFIG = "backend_config[docker]"
OPTIONS = "backend_options.docker"

# The engine parses an image with distribution/reference's ParseNormalizedNamed (reference/regexp.go):
#   domain  := host[:port], host := (label)(.label)* with [a-zA-Z0-9-] labels (or an [IPv6] literal)
#   path    := component(/component)*, component := [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*
#   tag     := [\w][\w.-]{0,127}       digest := algorithm:hex (at least 32 hex digits)
# and answers 400 "invalid reference format" (or "...: repository name must be lowercase") otherwise.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*" \
          r"|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_REFERENCE = re.compile(
    rf"^(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:"
    r"[0-9a-fA-F]{32,}))?$")
#: reference.NameTotalLengthMax: the repository name (domain and path) is at most 255 characters.
_NAME_MAX = 255

# moby api/types/container IpcMode.Valid(): "", "none", "private", "shareable", "host", "container:<id>".
_IPC_MODES = ("", "none", "private", "shareable", "host")

# The engine's 400 texts (seen from Docker 20.10 for these requests, and in moby's daemon/create.go,
# daemon/container.go verifyContainerSettings, volume/mounts/linux_parser.go), and the setting each names:
# a step option / profile / config key (placed by :func:`locate`), or a field of the spec itself.
_ENGINE_WORDS: tuple[tuple[re.Pattern[str], str, str], ...] = tuple(
    (re.compile(words, re.I), field, fix) for words, field, fix in (
        (r"invalid reference format", "image", "use a reference such as 'python:3.12' or "
         "'registry.example.com/team/runner:1.0' (lower-case repository)"),
        (r"invalid mount config|invalid volume specification|duplicate mount point|mount path must be absolute",
         "mounts", "give a source that exists on the Docker host and an absolute target"),
        (r"unknown runtime specified|unknown or invalid runtime", "runtime",
         "use a runtime the engine lists in `docker info` (e.g. 'runc' or 'nvidia')"),
        (r"working directory .* is invalid", "working_dir", "use an absolute path"),
        (r"invalid capadd|unknown capability", "cap_add", "use capability names such as 'SYS_PTRACE'"),
        (r"minimum memory limit", "compute.memory", "ask for at least 6Mi"),
        (r"range of cpus", "compute.cpu", "ask for no more CPUs than the Docker host has"),
        (r"add-host|extra.?host", "extra_hosts", "map host names to IP addresses or 'host-gateway'"),
        (r"invalid environment variable", "env", "use NAME=value pairs with a non-empty name"),
        (r"invalid ipc mode", "ipc_mode", f"use one of {', '.join(m for m in _IPC_MODES if m)} or "
         "'container:<name>'"),
        (r"unable to find user", "user", "use a user that exists in the image, or a numeric uid[:gid]"),
    ))


def engine_refusal(action: str, message: str, status_code: int | None) -> InvalidRequestError | None:
    """The field an engine refusal names, as an InvalidRequestError; None for a refusal naming no setting.

    Only a 400 (the engine's InvalidParameter) or one of the start-time texts above that a 500 carries
    (an IPC mode or a user the runtime could not set up: the same container fails the same way again).
    """
    for pattern, key, fix in _ENGINE_WORDS:
        if pattern.search(message) and (status_code == 400 or key in ("ipc_mode", "user")):
            field = key if key in _SPEC_FIELDS else f"{OPTIONS}.{key}"
            return InvalidRequestError("docker", field, f"{action}: {message}", status_code, fix)
    if status_code == 400:
        return InvalidRequestError("docker", OPTIONS, f"{action}: {message}", status_code,
                                   "fix the setting the engine names")
    return None


_SPEC_FIELDS = ("image", "env", "compute.memory", "compute.cpu")


def locate(error: InvalidRequestError, options: Mapping[str, Any], profile_name: str | None,
           profile: Mapping[str, Any], config: DockerConfig) -> InvalidRequestError:
    """``error`` with its field where the refused setting was written: the step's options win over the
    profile, the profile over the backend's settings (the order :func:`._containers.container_request`
    merges them in); a mount may come from any of them, or from ``volumes``."""
    if not error.field.startswith(OPTIONS + "."):
        return error
    key = error.field[len(OPTIONS) + 1:]
    if key in options:
        return error
    if key in profile:
        field = f"profiles.{profile_name}.{key}"
    elif key == "mounts" and (config.mounts or config.volumes):
        field = f"{CONFIG}.{'mounts' if config.mounts else 'volumes'}"
    elif getattr(config, key, None) not in (None, [], {}):
        field = f"{CONFIG}.{key}"
    else:
        return error
    return error.with_field(field)


def check_image(field: str, image: Any) -> str:
    """An image reference the engine can parse (the grammar above)."""
    text = require_text(field, image, "an image reference", "'python:3.12'")
    match = _REFERENCE.match(text)
    if match is None:
        lower = _REFERENCE.match(text.lower())
        problem = "has an upper-case repository name" if lower else "is not an image reference"
        raise ConfigError(field, f"{short_repr(text)} {problem} (the engine answers 'invalid reference format')",
                          "use e.g. 'python:3.12', 'registry.example.com:5000/team/runner:1.0' or "
                          "'name@sha256:<digest>'; repository names are lower case")
    name = (match.group("domain") + "/" if match.group("domain") else "") + match.group("path")
    if len(name) > _NAME_MAX:
        raise ConfigError(field, f"the repository name is {len(name)} characters long", "use at most 255")
    return text


def check_option_values(prefix: str, options: Mapping[str, Any]) -> None:
    """Values the engine refuses whatever the host: an unknown IPC mode, an ``extra_hosts`` address that is
    not an IP (``host-gateway`` is the engine's own alias, docker/cli opts/hosts.go ValidateExtraHost)."""
    ipc = options.get("ipc_mode")
    if isinstance(ipc, str) and ipc not in _IPC_MODES and not (ipc.startswith("container:") and ipc[10:]):
        raise ConfigError(f"{prefix}.ipc_mode", f"{short_repr(ipc)} is not an IPC mode",
                          f"use one of {', '.join(m for m in _IPC_MODES if m)} or 'container:<name>'")
    hosts = options.get("extra_hosts")
    if isinstance(hosts, Mapping):
        for host, address in hosts.items():
            if address == "host-gateway":
                continue
            try:
                ipaddress.ip_address(str(address).strip("[]"))
            except ValueError:
                raise ConfigError(f"{prefix}.extra_hosts.{host}", f"{short_repr(address)} is not an IP address",
                                  "give an IPv4/IPv6 address or 'host-gateway'") from None


def check_config(config: DockerConfig) -> None:
    """Every setting by type and range, before the client or the request builder computes with it."""
    check_numeric_settings(config, CONFIG)
    for name in ("base_url", "tls_ca_cert", "tls_client_cert", "tls_client_key", "conn_id", "network_mode",
                 "artifact_host_path"):
        expect_text(f"{CONFIG}.{name}", getattr(config, name), "a string", _EXAMPLES.get(name, "a path"))
    require_text(f"{CONFIG}.api_version", config.api_version, "an API version", "'auto' or '1.43'")
    require_text(f"{CONFIG}.python", config.python, "an interpreter", "'python3'")
    for name in ("tls_verify", "init", "artifact_mount", "attach"):
        expect_bool(f"{CONFIG}.{name}", getattr(config, name))
    for name, allowed in (("removal_policy", REMOVAL_POLICIES), ("pull", PULL_POLICIES),
                          ("secrets_from", ("airflow", "env"))):
        if getattr(config, name) not in allowed:
            raise ConfigError(f"{CONFIG}.{name}", f"{short_repr(getattr(config, name))} is not known",
                              f"use one of {', '.join(allowed)}")
    user = config.user
    if user is not None and (isinstance(user, bool) or not isinstance(user, (str, int))):
        raise ConfigError(f"{CONFIG}.user", f"{short_repr(user)} ({type_name(user)}) is not a user",
                          "use a name, a uid or 'uid:gid'")
    labels = expect_mapping(f"{CONFIG}.labels", config.labels, "{'team': 'ml'}")
    for key, value in labels.items():
        if not isinstance(value, str):
            raise ConfigError(f"{CONFIG}.labels.{key}", f"{short_repr(value)} is not a string", "labels are strings")
        if key.startswith(LABEL_PREFIX):
            raise ConfigError(f"{CONFIG}.labels.{key}", f"keys starting with {LABEL_PREFIX!r} are reserved for the "
                              "step identity", "choose another label key")
    if config.network_mode is not None:
        require_text(f"{CONFIG}.network_mode", config.network_mode, "a network", "'bridge'")


_EXAMPLES = {"base_url": "'unix:///var/run/docker.sock'", "conn_id": "'docker_default'",
             "network_mode": "'bridge'"}
