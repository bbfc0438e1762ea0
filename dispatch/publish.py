"""Route and publish one job attempt: a signed envelope sent by task name to its agent's or project's queue."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery

from dispatch.contract import RUN_JOB_TASK, agent_queue, celery_priority, shared_queue, task_id
from dispatch.logs import job_fields
from dispatch.signing import Signer

log = logging.getLogger(__name__)


class PublishError(Exception):
    """Raised when the broker does not take a message; the job stays pending and the sweeper tries again."""


@dataclass(frozen=True)
class JobMessage:
    """What is needed to deliver one attempt of a job."""

    job_id: str
    attempt: int
    tenant: str
    project: str
    platform: str
    name: str
    workflow: str
    variables: dict[str, Any]
    priority: int = 5
    agent_id: str | None = None
    expires_at: float | None = None  # a deliver-by deadline, as a UNIX time

    @property
    def queue(self) -> str:
        """The queue this attempt goes to: the pinned agent's, or the project's for its platform."""
        if self.agent_id:
            return agent_queue(self.tenant, self.agent_id)
        return shared_queue(self.tenant, self.project, self.platform)


class Publisher:
    """Signs and publishes job attempts with the control plane's Celery app."""

    def __init__(self, celery: Celery, signer: Signer) -> None:
        self.celery = celery
        self.signer = signer

    def publish(self, message: JobMessage) -> str:
        """Publish one attempt; returns the queue it went to.

        The message and its task-sent event go in one round trip (one pipeline, as ``publish_many`` sends them).
        Should that fail, the message is sent once more on Celery's own path, which reconnects and retries; if the
        pipeline had reached the broker after all, the job is delivered twice, which its fenced claim makes
        harmless.

        Raises:
            PublishError: the broker could not be reached or refused the message.
        """
        try:
            self._send_batch([message])
        except Exception as exc:  # kombu raises several connection error types, and BatchPublishError
            log.warning(
                "publishing job %s attempt %d again: %s",
                message.job_id,
                message.attempt,
                exc,
                extra=job_fields(message.job_id, message.tenant),
            )
            try:
                self._send(message)
            except Exception as again:
                raise PublishError(
                    f"could not publish job {message.job_id} attempt {message.attempt}: {again}"
                ) from again
        self._published(message)
        return message.queue

    def publish_many(self, messages: Sequence[JobMessage]) -> None:
        """Publish attempts in one round trip to the broker: their messages and task-sent events go in one
        pipeline (``kombu.Producer.batch``), written when the last is added.

        Raises:
            PublishError: the broker could not be reached, or failed while it wrote them; whether any of them
                was delivered is then unknown (none is recorded as sent: the sweeper sends them again, and a job's
                claim is fenced, so a message delivered twice runs once).
        """
        if not messages:
            return
        try:
            self._send_batch(messages)
        except Exception as exc:  # kombu raises several connection error types, and BatchPublishError
            first = messages[0]
            raise PublishError(
                f"could not publish {len(messages)} jobs (job {first.job_id} attempt {first.attempt} first): {exc}"
            ) from exc
        for message in messages:
            self._published(message)

    def _send_batch(self, messages: Sequence[JobMessage]) -> None:
        with self.celery.producer_or_acquire() as producer, producer.batch():
            for message in messages:
                self._send(message, producer)

    def _send(self, message: JobMessage, producer: Any = None) -> None:
        queue = message.queue
        kwargs = self.signer.sign(
            audience=queue,
            tenant=message.tenant,
            project=message.project,
            job_id=message.job_id,
            attempt=message.attempt,
            name=message.name,
            workflow=message.workflow,
            variables=message.variables,
            expires_at=message.expires_at,
        )
        self.celery.send_task(
            RUN_JOB_TASK,
            kwargs=kwargs,
            queue=queue,
            task_id=task_id(message.job_id, message.attempt),
            priority=celery_priority(message.priority),
            kwargsrepr=f"{{job_id: {message.job_id!r}, attempt: {message.attempt}, name: {message.name!r}}}",
            producer=producer,
            declare=[],  # routed by the queue's name (the default exchange): no binding to declare on each publish
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5},
        )

    @staticmethod
    def _published(message: JobMessage) -> None:
        log.info(
            "published job %s attempt %d to %s",
            message.job_id,
            message.attempt,
            message.queue,
            extra=job_fields(message.job_id, message.tenant),
        )
