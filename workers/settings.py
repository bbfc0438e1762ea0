"""The agent's settings: read once from the environment into a frozen dataclass, in the entry point."""

from __future__ import annotations

import os
import platform
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

# The agent's own credentials: removed from its environment once read, so that no workflow (a command's
# inherited environment, a {{.NAME}} placeholder) can see them. AGENT_SCRUB_ENV names more, comma-separated.
CREDENTIALS = ("JWT_TOKEN", "VALKEY_URL", "JOB_VERIFY_KEY", "AGENT_SCRUB_ENV")

REQUIRED = ("CONTROL_PLANE_URL", "TENANT_ID", "PROJECT_ID", "AGENT_ID", "JWT_TOKEN", "VALKEY_URL", "JOB_VERIFY_KEY")


class SettingsError(Exception):
    """Raised when the agent's environment lacks a setting or holds a malformed one."""


def this_platform() -> str:
    """The platform name of this host as queues use it: linux, windows or darwin."""
    name = platform.system().lower()
    return {"windows": "windows", "darwin": "darwin"}.get(name, "linux")


@dataclass(frozen=True)
class AgentSettings:
    """Everything the agent needs, from environment variables (see docs/CONFIGURATION.md)."""

    control_plane_url: str
    tenant_id: str
    project_id: str
    agent_id: str
    jwt_token: str
    valkey_url: str
    verify_key: str
    log_level: str = "INFO"
    log_format: str = "json"
    heartbeat_interval: float = 30.0
    concurrency: int = 1
    platform: str = "linux"
    hostname: str = ""
    visibility_timeout: int = 12 * 3600
    restore_interval: int | None = None
    request_timeout: float = 10.0
    report_deadline: float = 300.0  # how long a result is retried before the agent gives up on it
    poison_limit: int = 3  # deliveries of one message that never finished before it is refused
    ca_file: str | None = None
    isolated: bool = False  # own names for kombu's bookkeeping and its tenant's event exchange, for a Valkey ACL

    @property
    def api(self) -> str:
        """The control plane's API root."""
        return self.control_plane_url.rstrip("/") + "/api/v1"


def _number(environ: Mapping[str, str], name: str, default: float, kind: type = float) -> float:
    raw = environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name} must be more than zero, got {raw!r}")
    return float(value)


def load_settings(environ: Mapping[str, str] | None = None) -> AgentSettings:
    """Read the agent's settings from ``environ`` (default: the process environment)."""
    env = os.environ if environ is None else environ
    missing = [name for name in REQUIRED if not env.get(name)]
    if missing:
        raise SettingsError(f"the agent needs these environment variables: {', '.join(missing)}")
    return AgentSettings(
        control_plane_url=env["CONTROL_PLANE_URL"],
        tenant_id=env["TENANT_ID"],
        project_id=env["PROJECT_ID"],
        agent_id=env["AGENT_ID"],
        jwt_token=env["JWT_TOKEN"],
        valkey_url=env["VALKEY_URL"],
        verify_key=env["JOB_VERIFY_KEY"],
        log_level=env.get("LOG_LEVEL", "INFO").upper(),
        log_format=env.get("LOG_FORMAT") or "json",
        heartbeat_interval=_number(env, "HEARTBEAT_INTERVAL", 30.0),
        concurrency=int(_number(env, "AGENT_CONCURRENCY", 1, int)),
        platform=env.get("AGENT_PLATFORM") or this_platform(),
        hostname=env.get("AGENT_HOSTNAME") or socket.gethostname(),
        visibility_timeout=int(_number(env, "BROKER_VISIBILITY_TIMEOUT", 12 * 3600, int)),
        restore_interval=int(_number(env, "BROKER_RESTORE_INTERVAL", 0, int))
        if env.get("BROKER_RESTORE_INTERVAL")
        else None,
        request_timeout=_number(env, "CONTROL_PLANE_TIMEOUT", 10.0),
        report_deadline=_number(env, "REPORT_DEADLINE", 300.0),
        poison_limit=int(_number(env, "POISON_LIMIT", 3, int)),
        ca_file=env.get("CONTROL_PLANE_CA_FILE") or None,
        isolated=_flag(env, "AGENT_BROKER_ISOLATION"),
    )


def _flag(environ: Mapping[str, str], name: str) -> bool:
    raw = (environ.get(name) or "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name} must be true or false, got {environ.get(name)!r}")


def scrub_environment(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Remove the agent's credentials (and the variables AGENT_SCRUB_ENV names) from ``environ``; return them."""
    env = os.environ if environ is None else environ
    extra = [name.strip() for name in env.get("AGENT_SCRUB_ENV", "").split(",") if name.strip()]
    removed = [name for name in (*extra, *CREDENTIALS) if env.pop(name, None) is not None]
    return removed
