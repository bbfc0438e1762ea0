"""Agent services: register, list, read, heartbeat (renewing leases) and delete."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import current_app
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from app.agents.models import Agent
from app.agents.schemas import AgentListQuery, AgentRegister, RefusalReport
from app.audit import service as audit
from app.auth.guard import check_project, check_tenant, deny
from app.auth.tokens import Principal
from app.columns import utcnow
from app.errors import NOT_FOUND, Conflict, NotFound, Unprocessable
from app.extensions import db
from app.jobs import dispatching
from app.jobs.models import Job, JobAttempt
from app.jobs.states import AttemptState, JobState
from app.tenants.models import Project

OTHER_AGENT = "an agent token may act only on its own agent record"
# Refusals that mean the message can never run as sent: the job is dead-lettered with this reason.
DEAD_LETTER_ON_REFUSAL = {
    "bad_signature": "refused",
    "wrong_audience": "refused",
    "unsigned": "refused",
    "malformed": "refused",
    "expired": "expired",
    "poison": "poison",
}
NO_PROJECT = "name the project: give project_id (the token is not limited to one)"
UNKNOWN_PROJECT = "project '{project}' does not exist in this tenant"


def scoped(caller: Principal, agent_id: str) -> Agent:
    """Return the agent if the caller may see it: 404 outside its tenant, 403 for another agent's token."""
    agent = db.session.get(Agent, (caller.tenant_id, agent_id))
    if agent is not None and agent.id != agent_id:
        agent = None  # found under another spelling (MariaDB compares without case): not the agent asked for
    if agent is None or (caller.project_id is not None and agent.project_id != caller.project_id):
        raise NotFound(NOT_FOUND.format(kind="agent", id=agent_id))
    if caller.role == "agent" and caller.agent_id != agent_id:
        raise deny(caller, OTHER_AGENT, agent_id=agent_id)
    return agent


def register_agent(*, caller: Principal, data: AgentRegister) -> tuple[Agent, bool]:
    """Create or update an agent's registration; return it and whether it is new."""
    check_tenant(caller, data.tenant_id)
    if caller.role == "agent" and caller.agent_id != data.agent_id:
        raise deny(caller, OTHER_AGENT, agent_id=data.agent_id)
    project_id = check_project(caller, data.project_id)
    if project_id is None:
        raise Unprocessable(NO_PROJECT, code="unknown_project")
    if db.session.get(Project, (caller.tenant_id, project_id)) is None:
        raise Unprocessable(UNKNOWN_PROJECT.format(project=project_id), code="unknown_project")
    try:
        return _register(caller, data, project_id)
    except IntegrityError:  # a concurrent first registration of the same agent inserted it: this one updates it
        db.session.rollback()
        return _register(caller, data, project_id)


def _register(caller: Principal, data: AgentRegister, project_id: str) -> tuple[Agent, bool]:
    now = utcnow()
    agent = db.session.get(Agent, (caller.tenant_id, data.agent_id))
    if agent is not None and caller.project_id is not None and agent.project_id != caller.project_id:
        # an agent of a project the caller cannot see: moved only by a caller who can (as GET and DELETE answer)
        raise NotFound(NOT_FOUND.format(kind="agent", id=data.agent_id))
    created = agent is None
    if agent is None:
        agent = Agent(tenant_id=caller.tenant_id, id=data.agent_id, registered_at=now)
        db.session.add(agent)
    moved = not created and (agent.project_id, agent.platform) != (project_id, data.platform)
    fields = data.model_dump(exclude={"agent_id", "tenant_id", "project_id"})
    for key, value in fields.items():
        setattr(agent, key, value)
    agent.project_id = project_id
    agent.updated_at = now
    agent.last_heartbeat_at = now
    audit.record(
        action="agent.registered",
        principal=caller,
        target_type="agent",
        target_id=data.agent_id,
        details={"project_id": project_id, "platform": data.platform, "new": created},
    )
    db.session.commit()
    if moved:  # the jobs pinned to it for its old project or platform can never be claimed now
        dispatching.strand(now=now, actor=caller.subject, tenant_id=agent.tenant_id, agent_id=agent.id)
    return agent, created


def list_agents(*, caller: Principal, params: AgentListQuery) -> tuple[list[Agent], int]:
    """Return a page of the caller's agents and how many match in all."""
    check_tenant(caller, params.tenant_id)
    query = select(Agent).where(Agent.tenant_id == caller.tenant_id)
    project_id = check_project(caller, params.project_id)
    if project_id is not None:
        query = query.where(Agent.project_id == project_id)
    if params.platform is not None:
        query = query.where(Agent.platform == params.platform)
    if params.status is not None:
        online = Agent.online(current_app.config["AGENT_OFFLINE_AFTER"])
        query = query.where(online if params.status == "online" else (Agent.last_heartbeat_at.is_(None) | ~online))
    total = db.session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = query.order_by(Agent.id).limit(params.limit).offset(params.offset)
    return list(db.session.scalars(page)), total


def heartbeat(
    *, caller: Principal, agent_id: str, running: list[tuple[str, int]]
) -> tuple[Agent, list[tuple[Job, JobAttempt]]]:
    """Record that the agent is alive and renew the leases of the attempts it says it runs; return them.

    Only the attempts the agent names are renewed: an attempt the agent has lost track of (its report gave
    up, its process restarted) keeps its lease, which expires, and the reaper retries it. A job can never
    stay ``running`` because an agent that is alive keeps beating for something it no longer runs.
    """
    agent = scoped(caller, agent_id)
    now = utcnow()
    expires = now + timedelta(seconds=current_app.config["LEASE_SECONDS"])
    agent.last_heartbeat_at = now
    mine = (
        JobAttempt.tenant_id == caller.tenant_id,
        JobAttempt.agent_id == agent_id,
        JobAttempt.state == AttemptState.RUNNING.value,
    )
    claimed = [(job, attempt) for job, attempt in _running(mine, running) if attempt.number == job.attempt]
    if claimed:
        db.session.execute(
            update(JobAttempt)
            .where(*mine, JobAttempt.id.in_([attempt.id for _, attempt in claimed]))
            .values(lease_expires_at=expires)
            .execution_options(synchronize_session=False)
        )
        for _, attempt in claimed:
            attempt.lease_expires_at = expires
    db.session.commit()
    return agent, claimed


def _running(mine: tuple[Any, ...], running: list[tuple[str, int]]) -> list[tuple[Job, JobAttempt]]:
    """The attempts of ``running`` (job id, attempt number) that the server has running on this agent."""
    if not running:
        return []
    wanted = set(running)
    query = (
        select(Job, JobAttempt)
        .join(JobAttempt, JobAttempt.job_id == Job.id)
        .where(*mine, JobAttempt.job_id.in_([job_id for job_id, _ in wanted]))
    )
    rows = db.session.execute(query.execution_options(populate_existing=True)).all()
    return [(job, attempt) for job, attempt in rows if (job.id, attempt.number) in wanted]


def record_refusal(*, caller: Principal, agent_id: str, report: RefusalReport) -> None:
    """Audit a job message the agent refused before running anything (forged, expired, misaddressed, replayed)."""
    agent = scoped(caller, agent_id)
    audit.record(
        action="job.message_refused",
        principal=caller,
        outcome="refused",
        target_type="job",
        target_id=report.job_id or report.task_id,
        details={
            "agent_id": agent_id,
            "reason": report.reason,
            "message": report.message,
            "task_id": report.task_id,
            "attempt": report.attempt,
        },
    )
    db.session.commit()
    dead = DEAD_LETTER_ON_REFUSAL.get(report.reason)
    job = db.session.get(Job, report.job_id) if dead and report.job_id else None
    if job is not None and job.id != report.job_id:
        job = None  # another spelling of its id (MariaDB compares without case): not the job the agent named
    if (
        dead is not None
        and job is not None
        # only a job whose messages could reach this agent: its tenant and project, pinned to it, or on the
        # queue of its project and platform
        and job.tenant_id == caller.tenant_id
        and job.project_id == caller.project_id
        and (job.agent_id == caller.agent_id or (job.agent_id is None and job.platform == agent.platform))
        and job.attempt == report.attempt
        and job.state == JobState.QUEUED.value
    ):
        message = f"agent '{agent_id}' refused the message ({report.reason}): {report.message}"
        try:
            dispatching.dead_letter(job, reason=dead, actor=caller.subject, message=message)
        except Conflict:
            db.session.rollback()  # claimed or changed meanwhile


def delete_agent(*, caller: Principal, agent_id: str) -> None:
    """Remove an agent's registration (its jobs keep their history); the jobs due that wait for it alone are
    dead-lettered (``no_agent``)."""
    agent = scoped(caller, agent_id)
    tenant_id = agent.tenant_id
    db.session.execute(delete(Agent).where(Agent.tenant_id == tenant_id, Agent.id == agent_id))
    audit.record(action="agent.deleted", principal=caller, target_type="agent", target_id=agent_id)
    db.session.commit()
    dispatching.strand(now=utcnow(), actor=caller.subject, tenant_id=tenant_id, agent_id=agent_id)
