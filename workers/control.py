"""Direct control messages: the control plane asks an agent to cancel a job at once over Valkey pub/sub.

The broker is not trusted: a message here is only a hint. The agent answers it by sending a heartbeat at once,
and only the control plane's heartbeat reply (over HTTPS, authenticated) actually cancels a job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)

RECONNECT_DELAY = 2.0


class ControlListener(threading.Thread):
    """Listens on the agent's control channel and calls ``on_hint`` for each message."""

    def __init__(self, valkey_url: str, channel: str, on_hint: Callable[[], None]) -> None:
        super().__init__(name="agent-control", daemon=True)
        self.valkey_url, self.channel, self.on_hint = valkey_url, channel, on_hint
        self.stopping = threading.Event()
        self.subscribed = threading.Event()

    def run(self) -> None:
        """Subscribe, and subscribe again after a broker outage, until stopped."""
        while not self.stopping.is_set():
            try:
                self._listen()
            except redis.RedisError as exc:
                self.subscribed.clear()
                log.warning("control channel lost (%s); subscribing again in %.0fs", exc, RECONNECT_DELAY)
                self.stopping.wait(RECONNECT_DELAY)

    def _listen(self) -> None:
        client = redis.Redis.from_url(self.valkey_url, socket_connect_timeout=10, health_check_interval=25)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.channel)
            self.subscribed.set()
            while not self.stopping.is_set():
                if pubsub.get_message(timeout=1.0) is not None:
                    log.info("control message on %s: asking the control plane", self.channel)
                    self.on_hint()
        finally:
            pubsub.close()
            client.close()

    def stop(self) -> None:
        """Stop listening."""
        self.stopping.set()
