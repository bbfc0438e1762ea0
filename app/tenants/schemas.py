"""Request and response models of the tenants and projects API."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from app.schemas import BIGGEST, Request, Response, Slug


class TenantCreate(Request):
    """``POST /api/v1/tenants``."""

    tenant_id: Slug
    name: str | None = Field(None, min_length=1, max_length=200)


class ProjectCreate(Request):
    """``POST /api/v1/tenants/{tenant_id}/projects``."""

    project_id: Slug
    name: str | None = Field(None, min_length=1, max_length=200)
    max_running_jobs: int | None = Field(None, ge=1, le=BIGGEST)


class TenantOut(Response):
    """A tenant."""

    tenant_id: str
    name: str
    created_at: datetime


class ProjectOut(Response):
    """A project of a tenant."""

    tenant_id: str
    project_id: str
    name: str
    max_running_jobs: int | None
    created_at: datetime


class TenantList(Response):
    """A page of tenants."""

    tenants: list[TenantOut]
    total: int
    limit: int
    offset: int


class ProjectList(Response):
    """A page of a tenant's projects."""

    projects: list[ProjectOut]
    total: int
    limit: int
    offset: int
