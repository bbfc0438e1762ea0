"""The audit log records who did what, where from, and with which outcome; admins read it."""

from __future__ import annotations

from app.audit.schemas import AuditList
from tests.app.support import WORKFLOW, Api, Tenant, token


def events(api: Api, bearer: str, query: str = "") -> list[dict[str, object]]:
    response = api.get(f"/api/v1/audit{query}", bearer)
    assert response.status_code == 200, response.json
    return AuditList.model_validate(response.json).model_dump(mode="json")["events"]  # type: ignore[no-any-return]


def test_submissions_cancellations_and_registrations_are_audited(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    job = api.post("/api/v1/jobs", acme.tokens["operator"], json={"workflow": WORKFLOW}).json["job_id"]
    api.post(f"/api/v1/jobs/{job}/cancel", acme.tokens["operator"])
    log = events(api, acme.tokens["tenant_admin"])
    submitted = next(e for e in log if e["action"] == "job.submitted" and e["target_id"] == job)
    assert submitted["actor"] == "operator@acme" and submitted["role"] == "operator"
    assert submitted["outcome"] == "success" and submitted["remote_addr"] == "127.0.0.1"
    assert submitted["tenant_id"] == "acme" and submitted["created_at"]
    assert any(e["action"] == "job.cancelled" and e["target_id"] == job for e in log)
    assert any(e["action"] == "agent.registered" and e["target_id"] == "a1" for e in log)
    assert any(e["action"] == "tenant.created" for e in log) and any(e["action"] == "project.created" for e in log)


def test_authentication_failures_and_access_violations_are_audited(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    api.get("/api/v1/jobs", "not-a-token")
    api.post("/api/v1/tenants", acme.tokens["viewer"], json={"tenant_id": "x"})
    api.get(f"/api/v1/jobs/{world['globex'].pending}", acme.tokens["viewer"])
    log = events(api, acme.tokens["admin"])
    failure = next(e for e in log if e["action"] == "auth.failed")
    assert failure["outcome"] == "failure" and failure["remote_addr"] == "127.0.0.1"
    denied = next(e for e in log if e["action"] == "access.denied")
    assert denied["actor"] == "viewer@acme" and denied["details"]["path"] == "/api/v1/tenants"  # type: ignore[index]
    crossing = next(e for e in log if e["action"] == "access.cross_tenant")
    assert crossing["target_id"] == world["globex"].pending and crossing["actor"] == "viewer@acme"
    # in the platform's log: neither tenant's admin learns from it (acme's which of globex's ids exist)
    assert crossing["tenant_id"] is None
    for tenant in ("acme", "globex"):
        assert not [
            e for e in events(api, world[tenant].tokens["tenant_admin"]) if e["action"] == "access.cross_tenant"
        ]


def test_a_tenant_admin_reads_only_its_own_tenants_audit_log(api: Api, world: dict[str, Tenant]) -> None:
    own = events(api, world["acme"].tokens["tenant_admin"])
    assert own and {e["tenant_id"] for e in own} == {"acme"}
    everyone = events(api, world["acme"].tokens["admin"])
    assert {"acme", "globex"} <= {e["tenant_id"] for e in everyone}
    assert {e["tenant_id"] for e in events(api, world["acme"].tokens["admin"], "?tenant_id=globex")} == {"globex"}
    refused = api.get("/api/v1/audit?tenant_id=globex", world["acme"].tokens["tenant_admin"])
    assert refused.status_code == 403


def test_the_audit_log_is_filtered_and_paged(api: Api, world: dict[str, Tenant]) -> None:
    admin = world["acme"].tokens["admin"]
    assert {e["action"] for e in events(api, admin, "?action=tenant.created")} == {"tenant.created"}
    page = api.get("/api/v1/audit?limit=1&offset=1", admin).json
    assert len(page["events"]) == 1 and page["total"] > 1
    assert events(api, admin, "?since=2999-01-01T00:00:00Z") == []
    assert api.get("/api/v1/audit", world["acme"].tokens["operator"]).status_code == 403


def test_a_token_limited_to_one_project_cannot_read_the_tenants_audit_log(api: Api, world: dict[str, Tenant]) -> None:
    # the log names every project's jobs (their names, projects and agents): not for a token of one project
    limited = token("acme", "tenant_admin", project_override="web")
    refused = api.get("/api/v1/audit?action=job.submitted", limited)
    assert refused.status_code == 403 and refused.json["error"] == "access_denied", refused.json
    assert "limited to project 'web'" in refused.json["message"]
    assert any(e["action"] == "access.denied" for e in events(api, world["acme"].tokens["tenant_admin"]))
