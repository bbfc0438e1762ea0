"""The reaper ends runs for their expired leases only while agents could have renewed them, as the beacon tells."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import pytest
import redis
from flask import Flask

from app.columns import utcnow
from app.config import ConfigError
from app.extensions import db
from app.jobs import dispatching
from app.jobs.models import JobAttempt
from app.system.beacon import Forget, start_marking
from dispatch import beacon
from dispatch.beacon import Marker
from tests.app.support import Api, MakeApp, Tenant


@pytest.fixture
def valkey(beacon_valkey: redis.Redis) -> redis.Redis:
    """The session's Valkey, with a beacon key of this test's own."""
    return beacon_valkey


def _beacon(client: redis.Redis, *, silent: float, up_for: float, gap: float = 15.0) -> None:
    """Write the beacon as a control plane that last marked it ``silent`` seconds ago, up for ``up_for`` then."""
    seconds, micros = client.time()
    now = seconds * 1000 + micros // 1000
    client.set(beacon.KEY, f"{now - int(silent * 1000)} {now - int((silent + up_for) * 1000)} {int(gap * 1000)}")


@pytest.mark.parametrize(
    ("state", "reaped"),
    [
        ("never marked", True),  # no web process marks it (BEACON_INTERVAL 0 there): leases expire as they did
        ("down", False),  # the web or its database out of reach: agents cannot renew leases
        ("back", False),  # up again, for less than a lease: agents have not all had the chance to beat yet
        ("back a lease", False),  # and the gap more, so that a cut-off agent stops its run first
        ("up", True),
    ],
)
def test_an_expired_lease_is_reaped_only_once_agents_have_had_a_lease_of_uptime_to_renew_it(
    make_app: MakeApp,
    valkey_server,
    valkey: redis.Redis,
    world: dict[str, Tenant],
    caplog: pytest.LogCaptureFixture,
    state: str,
    reaped: bool,
) -> None:
    app = make_app(VALKEY_URL=valkey_server.url, BEACON_INTERVAL=5)
    lease = app.config["LEASE_SECONDS"]
    if state == "down":
        _beacon(valkey, silent=600, up_for=3600)
    elif state == "back":
        _beacon(valkey, silent=1, up_for=lease - 20)
    elif state == "back a lease":
        _beacon(valkey, silent=1, up_for=lease + 5)  # the gap is 15 s
    elif state == "up":
        _beacon(valkey, silent=1, up_for=lease + 30)
    acme = world["acme"]
    with app.app_context(), caplog.at_level(logging.INFO, "app.jobs.dispatching"):
        count = dispatching.reap(now=utcnow() + timedelta(seconds=lease + 1))
        attempt = db.session.query(JobAttempt).filter_by(job_id=acme.running, number=1).one()
    assert (count >= 1, attempt.state) == ((True, "lost") if reaped else (False, "running"))
    paused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("no lease is reaped")]
    assert bool(paused) is not reaped
    if state == "down":
        assert "has not marked its beacon for 600 s" in paused[0]
    if state == "back":
        assert any(f"has been back for {lease - n} s" in paused[0] for n in (19, 20, 21)), paused


def test_a_beacon_the_reaper_cannot_read_pauses_it(
    make_app: MakeApp, world: dict[str, Tenant], caplog: pytest.LogCaptureFixture
) -> None:
    """The safe side: a run reaped while its agent reads an outage in the beacon would run twice."""
    app = make_app(VALKEY_URL="redis://127.0.0.1:1/0", BEACON_INTERVAL=5, HEALTH_TIMEOUT=0.5)
    with app.app_context(), caplog.at_level(logging.WARNING, "app.jobs.dispatching"):
        paused = dispatching.leases_paused()
    assert paused is not None and paused.startswith("no lease is reaped: the control plane's beacon could not be read")
    assert any("could not read the control plane's beacon" in r.getMessage() for r in caplog.records)


def test_the_reaper_reads_the_beacon_whatever_its_own_interval_and_a_web_with_none_removes_it(
    make_app: MakeApp, valkey_server, valkey: redis.Redis
) -> None:
    """Agents read the beacon whatever the control plane's settings: the reaper must read the same. A web process with
    BEACON_INTERVAL 0 removes a beacon left from before, which would otherwise read as an outage on both sides."""
    _beacon(valkey, silent=600, up_for=3600)
    app: Flask = make_app(VALKEY_URL=valkey_server.url, BEACON_INTERVAL=0)
    with app.app_context():
        assert (dispatching.leases_paused() or "").startswith("no lease is reaped: the control plane has not marked")
    assert valkey.exists(beacon.KEY)  # built, it serves nothing yet (the dispatcher, the CLI)
    Api(app.test_client()).get("/health")
    deadline = time.monotonic() + 5
    while valkey.exists(beacon.KEY) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not valkey.exists(beacon.KEY)
    with app.app_context():
        assert dispatching.leases_paused() is None


def test_gunicorn_starts_marking_or_removing_the_beacon_as_a_worker_begins_and_a_failed_removal_is_tried_again(
    make_app: MakeApp, valkey_server, valkey: redis.Redis
) -> None:
    _beacon(valkey, silent=600, up_for=3600)
    app: Flask = make_app(VALKEY_URL=valkey_server.url, BEACON_INTERVAL=0)
    start_marking(app)  # gunicorn's post_worker_init, before any request
    deadline = time.monotonic() + 5
    while valkey.exists(beacon.KEY) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not valkey.exists(beacon.KEY)
    unreachable = Forget(redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2))
    unreachable.start()
    deadline = time.monotonic() + 30
    while unreachable._pid is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert unreachable._pid is None  # the next request tries again
    marking: Flask = make_app(VALKEY_URL=valkey_server.url, BEACON_INTERVAL=0.1)
    start_marking(marking)
    try:
        deadline = time.monotonic() + 5
        while (seen := beacon.read(valkey)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen is not None and seen.up
    finally:
        marking.extensions["beacon"].stop()


def test_a_beacon_interval_too_long_for_the_lease_is_warned_about(
    make_app: MakeApp, valkey_server, valkey: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "app.system.beacon"):
        make_app(VALKEY_URL=valkey_server.url, BEACON_INTERVAL=5, LEASE_SECONDS=30)
        assert not caplog.records
        make_app(VALKEY_URL=valkey_server.url, BEACON_INTERVAL=6, LEASE_SECONDS=30)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("BEACON_INTERVAL 6 s: an outage of the control plane is noticed only after 18 s")


def test_a_web_process_marks_the_beacon_once_it_serves_requests_and_only_then(
    make_app: MakeApp, valkey_server, valkey: redis.Redis
) -> None:
    app: Flask = make_app(VALKEY_URL=valkey_server.url, BEACON_INTERVAL=0.1)
    time.sleep(0.3)
    assert beacon.read(valkey) is None  # built (as the dispatcher and the CLI build it), it serves nothing
    try:
        assert Api(app.test_client()).get("/health").status_code in (200, 503)
        deadline = time.monotonic() + 5
        while (seen := beacon.read(valkey)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen is not None and seen.up and seen.gap == pytest.approx(0.3)
    finally:
        app.extensions["beacon"].stop()


def test_no_beacon_is_marked_without_valkey_or_with_an_interval_of_zero_and_an_infinite_one_is_refused(
    make_app: MakeApp, valkey_server
) -> None:
    assert "beacon" not in make_app(BEACON_INTERVAL=5).extensions  # no VALKEY_URL
    assert not isinstance(make_app(VALKEY_URL=valkey_server.url, BEACON_INTERVAL=0).extensions["beacon"], Marker)
    with pytest.raises(ConfigError, match="BEACON_INTERVAL must be a finite number"):
        make_app(VALKEY_URL=valkey_server.url, BEACON_INTERVAL=float("inf"))
