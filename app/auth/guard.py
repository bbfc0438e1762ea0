"""Authenticate each request from its bearer token and authorize it by role."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import current_app, g, request

from app.api import refuse_unknown_query
from app.audit import service as audit
from app.auth.tokens import Principal, TokenError, verify_token
from app.errors import ACCESS_DENIED, Forbidden, Unauthorized

F = TypeVar("F", bound=Callable[..., Any])

MISSING_TOKEN = "this endpoint needs a token: send 'Authorization: Bearer <token>'"  # noqa: S105 - a message, not a secret
TENANT_MISMATCH = "the body names tenant '{tenant}', but the token belongs to another tenant"
PROJECT_MISMATCH = "the token is limited to project '{project}'"


def authenticate() -> Principal:
    """Return the caller's principal, or raise Unauthorized (401) and audit the failure."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        audit.record_refusal(action="auth.failed", principal=None, outcome="failure", details={"reason": "missing"})
        raise Unauthorized(MISSING_TOKEN, code="missing_token")
    if scheme.lower() != "bearer" or not token.strip():
        audit.record_refusal(action="auth.failed", principal=None, outcome="failure", details={"reason": "scheme"})
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    try:
        return verify_token(current_app.config["JWT_SECRET"], token.strip())
    except TokenError as exc:
        audit.record_refusal(action="auth.failed", principal=None, outcome="failure", details={"reason": exc.message})
        raise


def deny(principal: Principal, message: str, **details: Any) -> Forbidden:
    """Audit an access violation and return the Forbidden (403) error to raise."""
    audit.record_refusal(
        action="access.denied",
        principal=principal,
        details={"method": request.method, "path": request.path, "reason": message, **details},
    )
    return Forbidden(message)


def require(*roles: str, action: str) -> Callable[[F], F]:
    """Decorate a view: authenticate the caller and refuse (403) every role not in ``roles``."""

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            principal = authenticate()
            if principal.role not in roles:
                raise deny(principal, ACCESS_DENIED.format(role=principal.role, action=action))
            g.principal = principal
            refuse_unknown_query()  # after the token: a caller without one learns nothing of the endpoint
            return view(*args, **kwargs)

        wrapper.__roles__ = roles  # type: ignore[attr-defined]  # read by the OpenAPI document
        return cast(F, wrapper)

    return decorate


def principal() -> Principal:
    """Return the principal that ``require`` authenticated for this request."""
    return cast(Principal, g.principal)


def check_tenant(caller: Principal, tenant_id: str | None) -> None:
    """Refuse (403) a body or query that names a tenant other than the token's."""
    if tenant_id is not None and tenant_id != caller.tenant_id:
        raise deny(caller, TENANT_MISMATCH.format(tenant=tenant_id))


def check_project(caller: Principal, project_id: str | None) -> str | None:
    """Return the project to use, refusing (403) one outside a project-limited token."""
    if caller.project_id is None:
        return project_id
    if project_id is not None and project_id != caller.project_id:
        raise deny(caller, PROJECT_MISMATCH.format(project=caller.project_id))
    return caller.project_id
