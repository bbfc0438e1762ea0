"""The logs blueprint: agents ship lines, readers page or follow a job's log, and search their tenant's."""

from __future__ import annotations

import time

from flask import Blueprint, Flask, Response
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from app.api import ERR_READ, ERR_WRITE, READERS, body, document, query, reply
from app.auth.guard import principal, require
from app.config import ConfigError
from app.extensions import db
from app.jobs.models import Job
from app.jobs.service import get_job
from app.jobs.states import FINAL_STATES
from app.logs import search, service, shipping
from app.logs.schemas import (
    LogBatch,
    LogBatchOut,
    LogLineOut,
    LogPage,
    LogQuery,
    LogSearchQuery,
    LogSearchResult,
)
from dispatch.logsink import LogSink

bp = Blueprint("logs", __name__, url_prefix="/api/v1")

POLL_INTERVAL = 0.5  # seconds between two looks at the database while a follow request waits
MAX_LINE_BYTES = 65535  # MariaDB's TEXT
LINE_LIMIT = f"LOG_LINE_MAX_BYTES must be between 256 and {MAX_LINE_BYTES}"


@bp.post("/jobs/<job_id>/logs")
@document(
    "Ship log lines of the current attempt (agents; bounded per job with a truncation marker)",
    body=LogBatch,
    responses={200: LogBatchOut},
    errors={**ERR_WRITE, 409: ("stale_attempt", "concurrent_update")},
)
@require("agent", action="ship job logs")
def ship(job_id: str) -> Response:
    """Store a batch of lines."""
    data = body(LogBatch)
    stored, dropped, repeated = shipping.receive_lines(
        caller=principal(), job_id=job_id, attempt=data.attempt, lines=data.lines, first=data.first_line
    )
    return reply(LogBatchOut(job_id=job_id, accepted=stored, dropped=dropped, repeated=repeated))


def _state(job_id: str) -> str | None:
    return db.session.scalar(select(Job.state).where(Job.id == job_id))


@bp.get("/jobs/<job_id>/logs")
@document(
    "Read a job's log after a cursor; follow=true waits up to `wait` seconds for new lines or the job's end",
    query=LogQuery,
    responses={200: LogPage},
    errors={**ERR_READ, 400: ("invalid_request",)},
)
@require(*READERS, action="read job logs")
def read(job_id: str) -> Response:
    """Page through, or follow, a job's log."""
    params = query(LogQuery)
    job = get_job(caller=principal(), job_id=job_id)
    deadline = time.monotonic() + params.wait
    state: str | None = job.state
    while True:
        final = state is None or state in FINAL_STATES  # read before the lines: a final job has all of them
        rows, more = service.read_lines(job, params.after, params.limit)
        if rows or final or not params.follow or time.monotonic() >= deadline:
            break
        db.session.commit()  # end the read transaction (keeping `job` loaded): the next look sees new commits
        time.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
        state = _state(job.id)
    page = LogPage(
        job_id=job.id,
        lines=[
            LogLineOut(seq=r.seq, ts=r.ts, attempt=r.attempt, task=r.task, level=r.level, message=r.message)
            for r in rows
        ],
        next=rows[-1].seq if rows else params.after,
        finished=final and not more,
        truncated=service.is_truncated(job),
    )
    return reply(page)


@bp.get("/logs")
@document(
    "Search the tenant's job logs (Quickwit when configured, else the database), newest first",
    query=LogSearchQuery,
    responses={200: LogSearchResult},
    errors={**ERR_READ, 400: ("invalid_request", "invalid_query"), 503: ("search_unavailable", "database_unavailable")},
)
@require(*READERS, action="search logs")
def search_logs() -> Response:
    """Search log lines."""
    return reply(search.search_logs(caller=principal(), params=query(LogSearchQuery)))


def init_logs(app: Flask) -> None:
    """Check the log settings, serve the logs API, and forward committed lines to Quickwit when it is configured."""
    if not 256 <= app.config["LOG_LINE_MAX_BYTES"] <= MAX_LINE_BYTES:
        raise ConfigError(LINE_LIMIT)
    if app.config["QUICKWIT_URL"]:
        app.extensions[service.SINK] = LogSink(
            app.config["QUICKWIT_URL"], app.config["QUICKWIT_INDEX"], timeout=app.config["QUICKWIT_TIMEOUT"]
        )
    for name, hook in (("after_commit", service.forward), ("after_rollback", service.discard)):
        if not event.contains(Session, name, hook):
            event.listen(Session, name, hook)
    app.register_blueprint(bp)
