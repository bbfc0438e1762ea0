"""``GET /api/v1/logs``: Quickwit's search when QUICKWIT_URL is set, the database otherwise; always one tenant."""

from __future__ import annotations

import logging
from typing import Any, Literal

from flask import current_app
from pydantic import ValidationError
from sqlalchemy import ColumnElement, func, select

from app.auth.guard import check_project
from app.auth.tokens import Principal
from app.errors import ServiceUnavailable
from app.extensions import db
from app.logs import quickwit
from app.logs.models import JobLogLine
from app.logs.schemas import LogHit, LogSearchQuery, LogSearchResult

log = logging.getLogger(__name__)

FOREIGN_HIT = "Quickwit returned a line of tenant %s to a search of tenant %s; it was left out"
BAD_HIT = "Quickwit returned a document that is not a log line: {error}"


def search_logs(*, caller: Principal, params: LogSearchQuery) -> LogSearchResult:
    """Return the caller's tenant's lines that match, newest first (a project-limited token: its project only)."""
    project_id = check_project(caller, params.project_id)
    url = current_app.config["QUICKWIT_URL"]
    backend: Literal["quickwit", "database"]
    if url:
        hits, total = _quickwit(caller, project_id, params, url)
        backend = "quickwit"
    else:
        hits, total = _database(caller, project_id, params)
        backend = "database"
    return LogSearchResult(lines=hits, total=total, limit=params.limit, offset=params.offset, backend=backend)


def _filters(caller: Principal, project_id: str | None, params: LogSearchQuery) -> dict[str, str]:
    filters = {"tenant_id": caller.tenant_id}  # first, and never from the request
    for field, value in (
        ("project_id", project_id),
        ("job_id", params.job_id),
        ("task", params.task),
        ("level", params.level),
    ):
        if value is not None:
            filters[field] = value
    return filters


def _quickwit(caller: Principal, project_id: str | None, params: LogSearchQuery, url: str) -> tuple[list[LogHit], int]:
    config = current_app.config
    documents, total = quickwit.search(
        url=url,
        index=config["QUICKWIT_INDEX"],
        query=quickwit.build_query(filters=_filters(caller, project_id, params), text=params.query),
        since=params.since,
        until=params.until,
        limit=params.limit,
        offset=params.offset,
        timeout=config["QUICKWIT_TIMEOUT"],
    )
    hits = []
    for document in documents:
        owner = document.get("tenant_id") if isinstance(document, dict) else None
        if owner != caller.tenant_id or (project_id is not None and document.get("project_id") != project_id):
            log.warning(FOREIGN_HIT, owner, caller.tenant_id)  # defence in depth: the query already excludes it
            continue
        hits.append(_hit(document))
    return hits, total


def _hit(document: dict[str, Any]) -> LogHit:
    try:
        return LogHit.model_validate({**document, "ts": document.get("timestamp")})
    except ValidationError as exc:
        raise ServiceUnavailable(BAD_HIT.format(error=exc.error_count()), code="search_unavailable") from None


def _like(word: str) -> str:
    escaped = word.lower().replace("/", "//").replace("%", "/%").replace("_", "/_")
    return f"%{escaped}%"


def _database(caller: Principal, project_id: str | None, params: LogSearchQuery) -> tuple[list[LogHit], int]:
    conditions: list[ColumnElement[bool]] = [JobLogLine.tenant_id == caller.tenant_id]
    columns = {"project_id": project_id, "job_id": params.job_id, "task": params.task, "level": params.level}
    for name, value in columns.items():
        if value is not None:
            conditions.append(getattr(JobLogLine, name) == value)
    if params.since is not None:
        conditions.append(JobLogLine.ts >= params.since)
    if params.until is not None:
        conditions.append(JobLogLine.ts < params.until)
    for word in params.query.split():
        conditions.append(func.lower(JobLogLine.message).like(_like(word), escape="/"))
    total = db.session.scalar(select(func.count()).select_from(JobLogLine).where(*conditions)) or 0
    rows = db.session.scalars(
        select(JobLogLine)
        .where(*conditions)
        .order_by(JobLogLine.ts.desc(), JobLogLine.id.desc())
        .limit(params.limit)
        .offset(params.offset)
    ).all()
    hits = [
        LogHit(
            job_id=row.job_id,
            project_id=row.project_id,
            seq=row.seq,
            ts=row.ts,
            attempt=row.attempt,
            task=row.task,
            level=row.level,
            message=row.message,
        )
        for row in rows
    ]
    return hits, total
