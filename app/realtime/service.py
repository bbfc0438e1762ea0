"""Live-status services: Centrifugo tokens that grant only the caller's channels, and a job's event snapshot."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

import jwt
from flask import current_app
from sqlalchemy import select

from app.auth.tokens import ALGORITHM, Principal
from app.errors import ServiceUnavailable
from app.extensions import db
from app.jobs.models import Job
from app.jobs.service import scoped
from app.realtime.schemas import RealtimeChannels, RealtimeToken
from dispatch.realtime import centrifugo_job_channel, centrifugo_project_channel, centrifugo_tenant_channel

NO_TOKEN_SECRET = "live status through Centrifugo is not configured here: CENTRIFUGO_TOKEN_SECRET is not set"  # noqa: S105


def issue_tokens(*, caller: Principal, job_id: str | None = None) -> RealtimeToken:
    """Return a connection token and subscription tokens for the caller's tenant (or project) channel and a job's.

    A project-limited token gets its project's channel instead of the tenant's (which carries every project's
    jobs). Another tenant's or project's job is 404, exactly as if it did not exist.
    """
    config = current_app.config
    secret = config["CENTRIFUGO_TOKEN_SECRET"]
    if not secret:
        raise ServiceUnavailable(NO_TOKEN_SECRET, code="realtime_not_configured")
    job = scoped(caller, job_id) if job_id is not None else None
    channels = RealtimeChannels(
        tenant=centrifugo_tenant_channel(caller.tenant_id) if caller.project_id is None else None,
        project=centrifugo_project_channel(caller.tenant_id, caller.project_id) if caller.project_id else None,
        job=centrifugo_job_channel(job.tenant_id, job.id) if job is not None else None,
    )
    now = int(time.time())
    expires = now + int(config["CENTRIFUGO_TOKEN_TTL"])
    claims = {"sub": caller.subject, "iat": now, "exp": expires}
    connection = jwt.encode(
        {**claims, "info": {"tenant_id": caller.tenant_id, "role": caller.role}}, secret, algorithm=ALGORITHM
    )
    granted = [channel for channel in (channels.tenant, channels.project, channels.job) if channel is not None]
    return RealtimeToken(
        token=connection,
        user=caller.subject,
        expires_at=datetime.fromtimestamp(expires, UTC),
        channels=channels,
        subscriptions={c: jwt.encode({**claims, "channel": c}, secret, algorithm=ALGORITHM) for c in granted},
    )


@dataclass(frozen=True)
class JobSnapshot:
    """What the event stream needs of a job row, read without holding a database connection."""

    job_id: str
    tenant_id: str
    project_id: str
    state: str
    attempt: int
    changed_at: datetime


def job_snapshot(*, caller: Principal, job_id: str) -> JobSnapshot:
    """Return the caller's job as a snapshot (404 outside its tenant or project) and release the connection."""
    job = scoped(caller, job_id)
    snapshot = _snapshot(job)
    db.session.rollback()  # a stream may last an hour: it holds no database connection meanwhile
    return snapshot


def reread(job_id: str) -> JobSnapshot | None:
    """Read a job again (None when it was deleted) and release the connection."""
    job = db.session.scalar(select(Job).where(Job.id == job_id).execution_options(populate_existing=True))
    snapshot = None if job is None else _snapshot(job)
    db.session.rollback()
    return snapshot


def _snapshot(job: Job) -> JobSnapshot:
    return JobSnapshot(
        job_id=job.id,
        tenant_id=job.tenant_id,
        project_id=job.project_id,
        state=job.state,
        attempt=job.attempt,
        changed_at=job.finished_at or job.updated_at,
    )
