"""The schedules blueprint: ``/api/v1/schedules`` for operators (viewers read; agents have no access)."""

from __future__ import annotations

from flask import Blueprint, Response

from app.api import ERR_READ, ERR_WRITE, READERS, WRITERS, body, document, query, reply
from app.auth.guard import principal, require
from app.schedules import service
from app.schedules.models import Schedule
from app.schedules.schemas import (
    ScheduleCreate,
    ScheduleDetail,
    ScheduleList,
    ScheduleListQuery,
    ScheduleOut,
    ScheduleRunOut,
    ScheduleUpdate,
)

bp = Blueprint("schedules", __name__, url_prefix="/api/v1/schedules")

ERR_INVALID = (
    "invalid_cron",
    "invalid_timezone",
    "invalid_workflow",
    "unknown_project",
    "unknown_agent",
    "incompatible_platform",
)


def schedule_out(schedule: Schedule) -> ScheduleOut:
    """Return the response model of a schedule."""
    return ScheduleOut(
        schedule_id=schedule.id,
        tenant_id=schedule.tenant_id,
        project_id=schedule.project_id,
        name=schedule.name,
        cron=schedule.cron,
        timezone=schedule.timezone,
        agent_id=schedule.agent_id,
        platform=schedule.platform,
        variables=schedule.variables,
        priority=schedule.priority,
        overlap=schedule.overlap,
        paused=schedule.paused,
        next_run_at=schedule.next_run_at,
        revision=schedule.revision,
        created_at=schedule.created_at,
        updated_at=schedule.updated_at,
        created_by=schedule.created_by,
    )


def schedule_detail(schedule: Schedule) -> ScheduleDetail:
    """Return a schedule with its workflow and its latest fire times."""
    runs = [
        ScheduleRunOut(
            scheduled_for=run.scheduled_for,
            state=run.state,
            job_id=run.job_id,
            job_state=job_state,
            reason=run.reason,
            created_at=run.created_at,
        )
        for run, job_state in service.recent_runs(schedule=schedule)
    ]
    return ScheduleDetail(**schedule_out(schedule).model_dump(), workflow=schedule.workflow, runs=runs)


@bp.post("")
@document(
    "Create a recurring schedule: a workflow run as a job at every fire time of a cron expression",
    body=ScheduleCreate,
    responses={201: ScheduleOut},
    errors={**ERR_WRITE, 422: ERR_INVALID},
)
@require(*WRITERS, action="create schedules")
def create_schedule() -> Response:
    """Create a schedule."""
    schedule = service.create_schedule(caller=principal(), data=body(ScheduleCreate))
    return reply(schedule_out(schedule), 201, {"Location": f"/api/v1/schedules/{schedule.id}"})


@bp.get("")
@document(
    "List schedules, newest first",
    query=ScheduleListQuery,
    responses={200: ScheduleList},
    errors={**ERR_READ, 400: ("invalid_request",)},
)
@require(*READERS, action="list schedules")
def list_schedules() -> Response:
    """List schedules."""
    params = query(ScheduleListQuery)
    schedules, total = service.list_schedules(caller=principal(), params=params)
    return reply(
        ScheduleList(
            schedules=[schedule_out(s) for s in schedules], total=total, limit=params.limit, offset=params.offset
        )
    )


@bp.get("/<schedule_id>")
@document("Read a schedule with its next run and its latest runs", responses={200: ScheduleDetail}, errors=ERR_READ)
@require(*READERS, action="read schedules")
def get_schedule(schedule_id: str) -> Response:
    """Read a schedule."""
    return reply(schedule_detail(service.get_schedule(caller=principal(), schedule_id=schedule_id)))


@bp.put("/<schedule_id>")
@document(
    "Change a schedule (pause, resume, a new expression, workflow or target)",
    body=ScheduleUpdate,
    responses={200: ScheduleOut},
    errors={**ERR_WRITE, 409: ("concurrent_update",), 422: ERR_INVALID},
)
@require(*WRITERS, action="change schedules")
def update_schedule(schedule_id: str) -> Response:
    """Change a schedule."""
    data = body(ScheduleUpdate)
    return reply(schedule_out(service.update_schedule(caller=principal(), schedule_id=schedule_id, data=data)))


@bp.delete("/<schedule_id>")
@document("Delete a schedule (its jobs stay)", responses={204: None}, errors=ERR_READ)
@require(*WRITERS, action="delete schedules")
def delete_schedule(schedule_id: str) -> Response:
    """Delete a schedule."""
    service.delete_schedule(caller=principal(), schedule_id=schedule_id)
    return Response(status=204)
