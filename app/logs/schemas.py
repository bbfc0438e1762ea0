"""Request and response models of the logs API (shared contract 3 of issue 6)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from app.schemas import BIGGEST, Moment, Query, Request, Response, Slug
from probe.workflow import NAME_LIMIT

Level = Literal["info", "warning", "error", "debug"]


class LogLineIn(Request):
    """One line as an agent ships it: when, which task (null: the workflow's own), how bad, what."""

    ts: Moment
    task: str | None = Field(None, max_length=NAME_LIMIT)
    level: Level
    message: str


def numbered_within_range(first: int | None, lines: list[LogLineIn]) -> None:
    """Refuse lines numbered from ``first`` whose last number would be past what the attempt's count can hold."""
    if first is not None and first - 1 + len(lines) > BIGGEST:
        raise PydanticCustomError("too_many_lines", "the lines' numbers would go past {limit}", {"limit": BIGGEST})


class LogBatch(Request):
    """``POST /api/v1/jobs/{id}/logs``: lines of the caller's current attempt, in order."""

    attempt: int = Field(ge=1, le=BIGGEST)
    lines: list[LogLineIn]
    # The number of the batch's first line within the attempt (its first line is 1). A batch sent again after a
    # lost answer carries the same number, and the lines received before are not stored twice.
    first_line: int | None = Field(None, ge=1, le=BIGGEST)

    @model_validator(mode="after")
    def _numbered_within_range(self) -> Self:
        numbered_within_range(self.first_line, self.lines)
        return self


class LogBatchOut(Response):
    """What became of a batch: lines stored, refused over the job's bound, and received before (a resend)."""

    job_id: str
    accepted: int
    dropped: int
    repeated: int = 0


class LogQuery(Query):
    """``GET /api/v1/jobs/{id}/logs``: the lines after a cursor; ``follow`` waits for new ones."""

    after: int = Field(0, ge=0, le=BIGGEST)
    limit: int = Field(500, ge=1, le=1000)
    follow: bool = False
    wait: float = Field(25.0, ge=0, le=30)


class LogLineOut(Response):
    """One stored line of a job."""

    seq: int
    ts: datetime
    attempt: int
    task: str | None
    level: str
    message: str


class LogPage(Response):
    """A job's lines after the cursor; ``next`` is the cursor of the following call."""

    job_id: str
    lines: list[LogLineOut]
    next: int
    finished: bool = Field(description="the job is in a final state and no lines remain after `next`")
    truncated: bool = Field(description="the job reached its log bound; a marker line says how many were dropped")


class LogSearchQuery(Query):
    """``GET /api/v1/logs``: a query and filters, always within the caller's tenant."""

    query: str = Field("", max_length=1000)
    job_id: str | None = Field(None, max_length=36)
    project_id: Slug | None = None
    task: str | None = Field(None, max_length=NAME_LIMIT)
    level: Level | None = None
    since: Moment | None = None
    until: Moment | None = None
    limit: int = Field(100, ge=1, le=500)
    offset: int = Field(0, ge=0, le=10000)


class LogHit(LogLineOut):
    """A line found by a search, with its job."""

    job_id: str
    project_id: str


class LogSearchResult(Response):
    """Matching lines, newest first, from Quickwit or the database (``backend``)."""

    lines: list[LogHit]
    total: int
    limit: int
    offset: int
    backend: Literal["quickwit", "database"]
