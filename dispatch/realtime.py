"""Live job events: numbered, kept and published on Valkey in one round trip, copied to Centrifugo in the background.

``Fanout.publish_events`` takes the events of one committed transaction. A Lua script gives each event its
per-job id (``INCR``), appends it to the job's capped history list and publishes it on the job's and the
tenant's pub/sub channels: one call per commit, whatever the number of events. When Centrifugo is configured,
the numbered events go to a bounded in-memory queue that a daemon thread (one per process, started after any
fork) publishes with ``cent``, retrying with backoff while Centrifugo is down. Nothing here ever fails the
caller: the database already committed.

Standard library, ``redis``, ``cent`` and ``prometheus_client`` (the last two imported when first used).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger(__name__)

NAMESPACE = "jobs"  # Centrifugo's namespace of deploy/centrifugo/config.json
DEFAULT_HISTORY_SIZE = 1000
DEFAULT_HISTORY_TTL = 86400
DEFAULT_QUEUE_SIZE = 10000
DEFAULT_RETRY_FOR = 300.0  # Centrifugo keeps idempotency keys for 5 minutes: retries within it are harmless
PUBLISH_TIMEOUT = 5.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
DRAIN_AT_EXIT = 2.0  # seconds a process waits at exit for its queued Centrifugo publishes
RETRYABLE_API_CODES = frozenset({100, 108})  # internal error, not available

# KEYS: (counter, history) per event. ARGV: cap, ttl, then (job channel, tenant channel, event without id).
_PUBLISH_LUA = """
local cap = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local ids = {}
for i = 1, #KEYS / 2 do
  local id = redis.call('INCR', KEYS[2 * i - 1])
  redis.call('EXPIRE', KEYS[2 * i - 1], ttl)
  local event = '{"id":' .. id .. ',' .. string.sub(ARGV[3 * i + 2], 2)
  redis.call('RPUSH', KEYS[2 * i], event)
  redis.call('LTRIM', KEYS[2 * i], -cap, -1)
  redis.call('EXPIRE', KEYS[2 * i], ttl)
  redis.call('PUBLISH', ARGV[3 * i], event)
  redis.call('PUBLISH', ARGV[3 * i + 1], event)
  ids[i] = id
end
return ids
"""


def job_channel(tenant_id: str, job_id: str) -> str:
    """The Valkey pub/sub channel of one job's live events."""
    return f"automation.events.{tenant_id}.{job_id}"


def tenant_channel(tenant_id: str) -> str:
    """The Valkey pub/sub channel of every live event of a tenant."""
    return f"automation.events.{tenant_id}"


def history_key(tenant_id: str, job_id: str) -> str:
    """The Valkey list of one job's latest live events, oldest first."""
    return f"automation.events.{tenant_id}.{job_id}.history"


def counter_key(tenant_id: str, job_id: str) -> str:
    """The Valkey counter that numbers one job's live events."""
    return f"automation.events.{tenant_id}.{job_id}.seq"


def centrifugo_tenant_channel(tenant_id: str) -> str:
    """Centrifugo's channel of every live event of a tenant: ``jobs:<tenant>``."""
    return f"{NAMESPACE}:{tenant_id}"


def centrifugo_project_channel(tenant_id: str, project_id: str) -> str:
    """Centrifugo's channel of every live event of one project: ``jobs:<tenant>.project.<project>``.

    It never names a job's channel: a job id (a UUID) has no dot.
    """
    return f"{NAMESPACE}:{tenant_id}.project.{project_id}"


def centrifugo_job_channel(tenant_id: str, job_id: str) -> str:
    """Centrifugo's channel of one job: ``jobs:<tenant>.<job_id>`` (tenant ids never contain a dot)."""
    return f"{NAMESPACE}:{tenant_id}.{job_id}"


def iso_utc(moment: datetime) -> str:
    """An aware time as ISO 8601 in UTC with ``Z``."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class LiveEvent:
    """One job state change, task start or task finish; its ``id`` is given when it is published."""

    job_id: str
    tenant_id: str
    project_id: str
    attempt: int
    state: str
    task: str | None
    status: str | None
    ts: str

    def body(self) -> str:
        """The event as compact JSON, without its id."""
        return json.dumps(
            {
                "job_id": self.job_id,
                "tenant_id": self.tenant_id,
                "project_id": self.project_id,
                "attempt": self.attempt,
                "state": self.state,
                "task": self.task,
                "status": self.status,
                "ts": self.ts,
            },
            separators=(",", ":"),
        )


@dataclass(frozen=True)
class Counters:
    """The fan-out's Prometheus counters (created on first use: nothing is imported or made at import time)."""

    published: Counter
    failures: Counter
    dropped: Counter


@functools.cache
def counters() -> Counters:
    """The counters, in no registry: the web process registers them with its own (``app.realtime``)."""
    from prometheus_client import Counter

    return Counters(
        published=Counter(
            "automation_realtime_published",
            "Live events published, by target (valkey: events; centrifugo: publications, one per channel)",
            ("target",),
            registry=None,
        ),
        failures=Counter(
            "automation_realtime_publish_failures",
            "Failed attempts to publish live events, by target (a retried publication counts each time)",
            ("target",),
            registry=None,
        ),
        dropped=Counter(
            "automation_realtime_dropped",
            "Live events (valkey) or publications (centrifugo) given up, by target and reason",
            ("target", "reason"),
            registry=None,
        ),
    )


@dataclass(frozen=True)
class Publication:
    """One Centrifugo publish waiting in the queue."""

    channel: str
    data: dict[str, Any]
    idempotency_key: str
    queued_at: float


class CentrifugoPublisher:
    """Publishes to Centrifugo from a daemon thread; ``submit`` never blocks and never raises."""

    def __init__(
        self,
        api_url: str,
        api_key: str,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        retry_for: float = DEFAULT_RETRY_FOR,
        timeout: float = PUBLISH_TIMEOUT,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.api_key = api_key
        self.queue_size = queue_size
        self.retry_for = retry_for
        self.timeout = timeout
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._queue: queue.Queue[Publication | None] = queue.Queue(queue_size)
        self._closed = threading.Event()

    def submit(self, events: Sequence[dict[str, Any]]) -> None:
        """Queue numbered events for their tenant's, project's and job's channels; count what a full queue refuses."""
        self._ensure_worker()
        metrics = counters()
        now = time.monotonic()
        for event in events:
            key = f"{event['job_id']}:{event['id']}"
            for channel in (
                centrifugo_tenant_channel(event["tenant_id"]),
                centrifugo_project_channel(event["tenant_id"], event["project_id"]),
                centrifugo_job_channel(event["tenant_id"], event["job_id"]),
            ):
                try:
                    self._queue.put_nowait(Publication(channel, event, key, now))
                except queue.Full:
                    metrics.dropped.labels("centrifugo", "queue_full").inc()

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the queue to empty; True if it did."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._queue.unfinished_tasks

    def close(self) -> None:
        """Stop this process's thread (what is still queued is not sent); ``submit`` starts a new one."""
        with self._lock:
            self._closed.set()
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
            self._pid = None
        atexit.unregister(self.drain)

    def _ensure_worker(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._lock:
            if self._pid == pid:
                return
            # A new process (gunicorn or Celery forked us): the parent's queue and thread are not ours.
            self._queue = queue.Queue(self.queue_size)
            self._closed = threading.Event()
            thread = threading.Thread(
                target=self._run, args=(self._queue, self._closed), name="centrifugo-publisher", daemon=True
            )
            thread.start()
            atexit.register(self.drain, DRAIN_AT_EXIT)
            self._pid = pid

    def _client(self) -> Any:
        from cent import Client

        return Client(self.api_url, self.api_key, timeout=self.timeout)

    def _run(self, work: queue.Queue[Publication | None], closed: threading.Event) -> None:
        client = self._client()
        backoff = 0.0
        while not closed.is_set():
            item = work.get()
            if item is None:
                break
            try:
                backoff = self._deliver(client, item, backoff, closed)
            except Exception:  # the thread must outlive any surprise
                log.exception("unexpected error publishing to Centrifugo channel %s", item.channel)
            finally:
                work.task_done()

    def _deliver(self, client: Any, item: Publication, backoff: float, closed: threading.Event) -> float:
        """Publish one item, retrying while it is young enough; return the backoff to carry on with."""
        from cent import PublishRequest

        metrics = counters()
        request = PublishRequest(channel=item.channel, data=item.data, idempotency_key=item.idempotency_key)
        while True:
            if time.monotonic() - item.queued_at > self.retry_for:
                metrics.dropped.labels("centrifugo", "retries_exhausted").inc()
                return backoff
            if backoff and closed.wait(backoff):
                return backoff
            try:
                client.publish(request)
            except Exception as exc:
                metrics.failures.labels("centrifugo").inc()
                if not _retryable(exc):
                    log.error("Centrifugo refused a publication to %s, dropped: %r", item.channel, exc)
                    metrics.dropped.labels("centrifugo", "refused").inc()
                    return 0.0
                backoff = min(BACKOFF_MAX, backoff * 2 if backoff else BACKOFF_FIRST)
                log.warning("Centrifugo publish to %s failed (%r); retrying in %.1fs", item.channel, exc, backoff)
                continue
            metrics.published.labels("centrifugo").inc()
            return 0.0


def _retryable(exc: Exception) -> bool:
    """Whether a failed publish may succeed later: Centrifugo unreachable, overloaded or failing."""
    from cent import CentApiResponseError, CentNetworkError, CentTransportError
    from cent.exceptions import CentTimeoutError

    if isinstance(exc, CentNetworkError | CentTimeoutError):
        return True
    if isinstance(exc, CentTransportError):
        return exc.status_code >= 500 or exc.status_code == 429
    if isinstance(exc, CentApiResponseError):
        return exc.code in RETRYABLE_API_CODES
    return False


def check_centrifugo(api_url: str, api_key: str, timeout: float) -> None:
    """Call Centrifugo's ``info`` method (checks reachability and the API key); raises when it fails."""
    from cent import Client, InfoRequest

    Client(api_url.rstrip("/"), api_key, timeout=timeout).info(InfoRequest())


class Fanout:
    """Publishes the events of committed transactions to Valkey (and through it, to Centrifugo)."""

    def __init__(
        self,
        valkey: redis.Redis,
        *,
        history_size: int = DEFAULT_HISTORY_SIZE,
        history_ttl: int = DEFAULT_HISTORY_TTL,
        centrifugo: CentrifugoPublisher | None = None,
    ) -> None:
        self.valkey = valkey
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.centrifugo = centrifugo
        self._script = valkey.register_script(_PUBLISH_LUA)

    def publish_events(self, events: Sequence[LiveEvent]) -> list[int]:
        """Number, keep and publish one transaction's events in order; return their ids ([] if Valkey failed)."""
        if not events:
            return []
        metrics = counters()
        keys: list[str] = []
        args: list[Any] = [self.history_size, self.history_ttl]
        for event in events:
            keys += [counter_key(event.tenant_id, event.job_id), history_key(event.tenant_id, event.job_id)]
            args += [job_channel(event.tenant_id, event.job_id), tenant_channel(event.tenant_id), event.body()]
        try:
            ids = [int(i) for i in self._script(keys=keys, args=args)]
        except (redis.RedisError, OSError) as exc:
            # The commit happened: a lost live event must not fail the request. Clients re-read the job.
            log.warning("could not publish %d live event(s) of job %s: %s", len(events), events[0].job_id, exc)
            metrics.failures.labels("valkey").inc()
            metrics.dropped.labels("valkey", "unavailable").inc(len(events))
            return []
        metrics.published.labels("valkey").inc(len(events))
        if self.centrifugo is not None:
            self.centrifugo.submit([{"id": n, **asdict(e)} for e, n in zip(events, ids, strict=True)])
        return ids
