"""The job life cycle of DESIGN.md, in one place: states, legal transitions, and the atomic move."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import inspect

from app.columns import utcnow
from app.errors import Conflict
from app.extensions import db
from app.jobs.models import Job, JobAttempt, JobEvent
from app.realtime.events import note_state
from app.rows import insert_row, update_fenced

T = TypeVar("T")

FINISHED_JOBS = "automation.metrics.finished_jobs"  # session.info: (state, seconds run) of jobs ended meanwhile
INVALID_TRANSITION = "job {job_id} is {current}; it cannot become {target}"
CHANGED_MEANWHILE = "job {job_id} changed while the request was handled; read it again"


class JobState(StrEnum):
    """Where a job is in its life cycle."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    DEAD_LETTER = "dead_letter"


class AttemptState(StrEnum):
    """Where one delivery of a job is; ``lost`` means its lease expired."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    LOST = "lost"
    DEAD_LETTER = "dead_letter"


J = JobState
A = AttemptState

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    J.PENDING: frozenset({J.QUEUED, J.CANCELLED, J.DEAD_LETTER}),
    J.QUEUED: frozenset({J.RUNNING, J.CANCELLED, J.DEAD_LETTER}),
    # running -> queued is the next attempt after a lost one; -> dead_letter when attempts are exhausted.
    J.RUNNING: frozenset({J.COMPLETED, J.FAILED, J.TIMED_OUT, J.CANCELLED, J.QUEUED, J.DEAD_LETTER}),
    J.COMPLETED: frozenset(),
    J.FAILED: frozenset(),
    J.TIMED_OUT: frozenset(),
    J.CANCELLED: frozenset(),
    J.DEAD_LETTER: frozenset({J.QUEUED}),  # requeued by an operator: a new attempt
}

ATTEMPT_TRANSITIONS: dict[AttemptState, frozenset[AttemptState]] = {
    A.QUEUED: frozenset({A.RUNNING, A.CANCELLED, A.DEAD_LETTER}),
    A.RUNNING: frozenset({A.COMPLETED, A.FAILED, A.TIMED_OUT, A.CANCELLED, A.LOST}),
    A.COMPLETED: frozenset(),
    A.FAILED: frozenset(),
    A.TIMED_OUT: frozenset(),
    A.CANCELLED: frozenset(),
    A.LOST: frozenset(),
    A.DEAD_LETTER: frozenset(),
}

FINAL_STATES = frozenset({J.COMPLETED, J.FAILED, J.TIMED_OUT, J.CANCELLED, J.DEAD_LETTER})
ACTIVE_STATES = frozenset(JobState) - FINAL_STATES
NOT_STARTED = frozenset({J.PENDING, J.QUEUED})
REPORTABLE = frozenset({J.COMPLETED, J.FAILED, J.TIMED_OUT, J.CANCELLED})


def can_transition(current: str, target: str) -> bool:
    """Tell whether a job may move from ``current`` to ``target``."""
    return JobState(target) in JOB_TRANSITIONS[JobState(current)]


def transition(
    job: Job,
    target: JobState,
    *,
    reason: str | None = None,
    actor: str | None = None,
    guards: dict[str, Any] | None = None,
    **values: Any,
) -> None:
    """Move ``job`` to ``target`` atomically, or raise Conflict (409) if that is illegal or lost a race.

    The row is updated only if it still has the state and attempt it was read with (and the columns named in
    ``guards`` still hold those values), so two concurrent requests can never both win. Records a JobEvent and
    notes the live event.
    """
    current = JobState(job.state)
    if target not in JOB_TRANSITIONS[current]:
        raise Conflict(
            INVALID_TRANSITION.format(job_id=job.id, current=current.value, target=target.value),
            code="invalid_transition",
            state=current.value,
        )
    now = utcnow()
    values = {"state": target.value, "updated_at": now, **values}
    # A stored job is moved with two plain statements on the session's connection (the ORM's bulk-update and
    # unit-of-work machinery cost more than the statements themselves on the hot path of every job); one
    # born in this transaction is not written yet, so its own INSERT carries the new state and its event.
    if inspect(job).pending:
        for key, value in values.items():
            setattr(job, key, value)
        db.session.add(JobEvent(**_event(job, current, target, reason, actor, now)))
    else:
        fence = {"state": current.value, "attempt": job.attempt, **(guards or {})}
        if not update_fenced(db.session, job, values, fence):
            raise Conflict(CHANGED_MEANWHILE.format(job_id=job.id), code="concurrent_update")
        insert_row(db.session, JobEvent, _event(job, current, target, reason, actor, now))
    note_state(job)  # the live event, published when the transaction commits
    if target in FINAL_STATES and job.started_at is not None:  # observed by /metrics when this commits
        seconds = max(0.0, (now - job.started_at).total_seconds())
        db.session.info.setdefault(FINISHED_JOBS, []).append((target.value, seconds))


def _event(
    job: Job, current: JobState, target: JobState, reason: str | None, actor: str | None, now: datetime
) -> dict[str, Any]:
    """The JobEvent row of a move, once the job carries its new attempt number."""
    return {
        "job_id": job.id,
        "tenant_id": job.tenant_id,
        "attempt": job.attempt,
        "from_state": current.value,
        "to_state": target.value,
        "reason": reason,
        "actor": actor,
        "created_at": now,
    }


def transition_attempt(
    attempt: JobAttempt, target: AttemptState, *, guards: Mapping[str, Any] | None = None, **values: Any
) -> None:
    """Move an attempt to ``target``, or raise Conflict (409) when its state does not allow it, or when its row no
    longer has the state it was read with (or the values of ``guards``)."""
    current = AttemptState(attempt.state)
    if target not in ATTEMPT_TRANSITIONS[current]:
        raise Conflict(
            f"attempt {attempt.number} of job {attempt.job_id} is {current.value}; it cannot become {target.value}",
            code="invalid_transition",
            state=current.value,
        )
    values = {"state": target.value, **values}
    if inspect(attempt).persistent:  # written now, fenced by the state it was read with
        if not update_fenced(db.session, attempt, values, {"state": current.value, **(guards or {})}):
            raise Conflict(
                f"attempt {attempt.number} of job {attempt.job_id} changed while the request was handled",
                code="concurrent_update",
            )
        return
    for key, value in values.items():
        setattr(attempt, key, value)


def again_if_overtaken(action: Callable[[], T]) -> T:
    """Run ``action``; when its write lost a race (409 ``concurrent_update``: the row changed after it was read),
    roll back and run it once more, so that it is decided on the state committed meanwhile."""
    try:
        return action()
    except Conflict as exc:
        if exc.code != "concurrent_update":
            raise
        db.session.rollback()
    return action()
