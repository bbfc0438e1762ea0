"""The JobLogLine table: one line of a job's log, numbered per job."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.columns import UTCDateTime, exact, utcnow
from app.extensions import Base

BigId = BigInteger().with_variant(Integer, "sqlite")


class JobLogLine(Base):
    """One log line of a job; ``seq`` orders a job's lines (1, 2, 3 …) and is the cursor of ``GET …/logs``.

    The truncation marker, stored once when a job reaches its bound, is the line with ``dropped`` set: the
    number of lines refused after it.
    """

    __tablename__ = "job_log_lines"
    __table_args__ = (
        UniqueConstraint("job_id", "seq", name="uq_job_log_lines_job_seq"),
        Index("ix_job_log_lines_tenant_ts", "tenant_id", "ts"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int]
    seq: Mapped[int]
    ts: Mapped[datetime] = mapped_column(UTCDateTime())
    task: Mapped[str | None] = mapped_column(exact(200), default=None)
    level: Mapped[str] = mapped_column(String(8))
    message: Mapped[str] = mapped_column(Text)
    dropped: Mapped[int | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
