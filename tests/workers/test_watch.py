"""The agent's reading of the control plane's beacon: one quick try, and a safe bound when Valkey cannot be read."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest
import redis

from dispatch import beacon
from tests.servers._util import free_port
from workers import watch as watching
from workers.watch import TIMEOUT, BeaconWatch


def test_a_watch_reads_the_beacon_from_valkey_and_gives_up_within_seconds_on_a_silent_network(
    valkey_server, beacon_valkey: redis.Redis
):
    """The heartbeat thread waits for the watch before it decides to stop a run: it must never wait long (redis-py's
    own retries would make a silent network last minutes)."""
    watch = BeaconWatch.of(valkey_server.url)
    assert watch.lease_time() is None and watch.reaper_waits(90) is False  # never marked
    beacon.mark(beacon_valkey, gap=15)
    up_for = watch.lease_time()
    assert up_for is not None and 0 <= up_for < 1 and watch.reaper_waits(90) is True  # just back
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        for url in (f"redis://127.0.0.1:{silent.getsockname()[1]}/0", f"redis://127.0.0.1:{free_port()}/0"):
            started = time.monotonic()
            with pytest.raises((redis.RedisError, OSError)):
                BeaconWatch.of(url).lease_time()
            assert time.monotonic() - started < 3 * TIMEOUT, url  # a try and one retry


class Readings:
    """A beacon that reads as given, then fails."""

    def __init__(self, *seen: beacon.Beacon | None) -> None:
        self.seen = list(seen)

    def __call__(self) -> beacon.Beacon | None:
        if not self.seen:
            raise redis.ConnectionError("Valkey is out of reach")
        return self.seen.pop(0)


def test_when_valkey_cannot_be_read_the_last_reading_bounds_the_answer(monkeypatch: pytest.MonkeyPatch):
    """A reading that fails (a stale connection, Valkey restarting) must not make every run stop in an outage: the
    control plane cannot have been up for longer than it last was, plus the time since."""
    clock = [1000.0]
    monkeypatch.setattr(watching, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    down = beacon.Beacon(silent_for=60, up_for=3600, gap=15)
    watch = BeaconWatch(Readings(down))
    assert watch.lease_time() == 0.0 and watch.reaper_waits(90) is True
    clock[0] += 40
    assert watch.lease_time() == 40.0  # at most back for 40 s: a run 60 s overdue goes on until a lease of uptime
    assert watch.reaper_waits(90) is True  # and the reaper cannot reap before 90 + 15 s
    clock[0] += 70
    assert watch.lease_time() == 110.0 and watch.reaper_waits(90) is False
    up = beacon.Beacon(silent_for=1, up_for=30, gap=15)
    watch = BeaconWatch(Readings(up))
    assert watch.lease_time() == 30.0
    clock[0] += 5
    assert watch.lease_time() == 35.0 and watch.reaper_waits(90) is True
    never = BeaconWatch(Readings())
    with pytest.raises(redis.ConnectionError):
        never.lease_time()  # the heartbeat then stops runs after a lease, as without a beacon
    assert never.reaper_waits(90) is False  # and a final state is given up after REPORT_DEADLINE
