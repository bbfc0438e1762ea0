"""Keep the job history bounded, when the operator asks: finished jobs older than the retention are deleted.

With ``JOB_RETENTION_DAYS`` set (default 0: every job is kept), a periodic pass (the Celery task
``control.prune_jobs``, hourly) deletes the jobs that finished before the cutoff, state by state and the oldest
first, with their
attempts, task results, state changes and log lines, and at most ``MAX_PER_PASS`` jobs per pass. Transactions
stay short: a job can hold thousands of log lines, so those go first, ``LINES_BATCH`` at a time, then the jobs,
``DELETE_BATCH`` at a time (the rest by the database's ``ON DELETE CASCADE``).

Never deleted: a job that has not finished, however old, and a dead-lettered job, which waits for a person to
requeue or delete it. Each transaction that deletes jobs adds, per tenant, one ``job.pruned`` audit record with
how many went and the cutoff: the audit log itself is kept whole (its hash chain), and still tells who submitted
each job.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from itertools import groupby
from typing import Any

from flask import current_app
from sqlalchemy import ColumnElement, delete, select

from app.audit import service as audit
from app.columns import utcnow
from app.extensions import db
from app.jobs.models import Job
from app.jobs.states import FINAL_STATES, JobState
from app.logs.models import JobLogLine

log = logging.getLogger(__name__)

DELETE_BATCH = 50  # jobs deleted per transaction, with their attempts, results and state changes
LINES_BATCH = 5000  # log lines deleted per transaction, before their jobs
MAX_PER_PASS = 20000  # jobs deleted per pass at most; the next pass goes on
PRUNED = sorted(state.value for state in FINAL_STATES - {JobState.DEAD_LETTER})


def _prunable(cutoff: datetime) -> ColumnElement[bool]:
    """Jobs the retention may delete: finished (not dead-lettered) before ``cutoff``; checked again on delete."""
    return (Job.finished_at < cutoff) & Job.state.in_(PRUNED)


def _expired(state: str, cutoff: datetime, limit: int) -> list[Any]:
    """(tenant, job id) of up to ``limit`` jobs in ``state`` that finished before ``cutoff``, the oldest first.

    One state at a time: the index on (state, finished_at) then yields them in order, without a sort.
    """
    query = (
        select(Job.tenant_id, Job.id)
        .where(Job.state == state, Job.finished_at < cutoff)
        .order_by(Job.finished_at)
        .limit(limit)
    )
    return list(db.session.execute(query).all())


def prune_jobs(*, now: datetime | None = None) -> int:
    """Delete the finished jobs past the retention (see the module); how many (0: the retention is off)."""
    days = current_app.config["JOB_RETENTION_DAYS"]
    if days <= 0:
        return 0
    cutoff = (now or utcnow()) - timedelta(days=days)
    deleted = 0
    for state in PRUNED:
        deleted += _prune_state(state, cutoff, days, MAX_PER_PASS - deleted)
    if deleted:
        log.info("deleted %d jobs that finished more than %d days ago", deleted, days)
    return deleted


def _prune_state(state: str, cutoff: datetime, days: int, budget: int) -> int:
    """Delete up to ``budget`` jobs in ``state`` that finished before ``cutoff``; how many."""
    deleted = 0
    while deleted < budget:
        rows = _expired(state, cutoff, min(DELETE_BATCH, budget - deleted))
        db.session.rollback()  # end the read; what follows is transactions of their own
        if not rows:
            break
        ids = [job_id for _tenant, job_id in rows]
        _delete_lines(ids, cutoff)
        for tenant_id, group in groupby(sorted(rows), key=lambda row: row[0]):
            gone = db.session.execute(
                delete(Job)
                .where(Job.id.in_([job_id for _tenant, job_id in group]), _prunable(cutoff))  # requeued: kept
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
            if gone:
                audit.record(
                    action="job.pruned",
                    principal=None,
                    tenant_id=tenant_id,
                    target_type="job",
                    details={
                        "jobs": gone,
                        "finished_before": cutoff.strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "retention_days": days,
                    },
                )
            deleted += gone
        db.session.commit()
    return deleted


def _delete_lines(job_ids: list[str], cutoff: datetime) -> None:
    """Delete the log lines of those of ``job_ids`` that are still prunable, a batch per transaction."""
    still = select(Job.id).where(Job.id.in_(job_ids), _prunable(cutoff))
    while True:
        lines = db.session.scalars(select(JobLogLine.id).where(JobLogLine.job_id.in_(still)).limit(LINES_BATCH)).all()
        if not lines:
            break
        db.session.execute(
            delete(JobLogLine).where(JobLogLine.id.in_(lines)).execution_options(synchronize_session=False)
        )
        db.session.commit()
