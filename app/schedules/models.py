"""Schedule and ScheduleRun tables."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
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
from sqlalchemy.orm import Mapped, mapped_column

from app.columns import LongText, UTCDateTime, new_id, utcnow
from app.extensions import Base

BigId = BigInteger().with_variant(Integer, "sqlite")


class Overlap(StrEnum):
    """What a fire time does while the schedule's previous job is still active."""

    SKIP = "skip"  # recorded as skipped, no job
    ALLOW = "allow"  # a job all the same


class RunState(StrEnum):
    """What became of one fire time."""

    FIRED = "fired"  # a job was submitted (``job_id``; empty for a moment while it is being made)
    SKIPPED = "skipped"  # no job: the previous one was still active, or the job was refused (``reason``)
    MISSED = "missed"  # no job: the scheduler was down or late past the misfire grace


class Schedule(Base):
    """A workflow, a target and a cron expression in a timezone; ``next_run_at`` is None while paused."""

    __tablename__ = "schedules"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "project_id"], ["projects.tenant_id", "projects.id"], ondelete="CASCADE"),
        Index("ix_schedules_tenant_created", "tenant_id", "created_at"),
        Index("ix_schedules_next_run_at", "next_run_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    cron: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64))
    workflow: Mapped[str] = mapped_column(LongText)
    variables: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    priority: Mapped[int] = mapped_column(default=5)
    agent_id: Mapped[str | None] = mapped_column(String(64), default=None)
    platform: Mapped[str] = mapped_column(String(16))
    overlap: Mapped[str] = mapped_column(String(8), default=Overlap.SKIP.value)
    paused: Mapped[bool] = mapped_column(default=False)
    next_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    revision: Mapped[int] = mapped_column(default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(255), default=None)


class ScheduleRun(Base):
    """One fire time of a schedule and what became of it; unique per time, so only one scheduler fires it."""

    __tablename__ = "schedule_runs"
    __table_args__ = (
        UniqueConstraint("schedule_id", "scheduled_for", name="uq_schedule_runs_schedule_scheduled_for"),
        Index("ix_schedule_runs_state_job", "state", "job_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    schedule_id: Mapped[str] = mapped_column(String(36), ForeignKey("schedules.id", ondelete="CASCADE"))
    scheduled_for: Mapped[datetime] = mapped_column(UTCDateTime())
    state: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[str | None] = mapped_column(String(36), default=None)  # no foreign key: kept after the job
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
