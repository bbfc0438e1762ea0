"""Live status: job events published after each commit (Valkey pub/sub, Centrifugo), tokens, and an SSE stream.

>>> from app.realtime.events import note_task    # services note events; they go out when the transaction commits

Nothing is imported here at import time: ``app.jobs.states`` imports ``app.realtime.events``, and the views
import the jobs services.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask

from app.config import MIN_SECRET_LENGTH, ConfigError

log = logging.getLogger(__name__)

NEEDS_API_KEY = "CENTRIFUGO_API_URL is set but CENTRIFUGO_API_KEY is not: Centrifugo refuses API calls without it"
SHORT_TOKEN_SECRET = f"CENTRIFUGO_TOKEN_SECRET must be at least {MIN_SECRET_LENGTH} characters long"
SAME_SECRET = "CENTRIFUGO_TOKEN_SECRET must differ from JWT_SECRET: Centrifugo must not accept the API's tokens"  # noqa: S105
POSITIVE = ("EVENT_HISTORY_SIZE", "EVENT_HISTORY_TTL", "CENTRIFUGO_QUEUE_SIZE", "CENTRIFUGO_TOKEN_TTL")
POSITIVE_SECONDS = ("CENTRIFUGO_RETRY_FOR", "SSE_MAX_SECONDS", "SSE_KEEPALIVE")
NEEDS_VALKEY = "CENTRIFUGO_API_URL is set but VALKEY_URL is not: live events are numbered in Valkey, none is published"
_registered: list[bool] = []


def check_settings(config: Mapping[str, Any]) -> None:
    """Refuse live-status settings that cannot work; raises ConfigError."""
    if config["CENTRIFUGO_API_URL"] and not config["CENTRIFUGO_API_KEY"]:
        raise ConfigError(NEEDS_API_KEY)
    secret = config["CENTRIFUGO_TOKEN_SECRET"]
    if secret and len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(SHORT_TOKEN_SECRET)
    if secret and secret == config["JWT_SECRET"]:
        raise ConfigError(SAME_SECRET)
    for name in (*POSITIVE, *POSITIVE_SECONDS):
        if config[name] <= 0:
            raise ConfigError(f"{name} must be more than 0, got {config[name]!r}")
    streams = config.get("SSE_MAX_STREAMS")
    if streams is not None and streams < 0:
        raise ConfigError(f"SSE_MAX_STREAMS must be 0 or more, got {streams!r}")


def _register_counters() -> None:
    """Serve the fan-out's counters with the web process's own metrics (once per process)."""
    if _registered:
        return
    from app.system import instruments
    from dispatch.realtime import counters

    metrics = counters()
    for counter in (metrics.published, metrics.failures, metrics.dropped):
        instruments.PROCESS.register(counter)
    _registered.append(True)


def centrifugo_check(config: Mapping[str, Any]) -> Callable[[], object] | None:
    """The ``/health`` check of Centrifugo's API (its ``info`` method), or None when the API is not configured."""
    url, key = config["CENTRIFUGO_API_URL"], config["CENTRIFUGO_API_KEY"]
    if not url:
        return None
    from dispatch.realtime import check_centrifugo

    return lambda: check_centrifugo(url, key, float(config["HEALTH_TIMEOUT"]))


def init_realtime(app: Flask) -> None:
    """Check the settings, build the fan-out (with VALKEY_URL), hook the session, and serve the endpoints."""
    from app.realtime.events import EXTENSION, install_session_hooks
    from app.realtime.views import SLOTS, bp
    from dispatch.realtime import CentrifugoPublisher, Fanout

    config = app.config
    check_settings(config)
    valkey = app.extensions.get("valkey")
    if valkey is not None:
        centrifugo = None
        if config["CENTRIFUGO_API_URL"]:
            centrifugo = CentrifugoPublisher(
                config["CENTRIFUGO_API_URL"],
                config["CENTRIFUGO_API_KEY"],
                queue_size=int(config["CENTRIFUGO_QUEUE_SIZE"]),
                retry_for=float(config["CENTRIFUGO_RETRY_FOR"]),
            )
        app.extensions[EXTENSION] = Fanout(
            valkey,
            history_size=int(config["EVENT_HISTORY_SIZE"]),
            history_ttl=int(config["EVENT_HISTORY_TTL"]),
            centrifugo=centrifugo,
        )
    elif config["CENTRIFUGO_API_URL"]:
        log.warning(NEEDS_VALKEY)
    streams = config["SSE_MAX_STREAMS"]  # each event stream holds a web thread while it lasts
    app.extensions[SLOTS] = None if streams is None else threading.BoundedSemaphore(streams)
    install_session_hooks()
    _register_counters()
    app.register_blueprint(bp)
