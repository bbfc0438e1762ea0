"""Job services for operators: submit, list, read, change, cancel and delete (and publish, for dispatch)."""

from __future__ import annotations

import hashlib
from datetime import UTC

from flask import current_app
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from app.agents.models import Agent
from app.audit import service as audit
from app.auth.guard import check_project, check_tenant, deny
from app.auth.tokens import Principal
from app.columns import new_id, utcnow
from app.errors import NOT_FOUND, AppError, BadRequest, Conflict, NotFound, Unprocessable
from app.extensions import db
from app.jobs import dispatching
from app.jobs.models import Job, JobAttempt
from app.jobs.schemas import DeadLetterQuery, JobListQuery, JobSubmit, JobUpdate, RequeueRequest
from app.jobs.states import FINAL_STATES, NOT_STARTED, AttemptState, JobState, transition, transition_attempt
from app.jobs.workflows import choose_platform, validate_workflow
from app.realtime.events import note_state
from app.rows import commit_new
from app.tenants.models import Project

IDEMPOTENCY_CONFLICT = "Idempotency-Key '{key}' was already used with a different request"
UNKNOWN_PROJECT = "project '{project}' does not exist in this tenant"
NO_PROJECT = "name the project: give project_id (the token is not limited to one)"
UNKNOWN_AGENT = "agent '{agent}' is not registered in project '{project}'"
AGENT_PLATFORM = "agent '{agent}' runs {platform}; this workflow runs on {allowed}"
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
    seen = (
        job is not None
        and job.tenant_id == caller.tenant_id
        and (caller.project_id is None or job.project_id == caller.project_id)
    )
    if not seen:
        if job is not None:
            audit.record_refusal(action="access.cross_tenant", principal=caller, target_type="job", target_id=job_id)
        raise NotFound(NOT_FOUND.format(kind="job", id=job_id))
    assert job is not None
    return job


def _request_hash(data: JobSubmit, project_id: str) -> str:
    return hashlib.sha256(f"{project_id}\n{data.model_dump_json()}".encode()).hexdigest()


def _replay(caller: Principal, key: str, digest: str) -> Job | None:
    job = db.session.scalar(select(Job).where(Job.tenant_id == caller.tenant_id, Job.idempotency_key == key))
    if job is not None and job.request_hash != digest:
        raise Conflict(IDEMPOTENCY_CONFLICT.format(key=key), code="idempotency_conflict")
    return job


def _check_project(caller: Principal, project_id: str) -> None:
    if db.session.get(Project, (caller.tenant_id, project_id)) is None:
        raise Unprocessable(UNKNOWN_PROJECT.format(project=project_id), code="unknown_project")


def check_target(caller: Principal, project_id: str, agent_id: str | None, platform: str | None) -> Agent | None:
    """Return the pinned agent (None when not pinned); the project of an unpinned job is checked on insert."""
    if agent_id is None:
        return None
    agent = db.session.get(Agent, (caller.tenant_id, agent_id))
    if agent is None or agent.project_id != project_id:
        raise Unprocessable(UNKNOWN_AGENT.format(agent=agent_id, project=project_id), code="unknown_agent")
    if platform is not None and platform != agent.platform:
        raise Unprocessable(
            AGENT_PLATFORM.format(agent=agent_id, platform=agent.platform, allowed=platform),
            code="incompatible_platform",
        )
    return agent


def _new_job(caller: Principal, data: JobSubmit, project_id: str, idempotency_key: str | None, digest: str) -> Job:
    """Validate one submission (its tenant and ``project_id`` already checked) and add it to the session as a new
    job (queued when it is due), not committed."""
    workflow = validate_workflow(data.workflow, max_bytes=current_app.config["MAX_WORKFLOW_BYTES"])
    agent = check_target(caller, project_id, data.agent_id, data.platform)
    platform = choose_platform(workflow, data.platform or (agent.platform if agent else None))
    now = utcnow()
    job = Job(
        id=new_id(),
        tenant_id=caller.tenant_id,
        project_id=project_id,
        name=workflow.name,
        workflow=data.workflow,
        variables=data.variables,
        priority=data.priority,
        agent_id=data.agent_id,
        platform=platform,
        state=JobState.PENDING.value,
        attempt=0,
        max_attempts=data.max_attempts or current_app.config["MAX_ATTEMPTS"],
        retry_backoff=current_app.config["RETRY_BACKOFF"] if data.retry_backoff is None else data.retry_backoff,
        scheduled_at=data.scheduled_at or now,
        deliver_by=data.deliver_by,
        created_at=now,
        updated_at=now,
        created_by=caller.subject,
        idempotency_key=idempotency_key,
        request_hash=digest if idempotency_key else None,
    )
    db.session.add(job)
    audit.record(
        action="job.submitted",
        principal=caller,
        target_type="job",
        target_id=job.id,
        details={"project_id": project_id, "name": job.name, "agent_id": data.agent_id},
    )
    if not dispatching.queue_new(job):
        note_state(job)  # the live event of a job that waits (queued jobs have theirs from the transition)
    return job


def _project_of(caller: Principal, data: JobSubmit) -> str:
    check_tenant(caller, data.tenant_id)
    project_id = check_project(caller, data.project_id)
    if project_id is None:
        raise Unprocessable(NO_PROJECT, code="unknown_project")
    return project_id


def submit_job(*, caller: Principal, data: JobSubmit, idempotency_key: str | None = None) -> tuple[Job, bool]:
    """Validate and store a new ``pending`` job; return it and whether it was created (False: a replay)."""
    project_id = _project_of(caller, data)
    digest = _request_hash(data, project_id)
    if idempotency_key is not None and (existing := _replay(caller, idempotency_key, digest)) is not None:
        return existing, False
    job = _new_job(caller, data, project_id, idempotency_key, digest)
    try:
        commit_new(db.session)  # plain INSERTs: a third of what the unit of work's flush would cost
    except IntegrityError:  # the project's foreign key, or a concurrent request with the same key
        db.session.rollback()
        _check_project(caller, job.project_id)
        if idempotency_key is not None and (existing := _replay(caller, idempotency_key, digest)) is not None:
            return existing, False
        raise
    return job, True


def batch_key(idempotency_key: str, index: int) -> str:
    """The idempotency key stored with the job at ``index`` of a batch submitted with ``idempotency_key``."""
    return f"{idempotency_key}#{index}"


def _batch_hashes(digests: list[str]) -> list[str]:
    """The request hash kept with each job of a batch: of the whole batch and the job's place in it, so that only
    the same batch sent again matches (never a shorter or reordered one, never a single submission)."""
    whole = hashlib.sha256(("batch\n" + "\n".join(digests)).encode()).hexdigest()
    return [hashlib.sha256(f"{whole}\n{index}".encode()).hexdigest() for index in range(len(digests))]


def _replay_batch(caller: Principal, idempotency_key: str, hashes: list[str]) -> list[Job] | None:
    """The jobs of an earlier batch with the same key (None if there was none); 409 if it was another request."""
    keys = [batch_key(idempotency_key, index) for index in range(len(hashes))]
    found = {
        job.idempotency_key: job
        for job in db.session.scalars(
            select(Job).where(Job.tenant_id == caller.tenant_id, Job.idempotency_key.in_(keys))
        )
    }
    if not found:
        return None
    jobs = [found.get(key) for key in keys]
    if any(job is None or job.request_hash != digest for job, digest in zip(jobs, hashes, strict=True)):
        raise Conflict(IDEMPOTENCY_CONFLICT.format(key=idempotency_key), code="idempotency_conflict")
    return [job for job in jobs if job is not None]


def _at(index: int, exc: AppError) -> AppError:
    """The same error, naming the batch entry it is about."""
    return type(exc)(
        f"jobs[{index}]: {exc.message}", code=exc.code, headers=exc.headers, **{**exc.extra, "index": index}
    )


def submit_jobs(
    *, caller: Principal, items: list[JobSubmit], idempotency_key: str | None = None
) -> tuple[list[Job], bool]:
    """Validate and store several jobs in one transaction, all or none; return them and whether they were created.

    Every entry's tenant and project are checked first, then each entry's workflow and agent in order; the first
    entry that cannot be accepted refuses the whole batch, with the error it would get alone and its ``index``.
    With ``idempotency_key`` K, entry i is stored under ``K#i``, so the same batch sent again returns the same jobs.
    """
    projects = []
    for index, data in enumerate(items):
        try:
            projects.append(_project_of(caller, data))
        except AppError as exc:
            raise _at(index, exc) from None
    hashes = _batch_hashes([_request_hash(data, project) for data, project in zip(items, projects, strict=True)])
    if idempotency_key is not None and (existing := _replay_batch(caller, idempotency_key, hashes)) is not None:
        return existing, False
    pinned = {data.agent_id for data in items if data.agent_id is not None}
    # Loaded at once and held until the end: the checks below find them in the session without a query each.
    agents = (
        list(db.session.scalars(select(Agent).where(Agent.tenant_id == caller.tenant_id, Agent.id.in_(pinned))))
        if pinned
        else []
    )
    jobs = []
    with db.session.no_autoflush:  # nothing is written before the one commit, whatever a check reads
        for index, (data, project, digest) in enumerate(zip(items, projects, hashes, strict=True)):
            key = None if idempotency_key is None else batch_key(idempotency_key, index)
            try:
                jobs.append(_new_job(caller, data, project, key, digest))
            except AppError as exc:
                db.session.rollback()
                raise _at(index, exc) from None
    del agents
    try:
        commit_new(db.session)
    except IntegrityError:  # a project that was just deleted, or a concurrent batch with the same key
        db.session.rollback()
        for index, project in enumerate(projects):
            if project in projects[:index]:
                continue  # checked already, for an earlier entry
            try:
                _check_project(caller, project)
            except AppError as exc:
                raise _at(index, exc) from None
        if idempotency_key is not None and (existing := _replay_batch(caller, idempotency_key, hashes)) is not None:
            return existing, False
        raise
    return jobs, True


def list_jobs(*, caller: Principal, params: JobListQuery) -> tuple[list[Job], int]:
    """Return a page of the caller's jobs, newest first, and how many match in all."""
    check_tenant(caller, params.tenant_id)
    query = select(Job).where(Job.tenant_id == caller.tenant_id)
    project_id = check_project(caller, params.project_id)
    if project_id is not None:
        query = query.where(Job.project_id == project_id)
    if params.state is not None:
        query = query.where(Job.state == params.state.value)
    if params.agent_id is not None:
        query = query.where(Job.agent_id == params.agent_id)
    total = db.session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = query.order_by(Job.created_at.desc(), Job.id).limit(params.limit).offset(params.offset)
    return list(db.session.scalars(page)), total


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
    agent_id = changes.get("agent_id", job.agent_id)
    agent = check_target(caller, job.project_id, agent_id, changes.get("platform"))
    requested = changes.get("platform") or (agent.platform if agent else None)
    values = {**changes, "name": workflow.name, "platform": choose_platform(workflow, requested)}
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
        if previous is not None:
            transition_attempt(
                previous, AttemptState.CANCELLED, finished_at=now, error=f"superseded by revision {job.revision + 1}"
            )
        following = JobAttempt(job_id=job.id, tenant_id=job.tenant_id, number=job.attempt + 1, queued_at=now)
        db.session.add(following)
    audit.record(
        action="job.updated", principal=caller, target_type="job", target_id=job.id, details={"fields": sorted(changes)}
    )
    db.session.commit()
    db.session.refresh(job)
    if following is not None:
        dispatching.send(job, following)  # committed first; if this fails, the sweeper sends it
    return job


def cancel_job(*, caller: Principal, job_id: str, reason: str | None = None) -> Job:
    """Cancel a job durably: one not started is cancelled now, a running one is asked to stop."""
    job = scoped(caller, job_id)
    now = utcnow()
    reason = reason or f"cancelled by {caller.subject}"
    if job.state == JobState.RUNNING.value:
        if not job.cancel_requested:
            statement = (
                update(Job)
                .where(Job.id == job.id, Job.state == JobState.RUNNING.value)
                .values(cancel_requested=True, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            if db.session.execute(statement).rowcount != 1:  # type: ignore[attr-defined]
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
    db.session.execute(delete(Job).where(Job.id == job.id, Job.state.in_(finished)))
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


def list_dead_letters(*, caller: Principal, params: DeadLetterQuery) -> tuple[list[Job], int]:
    """Return a page of the caller's dead-lettered jobs, newest first, and how many match in all."""
    check_tenant(caller, params.tenant_id)
    query = select(Job).where(Job.tenant_id == caller.tenant_id, Job.state == JobState.DEAD_LETTER.value)
    project_id = check_project(caller, params.project_id)
    if project_id is not None:
        query = query.where(Job.project_id == project_id)
    if params.reason is not None:
        query = query.where(Job.dead_letter_reason == params.reason)
    total = db.session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = query.order_by(Job.finished_at.desc(), Job.id).limit(params.limit).offset(params.offset)
    return list(db.session.scalars(page)), total


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
    attempt = dispatching.open_next_attempt(
        job,
        actor=caller.subject,
        reason=f"requeued by {caller.subject}",
        dead_letter_reason=None,
        error=None,
        finished_at=None,
        deliver_by=data.deliver_by.astimezone(UTC).replace(tzinfo=None) if data.deliver_by else None,
    )
    audit.record(
        action="job.requeued",
        principal=caller,
        target_type="job",
        target_id=job.id,
        details={"attempt": attempt.number, "was": reason},
    )
    db.session.commit()
    dispatching.send(job, attempt)
    return job
