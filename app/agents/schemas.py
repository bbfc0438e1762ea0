"""Request and response models of the agents API."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from app.schemas import BIGGEST, Page, Platform, Request, Response, Slug


class AgentRegister(Request):
    """``POST /api/v1/agents``: register an agent, or update its registration."""

    agent_id: Slug
    hostname: str = Field(min_length=1, max_length=255)
    platform: Platform
    project_id: Slug | None = None
    tenant_id: str | None = None
    version: str | None = Field(None, max_length=64)
    task_types: list[str] = Field(default_factory=list, max_length=100)
    labels: dict[str, str] = Field(default_factory=dict, max_length=50)
    max_concurrent_jobs: int = Field(1, ge=1, le=1000)


class AgentListQuery(Page):
    """``GET /api/v1/agents`` filters."""

    tenant_id: Slug | None = None
    project_id: Slug | None = None
    platform: str | None = None
    status: Literal["online", "offline"] | None = None


class RunningAttempt(Request):
    """A job attempt the agent says it is running."""

    job_id: str = Field(max_length=36)
    attempt: int = Field(ge=1, le=BIGGEST)


class HeartbeatRequest(Request):
    """``POST /api/v1/agents/{id}/heartbeat`` (the body is optional)."""

    running: list[RunningAttempt] = Field(default_factory=list, max_length=1000)


class RefusalReport(Request):
    """``POST /api/v1/agents/{id}/refusals``: a job message the agent refused to run, and why."""

    reason: Literal[
        "unsigned",
        "bad_signature",
        "malformed",
        "expired",
        "not_yet_valid",
        "wrong_audience",
        "replayed",
        "poison",
        "unknown_task",
        "undecodable",
    ]
    message: str = Field(max_length=1000)
    task_id: str | None = Field(None, max_length=200)
    job_id: str | None = Field(None, max_length=64)
    attempt: int | None = Field(None, ge=0, le=BIGGEST)


class RefusalOut(Response):
    """The refusal was recorded in the audit log."""

    recorded: bool = True


class AgentOut(Response):
    """An agent and whether it is online (heard from within AGENT_OFFLINE_AFTER seconds)."""

    agent_id: str
    tenant_id: str
    project_id: str
    hostname: str
    platform: str
    version: str | None
    task_types: list[str]
    labels: dict[str, str]
    max_concurrent_jobs: int
    status: Literal["online", "offline"]
    registered_at: datetime
    updated_at: datetime
    last_heartbeat_at: datetime | None


class AgentList(Response):
    """A page of agents."""

    agents: list[AgentOut]
    total: int
    limit: int
    offset: int


class Lease(Response):
    """A running attempt of the agent and its renewed lease."""

    job_id: str
    attempt: int
    lease_expires_at: datetime
    cancel_requested: bool


class AttemptRef(Response):
    """One attempt of a job."""

    job_id: str
    attempt: int


class HeartbeatOut(Response):
    """The heartbeat's answer: renewed leases, jobs to stop, and when to beat next."""

    agent_id: str
    status: Literal["online"]
    server_time: datetime
    heartbeat_interval: int
    lease_seconds: int
    leases: list[Lease]
    cancel: list[str]
    # attempts the agent named that the control plane no longer has running on it (lost, timed out, finished,
    # someone else's): their results would be refused; stop them
    stop: list[AttemptRef] = []
