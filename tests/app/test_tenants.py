"""Contract tests of the tenants and projects endpoints."""

from __future__ import annotations

from app.tenants.schemas import ProjectList, ProjectOut, TenantList, TenantOut
from tests.app.support import Api, Tenant, token


def test_a_platform_admin_creates_a_tenant(api: Api, world: dict[str, Tenant]) -> None:
    response = api.post(
        "/api/v1/tenants", world["acme"].tokens["admin"], json={"tenant_id": "initech", "name": "Initech"}
    )
    assert response.status_code == 201
    assert TenantOut.model_validate(response.json).name == "Initech"
    again = api.post("/api/v1/tenants", world["acme"].tokens["admin"], json={"tenant_id": "initech"})
    assert again.status_code == 409 and again.json["error"] == "already_exists"


def test_a_tenant_id_must_be_a_slug(api: Api, world: dict[str, Tenant]) -> None:
    for bad in ("Initech", "a b", "", "x" * 64, "../etc"):
        response = api.post("/api/v1/tenants", world["acme"].tokens["admin"], json={"tenant_id": bad})
        assert response.status_code == 400 and response.json["error"] == "invalid_request"


def test_a_platform_admin_sees_every_tenant_and_a_tenant_admin_only_its_own(api: Api, world: dict[str, Tenant]) -> None:
    everyone = TenantList.model_validate(api.get("/api/v1/tenants", world["acme"].tokens["admin"]).json)
    assert [t.tenant_id for t in everyone.tenants] == ["acme", "globex"] and everyone.total == 2
    own = api.get("/api/v1/tenants", world["acme"].tokens["tenant_admin"]).json
    assert [t["tenant_id"] for t in own["tenants"]] == ["acme"]
    assert api.get("/api/v1/tenants/globex", world["acme"].tokens["admin"]).status_code == 200
    assert api.get("/api/v1/tenants/globex", world["acme"].tokens["tenant_admin"]).status_code == 404
    assert api.get("/api/v1/tenants/acme", world["acme"].tokens["tenant_admin"]).status_code == 200


def test_projects_are_created_listed_and_read_within_their_tenant(api: Api, world: dict[str, Tenant]) -> None:
    admin = world["acme"].tokens["tenant_admin"]
    response = api.post("/api/v1/tenants/acme/projects", admin, json={"project_id": "ops", "max_running_jobs": 5})
    assert response.status_code == 201
    assert ProjectOut.model_validate(response.json).max_running_jobs == 5
    listing = ProjectList.model_validate(api.get("/api/v1/tenants/acme/projects", admin).json)
    assert [p.project_id for p in listing.projects] == ["db", "ops", "web"]
    assert api.get("/api/v1/tenants/acme/projects/ops", admin).json["name"] == "ops"
    assert api.get("/api/v1/tenants/acme/projects/nope", admin).status_code == 404
    duplicate = api.post("/api/v1/tenants/acme/projects", admin, json={"project_id": "ops"})
    assert duplicate.status_code == 409 and duplicate.json["error"] == "already_exists"


def test_a_tenant_admin_cannot_touch_another_tenants_projects(api: Api, world: dict[str, Tenant]) -> None:
    admin = world["acme"].tokens["tenant_admin"]
    assert api.post("/api/v1/tenants/globex/projects", admin, json={"project_id": "x"}).status_code == 404
    assert api.get("/api/v1/tenants/globex/projects", admin).status_code == 404
    assert api.get("/api/v1/tenants/globex/projects/web", admin).status_code == 404
    platform = world["acme"].tokens["admin"]
    assert api.post("/api/v1/tenants/globex/projects", platform, json={"project_id": "x"}).status_code == 201


def test_a_tenant_admin_limited_to_one_project_cannot_create_projects(api: Api, world: dict[str, Tenant]) -> None:
    limited = token("acme", "tenant_admin", project_override="web")
    refused = api.post("/api/v1/tenants/acme/projects", limited, json={"project_id": "newp"})
    assert refused.status_code == 403 and refused.json["error"] == "access_denied", refused.json
    assert api.get("/api/v1/tenants/acme/projects/newp", world["acme"].tokens["tenant_admin"]).status_code == 404
