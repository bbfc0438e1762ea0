"""kombu's Redis transport, reusing one Redis client per channel for its synchronous commands.

kombu builds a new ``redis.Redis`` client for every publish, acknowledgement and event (redis-py fills a
table of some 170 response callbacks for each). A client is only a handle on the channel's connection pool
and safe to share between threads, so this channel keeps one per pool. Used through ``broker_transport`` for
``redis://`` and ``rediss://`` brokers (``dispatch.contract.celery_settings``).

It also lets ``kombu.Producer.batch`` write messages and their task-sent events in one pipeline
(``Publisher.publish`` and ``Publisher.publish_many``). kombu declines when the client retries on timeouts, as
ours does: a pipeline sent again after a timeout could deliver its messages twice. A job message delivered twice
is harmless here (its claim is fenced: one delivery runs; the other is refused as a replay or its claim is
refused), and a single publish retried after a timeout has the same chance of it.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    """A kombu Redis channel whose synchronous client is made once per connection pool."""

    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._shared_client
        if client is None or client.connection_pool is not self.pool:
            client = self._shared_client = super()._create_client()
        return client

    @property
    def supports_batch_publish(self) -> bool:
        """Always: see the module's docstring."""
        return True


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the channel above."""

    Channel = Channel
