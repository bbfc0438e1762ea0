"""Job log services: store an agent's lines within the job's bounds, read them back, forward them after commit."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from flask import current_app
from pydantic import ValidationError
from sqlalchemy import LargeBinary, bindparam, case, cast, func, insert, select
from sqlalchemy.orm import Session

from app.api import describe_errors
from app.columns import utcnow
from app.errors import BadRequest
from app.extensions import db
from app.jobs.models import Job
from app.logs.models import JobLogLine
from app.logs.schemas import LogLineIn
from app.rows import insert_rows
from app.schemas import BIGGEST
from dispatch.logsink import LogSink

SINK = "logsink"  # app.extensions key of the Quickwit forwarder (only when QUICKWIT_URL is set)
PENDING = "automation.logs.pending"  # session.info key: (sink, documents) to forward if the transaction commits
LINE_CUT = " [… line cut: {dropped} more bytes]"
MARKER = "[log truncated: {dropped} more lines dropped; limit {lines} lines / {size} bytes per job]"
UNCOUNTED = "[log truncated: later lines are dropped; limit {lines} lines / {size} bytes per job]"  # none counted yet
# An agent's own truncation lines (workers/logship.py): its notice when it starts dropping an attempt's lines, and at
# the end its count of them. Over the job's bound they are not log lines but counts for the job's marker.
AGENT_TRUNCATED = re.compile(
    r"\[log truncated on the agent: (?:later lines are dropped; limit \d+ lines / \d+ bytes per job"
    r"|(\d{1,9}) lines dropped in all)\]"  # a count the job's marker column holds, added up a few times
)
INVALID_LINES = "invalid log lines: {message}"
# Built once (and their cache keys with them): an append runs with every final state report.
_LOCK_JOB = select(Job.id).where(Job.id == bindparam("job_id")).with_for_update()
_TOTALS = select(
    func.count(),
    func.coalesce(func.sum(func.length(cast(JobLogLine.message, LargeBinary))), 0),
    func.coalesce(func.max(JobLogLine.seq), 0),
    func.max(case((JobLogLine.dropped.is_not(None), JobLogLine.id))),
).where(JobLogLine.job_id == bindparam("job_id"))
_INSERT = insert(JobLogLine)
Line = TypeVar("Line")
DOCUMENT_FIELDS = ("ts", "tenant_id", "project_id", "job_id", "attempt", "seq", "task", "level", "message")


def cut_line(message: str, limit: int) -> str:
    """Return ``message`` as valid UTF-8 of at most ``limit`` bytes, its end replaced by a marker if cut."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return data.decode("utf-8")
    dropped = len(data) - limit
    suffix = LINE_CUT.format(dropped=dropped)
    keep = max(0, limit - len(suffix.encode()))
    return data[:keep].decode("utf-8", "ignore") + suffix


def _parse(lines: Iterable[LogLineIn | Mapping[str, Any]]) -> list[LogLineIn]:
    try:
        return [line if isinstance(line, LogLineIn) else LogLineIn.model_validate(line, strict=False) for line in lines]
    except ValidationError as exc:
        details = describe_errors(exc)
        raise BadRequest(
            INVALID_LINES.format(message="; ".join(f"{d['field']}: {d['message']}" for d in details)),
            details=details,
        ) from None


def unseen(received: int, first: int | None, lines: Sequence[Line]) -> tuple[Sequence[Line], int]:
    """The lines of a batch not received before, and the attempt's new count of lines received.

    An agent numbers its lines within an attempt from 1 and sends the number of a batch's first line; a batch
    sent again after its answer was lost starts at or before the count, and only the lines after it are new.
    Without a number (an agent that does not send one) every line is new.
    """
    if first is None:
        return lines, received + len(lines)
    skip = max(0, received - (first - 1))
    return lines[skip:], max(received, first - 1 + len(lines))


def _marker_text(dropped: int) -> str:
    config = current_app.config
    text = MARKER if dropped else UNCOUNTED
    return text.format(dropped=dropped, lines=config["LOG_MAX_LINES_PER_JOB"], size=config["LOG_MAX_BYTES_PER_JOB"])


def _dropped(lines: Sequence[LogLineIn]) -> int:
    """How many lines of the job ``lines`` stand for, once the job is over its bound: each line one, but an agent's
    truncation lines, which count the lines the agent dropped (its notice none, its count at the end what it says).
    Counted as one line each, the two lines of an agent that kept the same bound made the marker say "2 more lines
    dropped" however many the agent had dropped."""
    total = 0
    for line in lines:
        found = AGENT_TRUNCATED.fullmatch(line.message) if line.task is None else None
        total += 1 if found is None else int(found.group(1) or 0)
    return min(total, BIGGEST)


def _marker(job_id: str) -> JobLogLine | None:
    return db.session.scalar(select(JobLogLine).where(JobLogLine.job_id == job_id, JobLogLine.dropped.is_not(None)))


def append_lines(
    job: Job, attempt: int, lines: Sequence[LogLineIn | Mapping[str, Any]], *, job_locked: bool = False
) -> int:
    """Add ``lines`` of ``attempt`` to the job's log in the current transaction (the caller commits).

    Lines are numbered after the job's last one. A line longer than LOG_LINE_MAX_BYTES is cut with a visible
    marker; once the job holds LOG_MAX_LINES_PER_JOB lines or LOG_MAX_BYTES_PER_JOB bytes, one truncation
    marker line is stored and every later line is only counted on it (an agent's own truncation lines by the count
    they give, see ``_dropped``). Returns how many of ``lines`` were stored. When Quickwit is configured, the
    stored lines are forwarded after the commit (never on rollback).
    ``job_locked``: the transaction already wrote the job's row (which serializes appends as its lock does).

    Raises:
        BadRequest: a line is malformed (nothing is added).
    """
    parsed = _parse(lines)
    if not parsed:
        return 0
    config = current_app.config
    if not job_locked:  # serialize the appends of one job (a row lock on MariaDB; SQLite has a single writer)
        db.session.connection().execute(_LOCK_JOB, {"job_id": job.id})
    count, size, last, marker_id = db.session.connection().execute(_TOTALS, {"job_id": job.id}).one()
    if marker_id is not None:
        marker = db.session.get(JobLogLine, marker_id)
        assert marker is not None
        marker.dropped = min((marker.dropped or 0) + _dropped(parsed), BIGGEST)  # an INTEGER column
        marker.message = _marker_text(marker.dropped)
        return 0
    now = utcnow()
    stored: list[dict[str, Any]] = []
    for index, line in enumerate(parsed):
        message = cut_line(line.message, config["LOG_LINE_MAX_BYTES"])
        length = len(message.encode())
        if count + 1 > config["LOG_MAX_LINES_PER_JOB"] or size + length > config["LOG_MAX_BYTES_PER_JOB"]:
            dropped = _dropped(parsed[index:])
            stored.append(_row(job, attempt, last + 1, now, None, "warning", _marker_text(dropped), now, dropped))
            break
        last, count, size = last + 1, count + 1, size + length
        stored.append(_row(job, attempt, last, line.ts, line.task, line.level, message, now))
    insert_rows(db.session, _INSERT, stored)  # one statement, no unit of work
    _forward_after_commit(db.session(), stored)
    return sum(1 for row in stored if row["dropped"] is None)


def _row(
    job: Job,
    attempt: int,
    seq: int,
    ts: datetime,
    task: str | None,
    level: str,
    message: str,
    now: datetime,
    dropped: int | None = None,
) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "tenant_id": job.tenant_id,
        "project_id": job.project_id,
        "attempt": attempt,
        "seq": seq,
        "ts": ts,
        "task": task,
        "level": level,
        "message": message,
        "dropped": dropped,
        "created_at": now,
    }


def read_lines(job: Job, after: int, limit: int) -> tuple[list[JobLogLine], bool]:
    """Return up to ``limit`` lines of the job after cursor ``after``, and whether more follow them."""
    rows = db.session.scalars(
        select(JobLogLine)
        .where(JobLogLine.job_id == job.id, JobLogLine.seq > after)
        .order_by(JobLogLine.seq)
        .limit(limit + 1)
    ).all()
    return list(rows[:limit]), len(rows) > limit


def is_truncated(job: Job) -> bool:
    """Tell whether the job reached its log bound (it has the truncation marker)."""
    return (
        db.session.scalar(
            select(JobLogLine.id).where(JobLogLine.job_id == job.id, JobLogLine.dropped.is_not(None)).limit(1)
        )
        is not None
    )


def document(row: JobLogLine | Mapping[str, Any]) -> dict[str, Any]:
    """Return the Quickwit document of a stored line (the fields of deploy/quickwit/automation-logs.yaml)."""
    line = row if isinstance(row, Mapping) else {name: getattr(row, name) for name in DOCUMENT_FIELDS}
    return {
        "timestamp": line["ts"].isoformat().replace("+00:00", "Z"),
        **{name: line[name] for name in DOCUMENT_FIELDS if name != "ts"},
    }


def _forward_after_commit(session: Session, rows: list[dict[str, Any]]) -> None:
    sink: LogSink | None = current_app.extensions.get(SINK)
    if sink is not None and rows:
        session.info.setdefault(PENDING, []).append((sink, [document(row) for row in rows]))


def forward(session: Session) -> None:
    """After a commit: hand the lines it stored to their Quickwit forwarder."""
    for sink, documents in session.info.pop(PENDING, []):
        sink.submit(documents)  # never raises, never blocks: a bounded queue and a background thread


def discard(session: Session) -> None:
    """After a rollback: forget the lines it would have stored."""
    session.info.pop(PENDING, None)
