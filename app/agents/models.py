"""The Agent table."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, ColumnElement, ForeignKeyConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from app.columns import UTCDateTime, utcnow
from app.extensions import Base


class Agent(Base):
    """A registered agent; its id is unique within its tenant and names its queue ``agent.<tenant>.<id>``."""

    __tablename__ = "agents"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "project_id"], ["projects.tenant_id", "projects.id"], ondelete="CASCADE"),
    )

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64))
    hostname: Mapped[str] = mapped_column(String(255))
    platform: Mapped[str] = mapped_column(String(16))
    version: Mapped[str | None] = mapped_column(String(64), default=None)
    task_types: Mapped[list[str]] = mapped_column(JSON, default=list)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    max_concurrent_jobs: Mapped[int] = mapped_column(default=1)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)

    @classmethod
    def online(cls, offline_after: int) -> ColumnElement[bool]:
        """The SQL condition of an agent that ``status`` calls online: heard from within ``offline_after`` seconds."""
        return cls.last_heartbeat_at >= utcnow() - timedelta(seconds=offline_after)

    def status(self, offline_after: int) -> str:
        """Return ``online`` when the last heartbeat is recent enough, else ``offline``."""
        seen = self.last_heartbeat_at
        if seen is None or utcnow() - seen > timedelta(seconds=offline_after):
            return "offline"
        return "online"
