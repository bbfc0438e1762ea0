"""Keep the schedule run history bounded: fire times older than the retention are deleted, a few at a time.

A schedule that fires every minute records half a million runs a year. A periodic pass (the Celery task
``control.prune_schedule_runs``, hourly) deletes the runs of every schedule whose fire time is older than
``SCHEDULE_RUN_RETENTION_DAYS``, but keeps, whatever their age, each schedule's latest ``RECENT_RUNS`` (what
``GET /api/v1/schedules/{id}`` shows) and every fired run still waiting for its job (the scheduler completes
those). Old rows are no longer needed to fire each time once: ``next_run_at`` only moves forward.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy import delete, or_, select

from app.columns import utcnow
from app.extensions import db
from app.schedules.models import RunState, Schedule, ScheduleRun
from app.schedules.service import RECENT_RUNS

log = logging.getLogger(__name__)

DELETE_BATCH = 500  # runs deleted per transaction (short write locks)
MAX_PER_PASS = 20000  # runs deleted per pass at most; the next pass goes on


def prune_runs(*, now: datetime | None = None, kept: int = RECENT_RUNS) -> int:
    """Delete the runs past the retention (see the module); return how many were deleted (0: retention is off)."""
    days = current_app.config["SCHEDULE_RUN_RETENTION_DAYS"]
    if days <= 0:
        return 0
    cutoff = (now or utcnow()) - timedelta(days=days)
    deleted = 0
    for schedule_id in db.session.scalars(select(Schedule.id).order_by(Schedule.id)).all():
        deleted += _prune_schedule(schedule_id, cutoff, kept, MAX_PER_PASS - deleted)
        if deleted >= MAX_PER_PASS:
            break
    if deleted:
        log.info("deleted %d schedule runs older than %d days", deleted, days)
    return deleted


def _prune_schedule(schedule_id: str, cutoff: datetime, kept: int, budget: int) -> int:
    """Delete up to ``budget`` runs of one schedule from before ``cutoff`` and before its latest ``kept``."""
    newest_kept = db.session.scalar(
        select(ScheduleRun.scheduled_for)
        .where(ScheduleRun.schedule_id == schedule_id)
        .order_by(ScheduleRun.scheduled_for.desc())
        .offset(kept - 1)
        .limit(1)
    )
    db.session.rollback()  # end the read; each batch below is a transaction of its own
    if newest_kept is None:  # fewer runs than are always kept
        return 0
    before = min(cutoff, newest_kept)
    deleted = 0
    while deleted < budget:
        ids = db.session.scalars(
            select(ScheduleRun.id)
            .where(
                ScheduleRun.schedule_id == schedule_id,
                ScheduleRun.scheduled_for < before,
                or_(ScheduleRun.state != RunState.FIRED.value, ScheduleRun.job_id.is_not(None)),
            )
            .order_by(ScheduleRun.scheduled_for)
            .limit(min(DELETE_BATCH, budget - deleted))
        ).all()
        if not ids:
            break
        db.session.execute(
            delete(ScheduleRun).where(ScheduleRun.id.in_(ids)).execution_options(synchronize_session=False)
        )
        db.session.commit()
        deleted += len(ids)
    return deleted
