"""Tenant and project services: create, list and read (platform admins everywhere, tenant admins at home)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from app.audit import service as audit
from app.auth.guard import deny
from app.auth.tokens import Principal
from app.columns import ID_RULE, is_id
from app.errors import NOT_FOUND, BadRequest, Conflict, NotFound
from app.extensions import db
from app.schemas import Page
from app.tenants.models import Project, Tenant

TENANT_EXISTS = "tenant '{id}' already exists"
PROJECT_EXISTS = "project '{id}' already exists in tenant '{tenant}'"
LIMITED_TO_PROJECT = "this token is limited to project '{project}': it cannot create projects"
NOT_AN_ID = "{kind} id {id!r} is not an id: " + ID_RULE + " characters"


def create_tenant(*, caller: Principal | None, tenant_id: str, name: str | None = None) -> Tenant:
    """Create a tenant; 409 if the id is taken. ``caller`` is None for the command line."""
    _check_id("tenant", tenant_id)
    tenant = Tenant(id=tenant_id, name=name or tenant_id)
    db.session.add(tenant)
    audit.record(
        action="tenant.created",
        principal=caller,
        tenant_id=tenant_id,
        target_type="tenant",
        target_id=tenant_id,
        details={"via": "api" if caller else "cli"},
    )
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        raise Conflict(TENANT_EXISTS.format(id=tenant_id), code="already_exists") from None
    return tenant


def _check_id(kind: str, value: str) -> None:
    """Refuse (400) an id not written as ids are: no token could name it (``app.auth.tokens``). The API's bodies
    check it already; the command line comes here."""
    if not is_id(value):
        raise BadRequest(NOT_AN_ID.format(kind=kind, id=value))


def visible_tenant(*, caller: Principal, tenant_id: str) -> Tenant:
    """Return a tenant the caller may see: any for a platform admin, its own for a tenant admin."""
    tenant = db.session.get(Tenant, tenant_id)
    if tenant is None or tenant.id != tenant_id or (not caller.is_admin and tenant_id != caller.tenant_id):
        raise NotFound(NOT_FOUND.format(kind="tenant", id=tenant_id))
    return tenant


def list_tenants(*, caller: Principal, page: Page) -> tuple[list[Tenant], int]:
    """Return the tenants the caller may see."""
    query = select(Tenant)
    if not caller.is_admin:
        query = query.where(Tenant.id == caller.tenant_id)
    total = db.session.scalar(select(func.count()).select_from(query.subquery())) or 0
    return list(db.session.scalars(query.order_by(Tenant.id).limit(page.limit).offset(page.offset))), total


def create_project(
    *,
    caller: Principal | None,
    tenant_id: str,
    project_id: str,
    name: str | None = None,
    max_running_jobs: int | None = None,
) -> Project:
    """Create a project in a tenant the caller may see; 409 if its id is taken there, 403 for a caller limited to
    one project (the tenant's projects are its tenant admin's to make)."""
    _check_id("project", project_id)
    if caller is not None:
        visible_tenant(caller=caller, tenant_id=tenant_id)
        if caller.project_id is not None:
            raise deny(caller, LIMITED_TO_PROJECT.format(project=caller.project_id), project_id=project_id)
    elif db.session.get(Tenant, tenant_id) is None:
        raise NotFound(NOT_FOUND.format(kind="tenant", id=tenant_id))
    project = Project(tenant_id=tenant_id, id=project_id, name=name or project_id, max_running_jobs=max_running_jobs)
    db.session.add(project)
    audit.record(
        action="project.created",
        principal=caller,
        tenant_id=tenant_id,
        target_type="project",
        target_id=project_id,
        details={"via": "api" if caller else "cli"},
    )
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        raise Conflict(PROJECT_EXISTS.format(id=project_id, tenant=tenant_id), code="already_exists") from None
    return project


def get_project(*, caller: Principal, tenant_id: str, project_id: str) -> Project:
    """Return one project of a tenant the caller may see."""
    visible_tenant(caller=caller, tenant_id=tenant_id)
    project = db.session.get(Project, (tenant_id, project_id))
    if (
        project is None
        or project.id != project_id
        or (caller.project_id is not None and project_id != caller.project_id)
    ):
        raise NotFound(NOT_FOUND.format(kind="project", id=project_id))
    return project


def list_projects(*, caller: Principal, tenant_id: str, page: Page) -> tuple[list[Project], int]:
    """Return the projects of a tenant the caller may see."""
    visible_tenant(caller=caller, tenant_id=tenant_id)
    query = select(Project).where(Project.tenant_id == tenant_id)
    if caller.project_id is not None:
        query = query.where(Project.id == caller.project_id)
    total = db.session.scalar(select(func.count()).select_from(query.subquery())) or 0
    return list(db.session.scalars(query.order_by(Project.id).limit(page.limit).offset(page.offset))), total
