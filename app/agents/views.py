"""The agents blueprint: ``/api/v1/agents``."""

from __future__ import annotations

from flask import Blueprint, Response, current_app

from app.agents import service
from app.agents.models import Agent
from app.agents.schemas import (
    AgentList,
    AgentListQuery,
    AgentOut,
    AgentRegister,
    AttemptRef,
    HeartbeatOut,
    HeartbeatRequest,
    Lease,
    RefusalOut,
    RefusalReport,
)
from app.api import ERR_READ, ERR_WRITE, READERS, body, document, query, reply
from app.auth.guard import principal, require
from app.columns import utcnow

bp = Blueprint("agents", __name__, url_prefix="/api/v1/agents")


def agent_out(agent: Agent) -> AgentOut:
    """Return the response model of an agent."""
    return AgentOut(
        agent_id=agent.id,
        tenant_id=agent.tenant_id,
        project_id=agent.project_id,
        hostname=agent.hostname,
        platform=agent.platform,
        version=agent.version,
        task_types=agent.task_types,
        labels=agent.labels,
        max_concurrent_jobs=agent.max_concurrent_jobs,
        status=agent.status(current_app.config["AGENT_OFFLINE_AFTER"]),  # type: ignore[arg-type]
        registered_at=agent.registered_at,
        updated_at=agent.updated_at,
        last_heartbeat_at=agent.last_heartbeat_at,
    )


@bp.post("")
@document(
    "Register an agent (201), or update its registration (200)",
    body=AgentRegister,
    responses={201: AgentOut, 200: AgentOut},
    errors={**ERR_WRITE, 422: ("unknown_project",)},
)
@require("admin", "tenant_admin", "agent", action="register agents")
def register() -> Response:
    """Register an agent."""
    agent, created = service.register_agent(caller=principal(), data=body(AgentRegister))
    return reply(agent_out(agent), 201 if created else 200)


@bp.get("")
@document(
    "List agents with their online/offline status",
    query=AgentListQuery,
    responses={200: AgentList},
    errors={**ERR_READ, 400: ("invalid_request",)},
)
@require(*READERS, action="list agents")
def list_agents() -> Response:
    """List agents."""
    params = query(AgentListQuery)
    agents, total = service.list_agents(caller=principal(), params=params)
    return reply(
        AgentList(agents=[agent_out(a) for a in agents], total=total, limit=params.limit, offset=params.offset)
    )


@bp.get("/<agent_id>")
@document("Read an agent", responses={200: AgentOut}, errors=ERR_READ)
@require(*READERS, "agent", action="read agents")
def get_agent(agent_id: str) -> Response:
    """Read an agent."""
    return reply(agent_out(service.scoped(principal(), agent_id)))


@bp.post("/<agent_id>/heartbeat")
@document(
    "Heartbeat: mark the agent online and renew the leases of its running attempts",
    body=HeartbeatRequest,
    responses={200: HeartbeatOut},
    errors=ERR_WRITE,
)
@require("agent", action="send heartbeats")
def heartbeat(agent_id: str) -> Response:
    """Record a heartbeat."""
    beat = body(HeartbeatRequest, optional=True)
    said = [(item.job_id, item.attempt) for item in beat.running]
    agent, running = service.heartbeat(caller=principal(), agent_id=agent_id, running=said)
    leases = [
        Lease(
            job_id=job.id,
            attempt=a.number,
            lease_expires_at=a.lease_expires_at,  # type: ignore[arg-type]
            cancel_requested=job.cancel_requested,
        )
        for job, a in running
    ]
    held = {(lease.job_id, lease.attempt) for lease in leases}
    ended = sorted(set(said) - held)
    return reply(
        HeartbeatOut(
            agent_id=agent.id,
            status="online",
            server_time=utcnow(),
            heartbeat_interval=current_app.config["HEARTBEAT_INTERVAL"],
            lease_seconds=current_app.config["LEASE_SECONDS"],
            leases=leases,
            cancel=[lease.job_id for lease in leases if lease.cancel_requested],
            stop=[AttemptRef(job_id=job_id, attempt=number) for job_id, number in ended],
        )
    )


@bp.post("/<agent_id>/refusals")
@document(
    "Report a job message the agent refused to run (recorded in the audit log)",
    body=RefusalReport,
    responses={201: RefusalOut},
    errors=ERR_WRITE,
)
@require("agent", action="report refused messages")
def report_refusal(agent_id: str) -> Response:
    """Record a refused message."""
    service.record_refusal(caller=principal(), agent_id=agent_id, report=body(RefusalReport))
    return reply(RefusalOut(), 201)


@bp.delete("/<agent_id>")
@document("Remove an agent's registration", responses={204: None}, errors=ERR_READ)
@require("admin", "tenant_admin", action="delete agents")
def delete_agent(agent_id: str) -> Response:
    """Delete an agent."""
    service.delete_agent(caller=principal(), agent_id=agent_id)
    return Response(status=204)
