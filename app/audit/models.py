"""The AuditEvent table (append-only, hash-chained) and the head of its chain."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.columns import UTCDateTime, utcnow
from app.extensions import Base


class AuditEvent(Base):
    """One audited action: authentication failures, submissions, cancellations, registrations, violations.

    ``seq``, ``prev_hash`` and ``hash`` are filled in when the transaction that wrote the event commits
    (``app.audit.chain``): entry ``seq`` carries the hash of entry ``seq - 1``, so an edited, removed or
    inserted row breaks the chain that ``automation audit verify`` checks.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_tenant_created", "tenant_id", "created_at"),
        Index("ix_audit_events_seq", "seq", unique=True),
        Index("ix_audit_events_action_tenant", "action", "tenant_id"),
        Index("ix_audit_events_action_tenant_target", "action", "tenant_id", "target_id"),  # a job's refused claims
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    tenant_id: Mapped[str | None] = mapped_column(String(64), default=None)
    actor: Mapped[str | None] = mapped_column(String(255), default=None)
    role: Mapped[str | None] = mapped_column(String(32), default=None)
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str | None] = mapped_column(String(32), default=None)
    target_id: Mapped[str | None] = mapped_column(String(255), default=None)
    outcome: Mapped[str] = mapped_column(String(16))
    remote_addr: Mapped[str | None] = mapped_column(String(64), default=None)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    seq: Mapped[int | None] = mapped_column(BigInteger, default=None)
    prev_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    hash: Mapped[str | None] = mapped_column(String(64), default=None)


class AuditChainHead(Base):
    """The one row (id 1) that every audited commit locks: the chain's last ``seq`` and ``hash``.

    Locking it serializes the writers of the chain (a row lock on MariaDB, SQLite's single writer), so two
    web workers can never give the same predecessor to two entries; it also tells a truncated tail.
    """

    __tablename__ = "audit_chain"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    last_hash: Mapped[str] = mapped_column(String(64))
