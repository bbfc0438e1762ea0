"""The tenants blueprint (``/api/v1/tenants``) and the projects blueprint (``/api/v1/tenants/{id}/projects``)."""

from __future__ import annotations

from flask import Blueprint, Response

from app.api import ERR_READ, ERR_WRITE, body, document, query, reply
from app.auth.guard import principal, require
from app.schemas import Page
from app.tenants import service
from app.tenants.models import Project, Tenant
from app.tenants.schemas import ProjectCreate, ProjectList, ProjectOut, TenantCreate, TenantList, TenantOut

tenants_bp = Blueprint("tenants", __name__, url_prefix="/api/v1/tenants")
projects_bp = Blueprint("projects", __name__, url_prefix="/api/v1/tenants/<tenant_id>/projects")

ADMINS = ("admin", "tenant_admin")
ERR_CREATE = {**ERR_WRITE, 409: ("already_exists",)}


def tenant_out(tenant: Tenant) -> TenantOut:
    """Return the response model of a tenant."""
    return TenantOut(tenant_id=tenant.id, name=tenant.name, created_at=tenant.created_at)


def project_out(project: Project) -> ProjectOut:
    """Return the response model of a project."""
    return ProjectOut(
        tenant_id=project.tenant_id,
        project_id=project.id,
        name=project.name,
        max_running_jobs=project.max_running_jobs,
        created_at=project.created_at,
    )


@tenants_bp.post("")
@document("Create a tenant (platform admins)", body=TenantCreate, responses={201: TenantOut}, errors=ERR_CREATE)
@require("admin", action="create tenants")
def create_tenant() -> Response:
    """Create a tenant."""
    data = body(TenantCreate)
    return reply(tenant_out(service.create_tenant(caller=principal(), tenant_id=data.tenant_id, name=data.name)), 201)


@tenants_bp.get("")
@document(
    "List tenants (a tenant admin sees its own)",
    query=Page,
    responses={200: TenantList},
    errors={**ERR_READ, 400: ("invalid_request",)},
)
@require(*ADMINS, action="list tenants")
def list_tenants() -> Response:
    """List tenants."""
    page = query(Page)
    tenants, total = service.list_tenants(caller=principal(), page=page)
    return reply(
        TenantList(tenants=[tenant_out(t) for t in tenants], total=total, limit=page.limit, offset=page.offset)
    )


@tenants_bp.get("/<tenant_id>")
@document("Read a tenant", responses={200: TenantOut}, errors=ERR_READ)
@require(*ADMINS, action="read tenants")
def get_tenant(tenant_id: str) -> Response:
    """Read a tenant."""
    return reply(tenant_out(service.visible_tenant(caller=principal(), tenant_id=tenant_id)))


@projects_bp.post("")
@document("Create a project in a tenant", body=ProjectCreate, responses={201: ProjectOut}, errors=ERR_CREATE)
@require(*ADMINS, action="create projects")
def create_project(tenant_id: str) -> Response:
    """Create a project."""
    data = body(ProjectCreate)
    project = service.create_project(
        caller=principal(),
        tenant_id=tenant_id,
        project_id=data.project_id,
        name=data.name,
        max_running_jobs=data.max_running_jobs,
    )
    return reply(project_out(project), 201)


@projects_bp.get("")
@document(
    "List a tenant's projects", query=Page, responses={200: ProjectList}, errors={**ERR_READ, 400: ("invalid_request",)}
)
@require(*ADMINS, action="list projects")
def list_projects(tenant_id: str) -> Response:
    """List projects."""
    page = query(Page)
    projects, total = service.list_projects(caller=principal(), tenant_id=tenant_id, page=page)
    return reply(
        ProjectList(projects=[project_out(p) for p in projects], total=total, limit=page.limit, offset=page.offset)
    )


@projects_bp.get("/<project_id>")
@document("Read a project", responses={200: ProjectOut}, errors=ERR_READ)
@require(*ADMINS, action="read projects")
def get_project(tenant_id: str, project_id: str) -> Response:
    """Read a project."""
    return reply(project_out(service.get_project(caller=principal(), tenant_id=tenant_id, project_id=project_id)))
