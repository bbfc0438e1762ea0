"""The control plane's beacon (``dispatch.beacon``) as the agent reads it: whether leases can run out now.

The heartbeat thread asks it before it stops a run it could not renew, and the outbox before it gives up a final
state it could not deliver; both must decide as the reaper does, and neither may wait long for Valkey. So a read is
one try (and one more on a fresh connection, for a connection that went stale while unused), within 1 s each; when
it fails, the last reading that succeeded still bounds the answer: the control plane cannot have been up for longer
than it then was, plus the time since.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dispatch import beacon

TIMEOUT = 1.0  # seconds a read of the beacon may take, per try


class BeaconWatch:
    """Reads the beacon for the agent's threads; ``read`` returns the beacon (None: no beacon) or raises."""

    def __init__(self, read: Callable[[], beacon.Beacon | None]) -> None:
        self.read = read
        self._lock = threading.Lock()
        self._last: tuple[float, beacon.Beacon] | None = None  # time.monotonic() of the last good reading, and it

    @classmethod
    def of(cls, valkey_url: str) -> BeaconWatch:
        """A watch reading Valkey at ``valkey_url`` with a client of its own (short timeouts, one retry)."""
        client = redis.Redis.from_url(
            valkey_url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, retry=Retry(NoBackoff(), 1)
        )
        return cls(functools.partial(beacon.read, client))

    def lease_time(self) -> float | None:
        """For how long agents have been able to renew their leases (0: the control plane is down; None: no beacon,
        and none read before). When Valkey cannot be read, at most what the last reading said plus the time since.

        Raises:
            redis.RedisError, OSError: the beacon could not be read, and never could.
        """
        seen, elapsed = self._reading()
        if seen is None:
            return None
        return seen.lease_time() + elapsed

    def reaper_waits(self, lease: float | None) -> bool:
        """Whether the reaper waits with expired leases now (the control plane is down, or back for less than a lease
        and the gap), as far as the beacon tells (False: no beacon, or it could never be read)."""
        try:
            seen, elapsed = self._reading()
        except (redis.RedisError, OSError):
            return False
        if seen is None:
            return False
        return seen.lease_time() + elapsed < (lease or 0) + seen.gap

    def _reading(self) -> tuple[beacon.Beacon | None, float]:
        """The beacon now (and 0), or the last good reading and the seconds since it when this one fails."""
        try:
            seen = self.read()
        except (redis.RedisError, OSError):
            with self._lock:
                last = self._last
            if last is None:
                raise
            return last[1], time.monotonic() - last[0]
        with self._lock:
            self._last = None if seen is None else (time.monotonic(), seen)
        return seen, 0.0
