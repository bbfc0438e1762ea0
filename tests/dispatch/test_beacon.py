"""The control plane's beacon on a real Valkey: marked while the web can serve agents, read by the reaper and agents."""

from __future__ import annotations

import time

import pytest
import redis

from dispatch import beacon


@pytest.fixture
def client(beacon_valkey: redis.Redis) -> redis.Redis:
    """A client of the session's Valkey, with a beacon key of this test's own."""
    return beacon_valkey


def test_a_beacon_never_marked_reads_as_none(client: redis.Redis) -> None:
    assert beacon.read(client) is None
    client.set(beacon.KEY, "not a beacon")
    assert beacon.read(client) is None


def test_marks_closer_than_the_gap_keep_the_uptime_and_a_silence_longer_than_it_starts_it_again(
    client: redis.Redis,
) -> None:
    beacon.mark(client, gap=0.5)
    first = beacon.read(client)
    assert first is not None and first.up and first.gap == 0.5 and first.up_for < 0.2
    for _ in range(3):  # marked every 0.2 s: still up, and up since the first mark
        time.sleep(0.2)
        beacon.mark(client, gap=0.5)
    held = beacon.read(client)
    assert held is not None and held.up and held.up_for >= 0.55 and held.silent_for < 0.2
    time.sleep(0.7)  # silent longer than the gap: down, and agents could renew no lease meanwhile
    silent = beacon.read(client)
    assert silent is not None and not silent.up and silent.silent_for >= 0.7 and silent.lease_time() == 0.0
    beacon.mark(client, gap=0.5)
    back = beacon.read(client)
    assert back is not None and back.up and back.up_for < 0.2 and back.lease_time() == back.up_for


def test_a_beacon_outlives_its_last_mark_by_a_day_and_can_be_removed(client: redis.Redis) -> None:
    """A control plane silent for a day reads as no beacon (leases run out again); one that stopped marking on
    purpose removes it at once."""
    beacon.mark(client, gap=0.5)
    assert beacon.KEPT == 86400 and 86300 * 1000 < client.pttl(beacon.KEY) <= 86400 * 1000
    beacon.forget(client)
    assert beacon.read(client) is None


def test_a_marker_marks_only_while_its_process_can_serve_agents(client: redis.Redis) -> None:
    database_up = False

    def ready() -> None:
        if not database_up:
            raise ConnectionError("the database is down")

    marker = beacon.Marker(client, interval=0.1, ready=ready)
    assert marker.mark_once() is False and beacon.read(client) is None
    database_up = True
    marker.start()
    thread = marker._thread
    marker.start()  # one thread per process, however often it is asked
    try:
        time.sleep(0.5)
        seen = beacon.read(client)
        assert seen is not None and seen.up and seen.gap == pytest.approx(0.3) and seen.up_for >= 0.3
        assert marker._thread is thread and thread is not None and thread.is_alive()
        database_up = False  # marks stop: the control plane goes silent, and then counts as down
        time.sleep(0.6)
        silent = beacon.read(client)
        assert silent is not None and not silent.up
    finally:
        marker.stop()
