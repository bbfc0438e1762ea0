"""The agent's Celery app, built from its settings in the entry point: no Flask, no database."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, Task, signals
from celery.exceptions import Reject
from celery.worker import state as worker_state

from dispatch.contract import (
    RUN_JOB_TASK,
    agent_queue,
    celery_settings,
    control_channel,
    deliveries_key,
    event_exchange,
    isolated_transport_options,
    shared_queue,
)
from workers.client import ControlPlane
from workers.control import ControlListener
from workers.envelope import EnvelopeRefused, Verifier
from workers.heartbeat import Heartbeat
from workers.jobs import Inflight, JobRunner, NotAccepted, Stopping, report_refusal
from workers.outbox import Outbox
from workers.settings import AgentSettings
from workers.watch import BeaconWatch

DELIVERIES_TTL = 7 * 86400
EX_NOT_ACCEPTED = 3  # the agent's exit status when the control plane refuses its claims (token, registration)

log = logging.getLogger(__name__)


@dataclass
class Agent:
    """One agent process: its settings, Celery app, control-plane client, heartbeat and final reports' outbox."""

    settings: AgentSettings
    celery: Celery
    client: ControlPlane
    inflight: Inflight
    heartbeat: Heartbeat
    control: ControlListener
    outbox: Outbox
    refused: list[str]  # why the control plane refused this agent's claims, once it has: the agent then stops

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
    celery.conf.update(celery_settings(settings.valkey_url, settings.visibility_timeout, settings.restore_interval))
    celery.conf.update(
        task_default_queue=agent_queue(settings.tenant_id, settings.agent_id),
        task_send_sent_event=False,
        worker_concurrency=settings.concurrency,
        worker_consumer="workers.consumer:Consumer",  # task events go to the broker a few at a time
    )
    scope = "automation"  # where the poison counters live
    if settings.isolated:  # everything it touches can be confined by a Valkey ACL (dispatch.contract.agent_acl)
        scope = agent_queue(settings.tenant_id, settings.agent_id)
        options = {**celery.conf.broker_transport_options}
        options.update(isolated_transport_options(settings.tenant_id, settings.agent_id))
        celery.conf.update(
            broker_transport_options=options,
            event_exchange=event_exchange(settings.tenant_id),
            worker_enable_remote_control=False,  # no broker-wide pidbox: cancels come on its own control channel
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
    watch = BeaconWatch.of(settings.valkey_url)
    runner = JobRunner(client, inflight, settings.concurrency, lambda: watch.reaper_waits(inflight.lease))
    refusals: list[str] = []

    valkey = redis.Redis.from_url(settings.valkey_url, socket_timeout=10, socket_connect_timeout=10)

    @celery.task(name=RUN_JOB_TASK, bind=True)
    def run_job(self: Task, *args: Any, **kwargs: Any) -> str:
        """Verify a job message before anything runs, then claim and run it."""
        task_id = str(self.request.id)
        # A first delivery costs the broker nothing: only one the broker gave back (its worker died, or never
        # acknowledged it within the visibility timeout) carries ``redelivered`` and is counted.
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        deliveries = _count_delivery(valkey, task_id, scope) if redelivered else 1
        try:
            if args:
                raise EnvelopeRefused("malformed", "job messages carry keyword arguments only")
            if deliveries > settings.poison_limit:
                # the job it names is dead-lettered: proved genuine first (a forged one is refused for that), as
                # its task id, which anyone with broker access may write, would name any job
                genuine = verifier.verify(kwargs, take=False)
                raise EnvelopeRefused(
                    "poison",
                    f"this message was delivered {deliveries} times and never finished (it crashes agents)",
                    {"job_id": genuine.job_id, "attempt": genuine.attempt},
                )
            envelope = verifier.verify(kwargs)
        except EnvelopeRefused as refusal:
            log.warning("refused message %s: %s (%s)", task_id, refusal, refusal.reason)
            report_refusal(client, settings.agent_id, refusal, task_id)
            if redelivered:
                _forget_delivery(valkey, task_id, scope)
            return f"refused: {refusal.reason}"
        try:
            return runner.run(envelope)
        except NotAccepted as refused:  # no claim of ours can succeed: another agent takes the message
            log.error("%s: the message goes back to the queue and the agent stops", refused)
            verifier.forget(envelope.nonce)
            runner.stopping.set()
            refusals.append(str(refused))
            worker_state.should_stop = EX_NOT_ACCEPTED  # a warm shutdown, as on SIGTERM
            raise Reject(str(refused), requeue=True) from None
        except Stopping as stopping:  # another agent, or this one once restarted, takes the message
            verifier.forget(envelope.nonce)
            raise Reject(str(stopping), requeue=True) from None
        finally:
            if redelivered:
                _forget_delivery(valkey, task_id, scope)

    def on_unknown(sender: Any = None, name: str = "", id: str = "", **extra: Any) -> None:
        refusal = EnvelopeRefused("unknown_task", f"a message for the unknown task {name!r} was dropped")
        report_refusal(client, settings.agent_id, refusal, id or None)

    def on_rejected(sender: Any = None, message: Any = None, exc: Any = None, **extra: Any) -> None:
        task = getattr(message, "headers", {}).get("id") if message is not None else None
        refusal = EnvelopeRefused("undecodable", f"a message that cannot be decoded was dropped: {exc}")
        report_refusal(client, settings.agent_id, refusal, task)

    def on_shutting_down(**extra: Any) -> None:
        runner.stopping.set()

    signals.worker_shutting_down.connect(on_shutting_down, weak=False)
    signals.task_unknown.connect(on_unknown, weak=False)
    signals.task_rejected.connect(on_rejected, weak=False)
    heartbeat = Heartbeat(client, settings, inflight, watch.lease_time)
    control = ControlListener(
        settings.valkey_url, control_channel(settings.tenant_id, settings.agent_id), heartbeat.beat_now
    )
    return Agent(settings, celery, client, inflight, heartbeat, control, runner.outbox, refusals)


def _count_delivery(valkey: redis.Redis, task_id: str, scope: str) -> int:
    """Count one more delivery of a redelivered message that has not finished (the first one counts too);
    2 when the broker cannot be asked."""
    try:
        pipe = valkey.pipeline()
        pipe.incr(deliveries_key(task_id, scope))
        pipe.expire(deliveries_key(task_id, scope), DELIVERIES_TTL)
        return 1 + int(pipe.execute()[0])
    except redis.RedisError:
        log.warning("could not count the deliveries of %s", task_id)
        return 2


def _forget_delivery(valkey: redis.Redis, task_id: str, scope: str) -> None:
    try:
        valkey.delete(deliveries_key(task_id, scope))
    except redis.RedisError:
        log.warning("could not clear the delivery count of %s", task_id)
