"""The audit blueprint: ``GET /api/v1/audit``."""

from __future__ import annotations

from flask import Blueprint, Response

from app.api import document, query, reply
from app.audit import service
from app.audit.schemas import AuditEventOut, AuditList, AuditQuery
from app.auth.guard import check_tenant, deny, principal, require

PROJECT_LIMITED = "the audit log is the whole tenant's; a token limited to project '{project}' may not read it"

bp = Blueprint("audit", __name__, url_prefix="/api/v1/audit")


@bp.get("")
@document(
    "Read the audit log (platform admins: every tenant; tenant admins: their own)",
    query=AuditQuery,
    responses={200: AuditList},
    errors={400: ("invalid_request",), 401: ("missing_token", "invalid_token"), 403: ("access_denied",)},
)
@require("admin", "tenant_admin", action="read the audit log")
def list_events() -> Response:
    """List audit events."""
    params = query(AuditQuery)
    caller = principal()
    if caller.project_id is not None:  # the log names every project's jobs, schedules and agents
        raise deny(caller, PROJECT_LIMITED.format(project=caller.project_id))
    if not caller.is_admin:
        check_tenant(caller, params.tenant_id)  # a tenant admin naming another tenant is refused, not ignored
    events, total = service.list_events(
        principal=caller,
        tenant_id=params.tenant_id,
        action=params.action,
        outcome=params.outcome,
        since=params.since,
        limit=params.limit,
        offset=params.offset,
    )
    return reply(
        AuditList(
            events=[
                AuditEventOut(
                    id=e.id,
                    created_at=e.created_at,
                    tenant_id=e.tenant_id,
                    actor=e.actor,
                    role=e.role,
                    action=e.action,
                    target_type=e.target_type,
                    target_id=e.target_id,
                    outcome=e.outcome,
                    remote_addr=e.remote_addr,
                    details=e.details,
                    seq=e.seq,
                    prev_hash=e.prev_hash,
                    hash=e.hash,
                )
                for e in events
            ],
            total=total,
            limit=params.limit,
            offset=params.offset,
        )
    )
