"""Job submission: one job or a batch of them, checked, stored in one transaction with their audit records, then
published (the sweeper publishes what a crash left behind)."""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

import probe
from app.agents.models import Agent
from app.audit import service as audit
from app.auth.guard import check_project, check_tenant
from app.auth.tokens import Principal
from app.columns import new_id, utcnow
from app.errors import AppError, BadRequest, Conflict, Unprocessable
from app.extensions import db
from app.jobs import dispatching
from app.jobs.models import Job
from app.jobs.schemas import JobSubmit
from app.jobs.states import JobState
from app.jobs.workflows import allowed_platforms, choose_platform, validate_workflow
from app.realtime.events import note_state
from app.rows import commit_new
from app.secretstore import service as secretstore
from app.tenants.models import Project

IDEMPOTENCY_CONFLICT = "Idempotency-Key '{key}' was already used with a different request"
UNKNOWN_PROJECT = "project '{project}' does not exist in this tenant"
NO_PROJECT = "name the project: give project_id (the token is not limited to one)"
UNKNOWN_AGENT = "agent '{agent}' is not registered in project '{project}'"
DEADLINE_PASSED = "deliver_by {deliver_by} has passed: a job must be deliverable when it is submitted"
UNKNOWN_SECRETS = "the workflow names secrets that project '{project}' does not have: {names}; set them first"
AGENT_PLATFORM = "agent '{agent}' runs {platform}; this workflow runs on {allowed}"


NO_AGENT_ONLINE = (
    "no {platform} agent of project '{project}' is online: the job waits in its queue until one is, and becomes "
    "dead_letter (expired) if none claims it in time"
)
PINNED_AGENT_OFFLINE = (
    "agent '{agent}', which the job is pinned to, is not online: the job waits in its queue until it is, and "
    "becomes dead_letter (expired) if it does not claim it in time"
)
SEEN_FOR = 10.0  # seconds a process trusts what it found out about a target's agents being online
SOON = timedelta(minutes=5)  # a job scheduled later than this is not warned about: agents may be back by then
_seen: dict[tuple[str, ...], tuple[float, bool]] = {}  # target -> (time.monotonic() when looked, any agent online)


def warnings_for(job: Job) -> list[str]:
    """What the submitter should know about a job it just submitted (or that is due soon): that no agent that could
    run it is online, its pinned agent or, unpinned, any of its project and platform. One query per target at most
    every ``SEEN_FOR`` seconds in a process, whatever it found, so the hot path does not pay for it."""
    if job.state not in (JobState.PENDING.value, JobState.QUEUED.value) or job.scheduled_at > utcnow() + SOON:
        return []
    pinned = job.agent_id is not None
    target = (job.tenant_id, "agent", str(job.agent_id)) if pinned else (job.tenant_id, job.project_id, job.platform)
    now = time.monotonic()
    seen = _seen.get(target)
    if seen is None or now - seen[0] >= SEEN_FOR:  # the query is built only when it runs: building it costs too
        scope = [Agent.tenant_id == job.tenant_id]
        if pinned:
            scope.append(Agent.id == job.agent_id)
        else:
            scope += [Agent.project_id == job.project_id, Agent.platform == job.platform]
        online = Agent.online(current_app.config["AGENT_OFFLINE_AFTER"])
        found = db.session.scalar(select(Agent.id).where(*scope, online).limit(1))
        if len(_seen) > 10000:
            _seen.clear()
        seen = _seen[target] = (now, found is not None)
    if seen[1]:
        return []
    if pinned:
        return [PINNED_AGENT_OFFLINE.format(agent=job.agent_id)]
    return [NO_AGENT_ONLINE.format(platform=job.platform, project=job.project_id)]


def _request_hash(data: JobSubmit, project_id: str) -> str:
    return hashlib.sha256(f"{project_id}\n{data.model_dump_json()}".encode()).hexdigest()


def _replay(caller: Principal, project_id: str, key: str, digest: str) -> Job | None:
    # a key is the project's own: another project's job under the same key is neither found nor in the way
    job = db.session.scalar(
        select(Job).where(Job.tenant_id == caller.tenant_id, Job.project_id == project_id, Job.idempotency_key == key)
    )
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


def target_platform(workflow: probe.Workflow, agent: Agent | None, requested: str | None) -> str:
    """The platform of a job (or a schedule's jobs): the one requested, else the pinned agent's, else the default;
    422 ``incompatible_platform`` when the workflow cannot run there, naming the pinned agent when it is its."""
    allowed = allowed_platforms(workflow)
    if agent is not None and requested is None and allowed and agent.platform not in allowed:
        raise Unprocessable(
            AGENT_PLATFORM.format(agent=agent.id, platform=agent.platform, allowed=", ".join(sorted(allowed))),
            code="incompatible_platform",
        )
    return choose_platform(workflow, requested or (agent.platform if agent else None))


def _new_job(caller: Principal, data: JobSubmit, project_id: str, idempotency_key: str | None, digest: str) -> Job:
    """Validate one submission (its tenant and ``project_id`` already checked) and add it to the session as a new
    job (queued when it is due), not committed."""
    workflow = validate_workflow(data.workflow, max_bytes=current_app.config["MAX_WORKFLOW_BYTES"])
    check_secrets(caller.tenant_id, project_id, data.workflow)
    check_deadline(data.deliver_by)
    agent = check_target(caller, project_id, data.agent_id, data.platform)
    platform = target_platform(workflow, agent, data.platform)
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
        timeout=workflow.timeout,
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


def check_secrets(tenant_id: str, project_id: str, workflow: str) -> None:
    """422 ``unknown_secret`` when the workflow names secrets the project does not have."""
    absent = secretstore.missing(tenant_id, project_id, workflow)
    if absent:
        names = ", ".join(absent)
        raise Unprocessable(
            UNKNOWN_SECRETS.format(project=project_id, names=names), code="unknown_secret", names=absent
        )


def check_deadline(deliver_by: datetime | None, scheduled_at: datetime | None = None) -> None:
    """400 for a delivery deadline that has passed, or that is not after the time the job is due: such a job could
    never be delivered (its envelope expires at least a second after it is sent, so it would run all the same)."""
    if deliver_by is None:
        return
    if deliver_by <= utcnow():
        raise BadRequest(DEADLINE_PASSED.format(deliver_by=deliver_by.isoformat()))
    if scheduled_at is not None and deliver_by <= scheduled_at:
        raise BadRequest("deliver_by must be later than scheduled_at")


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
    if idempotency_key is not None and (existing := _replay(caller, project_id, idempotency_key, digest)) is not None:
        return existing, False
    job = _new_job(caller, data, project_id, idempotency_key, digest)
    try:
        commit_new(db.session)  # plain INSERTs: a third of what the unit of work's flush would cost
    except IntegrityError:  # the project's foreign key, or a concurrent request with the same key
        db.session.rollback()
        _check_project(caller, job.project_id)
        if idempotency_key is not None and (existing := _replay(caller, project_id, idempotency_key, digest)):
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


def _replay_batch(caller: Principal, idempotency_key: str, projects: list[str], hashes: list[str]) -> list[Job] | None:
    """The jobs of an earlier batch with the same key (None if there was none); 409 if it was another request.
    Entry i's key is looked for in entry i's project only, as a single submission's is."""
    keys = [batch_key(idempotency_key, index) for index in range(len(hashes))]
    query = select(Job).where(
        Job.tenant_id == caller.tenant_id, Job.project_id.in_(set(projects)), Job.idempotency_key.in_(keys)
    )
    found = {(job.project_id, job.idempotency_key): job for job in db.session.scalars(query)}
    jobs = [found.get(place) for place in zip(projects, keys, strict=True)]
    if not any(jobs):
        return None
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
    if idempotency_key is not None and (existing := _replay_batch(caller, idempotency_key, projects, hashes)):
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
        if idempotency_key is not None and (existing := _replay_batch(caller, idempotency_key, projects, hashes)):
            return existing, False
        raise
    return jobs, True
