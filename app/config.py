"""Configuration: defaults in a class, overrides from the environment read by the app factory."""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from app.errors import AppError

MIN_SECRET_LENGTH = 32
SECRET_FILE = "jwt-secret"  # noqa: S105 - a file name
SIGNING_KEY_FILE = "job-signing-key"
SECRETS_KEY_FILE = "secrets-key"
SECRETS_KEY_BYTES = 32
BAD_SECRETS_KEY = "SECRETS_KEY must be the base64 form of 32 random bytes (automation keys secrets-key makes one)"


class ConfigError(AppError):
    """Raised when the configuration cannot work (a short JWT secret, a malformed number)."""


class Config:
    """Defaults of every setting; ``docs/CONFIGURATION.md`` documents each one."""

    DATABASE_URL: str | None = None  # None: an SQLite file in the instance folder
    VALKEY_URL: str | None = None
    JWT_SECRET: str | None = None  # None: a random secret kept in the instance folder
    JWT_DEFAULT_TTL = 86400
    MAX_CONTENT_LENGTH = 1024 * 1024
    MAX_WORKFLOW_BYTES = 256 * 1024
    TASK_OUTPUT_LIMIT = 64 * 1024
    RATE_LIMIT = "600 per minute"
    RATE_LIMIT_ENABLED = True
    AGENT_RATE_LIMIT = "6000 per minute"  # the limit of each agent token (claims, results, logs, reports)
    LEASE_SECONDS = 90
    HEARTBEAT_INTERVAL = 30
    AGENT_OFFLINE_AFTER = 90
    MAX_ATTEMPTS = 1  # runs of a workflow that fails; more with a job's max_attempts
    MAX_LOST_ATTEMPTS = 3  # attempts whose agent vanished before the job is dead-lettered
    RETRY_BACKOFF = 10.0  # seconds before the second run of a failed job; doubles each time, jittered
    RETRY_BACKOFF_MAX = 600.0
    JOB_SIGNING_KEY: str | None = None  # None: a key pair kept in the instance folder
    SECRETS_KEY: str | None = None  # seals project secrets; None: a key kept in the instance folder
    ENVELOPE_TTL = 86400
    BROKER_VISIBILITY_TIMEOUT = 12 * 3600
    BROKER_RESTORE_INTERVAL: int | None = None  # None: kombu's default (about every 100 s)
    REAPER_INTERVAL = 10.0
    BEACON_INTERVAL = 5.0  # seconds between a web process's marks that it can serve agents; 0: no beacon
    SWEEPER_INTERVAL = 5.0
    SWEEP_GRACE = 5.0
    AUDIT_SEAL_INTERVAL = 2.0  # seconds between two runs of the audit sealer (hash-chains new audit entries)
    SCHEDULE_MISFIRE_GRACE = 60.0  # seconds late a cron run may still fire; older ones are recorded as missed
    SCHEDULE_ALLOW_SECONDS = False  # accept 6-field cron expressions with the seconds first (tests, demos)
    SCHEDULE_RUN_RETENTION_DAYS = 30  # days of schedule run history kept (each schedule's latest 20 always); 0: all
    JOB_RETENTION_DAYS = 0  # days finished jobs are kept (with attempts, results, history, logs); 0: all
    CENTRIFUGO_URL: str | None = None
    CENTRIFUGO_API_URL: str | None = None  # e.g. http://centrifugo:8000/api; with the key: live events published there
    CENTRIFUGO_API_KEY: str | None = None
    CENTRIFUGO_TOKEN_SECRET: str | None = None  # HMAC key of Centrifugo's client tokens; unset: no tokens (503)
    CENTRIFUGO_TOKEN_TTL = 900  # seconds a connection or subscription token is valid
    CENTRIFUGO_QUEUE_SIZE = 10000  # publications a process keeps while Centrifugo is slow or down; more are dropped
    CENTRIFUGO_RETRY_FOR = 300.0  # seconds a publication is retried (within Centrifugo's idempotency window)
    EVENT_HISTORY_SIZE = 1000  # live events kept per job in Valkey for replay (SSE Last-Event-ID)
    EVENT_HISTORY_TTL = 86400  # seconds a job's kept events live after its last event
    SSE_MAX_SECONDS = 3600  # the longest an event stream stays open (the client resumes with Last-Event-ID)
    SSE_KEEPALIVE = 15.0  # seconds between keep-alive comments of a quiet event stream
    SSE_MAX_STREAMS: int | None = None  # event streams one web process serves at once; None: no limit (gunicorn's
    # config file sets its threads less one, so that a worker always has a thread for other requests)
    QUICKWIT_URL: str | None = None
    QUICKWIT_INDEX = "automation-logs"  # the index of deploy/quickwit/automation-logs.yaml
    QUICKWIT_TIMEOUT = 10.0  # seconds per request to Quickwit (searches and ingest batches)
    LOG_MAX_LINES_PER_JOB = 10000  # log lines kept per job; then one truncation marker counts the rest
    LOG_MAX_BYTES_PER_JOB = 5 * 1024 * 1024  # bytes of log messages kept per job
    LOG_LINE_MAX_BYTES = 8192  # a longer log line is cut with a visible marker (at most 65535)
    LOG_BATCH_MAX_LINES = 1000  # log lines an agent may send in one request
    HEALTH_TIMEOUT = 2.0
    LOG_FORMAT = "json"  # json: one JSON object per line; text: for people at a terminal
    LOG_LEVEL = "INFO"
    METRICS_TOKEN: str | None = None  # a bearer token that may read /metrics from anywhere
    METRICS_ALLOW = "127.0.0.0/8,::1/128"  # networks that may read /metrics without the token; "none": no network


# Environment variable -> the type it is read as. Only these are read.
ENVIRONMENT: dict[str, type] = {
    "DATABASE_URL": str,
    "VALKEY_URL": str,
    "JWT_SECRET": str,
    "JWT_DEFAULT_TTL": int,
    "MAX_CONTENT_LENGTH": int,
    "MAX_WORKFLOW_BYTES": int,
    "TASK_OUTPUT_LIMIT": int,
    "RATE_LIMIT": str,
    "RATE_LIMIT_ENABLED": bool,
    "AGENT_RATE_LIMIT": str,
    "LEASE_SECONDS": int,
    "HEARTBEAT_INTERVAL": int,
    "AGENT_OFFLINE_AFTER": int,
    "MAX_ATTEMPTS": int,
    "MAX_LOST_ATTEMPTS": int,
    "RETRY_BACKOFF": float,
    "RETRY_BACKOFF_MAX": float,
    "JOB_SIGNING_KEY": str,
    "SECRETS_KEY": str,
    "ENVELOPE_TTL": int,
    "BROKER_VISIBILITY_TIMEOUT": int,
    "BROKER_RESTORE_INTERVAL": int,
    "REAPER_INTERVAL": float,
    "BEACON_INTERVAL": float,
    "SWEEPER_INTERVAL": float,
    "SWEEP_GRACE": float,
    "AUDIT_SEAL_INTERVAL": float,
    "SCHEDULE_MISFIRE_GRACE": float,
    "SCHEDULE_ALLOW_SECONDS": bool,
    "SCHEDULE_RUN_RETENTION_DAYS": int,
    "JOB_RETENTION_DAYS": int,
    "CENTRIFUGO_URL": str,
    "CENTRIFUGO_API_URL": str,
    "CENTRIFUGO_API_KEY": str,
    "CENTRIFUGO_TOKEN_SECRET": str,
    "CENTRIFUGO_TOKEN_TTL": int,
    "CENTRIFUGO_QUEUE_SIZE": int,
    "CENTRIFUGO_RETRY_FOR": float,
    "EVENT_HISTORY_SIZE": int,
    "EVENT_HISTORY_TTL": int,
    "SSE_MAX_SECONDS": int,
    "SSE_KEEPALIVE": float,
    "SSE_MAX_STREAMS": int,
    "QUICKWIT_URL": str,
    "QUICKWIT_INDEX": str,
    "QUICKWIT_TIMEOUT": float,
    "LOG_MAX_LINES_PER_JOB": int,
    "LOG_MAX_BYTES_PER_JOB": int,
    "LOG_LINE_MAX_BYTES": int,
    "LOG_BATCH_MAX_LINES": int,
    "LOG_FORMAT": str,
    "LOG_LEVEL": str,
    "METRICS_TOKEN": str,
    "METRICS_ALLOW": str,
}


TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})


def from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Return the settings that ``environ`` overrides, converted to their types."""
    settings: dict[str, Any] = {}
    for name, kind in ENVIRONMENT.items():
        raw = environ.get(name)
        if raw is None or raw == "":
            continue
        if kind is bool:
            flag = raw.strip().lower()
            if flag not in TRUE | FALSE:  # a typo must not switch a safeguard off (RATE_LIMIT_ENABLED=ture)
                raise ConfigError(f"{name} must be true or false (1, yes, on / 0, no, off), got {raw!r}")
            settings[name] = flag in TRUE
        elif kind is int:
            try:
                settings[name] = int(raw)
            except ValueError:
                raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
        elif kind is float:
            try:
                settings[name] = float(raw)
            except ValueError:
                raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
        else:
            settings[name] = raw
    return settings


def database_url(configured: str | None, instance_path: str) -> str:
    """Return the database URL: the configured one, or an SQLite file under the instance folder."""
    if configured:
        return configured
    Path(instance_path).mkdir(parents=True, exist_ok=True)
    return "sqlite:///" + os.path.join(instance_path, "automation.db")


def jwt_secret(configured: str | None, instance_path: str) -> str:
    """Return the JWT secret: the configured one, or one kept in the instance folder (made on first use)."""
    if configured:
        if len(configured) < MIN_SECRET_LENGTH:
            raise ConfigError(f"JWT_SECRET must be at least {MIN_SECRET_LENGTH} characters long")
        return configured
    return _instance_secret(Path(instance_path) / SECRET_FILE, lambda: secrets.token_urlsafe(48))


def job_signing_key(configured: str | None, instance_path: str) -> str:
    """Return the Ed25519 key that signs job envelopes: the configured one, or one kept in the instance folder."""
    if configured:
        return configured
    from dispatch.signing import generate_keypair

    return _instance_secret(Path(instance_path) / SIGNING_KEY_FILE, lambda: generate_keypair()[0])


def new_secrets_key() -> str:
    """A new SECRETS_KEY: the base64 form of 32 random bytes."""
    return base64.b64encode(secrets.token_bytes(SECRETS_KEY_BYTES)).decode()


def secrets_key(configured: str | None, instance_path: str) -> str:
    """Return the key that seals project secrets: the configured one, or one kept in the instance folder; checked."""
    key = configured or _instance_secret(Path(instance_path) / SECRETS_KEY_FILE, new_secrets_key)
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(BAD_SECRETS_KEY) from None
    if len(raw) != SECRETS_KEY_BYTES:
        raise ConfigError(BAD_SECRETS_KEY)
    return key


def _instance_secret(path: Path, make: Callable[[], str]) -> str:
    """Read a secret file of the instance folder, creating it (mode 0600) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f"{path.name}.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(make())
        try:
            os.link(draft, path)  # atomic: the first process to get here wins, the others read its secret
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_text().strip()


def engine_options(url: str) -> dict[str, Any]:
    """Return SQLAlchemy engine options suited to the database behind ``url``."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 30}}
    return {"pool_pre_ping": True, "pool_recycle": 3600, "isolation_level": "READ COMMITTED"}
