"""Write and read the audit log."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from flask import has_request_context, request
from sqlalchemy import func, select

from app.audit.chain import PENDING
from app.audit.models import AuditEvent
from app.auth.tokens import Principal
from app.extensions import db

log = logging.getLogger(__name__)


def _event(
    *,
    action: str,
    outcome: str,
    principal: Principal | None,
    tenant_id: str | None,
    target_type: str | None,
    target_id: str | None,
    details: dict[str, Any] | None,
    platform: bool = False,
) -> AuditEvent:
    home = tenant_id or (principal.tenant_id if principal else None)
    return AuditEvent(
        action=action,
        outcome=outcome,
        tenant_id=None if platform else home,  # the platform's own log: no tenant's admin reads it
        actor=principal.subject if principal else None,
        role=principal.role if principal else None,
        target_type=target_type,
        target_id=target_id,
        remote_addr=request.remote_addr if has_request_context() else None,
        details=details or {},
        prev_hash=PENDING,  # chained by the sealer after the commit (app.audit.chain)
    )


def record(
    *,
    action: str,
    principal: Principal | None,
    outcome: str = "success",
    tenant_id: str | None = None,
    target_type: str | None = None,
    target_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Add an audit event to the current transaction: it is kept exactly when the action is."""
    db.session.add(
        _event(
            action=action,
            outcome=outcome,
            principal=principal,
            tenant_id=tenant_id,
            target_type=target_type,
            target_id=target_id,
            details=details,
        )
    )


def record_refusal(
    *,
    action: str,
    principal: Principal | None,
    outcome: str = "denied",
    tenant_id: str | None = None,
    target_type: str | None = None,
    target_id: str | None = None,
    details: dict[str, Any] | None = None,
    platform: bool = False,
) -> None:
    """Record a refused request in its own transaction (the request's own work is rolled back first); with
    ``platform``, in the platform's own log (no tenant), which only platform admins read."""
    try:
        db.session.rollback()
        db.session.add(
            _event(
                action=action,
                outcome=outcome,
                principal=principal,
                tenant_id=tenant_id,
                target_type=target_type,
                target_id=target_id,
                details=details,
                platform=platform,
            )
        )
        db.session.commit()
    except Exception:  # an unreachable database must not turn a 401/403/404 into a 500
        log.warning("could not write the audit event %s", action, exc_info=True)
        db.session.rollback()


def list_events(
    *,
    principal: Principal,
    tenant_id: str | None = None,
    action: str | None = None,
    outcome: str | None = None,
    since: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[AuditEvent], int]:
    """Return a page of audit events, newest first, and their total; tenant admins see their tenant only."""
    query = select(AuditEvent)
    if not principal.is_admin:
        query = query.where(AuditEvent.tenant_id == principal.tenant_id)
    if tenant_id is not None:
        query = query.where(AuditEvent.tenant_id == tenant_id)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    if outcome is not None:
        query = query.where(AuditEvent.outcome == outcome)
    if since is not None:
        query = query.where(AuditEvent.created_at >= since)
    total = db.session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = query.order_by(AuditEvent.id.desc()).limit(limit).offset(offset)
    return list(db.session.scalars(page)), total
