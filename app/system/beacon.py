"""The web process marks the control plane's beacon (``dispatch.beacon``) while it can reach its database.

Started before the first request a process serves (gunicorn's ``post_worker_init`` starts it as each worker
begins), in every process that serves the API: the dispatcher, the scheduler and the CLI build the app too, but
serve no agent and mark nothing. With ``BEACON_INTERVAL`` 0 a web process marks nothing and removes the beacon
instead, once, so that the reaper and the agents do not read a beacon left from before as an outage.
"""

from __future__ import annotations

import logging
import math
import os
import threading

import redis
from flask import Flask

from app.config import ConfigError
from app.extensions import db
from dispatch import beacon
from dispatch.beacon import Marker

log = logging.getLogger(__name__)

EXTENSION = "beacon"
SLOW = (
    "BEACON_INTERVAL {interval:g} s: an outage of the control plane is noticed only after {gap:g} s, more than half "
    "of LEASE_SECONDS ({lease} s); runs may be stopped before it is (keep BEACON_INTERVAL below a sixth of the lease)"
)


class Forget:
    """Removes the beacon once per process, in the background (a request must not wait for Valkey)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._pid: int | None = None

    def start(self) -> None:
        """Remove the beacon, if this process has not done so yet."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        threading.Thread(target=self._forget, name="beacon-forget", daemon=True).start()

    def _forget(self) -> None:
        try:
            beacon.forget(self.client)
        except Exception as exc:  # Valkey out of reach: tried again at this process's next request
            log.warning("could not remove the control plane's beacon: %s", exc)
            self._pid = None


def init_beacon(app: Flask) -> None:
    """Mark the beacon from this app's web processes, when Valkey is configured and ``BEACON_INTERVAL`` > 0; remove
    it from them when ``BEACON_INTERVAL`` is 0."""
    client = app.extensions.get("valkey")
    interval = float(app.config["BEACON_INTERVAL"])
    if not math.isfinite(interval):
        raise ConfigError(f"BEACON_INTERVAL must be a finite number of seconds, got {interval}")
    if client is None:
        return
    if interval <= 0:
        forget = Forget(client)
        app.extensions[EXTENSION] = forget
        app.before_request(forget.start)
        return
    lease = app.config["LEASE_SECONDS"]
    if beacon.gap_of(interval) > lease / 2:
        log.warning(SLOW.format(interval=interval, gap=beacon.gap_of(interval), lease=lease))
    with app.app_context():
        engine = db.engine

    def ready() -> None:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    marker = Marker(client, interval, ready)
    app.extensions[EXTENSION] = marker
    app.before_request(marker.start)


def start_marking(app: object) -> None:
    """Start marking now (or remove the beacon), if ``app`` (what gunicorn loaded) is a Flask app of ours."""
    marker = getattr(app, "extensions", {}).get(EXTENSION)
    if isinstance(marker, Marker | Forget):
        marker.start()
