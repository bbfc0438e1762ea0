"""The agent's settings: read once from the environment into a frozen dataclass, in the entry point."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import re
import socket
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

# The agent's own credentials: removed from its environment once read, so that no workflow (a command's
# inherited environment, a {{.NAME}} placeholder) can see them, and on Linux kept out of the environment the
# process was started with (``hide_credentials``). AGENT_SCRUB_ENV names more, comma-separated.
CREDENTIALS = ("JWT_TOKEN", "VALKEY_URL", "JOB_VERIFY_KEY", "AGENT_SCRUB_ENV")

TOKEN = re.compile(r"[A-Za-z0-9_=.-]+")  # a JWT: base64url segments joined by dots
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


def _token(value: str) -> str:
    """The agent's JWT, without the line end a token read from a file keeps; never echoed in an error."""
    token = value.strip()
    if not TOKEN.fullmatch(token):
        raise SettingsError("JWT_TOKEN is not a token: it holds spaces or other characters a JWT never has")
    return token


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
        jwt_token=_token(env["JWT_TOKEN"]),
        valkey_url=env["VALKEY_URL"],
        verify_key=env["JOB_VERIFY_KEY"],
        log_level=(env.get("LOG_LEVEL") or "INFO").strip().upper(),  # empty: the default, as for every variable
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


def _secret_names(environ: Mapping[str, str]) -> list[str]:
    """The agent's credentials and the variables AGENT_SCRUB_ENV names."""
    extra = [name.strip() for name in environ.get("AGENT_SCRUB_ENV", "").split(",") if name.strip()]
    return [*extra, *CREDENTIALS]


def scrub_environment(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Remove the agent's credentials (and the variables AGENT_SCRUB_ENV names) from ``environ``; return them."""
    env = os.environ if environ is None else environ
    return [name for name in _secret_names(env) if env.pop(name, None) is not None]


PR_SET_DUMPABLE = 4  # prctl's option: whether processes of the same user may read this one's memory and ptrace it
HANDOVER = "AGENT_CREDENTIALS_FD"  # set only by hide_credentials, for the image it starts
PR_SET_NAME = 15  # prctl's option that sets the calling thread's name (the process's, from its main thread)


def hide_credentials() -> None:
    """On Linux, keep the agent's credentials out of ``/proc/<pid>/environ`` and its memory out of reach of the
    workflows it runs (``keep_memory_private``); call first thing in the entry point.

    ``scrub_environment`` keeps them from the processes the agent starts, but Linux goes on showing the environment
    a process was started with to every process of the same user (``/proc/<pid>/environ``, ``ps e``): a workflow
    that collects those for a diagnosis would put the agent's token in its output. So an agent started with
    credentials in its environment starts itself again (``execve``: the same process, the same pid) without them,
    and hands them over in an anonymous memory file (``memfd_create``) named by ``AGENT_CREDENTIALS_FD``; the new
    image reads them back into ``os.environ``, which /proc does not show, and closes the file. Elsewhere (Windows,
    macOS) this does nothing. Raises ``SettingsError`` when a handover cannot be read.
    """
    _restart_without_credentials()  # returns in the image started again, or when there is nothing to hide
    keep_memory_private()


def keep_memory_private() -> None:
    """On Linux, make this process non-dumpable, so that a process of the same user (every workflow the agent runs,
    unless it runs as another user) can neither read its memory (``/proc/<pid>/mem``, where the credentials live
    on after ``hide_credentials``) nor attach to it with ptrace; only root can (``CAP_SYS_PTRACE``). It also writes
    no core dump. The commands it starts are not affected: ``execve`` makes a process dumpable again."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def _restart_without_credentials() -> None:
    handed = os.environ.pop(HANDOVER, None)
    if handed is not None:
        secrets, name = _take_handover(handed)
        os.environ.update(secrets)
        _set_process_name(name)
        return
    secrets = {name: os.environ[name] for name in _secret_names(os.environ) if name in os.environ}
    if not secrets or not hasattr(os, "memfd_create") or not sys.executable:
        return
    environment = {name: value for name, value in os.environ.items() if name not in secrets}
    # the process's name (``automation``, what ps, top, pgrep and journald show) would become the interpreter's
    name = ""
    with contextlib.suppress(OSError):
        name = Path("/proc/self/comm").read_text().strip()
    fd = -1
    try:
        fd = os.memfd_create("agent-credentials", 0)
        os.set_inheritable(fd, True)  # the new image's
        with os.fdopen(os.dup(fd), "wb") as handover:
            handover.write(json.dumps({"environ": secrets, "name": name}).encode())
        environment[HANDOVER] = str(fd)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)  # noqa: S606 - this agent again
    except OSError as exc:  # the agent still runs, its credentials kept from its workflows' environment only
        if fd >= 0:
            os.close(fd)
        print(f"automation agent: could not restart without credentials in its environment: {exc}", file=sys.stderr)


def _set_process_name(name: str) -> None:
    """Give this process back the name it had before ``hide_credentials`` started it again (Linux's prctl)."""
    if not name:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _take_handover(handed: str) -> tuple[dict[str, str], str]:
    """The credentials and the process name ``hide_credentials`` handed over in the file descriptor ``handed``,
    which it closes."""
    try:
        fd = int(handed)
    except ValueError:
        raise SettingsError(f"{HANDOVER} must be a file descriptor, got {handed!r}") from None
    try:
        with os.fdopen(fd, "rb") as handover:
            handover.seek(0)
            handed_over = json.loads(handover.read())
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot read the credentials handed over in {HANDOVER}={handed}: {exc}") from None
    secrets = handed_over.get("environ") if isinstance(handed_over, dict) else None
    name = handed_over.get("name") if isinstance(handed_over, dict) else None
    if not isinstance(secrets, dict) or not all(isinstance(v, str) for v in (*secrets, *secrets.values())):
        raise SettingsError(f"the credentials handed over in {HANDOVER}={handed} are not a map of strings")
    return secrets, name if isinstance(name, str) else ""
