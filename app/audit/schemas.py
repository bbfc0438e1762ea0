"""Query and response models of the audit API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from app.schemas import Moment, Page, Response, Slug


class AuditQuery(Page):
    """``GET /api/v1/audit`` filters."""

    tenant_id: Slug | None = None
    action: str | None = None
    outcome: str | None = None
    since: Moment | None = None


class AuditEventOut(Response):
    """One audit event."""

    id: int
    created_at: datetime
    tenant_id: str | None
    actor: str | None
    role: str | None
    action: str
    target_type: str | None
    target_id: str | None
    outcome: str
    remote_addr: str | None
    details: dict[str, Any]
    seq: int | None = Field(
        description="the entry's place in the hash chain; null until the dispatcher seals it (AUDIT_SEAL_INTERVAL)"
    )
    prev_hash: str | None = Field(
        description="SHA-256 of the previous entry (64 zeros for entry 1); 'pending' until sealed"
    )
    hash: str | None = Field(description="SHA-256 of this entry's content, its seq and prev_hash")


class AuditList(Response):
    """A page of audit events, newest first."""

    events: list[AuditEventOut]
    total: int
    limit: int
    offset: int
