"""Route and publish one job attempt: a signed envelope sent by task name to its agent's or project's queue."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Celery

from dispatch.contract import RUN_JOB_TASK, agent_queue, celery_priority, shared_queue, task_id
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

        Raises:
            PublishError: the broker could not be reached or refused the message.
        """
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
        try:
            self.celery.send_task(
                RUN_JOB_TASK,
                kwargs=kwargs,
                queue=queue,
                task_id=task_id(message.job_id, message.attempt),
                priority=celery_priority(message.priority),
                kwargsrepr=f"{{job_id: {message.job_id!r}, attempt: {message.attempt}, name: {message.name!r}}}",
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5},
            )
        except Exception as exc:  # kombu raises several connection error types
            raise PublishError(f"could not publish job {message.job_id} attempt {message.attempt}: {exc}") from exc
        log.info(
            "published job %s attempt %d to %s",
            message.job_id,
            message.attempt,
            queue,
            extra={"job_id": message.job_id, "tenant_id": message.tenant},
        )
        return queue
