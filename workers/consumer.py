"""The agent's Celery consumer: its task events go to the broker a few at a time, not one message each.

Flower shows a job's Celery task from the events its worker sends (``task-received``, ``task-started``,
``task-succeeded``…). Celery buffers them and sends what is buffered at the next turn of its event loop, which for
a worker that runs short jobs one after another is nearly one broker message per event: about three per job,
each a publish that costs the agent and the broker more than the event is worth. This consumer sends buffered
events at once when none went out for ``EVENT_INTERVAL``, and otherwise once that interval after the last
sending: a busy agent sends one ``task.multi`` message for all the events of that moment. Flower sees every
event, at most ``EVENT_INTERVAL`` later. Celery still sends at once when its buffer is full.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from celery.worker.consumer import Consumer as CeleryConsumer

log = logging.getLogger(__name__)

EVENT_INTERVAL = 0.1  # seconds between two sendings of a busy agent's task events


@dataclass
class Pacer:
    """When to send buffered events: at once, when none went out for ``interval``; else on a timer, one at a time,
    ``interval`` after the last sending."""

    interval: float
    sent_at: float = -math.inf
    timer_set: bool = False  # a timer set since the last sending will send the buffer

    def plan(self, now: float) -> float | None:
        """Events were buffered at ``now``: 0.0 to send them now (noted as sent), the delay of a timer to set, or
        None when a timer set earlier will send them."""
        wait = self.sent_at + self.interval - now
        if wait <= 0:
            self.sent(now)
            return 0.0
        if self.timer_set:
            return None
        self.timer_set = True
        return wait

    def sent(self, now: float) -> None:
        """Note that the buffer was sent at ``now`` (by a timer or at once)."""
        self.sent_at = now
        self.timer_set = False


class Consumer(CeleryConsumer):
    """Celery's consumer, sending buffered task events as ``Pacer`` plans (``worker_consumer`` of the agent)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.events_pacer = Pacer(EVENT_INTERVAL)
        super().__init__(*args, **kwargs)

    def _flush_events(self) -> None:
        """Celery's event loop calls this soon after each buffered event (in the loop's thread; Celery buffers task
        events only when it runs one)."""
        delay = self.events_pacer.plan(time.monotonic())
        if delay == 0.0:
            super()._flush_events()
        elif delay is not None:
            self.hub.call_later(delay, self._send_due_events)

    def _send_due_events(self) -> None:
        self.events_pacer.sent(time.monotonic())
        super()._flush_events()

    def shutdown(self) -> None:
        """Send the events still buffered, then shut down as Celery does."""
        try:
            super()._flush_events()
        except Exception as exc:  # the broker may be gone already; stopping matters more than these events
            log.warning("task events still buffered at shutdown were not sent: %s", exc)
        super().shutdown()
