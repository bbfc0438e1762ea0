"""The agents' side of job logs: a batch of lines fenced by the attempt, like task results.

Kept apart from ``app.logs.service`` so that ``app.jobs.fencing`` can import ``append_lines`` (for the lines of
the final status report) without a cycle.
"""

from __future__ import annotations

from flask import current_app

from app.auth.tokens import Principal
from app.errors import Conflict, PayloadTooLarge
from app.extensions import db
from app.jobs.fencing import ATTEMPT_OVER, fenced
from app.jobs.states import AttemptState
from app.logs.schemas import LogLineIn
from app.logs.service import append_lines, unseen
from app.rows import update_fenced

CHANGED = "attempt {attempt} of job {job_id} received other log lines while this batch was handled"
TOO_MANY_LINES = "a batch may hold at most {limit} lines (LOG_BATCH_MAX_LINES); send more batches"


def receive_lines(
    *, caller: Principal, job_id: str, attempt: int, lines: list[LogLineIn], first: int | None = None
) -> tuple[int, int, int]:
    """Store a batch an agent sent for its current, running attempt; return (stored, dropped, repeated), commit.

    ``first`` numbers the batch's first line within the attempt: lines received before (a batch sent again
    after a lost answer) are counted as ``repeated`` and not stored again.

    Raises:
        NotFound: another tenant's (or project's) job.
        Forbidden: the attempt belongs to another agent.
        Conflict: the attempt is not the job's current one, or it is over (``stale_attempt``), or another
            request of the attempt changed its count of lines meanwhile (``concurrent_update``).
        PayloadTooLarge: more lines than LOG_BATCH_MAX_LINES.
    """
    job, row = fenced(caller, job_id, attempt)
    if row.state != AttemptState.RUNNING.value:
        raise Conflict(
            ATTEMPT_OVER.format(attempt=row.number, job_id=job.id, state=row.state),
            code="stale_attempt",
            state=row.state,
        )
    limit = current_app.config["LOG_BATCH_MAX_LINES"]
    if len(lines) > limit:
        raise PayloadTooLarge(TOO_MANY_LINES.format(limit=limit))
    fresh, received = unseen(row.log_lines, first, lines)
    if received != row.log_lines and not update_fenced(
        db.session, row, {"log_lines": received}, {"log_lines": row.log_lines}
    ):
        raise Conflict(CHANGED.format(attempt=attempt, job_id=job.id), code="concurrent_update")
    stored = append_lines(job, attempt, fresh) if fresh else 0
    db.session.commit()
    return stored, len(fresh) - stored, len(lines) - len(fresh)
