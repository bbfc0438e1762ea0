"""Schedule services: create, list, read, change and delete recurring schedules (firing is in ``firing``)."""

from __future__ import annotations

from typing import Any

from flask import current_app
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from app.audit import service as audit
from app.auth.guard import check_project, check_tenant
from app.auth.tokens import Principal
from app.columns import new_id, utcnow
from app.errors import NOT_FOUND, BadRequest, Conflict, NotFound, Unprocessable
from app.extensions import db
from app.jobs.models import Job
from app.jobs.submission import (
    NO_PROJECT,
    UNKNOWN_PROJECT,
    check_target,  # the job submission's own agent and platform checks
    target_platform,
)
from app.jobs.workflows import validate_workflow
from app.schedules import cron
from app.schedules.models import Schedule, ScheduleRun
from app.schedules.schemas import ScheduleCreate, ScheduleListQuery, ScheduleUpdate
from app.tenants.models import Project

NOTHING_TO_CHANGE = "give at least one field to change"
CHANGED_MEANWHILE = "schedule {schedule_id} changed while the request was handled; read it again"
RECENT_RUNS = 20


def scoped(caller: Principal, schedule_id: str) -> Schedule:
    """Return the schedule if the caller's tenant (and project) can see it; 404 exactly as if it did not exist."""
    schedule = db.session.get(Schedule, schedule_id)
    if schedule is not None and schedule.id != schedule_id:
        schedule = None  # found under another spelling (MariaDB compares without case): not the one asked for
    visible = (
        schedule is not None
        and schedule.tenant_id == caller.tenant_id
        and (caller.project_id is None or schedule.project_id == caller.project_id)
    )
    if not visible:
        if schedule is not None:
            audit.record_refusal(  # in the platform's log, as for jobs (app.jobs.service.visible)
                action="access.cross_tenant",
                principal=caller,
                target_type="schedule",
                target_id=schedule_id,
                platform=True,
            )
        raise NotFound(NOT_FOUND.format(kind="schedule", id=schedule_id))
    assert schedule is not None
    return schedule


def _timing(cron_text: str, timezone: str) -> str:
    """Validate an expression and a timezone together; return the normalised expression."""
    cron.check_timezone(timezone)
    return cron.check_cron(cron_text, allow_seconds=current_app.config["SCHEDULE_ALLOW_SECONDS"])


def _target(
    caller: Principal, project_id: str, workflow: str, agent_id: str | None, platform: str | None
) -> tuple[str, str]:
    """Check the workflow and the target exactly as a job submission does; return its name and platform."""
    loaded = validate_workflow(workflow, max_bytes=current_app.config["MAX_WORKFLOW_BYTES"])
    agent = check_target(caller, project_id, agent_id, platform)
    return loaded.name, target_platform(loaded, agent, platform)


def _check_project(caller: Principal, project_id: str) -> None:
    if db.session.get(Project, (caller.tenant_id, project_id)) is None:
        raise Unprocessable(UNKNOWN_PROJECT.format(project=project_id), code="unknown_project")


def create_schedule(*, caller: Principal, data: ScheduleCreate) -> Schedule:
    """Validate and store a schedule; its first run is the first fire time after now (none while paused)."""
    check_tenant(caller, data.tenant_id)
    project_id = check_project(caller, data.project_id)
    if project_id is None:
        raise Unprocessable(NO_PROJECT, code="unknown_project")
    expression = _timing(data.cron, data.timezone)
    _check_project(caller, project_id)
    workflow_name, platform = _target(caller, project_id, data.workflow, data.agent_id, data.platform)
    now = utcnow()
    schedule = Schedule(
        id=new_id(),
        tenant_id=caller.tenant_id,
        project_id=project_id,
        name=data.name or workflow_name,
        cron=expression,
        timezone=data.timezone,
        workflow=data.workflow,
        variables=data.variables,
        priority=data.priority,
        agent_id=data.agent_id,
        platform=platform,
        overlap=data.overlap,
        paused=data.paused,
        next_run_at=None if data.paused else cron.next_after(expression, data.timezone, now),
        created_at=now,
        updated_at=now,
        created_by=caller.subject,
    )
    db.session.add(schedule)
    audit.record(
        action="schedule.created",
        principal=caller,
        target_type="schedule",
        target_id=schedule.id,
        details={"project_id": project_id, "cron": expression, "timezone": data.timezone, "paused": data.paused},
    )
    try:
        db.session.commit()
    except IntegrityError:  # the project was deleted meanwhile
        db.session.rollback()
        _check_project(caller, project_id)
        raise
    return schedule


def list_schedules(*, caller: Principal, params: ScheduleListQuery) -> tuple[list[Schedule], int]:
    """Return a page of the caller's schedules, newest first, and how many match in all."""
    check_tenant(caller, params.tenant_id)
    query = select(Schedule).where(Schedule.tenant_id == caller.tenant_id)
    project_id = check_project(caller, params.project_id)
    if project_id is not None:
        query = query.where(Schedule.project_id == project_id)
    if params.paused is not None:
        query = query.where(Schedule.paused.is_(params.paused))
    total = db.session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = query.order_by(Schedule.created_at.desc(), Schedule.id).limit(params.limit).offset(params.offset)
    return list(db.session.scalars(page)), total


def get_schedule(*, caller: Principal, schedule_id: str) -> Schedule:
    """Return one schedule of the caller's tenant."""
    return scoped(caller, schedule_id)


def recent_runs(*, schedule: Schedule, limit: int = RECENT_RUNS) -> list[tuple[ScheduleRun, str | None]]:
    """Return the latest fire times of a schedule, newest first, each with its job's current state."""
    rows = db.session.execute(
        select(ScheduleRun, Job.state)
        .outerjoin(Job, Job.id == ScheduleRun.job_id)
        .where(ScheduleRun.schedule_id == schedule.id)
        .order_by(ScheduleRun.scheduled_for.desc())
        .limit(limit)
    ).all()
    return [(run, state) for run, state in rows]


def update_schedule(*, caller: Principal, schedule_id: str, data: ScheduleUpdate) -> Schedule:
    """Change a schedule; a new expression, timezone or resume starts again from the next fire time after now."""
    schedule = scoped(caller, schedule_id)
    changes: dict[str, Any] = data.model_dump(exclude_unset=True)
    if not changes:
        raise BadRequest(NOTHING_TO_CHANGE)
    timezone = changes.get("timezone", schedule.timezone)
    if {"cron", "timezone"} & changes.keys():
        changes["cron"] = _timing(changes.get("cron", schedule.cron), timezone)
    if {"workflow", "agent_id", "platform"} & changes.keys():
        _, changes["platform"] = _target(
            caller,
            schedule.project_id,
            changes.get("workflow", schedule.workflow),
            changes.get("agent_id", schedule.agent_id),
            changes.get("platform"),
        )
    now = utcnow()
    paused = changes.get("paused", schedule.paused)
    values = {**changes, "revision": schedule.revision + 1, "updated_at": now}
    if paused:
        values["next_run_at"] = None
    elif schedule.paused or {"cron", "timezone"} & changes.keys():
        values["next_run_at"] = cron.next_after(changes.get("cron", schedule.cron), timezone, now)
    statement = (
        update(Schedule)
        .where(Schedule.id == schedule.id, Schedule.revision == schedule.revision)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if db.session.execute(statement).rowcount != 1:  # type: ignore[attr-defined]
        raise Conflict(CHANGED_MEANWHILE.format(schedule_id=schedule.id), code="concurrent_update")
    audit.record(
        action="schedule.updated",
        principal=caller,
        target_type="schedule",
        target_id=schedule.id,
        details={"fields": sorted(data.model_dump(exclude_unset=True))},
    )
    db.session.commit()
    db.session.refresh(schedule)
    return schedule


def delete_schedule(*, caller: Principal, schedule_id: str) -> None:
    """Delete a schedule and its record of fire times; its jobs stay, and so does their ``schedule_id``."""
    schedule = scoped(caller, schedule_id)
    gone = db.session.execute(delete(Schedule).where(Schedule.id == schedule.id))
    if gone.rowcount != 1:  # type: ignore[attr-defined]  # a concurrent request deleted it: 404, audited once
        db.session.rollback()
        raise NotFound(NOT_FOUND.format(kind="schedule", id=schedule_id))
    audit.record(action="schedule.deleted", principal=caller, target_type="schedule", target_id=schedule.id)
    db.session.commit()
