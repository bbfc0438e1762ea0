"""Request and response models of the schedules API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from app.schemas import Change, JsonObject, Page, Platform, Request, Response, Slug

OverlapPolicy = Literal["skip", "allow"]


class ScheduleCreate(Request):
    """``POST /api/v1/schedules``."""

    cron: str = Field(min_length=1, max_length=200)
    timezone: str = Field("UTC", min_length=1, max_length=64)
    workflow: str = Field(min_length=1)
    name: str | None = Field(None, min_length=1, max_length=200)
    project_id: Slug | None = None
    tenant_id: str | None = None
    agent_id: Slug | None = None
    platform: Platform | None = None
    variables: JsonObject = Field(default_factory=dict)
    priority: int = Field(5, ge=0, le=9)
    overlap: OverlapPolicy = "skip"
    paused: bool = False


class ScheduleUpdate(Change):
    """``PUT /api/v1/schedules/{id}``: the fields to change (``agent_id: null`` unpins, ``platform: null`` lets the
    workflow choose)."""

    NULLABLE = frozenset({"agent_id", "platform"})

    cron: str | None = Field(None, min_length=1, max_length=200)
    timezone: str | None = Field(None, min_length=1, max_length=64)
    workflow: str | None = Field(None, min_length=1)
    name: str | None = Field(None, min_length=1, max_length=200)
    agent_id: Slug | None = None
    platform: Platform | None = None
    variables: JsonObject | None = None
    priority: int | None = Field(None, ge=0, le=9)
    overlap: OverlapPolicy | None = None
    paused: bool | None = None


class ScheduleListQuery(Page):
    """``GET /api/v1/schedules`` filters."""

    tenant_id: Slug | None = None
    project_id: Slug | None = None
    paused: bool | None = None


class ScheduleOut(Response):
    """A schedule as lists and writes return it."""

    schedule_id: str
    tenant_id: str
    project_id: str
    name: str
    cron: str
    timezone: str
    agent_id: str | None
    platform: str
    variables: dict[str, Any]
    priority: int
    overlap: str
    paused: bool
    next_run_at: datetime | None
    revision: int
    created_at: datetime
    updated_at: datetime
    created_by: str | None


class ScheduleRunOut(Response):
    """One fire time of a schedule and what became of it."""

    scheduled_for: datetime
    state: str
    job_id: str | None
    job_state: str | None
    reason: str | None
    created_at: datetime


class ScheduleDetail(ScheduleOut):
    """A schedule with its workflow and its latest fire times, newest first."""

    workflow: str
    runs: list[ScheduleRunOut]


class ScheduleList(Response):
    """A page of schedules, newest first."""

    schedules: list[ScheduleOut]
    total: int
    limit: int
    offset: int
