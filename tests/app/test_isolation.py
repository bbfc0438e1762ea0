"""The tenant-isolation matrix: every endpoint x every role x own tenant / other tenant, with the exact status.

Callers hold tokens of tenant acme (project web; the agent is a1). "Other" means the object, path or body
belongs to tenant globex: its objects are 404 as if they did not exist, a body or filter naming it is 403.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.app.support import ROLES, WORKFLOW, Api, Tenant

Path = Callable[[Tenant], str]
Body = Callable[[Tenant], dict[str, Any]] | None


@dataclass(frozen=True)
class Case:
    """One endpoint and the statuses each role gets for its own tenant and for the other."""

    method: str
    path: Path
    body: Body
    own: tuple[int, ...]  # admin, tenant_admin, operator, viewer, agent
    other: tuple[int, ...]


DENY = 403
CASES = {
    "submit job": Case(
        "POST",
        lambda t: "/api/v1/jobs",
        lambda t: {"workflow": WORKFLOW, "project_id": "web", "tenant_id": t.id},
        (201, 201, 201, DENY, DENY),
        (DENY,) * 5,
    ),
    "list jobs": Case("GET", lambda t: f"/api/v1/jobs?tenant_id={t.id}", None, (200, 200, 200, 200, DENY), (DENY,) * 5),
    "read job": Case("GET", lambda t: f"/api/v1/jobs/{t.running}", None, (200,) * 5, (404,) * 5),
    "change job": Case(
        "PUT",
        lambda t: f"/api/v1/jobs/{t.pending}",
        lambda t: {"priority": 1},
        (200, 200, 200, DENY, DENY),
        (404, 404, 404, DENY, DENY),
    ),
    "cancel job": Case(
        "POST",
        lambda t: f"/api/v1/jobs/{t.pending}/cancel",
        None,
        (200, 200, 200, DENY, DENY),
        (404, 404, 404, DENY, DENY),
    ),
    "delete job": Case(
        "DELETE",
        lambda t: f"/api/v1/jobs/{t.completed}",
        None,
        (204, 204, 204, DENY, DENY),
        (404, 404, 404, DENY, DENY),
    ),
    "claim job": Case(
        "POST",
        lambda t: f"/api/v1/jobs/{t.queued}/claim",
        lambda t: {"attempt": 1},
        (DENY, DENY, DENY, DENY, 200),
        (DENY, DENY, DENY, DENY, 404),
    ),
    "report task": Case(
        "POST",
        lambda t: f"/api/v1/jobs/{t.running}/tasks",
        lambda t: {"attempt": 1, "name": "kernel", "type": "command", "status": "succeeded"},
        (DENY, DENY, DENY, DENY, 201),
        (DENY, DENY, DENY, DENY, 404),
    ),
    "report status": Case(
        "POST",
        lambda t: f"/api/v1/jobs/{t.running}/status",
        lambda t: {"attempt": 1, "state": "running"},
        (DENY, DENY, DENY, DENY, 200),
        (DENY, DENY, DENY, DENY, 404),
    ),
    "register agent": Case(
        "POST",
        lambda t: "/api/v1/agents",
        lambda t: {"agent_id": "a1", "hostname": "h", "platform": "linux", "project_id": "web", "tenant_id": t.id},
        (200, 200, DENY, DENY, 200),
        (DENY,) * 5,
    ),
    "list agents": Case(
        "GET", lambda t: f"/api/v1/agents?tenant_id={t.id}", None, (200, 200, 200, 200, DENY), (DENY,) * 5
    ),
    "read agent": Case("GET", lambda t: f"/api/v1/agents/{t.agent}", None, (200,) * 5, (404,) * 5),
    "heartbeat": Case(
        "POST",
        lambda t: f"/api/v1/agents/{t.agent}/heartbeat",
        None,
        (DENY, DENY, DENY, DENY, 200),
        (DENY, DENY, DENY, DENY, 404),
    ),
    "delete agent": Case(
        "DELETE",
        lambda t: f"/api/v1/agents/{t.agent}",
        None,
        (204, 204, DENY, DENY, DENY),
        (404, 404, DENY, DENY, DENY),
    ),
    "create tenant": Case(
        "POST",
        lambda t: "/api/v1/tenants",
        lambda t: {"tenant_id": f"new-{t.id}"},
        (201, DENY, DENY, DENY, DENY),
        (201, DENY, DENY, DENY, DENY),
    ),
    "list tenants": Case(
        "GET", lambda t: "/api/v1/tenants", None, (200, 200, DENY, DENY, DENY), (200, 200, DENY, DENY, DENY)
    ),
    "read tenant": Case(
        "GET", lambda t: f"/api/v1/tenants/{t.id}", None, (200, 200, DENY, DENY, DENY), (200, 404, DENY, DENY, DENY)
    ),
    "create project": Case(
        "POST",
        lambda t: f"/api/v1/tenants/{t.id}/projects",
        lambda t: {"project_id": "new"},
        (201, 201, DENY, DENY, DENY),
        (201, 404, DENY, DENY, DENY),
    ),
    "list projects": Case(
        "GET",
        lambda t: f"/api/v1/tenants/{t.id}/projects",
        None,
        (200, 200, DENY, DENY, DENY),
        (200, 404, DENY, DENY, DENY),
    ),
    "read project": Case(
        "GET",
        lambda t: f"/api/v1/tenants/{t.id}/projects/web",
        None,
        (200, 200, DENY, DENY, DENY),
        (200, 404, DENY, DENY, DENY),
    ),
    "read audit log": Case(
        "GET",
        lambda t: f"/api/v1/audit?tenant_id={t.id}",
        None,
        (200, 200, DENY, DENY, DENY),
        (200, DENY, DENY, DENY, DENY),
    ),
    "health": Case("GET", lambda t: "/health", None, (200,) * 5, (200,) * 5),
    "openapi": Case("GET", lambda t: "/api/v1/openapi.json", None, (200,) * 5, (200,) * 5),
}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("endpoint", sorted(CASES))
def test_each_role_gets_the_exact_status_in_its_own_and_the_other_tenant(
    api: Api, world: dict[str, Tenant], endpoint: str, role: str
) -> None:
    case = CASES[endpoint]
    bearer = world["acme"].tokens[role]
    index = ROLES.index(role)
    for scope, expected in (("other", case.other[index]), ("own", case.own[index])):
        tenant = world["acme" if scope == "own" else "globex"]
        body = case.body(tenant) if case.body else None
        response = api.call(case.method, case.path(tenant), bearer, json=body)
        assert (scope, response.status_code) == (scope, expected), response.get_data(as_text=True)
        if expected >= 400:
            assert response.json["error"] == {403: "access_denied", 404: "not_found"}[expected]
            assert globex_ids(world) & set(response.get_data(as_text=True).split('"')) == set()


def test_nothing_of_the_other_tenant_shows_in_any_list(api: Api, world: dict[str, Tenant]) -> None:
    hidden = globex_ids(world)
    for role, bearer in world["acme"].tokens.items():
        for path in ("/api/v1/jobs", "/api/v1/agents", "/api/v1/audit", "/api/v1/tenants/acme/projects"):
            if role == "admin" and path == "/api/v1/audit":
                continue  # the platform admin reads every tenant's audit log by design
            text = api.get(path, bearer).get_data(as_text=True)
            assert not any(i in text for i in hidden), (role, path)


def globex_ids(world: dict[str, Tenant]) -> set[str]:
    globex = world["globex"]
    return {globex.pending, globex.queued, globex.running, globex.completed, globex.agent}


def test_an_id_in_another_spelling_finds_nothing_on_either_database(api: Api, world: dict[str, Tenant]) -> None:
    """MariaDB compares ids without case or trailing spaces: within the tenant, ``GET /agents/A1`` found agent a1
    there and nothing on SQLite. Every lookup by id now compares the id it found with the one asked for."""
    acme = world["acme"]
    for path, role in (
        ("/api/v1/agents/A1", "viewer"),
        ("/api/v1/agents/a1%20", "viewer"),
        (f"/api/v1/jobs/{acme.running.upper()}", "viewer"),
        (f"/api/v1/jobs/{acme.running.upper()}/logs", "viewer"),
        ("/api/v1/tenants/ACME", "tenant_admin"),
        ("/api/v1/tenants/acme/projects/WEB", "tenant_admin"),
        ("/api/v1/tenants/ACME/projects/web", "admin"),
        ("/api/v1/tenants/acme/projects/WEB/secrets", "tenant_admin"),
    ):
        response = api.get(path, acme.tokens[role])
        assert (path, response.status_code) == (path, 404), response.json
    claim = api.post(f"/api/v1/jobs/{acme.queued.upper()}/claim", acme.tokens["agent"], json={"attempt": 1})
    assert claim.status_code == 404, claim.json
    assert api.get(f"/api/v1/jobs/{acme.queued}", acme.tokens["viewer"]).json["state"] == "queued"
