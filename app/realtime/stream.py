"""A job's live events as Server-Sent Events: subscribe first, replay the kept history, then follow live.

Subscribing before reading the history means no event falls between the two; ids already sent are skipped.
The stream ends after an event whose state is final, when the job is found final without one (its history
expired, or Valkey lost its event: one event is made from the job row), or after ``lifetime`` seconds (the
client resumes with ``Last-Event-ID``), so no web thread is held for ever.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis

from app.jobs.states import FINAL_STATES
from app.realtime.service import JobSnapshot
from dispatch.realtime import Fanout, history_key, iso_utc, job_channel

log = logging.getLogger(__name__)

KEEP_ALIVE = ": keep-alive\n\n"
SUBSCRIBE_TIMEOUT = 5.0


def frame(event_id: int, data: str) -> str:
    """One SSE ``job`` event."""
    return f"id: {event_id}\nevent: job\ndata: {data}\n\n"


def _final(state: Any) -> bool:
    return state in FINAL_STATES


class JobStream:
    """The event stream of one job for one client; ``open`` before the response starts, then iterate ``frames``."""

    def __init__(
        self,
        fanout: Fanout,
        job: JobSnapshot,
        *,
        after: int,
        keepalive: float,
        lifetime: float,
        reread: Callable[[str], JobSnapshot | None],
    ) -> None:
        self.fanout = fanout
        self.job = job
        self.sent = after
        self.keepalive = keepalive
        self.lifetime = lifetime
        self.reread = reread
        self._pubsub: Any = None
        self._history: list[bytes | str] = []

    def open(self) -> None:
        """Subscribe to the job's channel (confirmed), then read its history; raises redis errors."""
        pubsub = self.fanout.valkey.pubsub()
        try:
            pubsub.subscribe(job_channel(self.job.tenant_id, self.job.job_id))
            reply = pubsub.get_message(timeout=SUBSCRIBE_TIMEOUT)
            if not reply or reply["type"] != "subscribe":
                raise redis.ConnectionError("Valkey did not confirm the subscription")
            self._history = self.fanout.valkey.lrange(history_key(self.job.tenant_id, self.job.job_id), 0, -1)
        except BaseException:
            pubsub.close()
            raise
        self._pubsub = pubsub

    def frames(self) -> Iterator[str]:
        """The stream's text: replay, then live events and keep-alives until the job ends or time is up."""
        try:
            yield KEEP_ALIVE  # the response starts now, whether or not an event is due
            ended = False
            for raw in self._history:
                text, event = self._decode(raw)
                if event["id"] > self.sent:
                    yield self._send(text, event)
                ended = _final(event["state"])  # the last kept event tells whether the job has ended
            if ended:
                return
            if _final(self.job.state):
                yield self._made_up(self.job)
                return
            yield from self._follow()
        except (redis.RedisError, OSError) as exc:
            log.warning("the event stream of job %s stopped: %s", self.job.job_id, exc)
        finally:
            self.close()

    def close(self) -> None:
        """Unsubscribe and give the connection back (also when the client left before the first frame)."""
        if self._pubsub is not None:
            self._pubsub.close()
            self._pubsub = None

    def _follow(self) -> Iterator[str]:
        started = last_write = time.monotonic()
        while (left := started + self.lifetime - time.monotonic()) > 0:
            message = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=min(left, self.keepalive))
            if message is not None and message["type"] == "message":
                text, event = self._decode(message["data"])
                if event["id"] <= self.sent:
                    continue  # already replayed
                yield self._send(text, event)
                last_write = time.monotonic()
                if _final(event["state"]):
                    return
            elif time.monotonic() - last_write >= self.keepalive:
                yield KEEP_ALIVE
                last_write = time.monotonic()
                job = self.reread(self.job.job_id)  # a quiet job: did it end with its event lost?
                if job is None:
                    return
                if _final(job.state):
                    yield self._made_up(job)
                    return

    @staticmethod
    def _decode(raw: bytes | str) -> tuple[str, dict[str, Any]]:
        text = raw.decode() if isinstance(raw, bytes) else raw
        return text, json.loads(text)

    def _send(self, text: str, event: dict[str, Any]) -> str:
        self.sent = int(event["id"])
        return frame(self.sent, text)

    def _made_up(self, job: JobSnapshot) -> str:
        """The final event made from the job row, numbered after everything the client has."""
        event = {
            "id": self.sent + 1,
            "job_id": job.job_id,
            "tenant_id": job.tenant_id,
            "project_id": job.project_id,
            "attempt": job.attempt,
            "state": job.state,
            "task": None,
            "status": None,
            "ts": iso_utc(job.changed_at),
        }
        return self._send(json.dumps(event, separators=(",", ":")), event)
