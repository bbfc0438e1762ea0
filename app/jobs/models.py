"""Job, JobAttempt, TaskResult and JobEvent tables."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.columns import LongText, UTCDateTime, exact, new_id, utcnow
from app.extensions import Base

BigId = BigInteger().with_variant(Integer, "sqlite")


class Job(Base):
    """A submitted workflow and where it is in its life cycle; ``attempt`` is the current delivery."""

    __tablename__ = "jobs"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "project_id"], ["projects.tenant_id", "projects.id"], ondelete="CASCADE"),
        Index("ix_jobs_tenant_project_state_scheduled", "tenant_id", "project_id", "state", "scheduled_at"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_state_scheduled", "state", "scheduled_at"),
        Index("ix_jobs_tenant_dead_letter", "tenant_id", "dead_letter_reason"),
        Index("ix_jobs_schedule_state", "schedule_id", "state"),  # schedules: is the previous run still active?
        Index("ix_jobs_state_finished", "state", "finished_at"),  # retention: a state's oldest jobs, in order
        UniqueConstraint("tenant_id", "project_id", "idempotency_key", name="uq_jobs_project_idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    workflow: Mapped[str] = mapped_column(LongText)
    variables: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    priority: Mapped[int] = mapped_column(default=5)
    agent_id: Mapped[str | None] = mapped_column(String(64), default=None)
    platform: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempt: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=1)  # runs of a failing workflow (lost ones don't count)
    retry_backoff: Mapped[float] = mapped_column(default=10.0)  # seconds before the 2nd run; doubles, jittered
    timeout: Mapped[float | None] = mapped_column(default=None)  # the workflow's, in seconds (None: before 0011)
    dead_letter_reason: Mapped[str | None] = mapped_column(String(32), default=None)
    revision: Mapped[int] = mapped_column(default=1)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    cancel_reason: Mapped[str | None] = mapped_column(Text, default=None)  # of a running job's cancel, for its end
    scheduled_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    deliver_by: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_by: Mapped[str | None] = mapped_column(String(255), default=None)
    idempotency_key: Mapped[str | None] = mapped_column(exact(255), default=None)  # "AbC" is not "abc"
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    schedule_id: Mapped[str | None] = mapped_column(String(36), default=None)  # the schedule that fired it

    attempts: Mapped[list[JobAttempt]] = relationship(
        back_populates="job", order_by="JobAttempt.number", cascade="all, delete-orphan", passive_deletes=True
    )


class JobAttempt(Base):
    """One delivery of a job to an agent, with its lease; results are fenced by its number."""

    __tablename__ = "job_attempts"
    __table_args__ = (
        UniqueConstraint("job_id", "number", name="uq_job_attempts_job_number"),
        Index("ix_job_attempts_state_lease", "state", "lease_expires_at"),
        Index("ix_job_attempts_tenant_agent_state", "tenant_id", "agent_id", "state"),
        Index("ix_job_attempts_state_published", "state", "published_at"),
        Index("ix_job_attempts_state_deadline", "state", "deadline_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(64))
    number: Mapped[int]
    state: Mapped[str] = mapped_column(String(16), default="queued")
    agent_id: Mapped[str | None] = mapped_column(String(64), default=None)
    claim_id: Mapped[str | None] = mapped_column(String(64), default=None)  # the agent's name for its claim
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)  # None: not yet sent
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)  # a retry's backoff
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    # the claim plus the workflow's timeout plus a lease: a run still not reported then is timed out, heartbeat or not
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    log_lines: Mapped[int] = mapped_column(default=0, server_default="0")  # log lines received from its agent

    job: Mapped[Job] = relationship(back_populates="attempts")


class TaskResult(Base):
    """The result of one task of one attempt, as the agent reported it."""

    __tablename__ = "task_results"
    __table_args__ = (UniqueConstraint("job_id", "attempt", "name", name="uq_task_results_job_attempt_name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int]
    position: Mapped[int] = mapped_column(default=0)
    name: Mapped[str] = mapped_column(exact(200))  # tasks "Build" and "build" have a result each
    type: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    output: Mapped[str] = mapped_column(LongText, default="")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    reported_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class JobEvent(Base):
    """One state change of a job (or of its attempt): the history, and the outbox of live events."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(default=0)
    from_state: Mapped[str | None] = mapped_column(String(16), default=None)
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    actor: Mapped[str | None] = mapped_column(String(255), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
