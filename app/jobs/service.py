"""Job services for operators: list, read, change, cancel, delete and requeue (and publish, for dispatch); submitting
is in ``app/jobs/submission.py``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import current_app
from sqlalchemy import Select, and_, delete, exists, func, select, update
from sqlalchemy.orm import aliased

from app.audit import service as audit
from app.auth.guard import check_project, check_tenant, deny
from app.auth.tokens import Principal
from app.columns import utcnow
from app.errors import NOT_FOUND, BadRequest, Conflict, NotFound
from app.extensions import db
from app.jobs import dispatching
from app.jobs.models import Job, JobAttempt
from app.jobs.schemas import DeadLetterQuery, JobListQuery, JobUpdate, RequeueRequest
from app.jobs.states import (
    FINAL_STATES,
    NOT_STARTED,
    AttemptState,
    JobState,
    again_if_overtaken,
    transition,
    transition_attempt,
)
from app.jobs.submission import check_deadline, check_secrets, check_target, target_platform
from app.jobs.workflows import validate_workflow
from app.schemas import Page

JOB_STARTED = "job {job_id} is {state}; only a job that has not started can be changed"
JOB_ACTIVE = "job {job_id} is {state}; cancel it or wait until it finishes before deleting it"
NOTHING_TO_CHANGE = "give at least one field to change"
NOT_CLAIMED_BY_YOU = "an agent may read only the jobs it claimed"


def scoped(caller: Principal, job_id: str) -> Job:
    """Return the job if the caller's tenant (and project) can see it; 404 exactly as if it did not exist."""
    job = db.session.get(Job, job_id)
    return visible(caller, job_id, job)


def visible(caller: Principal, job_id: str, job: Job | None) -> Job:
    """Return ``job`` (read by id ``job_id``) if the caller can see it; 404 exactly as if it did not exist."""
    if job is not None and job.id != job_id:
        job = None  # found under another spelling (MariaDB compares without case): not the job asked for
    seen = (
        job is not None
        and job.tenant_id == caller.tenant_id
        and (caller.project_id is None or job.project_id == caller.project_id)
    )
    if not seen:
        if job is not None:
            # in the platform's log: the caller's tenant admin would learn from it which ids exist elsewhere
            audit.record_refusal(
                action="access.cross_tenant", principal=caller, target_type="job", target_id=job_id, platform=True
            )
        raise NotFound(NOT_FOUND.format(kind="job", id=job_id))
    assert job is not None
    return job


def list_jobs(*, caller: Principal, params: JobListQuery) -> tuple[list[tuple[Job, str | None]], int]:
    """Return a page of the caller's jobs, newest first, each with the agent that claimed its current attempt
    (None until claimed), and how many match in all."""
    check_tenant(caller, params.tenant_id)
    query = select(Job).where(Job.tenant_id == caller.tenant_id)
    project_id = check_project(caller, params.project_id)
    if project_id is not None:
        query = query.where(Job.project_id == project_id)
    if params.state is not None:
        query = query.where(Job.state == params.state.value)
    if params.agent_id is not None:
        query = query.where(Job.agent_id == params.agent_id)
    if params.ran_on is not None:
        query = _ran_on(query, params.ran_on)
    if params.id_prefix is not None:
        query = query.where(Job.id.startswith(params.id_prefix, autoescape=True))
    return _page(query, (Job.created_at.desc(), Job.id), params)


def _ran_on(query: Select[Job], agent_id: str) -> Select[Job]:
    """Narrow ``query`` to the jobs whose current attempt ``agent_id`` claimed: what ``ran_on`` shows."""
    claimed = aliased(JobAttempt)  # the page joins JobAttempt too: this one is the filter's own
    current = (
        exists()
        .where(
            claimed.tenant_id == Job.tenant_id,  # the attempts' index by tenant and agent finds them
            claimed.agent_id == agent_id,
            claimed.job_id == Job.id,
            claimed.number == Job.attempt,
        )
        .correlate(Job)
    )
    return query.where(current)


def _page(query: Select[Job], order: tuple[Any, ...], params: Page) -> tuple[list[tuple[Job, str | None]], int]:
    """One page of the jobs ``query`` selects, in ``order``, each with the agent that claimed its current attempt (None
    until claimed), and how many it selects in all."""
    total = db.session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = (
        query.add_columns(JobAttempt.agent_id)
        .outerjoin(JobAttempt, and_(JobAttempt.job_id == Job.id, JobAttempt.number == Job.attempt))
        .order_by(*order)
        .limit(params.limit)
        .offset(params.offset)
    )
    return [(job, ran_on) for job, ran_on in db.session.execute(page)], total


def get_job(*, caller: Principal, job_id: str) -> Job:
    """Return one job; an agent may read only the jobs it claimed."""
    job = scoped(caller, job_id)
    if caller.role == "agent" and not any(a.agent_id == caller.agent_id for a in job.attempts):
        raise deny(caller, NOT_CLAIMED_BY_YOU, job_id=job_id)
    return job


def update_job(*, caller: Principal, job_id: str, data: JobUpdate) -> Job:
    """Change a job that has not started yet; its revision goes up by one."""
    job = scoped(caller, job_id)
    if JobState(job.state) not in NOT_STARTED:
        raise Conflict(JOB_STARTED.format(job_id=job.id, state=job.state), code="invalid_transition", state=job.state)
    changes = data.model_dump(exclude_unset=True)
    if not changes:
        raise BadRequest(NOTHING_TO_CHANGE)
    workflow = validate_workflow(data.workflow or job.workflow, max_bytes=current_app.config["MAX_WORKFLOW_BYTES"])
    if data.workflow is not None:  # checked as on submission
        check_secrets(job.tenant_id, job.project_id, data.workflow)
    if {"deliver_by", "scheduled_at"} & changes.keys():
        check_deadline(changes.get("deliver_by", job.deliver_by), changes.get("scheduled_at", job.scheduled_at))
    agent_id = changes.get("agent_id", job.agent_id)
    agent = check_target(caller, job.project_id, agent_id, changes.get("platform"))
    values = {
        **changes,
        "name": workflow.name,
        "timeout": workflow.timeout,
        "platform": target_platform(workflow, agent, changes.get("platform")),
    }
    now = utcnow()
    values.update(revision=job.revision + 1, updated_at=now)
    queued = job.state == JobState.QUEUED.value
    if queued:  # its message carries the old workflow: a new attempt supersedes it
        values.update(attempt=job.attempt + 1, queued_at=now)
    statement = (
        update(Job)
        .where(
            Job.id == job.id,
            Job.revision == job.revision,
            Job.attempt == job.attempt,
            Job.state.in_([s.value for s in NOT_STARTED]),
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if db.session.execute(statement).rowcount != 1:  # type: ignore[attr-defined]
        raise Conflict(f"job {job.id} changed while the request was handled; read it again", code="concurrent_update")
    following = None
    if queued:
        previous = _current_attempt(job)
        not_before = _not_before(previous, job.scheduled_at, changes.get("scheduled_at"), now)
        if previous is not None:
            transition_attempt(
                previous, AttemptState.CANCELLED, finished_at=now, error=f"superseded by revision {job.revision + 1}"
            )
        following = JobAttempt(
            job_id=job.id, tenant_id=job.tenant_id, number=job.attempt + 1, queued_at=now, not_before=not_before
        )
        db.session.add(following)
    audit.record(
        action="job.updated", principal=caller, target_type="job", target_id=job.id, details={"fields": sorted(changes)}
    )
    db.session.commit()
    db.session.refresh(job)
    if following is not None and following.not_before is None:
        dispatching.send(job, following)  # committed first; if this fails, the sweeper sends it
    return job


def _not_before(
    previous: JobAttempt | None, was_scheduled: datetime, scheduled_at: datetime | None, now: datetime
) -> datetime | None:
    """When the attempt that supersedes ``previous`` may be sent (None: now): not before a retry's backoff that
    ``previous`` still waited out, nor before a later ``scheduled_at`` the change asks for (a time an earlier change
    asked for, ``was_scheduled``, gives way to it). The sweeper sends it then, as it sends a retry."""
    waits = [] if scheduled_at is None else [scheduled_at.astimezone(UTC)]
    waited = previous.not_before if previous is not None and previous.published_at is None else None
    if waited is not None and (scheduled_at is None or waited != was_scheduled):  # a retry's backoff stays
        waits.append(waited)
    later = max(waits, default=None)
    return later if later is not None and later > now else None


def cancel_job(*, caller: Principal, job_id: str, reason: str | None = None) -> Job:
    """Cancel a job durably: one not started is cancelled now, a running one is asked to stop.

    A cancel whose write lost a race (an agent claimed the queued job meanwhile) is read and made once more, as of
    the job's latest state: the job that started is then asked to stop.
    """
    return again_if_overtaken(lambda: _cancel(caller, job_id, reason))


def _cancel(caller: Principal, job_id: str, reason: str | None) -> Job:
    job = scoped(caller, job_id)
    now = utcnow()
    reason = reason or f"cancelled by {caller.subject}"
    if job.state == JobState.RUNNING.value:
        if not job.cancel_requested:
            statement = (
                update(Job)
                .where(Job.id == job.id, Job.state == JobState.RUNNING.value, Job.cancel_requested.is_(False))
                .values(cancel_requested=True, cancel_reason=reason, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            if db.session.execute(statement).rowcount != 1:  # type: ignore[attr-defined]
                seen = db.session.execute(select(Job.state, Job.cancel_requested).where(Job.id == job.id)).one()
                if tuple(seen) != (JobState.RUNNING.value, True):  # else: asked meanwhile; its reason stands
                    raise Conflict(f"job {job.id} finished while the request was handled", code="concurrent_update")
    else:
        transition(
            job,
            JobState.CANCELLED,
            reason=reason,
            actor=caller.subject,
            cancel_requested=True,
            finished_at=now,
            error=reason,
        )
        current = _current_attempt(job)
        if current is not None and current.state == AttemptState.QUEUED.value:
            transition_attempt(current, AttemptState.CANCELLED, finished_at=now, error=reason)
    audit.record(
        action="job.cancelled",
        principal=caller,
        target_type="job",
        target_id=job.id,
        details={"reason": reason, "state": job.state},
    )
    db.session.commit()
    db.session.refresh(job)
    if job.state == JobState.RUNNING.value:
        dispatching.tell_agent_to_cancel(job)  # the heartbeat reply tells it too, if this message is lost
    return job


def delete_job(*, caller: Principal, job_id: str) -> None:
    """Delete a finished job with its attempts, results and history; 409 while it is active."""
    job = scoped(caller, job_id)
    finished = [s.value for s in FINAL_STATES]
    if job.state not in finished:
        raise Conflict(JOB_ACTIVE.format(job_id=job.id, state=job.state), code="job_active", state=job.state)
    gone = db.session.execute(delete(Job).where(Job.id == job.id, Job.state.in_(finished)))
    if gone.rowcount != 1:  # type: ignore[attr-defined]  # deleted by a concurrent request, or requeued meanwhile
        db.session.rollback()
        job = scoped(caller, job_id)  # 404 when deleted
        raise Conflict(JOB_ACTIVE.format(job_id=job.id, state=job.state), code="job_active", state=job.state)
    audit.record(action="job.deleted", principal=caller, target_type="job", target_id=job.id)
    db.session.commit()


def publish_job(*, job_id: str, actor: str = "dispatcher") -> JobAttempt:
    """Open the next attempt of a pending job and mark it ``queued`` (committed; the message is sent after)."""
    job = db.session.get(Job, job_id)
    if job is None:
        raise NotFound(NOT_FOUND.format(kind="job", id=job_id))
    return dispatching.open_next_attempt(job, actor=actor)


def _current_attempt(job: Job) -> JobAttempt | None:
    return db.session.scalar(select(JobAttempt).where(JobAttempt.job_id == job.id, JobAttempt.number == job.attempt))


def list_dead_letters(*, caller: Principal, params: DeadLetterQuery) -> tuple[list[tuple[Job, str | None]], int]:
    """Return a page of the caller's dead-lettered jobs, newest first, each with the agent that claimed its last
    attempt, and how many match in all."""
    check_tenant(caller, params.tenant_id)
    query = select(Job).where(Job.tenant_id == caller.tenant_id, Job.state == JobState.DEAD_LETTER.value)
    project_id = check_project(caller, params.project_id)
    if project_id is not None:
        query = query.where(Job.project_id == project_id)
    if params.reason is not None:
        query = query.where(Job.dead_letter_reason == params.reason)
    if params.ran_on is not None:
        query = _ran_on(query, params.ran_on)
    return _page(query, (Job.finished_at.desc(), Job.id), params)


def requeue_job(*, caller: Principal, job_id: str, data: RequeueRequest) -> Job:
    """Give a dead-lettered job a new attempt (audited); its deadline is the one given, or none."""
    job = scoped(caller, job_id)
    if job.state != JobState.DEAD_LETTER.value:
        raise Conflict(
            f"job {job.id} is {job.state}; only a dead-lettered job can be requeued",
            code="invalid_transition",
            state=job.state,
        )
    reason = job.dead_letter_reason
    check_deadline(data.deliver_by)
    target: dict[str, Any] = {}
    if "agent_id" in data.model_fields_set:  # pinned again, or unpinned: checked as on submission
        agent = check_target(caller, job.project_id, data.agent_id, None)
        workflow = validate_workflow(job.workflow, max_bytes=current_app.config["MAX_WORKFLOW_BYTES"])
        platform = target_platform(workflow, agent, None if agent is not None else job.platform)
        target = {"agent_id": data.agent_id, "platform": platform, "revision": job.revision + 1}
    attempt = dispatching.open_next_attempt(
        job,
        actor=caller.subject,
        reason=f"requeued by {caller.subject}",
        dead_letter_reason=None,
        cancel_requested=False,  # a new request: an old cancel of the job no longer stands
        cancel_reason=None,
        error=None,
        finished_at=None,
        deliver_by=data.deliver_by,  # aware: the column stores it as naive UTC
        **target,
    )
    details: dict[str, Any] = {"attempt": attempt.number, "was": reason}
    if target:
        details["agent_id"] = target["agent_id"]
    audit.record(action="job.requeued", principal=caller, target_type="job", target_id=job.id, details=details)
    db.session.commit()
    dispatching.send(job, attempt)
    return job
