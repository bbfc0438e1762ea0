"""The agent's Celery app, built from its settings in the entry point: no Flask, no database."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task

from dispatch.contract import RUN_JOB_TASK, agent_queue, celery_settings, shared_queue
from workers.client import ControlPlane
from workers.envelope import EnvelopeRefused, Verifier
from workers.heartbeat import Heartbeat
from workers.jobs import Inflight, JobRunner, report_refusal
from workers.settings import AgentSettings

log = logging.getLogger(__name__)


@dataclass
class Agent:
    """One agent process: its settings, Celery app, control-plane client and heartbeat."""

    settings: AgentSettings
    celery: Celery
    client: ControlPlane
    inflight: Inflight
    heartbeat: Heartbeat

    @property
    def queues(self) -> list[str]:
        """The queues this agent consumes: its own, then its project's for its platform."""
        s = self.settings
        return [agent_queue(s.tenant_id, s.agent_id), shared_queue(s.tenant_id, s.project_id, s.platform)]

    def worker_argv(self) -> list[str]:
        """The ``celery worker`` arguments of this agent."""
        s = self.settings
        return [
            "worker",
            "-Q",
            ",".join(self.queues),
            "-n",
            f"{s.agent_id}@{s.tenant_id}",
            "-P",
            "threads",
            "-c",
            str(s.concurrency),
            "-l",
            s.log_level,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]


def make_agent(settings: AgentSettings) -> Agent:
    """Build the agent: a Celery app whose one task verifies, claims and runs job envelopes."""
    celery = Celery(f"agent-{settings.agent_id}")
    celery.conf.update(celery_settings(settings.valkey_url, settings.visibility_timeout))
    celery.conf.update(
        task_default_queue=agent_queue(settings.tenant_id, settings.agent_id),
        task_send_sent_event=False,
        worker_concurrency=settings.concurrency,
    )
    verifier = Verifier(
        settings.verify_key,
        tenant=settings.tenant_id,
        project=settings.project_id,
        agent_id=settings.agent_id,
        platform=settings.platform,
    )
    client = ControlPlane(settings)
    inflight = Inflight()
    runner = JobRunner(client, inflight)

    @celery.task(name=RUN_JOB_TASK, bind=True)
    def run_job(self: Task, *args: Any, **kwargs: Any) -> str:
        """Verify a job message before anything runs, then claim and run it."""
        task_id = self.request.id
        try:
            if args:
                raise EnvelopeRefused("malformed", "job messages carry keyword arguments only")
            envelope = verifier.verify(kwargs)
        except EnvelopeRefused as refusal:
            log.warning("refused message %s: %s (%s)", task_id, refusal, refusal.reason)
            report_refusal(client, settings.agent_id, refusal, task_id)
            return f"refused: {refusal.reason}"
        return runner.run(envelope)

    return Agent(settings, celery, client, inflight, Heartbeat(client, settings, inflight))
