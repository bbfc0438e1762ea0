"""The control plane's periodic Celery tasks, sent by name from the beat schedule of dispatch/celery.py."""

from __future__ import annotations

from celery import shared_task

from app.jobs import dispatching
from app.jobs import retention as job_retention
from app.schedules import firing
from app.schedules import retention as schedule_retention
from dispatch.celery import FIRE_SCHEDULES_TASK, PRUNE_JOBS_TASK, PRUNE_SCHEDULE_RUNS_TASK, REAP_TASK, SWEEP_TASK


@shared_task(name=REAP_TASK)
def reap_leases() -> int:
    """Turn running attempts whose lease expired into ``lost``; retry or fail their jobs."""
    return dispatching.reap()


@shared_task(name=SWEEP_TASK)
def sweep_pending() -> int:
    """Publish due jobs and attempts whose publish never happened."""
    return dispatching.sweep()


@shared_task(name=FIRE_SCHEDULES_TASK)
def fire_schedules() -> int:
    """Turn recurring schedules whose time has come into jobs; record missed and skipped fire times."""
    return firing.fire_due()


@shared_task(name=PRUNE_SCHEDULE_RUNS_TASK)
def prune_schedule_runs() -> int:
    """Delete schedule runs older than ``SCHEDULE_RUN_RETENTION_DAYS`` (each schedule's latest ones stay)."""
    return schedule_retention.prune_runs()


@shared_task(name=PRUNE_JOBS_TASK)
def prune_jobs() -> int:
    """Delete jobs that finished more than ``JOB_RETENTION_DAYS`` ago (none when it is 0, the default)."""
    return job_retention.prune_jobs()
