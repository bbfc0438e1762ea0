"""Fire due schedules: record every fire time once, submit a job for the one that fires, publish it.

A pass (the periodic task ``control.fire_schedules``, any number of schedulers at once) takes each schedule
whose ``next_run_at`` has come and, in one transaction, inserts a ``schedule_runs`` row per fire time and
moves ``next_run_at`` on. The row is unique per (schedule, fire time): of two schedulers only the one whose
insert commits goes on, the other's transaction fails and changes nothing. The winner then submits the job
through the same service as ``POST /api/v1/jobs`` (with an idempotency key made of the schedule and the fire
time), links it to its run and publishes it. A fired run left without a job (a crash between the two) is
completed by the next pass of any scheduler; the key makes that safe to do twice.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from flask import current_app
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from app.auth.tokens import Principal
from app.columns import utcnow
from app.errors import AppError
from app.extensions import db
from app.jobs import dispatching, submission
from app.jobs.models import Job
from app.jobs.schemas import JobSubmit
from app.jobs.states import ACTIVE_STATES
from app.schedules import cron
from app.schedules.models import Overlap, RunState, Schedule, ScheduleRun
from dispatch.logs import job_fields

log = logging.getLogger(__name__)

BATCH = 100
CLAIM_GRACE = 10.0  # seconds after which any scheduler completes a fired run that has no job yet
ACTOR = "scheduler"
SUPERSEDED = "missed: a later fire time had come by the time the scheduler ran; only the latest one fires"
LATE = "missed: the scheduler ran {late:.0f}s after this time, later than the misfire grace of {grace:g}s"
TRUNCATED = "; so was every fire time from here to {until} (only the latest {kept} are recorded one by one)"
STILL_ACTIVE = "skipped: the previous run (job {job_id}) is still {state}"
STILL_SUBMITTING = "skipped: the previous run is still being submitted"
REFUSED = "skipped: the job was refused: {message}"


def idempotency_key(schedule_id: str, scheduled_for: datetime) -> str:
    """The Idempotency-Key of the job of one fire time."""
    return f"schedule:{schedule_id}:{scheduled_for.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def subject(schedule_id: str) -> str:
    """Who submits a schedule's jobs (their ``created_by`` and audit actor)."""
    return f"schedule:{schedule_id}"


def fire_due(*, now: datetime | None = None) -> int:
    """Fire every schedule whose time has come (and finish stranded runs); return how many jobs were submitted."""
    now = now or utcnow()
    submitted = finish_claimed(now=now)
    due = db.session.scalars(
        select(Schedule.id)
        .where(Schedule.paused.is_(False), Schedule.next_run_at <= now)
        .order_by(Schedule.next_run_at)
        .limit(BATCH)
    ).all()
    for schedule_id in due:
        try:
            submitted += fire_schedule(schedule_id=schedule_id, now=now)
        except Exception:  # a deadlock, a lost connection: one schedule must not stop the others
            db.session.rollback()
            log.exception("could not fire schedule %s; the next pass tries again", schedule_id)
    return submitted


def fire_schedule(*, schedule_id: str, now: datetime) -> int:
    """Record the fire times of one due schedule and submit its job; 1 if this call submitted it, else 0."""
    schedule = db.session.get(Schedule, schedule_id, populate_existing=True)
    if schedule is None or schedule.paused or schedule.next_run_at is None or schedule.next_run_at > now:
        return 0
    grace = current_app.config["SCHEDULE_MISFIRE_GRACE"]
    decided = cron.plan(schedule.cron, schedule.timezone, next_run_at=schedule.next_run_at, now=now, grace=grace)
    runs = [_missed(schedule, moment, now, grace, decided) for moment in decided.missed]
    due = None
    if decided.due is not None:
        state, reason = _overlap(schedule)
        due = ScheduleRun(schedule_id=schedule.id, scheduled_for=decided.due, state=state, reason=reason)
        runs.append(due)
    try:
        # Moving next_run_at first takes the schedule's row lock, so a second scheduler waits here and then
        # finds nothing to do; the unique (schedule_id, scheduled_for) rows are the guarantee behind it.
        moved = db.session.execute(
            update(Schedule)
            .where(
                Schedule.id == schedule.id,
                Schedule.next_run_at == schedule.next_run_at,
                Schedule.paused.is_(False),
            )
            .values(next_run_at=decided.following)
            .execution_options(synchronize_session=False)
        )
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            db.session.rollback()
            log.debug("schedule %s was fired by another scheduler, or changed, meanwhile", schedule_id)
            return 0
        db.session.add_all(runs)
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        log.info("schedule %s: another scheduler recorded its fire time first", schedule_id)
        return 0
    if due is None or due.state != RunState.FIRED.value:
        return 0
    return submit_run(schedule=schedule, run=due)


def _missed(schedule: Schedule, moment: datetime, now: datetime, grace: float, decided: cron.Plan) -> ScheduleRun:
    late = (now - moment).total_seconds()
    superseded = moment != decided.missed[-1] or decided.due is not None
    reason = SUPERSEDED if superseded and late <= grace else LATE.format(late=late, grace=grace)
    if decided.truncated and moment == decided.missed[0]:
        reason += TRUNCATED.format(until=decided.missed[1].isoformat(), kept=cron.MISSED_RECORDED)
    return ScheduleRun(schedule_id=schedule.id, scheduled_for=moment, state=RunState.MISSED.value, reason=reason)


def _overlap(schedule: Schedule) -> tuple[str, str | None]:
    """Decide whether the due fire time fires, by the schedule's overlap policy."""
    if schedule.overlap == Overlap.ALLOW.value:
        return RunState.FIRED.value, None
    active = db.session.execute(
        select(Job.id, Job.state)
        .where(Job.schedule_id == schedule.id, Job.state.in_([s.value for s in ACTIVE_STATES]))
        .limit(1)
    ).first()
    if active is not None:
        return RunState.SKIPPED.value, STILL_ACTIVE.format(job_id=active.id, state=active.state)
    submitting = db.session.scalar(
        select(ScheduleRun.id)
        .where(
            ScheduleRun.schedule_id == schedule.id,
            ScheduleRun.state == RunState.FIRED.value,
            ScheduleRun.job_id.is_(None),
        )
        .limit(1)
    )
    if submitting is not None:
        return RunState.SKIPPED.value, STILL_SUBMITTING
    return RunState.FIRED.value, None


def submit_run(*, schedule: Schedule, run: ScheduleRun) -> int:
    """Submit (or find) the job of a fired run, link the two, and publish the job; 1 when linked, else 0."""
    key = idempotency_key(schedule.id, run.scheduled_for)
    job = db.session.scalar(
        select(Job).where(
            Job.tenant_id == schedule.tenant_id,
            Job.project_id == schedule.project_id,
            Job.idempotency_key == key,
            Job.created_by == subject(schedule.id),
        )
    )
    if job is None:
        caller = Principal(
            subject=subject(schedule.id), tenant_id=schedule.tenant_id, role=ACTOR, project_id=schedule.project_id
        )
        data = JobSubmit(
            workflow=schedule.workflow,
            project_id=schedule.project_id,
            agent_id=schedule.agent_id,
            variables=dict(schedule.variables or {}),
            priority=schedule.priority,
            platform=schedule.platform,
            max_attempts=None,
            retry_backoff=None,
        )
        try:
            job, _ = submission.submit_job(caller=caller, data=data, idempotency_key=key)
        except AppError as exc:  # the workflow, the agent or the platform is no longer acceptable
            db.session.rollback()
            _refused(run, exc.message)
            return 0
    db.session.execute(
        update(ScheduleRun)
        .where(ScheduleRun.id == run.id, ScheduleRun.job_id.is_(None))
        .values(job_id=job.id)
        .execution_options(synchronize_session=False)
    )
    db.session.execute(
        update(Job).where(Job.id == job.id).values(schedule_id=schedule.id).execution_options(synchronize_session=False)
    )
    db.session.commit()
    log.info(
        "schedule %s fired for %s: job %s",
        schedule.id,
        run.scheduled_for.isoformat(),
        job.id,
        extra=job_fields(job.id, job.tenant_id),  # the scheduler runs no job of its own
    )
    dispatching.deliver(job, actor=ACTOR)  # committed first; if this fails, the sweeper sends it
    return 1


def _refused(run: ScheduleRun, message: str) -> None:
    log.warning("schedule %s: the job of %s was refused: %s", run.schedule_id, run.scheduled_for, message)
    db.session.execute(
        update(ScheduleRun)
        .where(ScheduleRun.id == run.id, ScheduleRun.job_id.is_(None), ScheduleRun.state == RunState.FIRED.value)
        .values(state=RunState.SKIPPED.value, reason=REFUSED.format(message=message))
        .execution_options(synchronize_session=False)
    )
    db.session.commit()


def finish_claimed(*, now: datetime) -> int:
    """Submit the job of every fired run left without one for ``CLAIM_GRACE`` seconds (a scheduler crashed)."""
    before = now - timedelta(seconds=CLAIM_GRACE)
    stranded = db.session.execute(
        select(ScheduleRun, Schedule)
        .join(Schedule, Schedule.id == ScheduleRun.schedule_id)
        .where(
            ScheduleRun.state == RunState.FIRED.value,
            ScheduleRun.job_id.is_(None),
            ScheduleRun.created_at <= before,
        )
        .limit(BATCH)
    ).all()
    submitted = 0
    for run, schedule in stranded:
        log.warning("schedule %s: the run of %s has no job; submitting it now", schedule.id, run.scheduled_for)
        submitted += submit_run(schedule=schedule, run=run)
    return submitted
