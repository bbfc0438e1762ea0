"""Request and response models of the live-status API."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from app.schemas import Query, Request, Response


class TokenRequest(Request):
    """``POST /api/v1/realtime/token``: optionally, a job whose channel to grant too."""

    job_id: str | None = Field(None, min_length=1, max_length=36)


class RealtimeChannels(Response):
    """The Centrifugo channels granted: the tenant's (the project's for a project-limited token) and the job's."""

    tenant: str | None = Field(description="jobs:<tenant>: every job of the tenant; null for a project-limited token")
    project: str | None = Field(
        description="jobs:<tenant>.project.<project>: every job of the project, for a project-limited token (else null)"
    )
    job: str | None = Field(description="jobs:<tenant>.<job_id> when a job_id was asked for")


class RealtimeToken(Response):
    """A Centrifugo connection token and one subscription token per granted channel."""

    token: str = Field(description="connection JWT (HS256, CENTRIFUGO_TOKEN_SECRET); sub is the caller")
    user: str = Field(description="the tokens' sub: the caller's subject")
    expires_at: datetime
    channels: RealtimeChannels
    subscriptions: dict[str, str] = Field(description="channel -> its subscription JWT")


class EventsQuery(Query):
    """``GET /api/v1/jobs/{job_id}/events``: where to resume (the ``Last-Event-ID`` header wins)."""

    last_event_id: int | None = Field(None, ge=0)


class LiveEventOut(Response):
    """One live event, the ``data`` of an SSE ``job`` event and of a Centrifugo publication."""

    id: int = Field(description="per job, increasing from 1")
    job_id: str
    tenant_id: str
    project_id: str
    attempt: int
    state: str = Field(description="the job's state after the event")
    task: str | None = Field(description="the task's name for a task event, null for a job state change")
    status: str | None = Field(description="the task's status (running when it starts); null for a state change")
    ts: str = Field(description="ISO 8601, UTC, with Z")
