"""The web process marks the control plane's beacon (``dispatch.beacon``) while it can reach its database.

Started before the first request a process serves (gunicorn's ``post_worker_init`` starts it as each worker
begins), in every process that serves the API: the dispatcher, the scheduler and the CLI build the app too, but
serve no agent and mark nothing. ``BEACON_INTERVAL`` 0 turns it off (and the reaper then ignores the beacon).
"""

from __future__ import annotations

import math

from flask import Flask

from app.config import ConfigError
from app.extensions import db
from dispatch.beacon import Marker

EXTENSION = "beacon"


def init_beacon(app: Flask) -> None:
    """Mark the beacon from this app's web processes, when Valkey is configured and ``BEACON_INTERVAL`` > 0."""
    client = app.extensions.get("valkey")
    interval = float(app.config["BEACON_INTERVAL"])
    if not math.isfinite(interval):
        raise ConfigError(f"BEACON_INTERVAL must be a finite number of seconds, got {interval}")
    if client is None or interval <= 0:
        return
    with app.app_context():
        engine = db.engine

    def ready() -> None:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    marker = Marker(client, interval, ready)
    app.extensions[EXTENSION] = marker
    app.before_request(marker.start)


def start_marking(app: object) -> None:
    """Start marking now, if ``app`` (what gunicorn loaded) is a Flask app that marks the beacon."""
    marker = getattr(app, "extensions", {}).get(EXTENSION)
    if isinstance(marker, Marker):
        marker.start()
