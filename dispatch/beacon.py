"""The control plane's beacon in Valkey: whether it can serve agents now, and for how long it has.

A lease is only fair while its agent can renew it, and an agent can renew it only while the control plane (the web
and its database) answers. Each web process that can reach its database marks the beacon every ``interval``
seconds; the first mark after a silence longer than ``gap`` (three intervals) starts the control plane's uptime
again. The reaper ends a run for its expired lease only while the beacon says the control plane is up, and has
been for a whole lease and the gap; an agent stops a run it could not renew after a lease of uptime, so before the
reaper runs the job again (``workers.watch``). An outage of the web or of
its database thus pauses every lease, instead of ending every running job once it is over, and a run that was cut
off alone (its agent's network) is still ended on both sides after a lease.

Times are Valkey's (``TIME``), so the web, the reaper and the agents need no common clock. The beacon is one string
key: ``"<last mark ms> <up since ms> <gap ms>"``, which expires a day after the last mark (``KEPT``): a control plane
silent that long is read as no beacon, and leases run out as they did without one. A web process whose
``BEACON_INTERVAL`` is 0 removes it (``forget``), so that a beacon nothing marks any more is not read as an outage.
Standard library and ``redis`` only: agents read it too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from dispatch.contract import BEACON_KEY

log = logging.getLogger(__name__)

KEY = BEACON_KEY
GAP_INTERVALS = 3  # marks missed in a row before the control plane counts as down
KEPT = 86400  # seconds the beacon outlives its last mark: leases pause for at most that long

# ARGV: the gap, then how long the key is kept, in ms. The uptime goes on while marks come less than a gap apart;
# else it starts again now.
_MARK_LUA = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local gap = tonumber(ARGV[1])
local since = ms
local old = redis.call('GET', KEYS[1])
if old then
  local last, up = string.match(old, '^(%d+) (%d+)')
  if last and ms - tonumber(last) <= gap then since = tonumber(up) end
end
redis.call('SET', KEYS[1], ms .. ' ' .. since .. ' ' .. gap, 'PX', ARGV[2])
return ms - since
"""


@dataclass(frozen=True)
class Beacon:
    """What the beacon said when it was read, in seconds by Valkey's clock."""

    silent_for: float  # since the last mark
    up_for: float  # since the first mark after the last silence
    gap: float  # a silence longer than this is an outage

    @property
    def up(self) -> bool:
        """Whether the control plane marks the beacon: it can serve agents now."""
        return self.silent_for <= self.gap

    def lease_time(self) -> float:
        """How long agents have been able to renew their leases: 0 while the control plane is down."""
        return self.up_for if self.up else 0.0


def gap_of(interval: float) -> float:
    """The silence, in seconds, after which a control plane that marks every ``interval`` seconds counts as down."""
    return GAP_INTERVALS * interval


def mark(client: redis.Redis, gap: float) -> None:
    """Mark the beacon now: this process can serve agents."""
    client.eval(_MARK_LUA, 1, KEY, int(gap * 1000), KEPT * 1000)


def forget(client: redis.Redis) -> None:
    """Remove the beacon: no control plane marks it any more."""
    client.delete(KEY)


def read(client: redis.Redis) -> Beacon | None:
    """The beacon as of now; None when no control plane ever marked it (or it is malformed).

    Raises:
        redis.RedisError, OSError: Valkey could not be read.
    """
    pipeline = client.pipeline(transaction=False)
    pipeline.get(KEY)
    pipeline.time()
    value, (seconds, micros) = pipeline.execute()
    try:
        last, since, gap = (int(part) for part in value.split())
    except (AttributeError, ValueError):  # None: never marked
        return None
    now = seconds * 1000 + micros // 1000
    return Beacon(silent_for=max(0, now - last) / 1000, up_for=max(0, now - since) / 1000, gap=gap / 1000)


class Marker:
    """Marks the beacon every ``interval`` seconds from a daemon thread, while ``ready`` says this process can serve
    agents (it reaches its database); one per process, started by ``start`` (again in a forked child)."""

    def __init__(self, client: redis.Redis, interval: float, ready: Callable[[], Any]) -> None:
        self.client = client
        self.interval = interval
        self.ready = ready
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._failing = False

    def start(self) -> None:
        """Start marking (no-op when this process already does: cheap enough to call before every request)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="beacon", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop marking (the control plane goes silent, as if this process had stopped)."""
        self._stop.set()

    def mark_once(self) -> bool:
        """Mark once if this process can serve agents; whether it did."""
        try:
            self.ready()
            mark(self.client, gap_of(self.interval))
        except Exception as exc:  # the database or Valkey is out of reach: no mark, which is the point
            if not self._failing:
                log.warning("the control plane's beacon is not marked: %s", (str(exc).splitlines() or [repr(exc)])[0])
            self._failing = True
            return False
        if self._failing:
            log.info("the control plane's beacon is marked again")
        self._failing = False
        return True

    def _run(self) -> None:
        stop = self._stop
        while True:
            self.mark_once()
            if stop.wait(self.interval):
                return
