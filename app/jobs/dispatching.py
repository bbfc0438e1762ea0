"""Deliver jobs: persist, commit, then publish each attempt; sweep what was never published; reap lost leases.

The database is the outbox. A job waiting to be sent is ``pending``; an attempt whose message has not been
confirmed sent has no ``published_at`` (a submission's is written a moment after its publish, by the process's
receipt writer in ``app/jobs/receipts.py``). The sweeper sends both after a grace period, so a crash between the
commit and the publish loses nothing; a message sent twice is harmless because the claim is fenced.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import current_app
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm.attributes import set_committed_value

from app.agents.models import Agent
from app.columns import utcnow
from app.errors import Conflict
from app.extensions import db
from app.jobs.models import Job, JobAttempt, JobEvent
from app.jobs.receipts import Receipts
from app.jobs.states import AttemptState, JobState, transition, transition_attempt
from dispatch import beacon
from dispatch.contract import control_channel
from dispatch.logs import job_fields
from dispatch.publish import JobMessage, Publisher, PublishError
from probe.durations import format_duration

log = logging.getLogger(__name__)

LEASE_EXPIRED = "attempt {number} lost: agent '{agent}' stopped renewing its lease"
LOST_EXHAUSTED = "{lost} attempts lost (the last on agent '{agent}', which stopped renewing its lease); giving up"
RETRYING = "attempt {number} {state}; run {failures} of {limit} failed, retrying in {delay:.0f}s"
EXPIRED = "not claimed before its deliver_by deadline ({deadline})"
UNCLAIMED = "not claimed before its message expired (sent {sent}, valid for ENVELOPE_TTL, {ttl} s)"
AGENT_GONE = "pinned to agent '{agent}', which is no longer registered"
AGENT_MOVED = (
    "pinned to agent '{agent}', which now serves project '{project}' on {platform}; "
    "the job needs project '{job_project}' on {job_platform}"
)
OVERRUN = (
    "attempt {number} timed out: agent '{agent}' had not reported its end by its deadline {deadline} (the claim, "
    "the workflow's timeout of {timeout}, and a lease more)"
)
CONTROL_PLANE_DOWN = (
    "no lease is reaped: the control plane has not marked its beacon for {silent:.0f} s, so agents cannot renew them"
)
CONTROL_PLANE_BACK = (
    "no lease is reaped yet: the control plane has been back for {up:.0f} s; leases are reaped once agents have had"
    " a whole lease ({lease} s) to renew them, and the beacon's gap ({gap:g} s) more"
)
BEACON_UNREADABLE = "no lease is reaped: the control plane's beacon could not be read ({error})"
NOT_CANCELLED = {"cancel_requested": False}  # the guard of a next attempt: a cancel committed meanwhile wins
BATCH = 100
RETRYABLE = frozenset({AttemptState.FAILED.value, AttemptState.TIMED_OUT.value})
_RECEIPTS_MADE = threading.Lock()


def _about(job: Job) -> dict[str, str]:
    """The ``extra`` of a log line about ``job``: logged by the dispatcher's tasks (no job of their own) or while a
    request names another job (a final report carried by the next job's claim)."""
    return job_fields(job.id, job.tenant_id)


def _publisher() -> Publisher | None:
    publisher = current_app.extensions.get("publisher")
    return publisher if isinstance(publisher, Publisher) else None


def _timestamp(moment: datetime | None) -> float | None:
    """A naive-UTC database time as a UNIX time."""
    return None if moment is None else moment.replace(tzinfo=UTC).timestamp()


def _message(job: Job, attempt: int) -> JobMessage:
    return JobMessage(
        job_id=job.id,
        attempt=attempt,
        tenant=job.tenant_id,
        project=job.project_id,
        platform=job.platform,
        name=job.name,
        workflow=job.workflow,
        variables=dict(job.variables or {}),
        priority=job.priority,
        agent_id=job.agent_id,
        expires_at=_timestamp(job.deliver_by),
    )


def _iso(moment: datetime) -> str:
    """A time for a message: 2026-12-07T13:08:15Z."""
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _receipts() -> Receipts:
    receipts = current_app.extensions.get("receipts")
    if not isinstance(receipts, Receipts):
        with _RECEIPTS_MADE:
            receipts = current_app.extensions.get("receipts")
            if not isinstance(receipts, Receipts):
                receipts = current_app.extensions["receipts"] = Receipts(db.engine)
    return receipts


def send(job: Job, attempt: JobAttempt, *, receipt: bool = False) -> bool:
    """Publish one committed attempt and record that it was sent; False when the broker did not take it.

    With ``receipt``, the record is left to the process's receipt writer (a moment later, many in one
    transaction) instead of a transaction of its own: the path of every submission.
    """
    publisher = _publisher()
    if publisher is None:
        return False
    try:
        publisher.publish(_message(job, attempt.number))
    except PublishError as exc:
        log.warning("%s; the sweeper will try again", exc, extra=_about(job))
        return False
    if receipt:
        _receipts().add(attempt.id)
        return True
    db.session.connection().execute(
        update(JobAttempt)
        .where(JobAttempt.id == attempt.id, JobAttempt.published_at.is_(None))
        .values(published_at=utcnow())
    )
    db.session.commit()
    return True


def _open_attempt(
    job: Job,
    *,
    actor: str,
    reason: str | None = None,
    not_before: datetime | None = None,
    guards: dict[str, Any] | None = None,
    **values: Any,
) -> JobAttempt:
    now = utcnow()
    number = job.attempt + 1
    transition(job, JobState.QUEUED, actor=actor, reason=reason, guards=guards, attempt=number, queued_at=now, **values)
    attempt = JobAttempt(job_id=job.id, tenant_id=job.tenant_id, number=number, queued_at=now, not_before=not_before)
    db.session.add(attempt)
    return attempt


def open_next_attempt(
    job: Job,
    *,
    actor: str,
    reason: str | None = None,
    not_before: datetime | None = None,
    guards: dict[str, Any] | None = None,
    **values: Any,
) -> JobAttempt:
    """Move a job to ``queued`` with a new attempt, committed, not yet published (not before ``not_before``);
    409 ``concurrent_update`` when the job changed since it was read, or no longer holds ``guards``."""
    attempt = _open_attempt(job, actor=actor, reason=reason, not_before=not_before, guards=guards, **values)
    db.session.commit()
    return attempt


def queue_new(job: Job, *, actor: str = "dispatcher") -> bool:
    """In a new job's own (uncommitted) transaction: queue it with its first attempt when it is due and can be sent.

    One commit then stores the job, its audit record, its move to ``queued`` and the attempt; ``deliver``
    publishes it after that commit (the sweeper does, should the process die in between).
    """
    if _publisher() is None or job.scheduled_at > utcnow():
        return False
    # Not flushed yet: the job is inserted already queued, with its state change and first attempt.
    set_committed_value(job, "attempts", [_open_attempt(job, actor=actor)])  # known: no query to load the list
    return True


def deliver(job: Job, *, actor: str = "dispatcher") -> bool:
    """Publish a committed new job: the attempt ``queue_new`` opened, or queue a pending one that is due."""
    if _unsent(job):
        return send(job, job.attempts[-1], receipt=True)
    db.session.add(job)  # detached as commit_new leaves it: in the session, the job queued below is this one
    return dispatch_job(job_id=job.id, actor=actor)


def deliver_all(jobs: Sequence[Job], *, actor: str = "dispatcher") -> None:
    """Publish a batch of committed new jobs: the attempts ``queue_new`` opened in one round trip to the broker, the
    others (not due yet) as ``deliver`` would. If the broker fails, what was not sent is left to the sweeper."""
    publisher = _publisher()
    fresh: list[Job] = []
    rest: list[Job] = []
    for job in jobs:
        (fresh if publisher is not None and _unsent(job) else rest).append(job)
    if publisher is not None and fresh:
        try:
            publisher.publish_many([_message(job, job.attempts[-1].number) for job in fresh])
        except PublishError as exc:
            log.warning("%s; the sweeper will try again", exc)
            return  # no point in waiting for the broker once more per job
        receipts = _receipts()
        for job in fresh:
            receipts.add(job.attempts[-1].id)
    for job in rest:
        if not deliver(job, actor=actor) and job.state == JobState.QUEUED.value:
            break  # the broker failed (after its retries)


def _unsent(job: Job) -> bool:
    """A queued job whose current attempt was not published yet."""
    return job.state == JobState.QUEUED.value and bool(job.attempts) and job.attempts[-1].published_at is None


def retry_delay(base: float, failures: int, cap: float) -> float:
    """Seconds before the next run after ``failures`` failed runs: base doubling each time, capped, ±20% jitter."""
    if base <= 0:
        return 0.0
    return min(cap, base * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)


def retry_failed(job: Job, attempt: JobAttempt, *, now: datetime) -> JobAttempt | None:
    """Queue the next run of a job whose attempt failed or timed out, if its ``max_attempts`` allow; else None.

    The next attempt is committed with a ``not_before`` time; the sweeper publishes it when that time comes
    (never a long Celery countdown, which would sit unacknowledged in a worker's memory). A cancel requested
    since the job was read refuses it (409 ``concurrent_update``): read again, the job is not retried.
    """
    if attempt.state not in RETRYABLE or job.cancel_requested:
        return None
    failures = _counted(job, JobAttempt.state.in_(list(RETRYABLE)))
    if failures >= job.max_attempts:
        return None
    config = current_app.config
    delay = retry_delay(job.retry_backoff, failures, config["RETRY_BACKOFF_MAX"])
    reason = RETRYING.format(
        number=attempt.number, state=attempt.state, failures=failures, limit=job.max_attempts, delay=delay
    )
    log.info("job %s: %s", job.id, reason, extra=_about(job))
    not_before = now + timedelta(seconds=delay) if delay else None
    following = open_next_attempt(job, actor="retry", reason=reason, not_before=not_before, guards=NOT_CANCELLED)
    if not delay:
        send(job, following)
    return following


def _counted(job: Job, condition: Any) -> int:
    """How many of the job's attempts meet ``condition``, counted from its last requeue: an operator who requeues a
    dead letter gives it its whole ``max_attempts`` and ``MAX_LOST_ATTEMPTS`` again (the attempts before stay in
    its history)."""
    requeued = db.session.scalar(
        select(func.max(JobEvent.attempt)).where(
            JobEvent.job_id == job.id,
            JobEvent.from_state == JobState.DEAD_LETTER.value,
            JobEvent.to_state == JobState.QUEUED.value,
        )
    )
    return (
        db.session.scalar(
            select(func.count())
            .select_from(JobAttempt)
            .where(JobAttempt.job_id == job.id, JobAttempt.number >= (requeued or 1), condition)
        )
        or 0
    )


def dead_letter(
    job: Job,
    *,
    reason: str,
    message: str,
    actor: str,
    now: datetime | None = None,
    guards: dict[str, Any] | None = None,
) -> None:
    """Move a job that cannot be delivered to ``dead_letter`` with a reason code and message (committed); 409 when
    the job changed since it was read, or no longer holds ``guards``."""
    now = now or utcnow()
    current = db.session.scalar(select(JobAttempt).where(JobAttempt.job_id == job.id, JobAttempt.number == job.attempt))
    if current is not None and current.state == AttemptState.QUEUED.value:
        transition_attempt(current, AttemptState.DEAD_LETTER, finished_at=now, error=message)
    transition(
        job,
        JobState.DEAD_LETTER,
        actor=actor,
        reason=message,
        finished_at=now,
        error=message,
        dead_letter_reason=reason,
        guards=guards,
    )
    db.session.commit()
    log.warning("job %s dead-lettered (%s): %s", job.id, reason, message, extra=_about(job))


def tell_agent_to_cancel(job: Job) -> bool:
    """Send a running job's agent a direct cancel message over Valkey pub/sub; False when none could be sent."""
    valkey = current_app.extensions.get("valkey")
    attempt = db.session.scalar(select(JobAttempt).where(JobAttempt.job_id == job.id, JobAttempt.number == job.attempt))
    if valkey is None or attempt is None or attempt.agent_id is None:
        return False
    message = json.dumps({"cancel": job.id, "attempt": attempt.number})
    try:
        valkey.publish(control_channel(job.tenant_id, attempt.agent_id), message)
    except Exception as exc:  # redis raises several connection errors; the heartbeat carries the cancel too
        log.warning(
            "could not send the cancel of job %s to agent %s: %s", job.id, attempt.agent_id, exc, extra=_about(job)
        )
        return False
    return True


def dispatch_job(*, job_id: str, actor: str = "dispatcher") -> bool:
    """Queue and publish a pending job that is due; False when it is not due, not pending, or not sent."""
    if _publisher() is None:
        return False
    job = db.session.get(Job, job_id)
    if job is None or job.state != JobState.PENDING.value or job.scheduled_at > utcnow():
        return False
    try:
        attempt = open_next_attempt(job, actor=actor)
    except Conflict:
        db.session.rollback()  # another process queued it first
        return False
    return send(job, attempt)


def sweep(*, now: datetime | None = None) -> int:
    """Dead-letter expired jobs and those pinned to an agent gone; send due pending jobs, queued attempts left
    unpublished past the grace, and retries whose backoff is over."""
    now = now or utcnow()
    expire(now=now)
    strand(now=now)
    if _publisher() is None:
        return 0
    before = now - timedelta(seconds=current_app.config["SWEEP_GRACE"])
    sent = 0
    due = db.session.scalars(
        select(Job.id)
        .where(Job.state == JobState.PENDING.value, Job.scheduled_at <= now, Job.updated_at <= before)
        .order_by(Job.priority.desc(), Job.scheduled_at)
        .limit(BATCH)
    ).all()
    for job_id in due:
        sent += dispatch_job(job_id=job_id, actor="sweeper")
    stranded = db.session.execute(
        select(Job, JobAttempt)
        .join(JobAttempt, JobAttempt.job_id == Job.id)
        .where(
            JobAttempt.state == AttemptState.QUEUED.value,
            JobAttempt.published_at.is_(None),
            # a retry waits for its backoff (sent by nobody else, it needs no grace); any other, for the grace
            or_(
                and_(JobAttempt.not_before.is_(None), JobAttempt.queued_at <= before),
                JobAttempt.not_before <= now,
            ),
            Job.attempt == JobAttempt.number,
            Job.state == JobState.QUEUED.value,
        )
        .limit(BATCH)
    ).all()
    for job, attempt in stranded:
        log.info("job %s attempt %d was never published; sending it now", job.id, attempt.number, extra=_about(job))
        sent += send(job, attempt)
    return sent


def expire(*, now: datetime) -> int:
    """Dead-letter every pending or queued job whose ``deliver_by`` passed before an agent claimed it, and every
    queued job without one whose message was sent and expired unclaimed (lost with the broker's data, dropped by an
    agent that waited for its project's capacity as long as it was valid): no agent may run it any more."""
    late = db.session.scalars(
        select(Job)
        .where(
            Job.state.in_([JobState.PENDING.value, JobState.QUEUED.value]),
            Job.deliver_by.is_not(None),
            Job.deliver_by < now,
        )
        .limit(BATCH)
    ).all()
    expired = [(job, EXPIRED.format(deadline=_iso(job.deliver_by))) for job in late if job.deliver_by]
    return _dead_letter_each(expired, reason="expired", actor="sweeper", now=now) + _expire_unclaimed(now)


def _expire_unclaimed(now: datetime) -> int:
    ttl = current_app.config["ENVELOPE_TTL"]
    sent_before = now - timedelta(seconds=ttl + current_app.config["SWEEP_GRACE"])  # the receipt follows the send
    unclaimed = db.session.execute(
        select(Job, JobAttempt.published_at)
        .join(JobAttempt, and_(JobAttempt.job_id == Job.id, JobAttempt.number == Job.attempt))
        .where(
            JobAttempt.state == AttemptState.QUEUED.value,
            JobAttempt.published_at < sent_before,
            Job.state == JobState.QUEUED.value,
            Job.deliver_by.is_(None),  # with one, the envelope is valid until then
        )
        .limit(BATCH)
    ).all()
    expired = [(job, UNCLAIMED.format(sent=_iso(sent), ttl=ttl)) for job, sent in unclaimed if sent]
    return _dead_letter_each(expired, reason="expired", actor="sweeper", now=now)


def strand(*, now: datetime, actor: str = "sweeper", tenant_id: str | None = None, agent_id: str | None = None) -> int:
    """Dead-letter (``no_agent``) every queued or pending job that is due, pinned to an agent that is no
    longer registered or now serves another project or platform: no agent could ever claim it. Only those of one
    agent when named, at most ``BATCH`` (the sweeper takes the rest). A job scheduled later is left alone until it
    is due: it may be pinned to another agent meanwhile. Returns how many were dead-lettered."""
    query = (
        select(Job, Agent.project_id, Agent.platform)
        .outerjoin(Agent, and_(Agent.tenant_id == Job.tenant_id, Agent.id == Job.agent_id))
        .where(
            Job.state.in_([JobState.QUEUED.value, JobState.PENDING.value]),
            Job.scheduled_at <= now,  # a queued job changed to run later is left alone until then, too
            Job.agent_id.is_not(None),
            or_(Agent.id.is_(None), Agent.project_id != Job.project_id, Agent.platform != Job.platform),
        )
    )
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id, Job.agent_id == agent_id)
    found = db.session.execute(query.limit(BATCH)).all()
    stranded = [(job, _no_agent(job, project, platform)) for job, project, platform in found]
    return _dead_letter_each(stranded, reason="no_agent", actor=actor, now=now)


def _dead_letter_each(jobs: list[tuple[Job, str]], *, reason: str, actor: str, now: datetime) -> int:
    """Dead-letter each (job, message) a batch query read, fenced by the revision and attempt it read them with (a
    rollback of one reloads the others: a job claimed or changed meanwhile is left alone); how many were."""
    fenced = [(job, {"revision": job.revision, "attempt": job.attempt}, message) for job, message in jobs]
    done = 0
    for job, guards, message in fenced:
        try:
            dead_letter(job, reason=reason, message=message, actor=actor, now=now, guards=guards)
        except Conflict:
            db.session.rollback()
        else:
            done += 1
    return done


def _no_agent(job: Job, project: str | None, platform: str | None) -> str:
    """Why a job pinned to an agent that is gone (``project`` None) or serves ``project`` on ``platform`` now can
    never be claimed."""
    if project is None:
        return AGENT_GONE.format(agent=job.agent_id)
    return AGENT_MOVED.format(
        agent=job.agent_id, project=project, platform=platform, job_project=job.project_id, job_platform=job.platform
    )


def _pinned_nowhere(job: Job) -> str | None:
    """Why no agent can claim the job's next attempt, for a job pinned to an agent that is gone or moved; else None."""
    if job.agent_id is None:
        return None
    agent = db.session.get(Agent, (job.tenant_id, job.agent_id))
    if agent is not None and (agent.project_id, agent.platform) == (job.project_id, job.platform):
        return None
    return _no_agent(job, agent.project_id if agent else None, agent.platform if agent else None)


def reap(*, now: datetime | None = None) -> int:
    """Turn every running attempt whose lease expired into ``lost``, and every one past its deadline (its agent
    beats, but the run never ends) into ``timed_out``; then queue the next attempt or end the job.

    Nothing is reaped while the control plane's beacon says that agents could not have renewed their leases
    (``leases_paused``).
    """
    paused = leases_paused()
    if paused is not None:
        log.info("%s", paused)
        return 0
    now = now or utcnow()
    reaped = 0
    for column, handle in ((JobAttempt.lease_expires_at, _reap_one), (JobAttempt.deadline_at, _time_out)):
        found = db.session.execute(
            select(Job, JobAttempt)
            .join(JobAttempt, JobAttempt.job_id == Job.id)
            .where(JobAttempt.state == AttemptState.RUNNING.value, column < now)
            .limit(BATCH)
        ).all()
        for job, attempt in found:
            try:
                reaped += handle(job, attempt, now)
            except Conflict:
                db.session.rollback()  # the agent reported, or another reaper won, meanwhile
    return reaped


def leases_paused() -> str | None:
    """Why leases must not be reaped now, or None: the control plane's beacon (``dispatch.beacon``) says that it
    cannot serve agents, or came back less than a lease ago (and a gap: a cut-off agent, which stops its runs a lease
    after the control plane is back, goes first), or it cannot be read. None with no beacon (no web process marks it:
    ``BEACON_INTERVAL`` 0, or no Valkey): leases are then reaped as they expire, as agents then stop their runs."""
    client = current_app.extensions.get("valkey")
    if client is None:
        return None
    try:
        seen = beacon.read(client)
    except Exception as exc:  # redis-py's errors and OSError
        # Waiting is the safe side: a run reaped while its agent reads an outage in the beacon would run twice.
        log.warning("could not read the control plane's beacon: %s", exc)
        return BEACON_UNREADABLE.format(error=exc)
    if seen is None:
        return None
    if not seen.up:
        return CONTROL_PLANE_DOWN.format(silent=seen.silent_for)
    lease = current_app.config["LEASE_SECONDS"]
    if seen.up_for < lease + seen.gap:
        return CONTROL_PLANE_BACK.format(up=seen.up_for, lease=lease, gap=seen.gap)
    return None


def _time_out(job: Job, attempt: JobAttempt, now: datetime) -> int:
    if attempt.deadline_at is None or attempt.deadline_at >= now:
        return 0  # read again after an earlier rollback: no longer past it
    message = OVERRUN.format(
        number=attempt.number,
        agent=attempt.agent_id or "?",
        deadline=_iso(attempt.deadline_at),
        timeout=format_duration(job.timeout or 0),
    )
    transition_attempt(attempt, AttemptState.TIMED_OUT, finished_at=now, error=message)
    log.warning("job %s: %s", job.id, message, extra=_about(job))
    if job.state == JobState.RUNNING.value and job.attempt == attempt.number:
        if job.cancel_requested:
            _cancel_as_requested(job, message, now)
        elif retry_failed(job, attempt, now=now) is not None:
            return 1  # committed with the next attempt
        else:
            transition(job, JobState.TIMED_OUT, actor="reaper", reason=message, finished_at=now, error=message)
    db.session.commit()
    return 1


def _cancel_as_requested(job: Job, ended: str, now: datetime) -> None:
    """Cancel (uncommitted) a job whose cancel was requested and whose run the reaper ended (``ended`` says how):
    stopped as asked, though not by its agent, and never run again."""
    message = f"{job.cancel_reason or 'cancelled as requested'}; {ended}"
    transition(job, JobState.CANCELLED, actor="reaper", reason=message, finished_at=now, error=message)
    log.warning("job %s: %s", job.id, message, extra=_about(job))


def _reap_one(job: Job, attempt: JobAttempt, now: datetime) -> int:
    agent = attempt.agent_id or "?"
    lost = LEASE_EXPIRED.format(number=attempt.number, agent=agent)
    if attempt.lease_expires_at is None or attempt.lease_expires_at >= now:
        return 0  # renewed since the query (the attempt was read again after an earlier rollback)
    # fenced by the lease as read: a heartbeat that renews it from now on keeps the attempt running
    guards = {"lease_expires_at": attempt.lease_expires_at}
    transition_attempt(attempt, AttemptState.LOST, guards=guards, finished_at=now, error=lost)
    current = job.state == JobState.RUNNING.value and job.attempt == attempt.number
    if not current:
        db.session.commit()
        return 1
    if job.cancel_requested:
        _cancel_as_requested(job, lost, now)
        db.session.commit()
        return 1
    lost_count = _counted(job, JobAttempt.state == AttemptState.LOST.value)
    nowhere = _pinned_nowhere(job)
    if nowhere is not None:
        dead_letter(job, reason="no_agent", message=f"{lost}; {nowhere}", actor="reaper", now=now)
    elif lost_count < current_app.config["MAX_LOST_ATTEMPTS"]:
        log.warning("job %s: %s; queueing attempt %d", job.id, lost, attempt.number + 1, extra=_about(job))
        following = open_next_attempt(job, actor="reaper", reason=lost, guards=NOT_CANCELLED)
        send(job, following)
    else:
        dead_letter(
            job, reason="lost", message=LOST_EXHAUSTED.format(lost=lost_count, agent=agent), actor="reaper", now=now
        )
    return 1
