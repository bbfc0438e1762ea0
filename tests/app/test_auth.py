"""Token attacks: every forged, expired or incomplete token is 401 invalid_token; roles are enforced."""

from __future__ import annotations

import base64
import datetime
import json
import time
from typing import Any

import jwt
import pytest
from flask import Flask

from app.audit.chain import seal
from app.audit.verify import verify
from app.auth.tokens import INVALID_TOKEN, NOT_AN_ID, NOT_TEXT, TokenError, issue_token
from app.extensions import db
from tests.app.support import SECRET, WORKFLOW, Api, Tenant, token


def b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {
        "sub": "mallory",
        "tenant_id": "acme",
        "project_id": "web",
        "role": "admin",
        "iat": now,
        "exp": now + 600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


FORGED = {
    "expired": lambda: jwt.encode(claims(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600), SECRET),
    "wrong secret": lambda: jwt.encode(claims(), "another-secret-" + "y" * 40),
    "alg none": lambda: f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}.",
    "alg none with a signature": lambda: f"{b64({'alg': 'none'})}.{b64(claims())}.c2lnbmF0dXJl",
    "HS512 instead of HS256": lambda: jwt.encode(claims(), SECRET, algorithm="HS512"),
    "tampered payload": lambda: (
        lambda t: ".".join([t.split(".")[0], b64(claims(tenant_id="globex")), t.split(".")[2]])
    )(jwt.encode(claims(), SECRET)),
    "missing tenant": lambda: jwt.encode(claims(tenant_id=None), SECRET),
    "missing role": lambda: jwt.encode(claims(role=None), SECRET),
    "missing sub": lambda: jwt.encode(claims(sub=None), SECRET),
    "missing exp": lambda: jwt.encode(claims(exp=None), SECRET),
    "unknown role": lambda: jwt.encode(claims(role="root"), SECRET),
    "tenant not a string": lambda: jwt.encode(claims(tenant_id=["acme", "globex"]), SECRET),
    "agent without agent id": lambda: jwt.encode(claims(role="agent"), SECRET),
    "garbage": lambda: "not.a.token",
    "tenant with a lone surrogate": lambda: jwt.encode(claims(tenant_id="acme\ud800"), SECRET),
    "project with a lone surrogate": lambda: jwt.encode(claims(project_id="\ud800"), SECRET),
    "sub with a lone surrogate": lambda: jwt.encode(claims(sub="op\udcff"), SECRET),
    "role with a lone surrogate": lambda: jwt.encode(claims(role="\ud800"), SECRET),
    "agent id with a lone surrogate": lambda: jwt.encode(claims(role="agent", agent_id="a\udcff"), SECRET),
    "claim name with a lone surrogate": lambda: jwt.encode({**claims(), "\ud800": "x"}, SECRET),
    "sub longer than the audit log's actor": lambda: jwt.encode(claims(sub="o" * 256), SECRET),
    "tenant longer than a tenant id": lambda: jwt.encode(claims(tenant_id="a" * 65), SECRET),
    "expiry too large for a float": lambda: jwt.encode(claims(exp=10**400), SECRET),
    "empty claims": lambda: jwt.encode({}, SECRET),
}


@pytest.mark.parametrize("attack", sorted(FORGED))
def test_a_forged_or_incomplete_token_is_refused_as_invalid(api: Api, world: dict[str, Tenant], attack: str) -> None:
    response = api.get("/api/v1/jobs", FORGED[attack]())
    assert response.status_code == 401
    assert response.json["error"] == "invalid_token" and response.json["message"].startswith("the token is invalid")
    assert response.content_type == "application/json"


def test_a_request_without_a_token_is_refused(api: Api, world: dict[str, Tenant]) -> None:
    response = api.get("/api/v1/jobs")
    assert response.status_code == 401 and response.json["error"] == "missing_token"


def test_a_token_with_another_scheme_is_refused(api: Api, world: dict[str, Tenant]) -> None:
    response = api.get("/api/v1/jobs", headers={"Authorization": f"Basic {world['acme'].tokens['admin']}"})
    assert response.status_code == 401 and response.json["error"] == "invalid_token"


def test_an_agent_token_cannot_act_as_another_agent(api: Api, world: dict[str, Tenant]) -> None:
    a1 = world["acme"].tokens["agent"]
    api.post(
        "/api/v1/agents",
        token("acme", "agent", agent="a2"),
        json={"agent_id": "a2", "hostname": "a2", "platform": "linux"},
    )
    assert api.get("/api/v1/agents/a2", a1).status_code == 403
    assert api.post("/api/v1/agents/a2/heartbeat", a1).status_code == 403
    assert (
        api.post("/api/v1/agents", a1, json={"agent_id": "a2", "hostname": "x", "platform": "linux"}).status_code == 403
    )
    assert api.get("/api/v1/agents/g1", a1).status_code == 404


def test_an_agent_token_cannot_use_operator_endpoints(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    agent = acme.tokens["agent"]
    assert api.post("/api/v1/jobs", agent, json={"workflow": "x"}).json["error"] == "access_denied"
    assert api.post(f"/api/v1/jobs/{acme.pending}/cancel", agent).status_code == 403
    assert api.delete(f"/api/v1/jobs/{acme.completed}", agent).status_code == 403


def test_an_operator_cannot_report_as_an_agent(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    response = api.post(
        f"/api/v1/jobs/{acme.running}/status", acme.tokens["operator"], json={"attempt": 1, "state": "completed"}
    )
    assert response.status_code == 403
    assert response.json == {"error": "access_denied", "message": "role 'operator' may not report job states"}


def test_a_project_limited_token_sees_only_its_project(api: Api, world: dict[str, Tenant]) -> None:
    ops = token("acme", "operator", project="db")
    assert api.get("/api/v1/jobs", ops).json["total"] == 0
    assert api.get(f"/api/v1/jobs/{world['acme'].pending}", ops).status_code == 404
    assert api.post("/api/v1/jobs", ops, json={"workflow": "x", "project_id": "web"}).status_code == 403
    assert api.get("/api/v1/agents/a1", ops).status_code == 404


def test_a_token_that_verified_is_refused_once_it_expires(
    api: Api, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.auth import tokens

    short = tokens.issue_token(SECRET, tenant_id="acme", role="viewer", ttl=60)
    assert api.get("/api/v1/jobs", short).status_code == 200  # verified, and remembered until it expires
    later = time.time() + 61
    monkeypatch.setattr(tokens.time, "time", lambda: later)

    class Later(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> Later:
            return cls.fromtimestamp(later, tz)

    monkeypatch.setattr(jwt.api_jwt, "datetime", Later)  # PyJWT's own expiry check sees the later time too
    refused = api.get("/api/v1/jobs", short)
    assert (
        refused.status_code == 401 and refused.json["error"] == "invalid_token" and "expired" in refused.json["message"]
    )


def test_a_token_verified_under_one_secret_is_not_accepted_under_another() -> None:
    from app.auth import tokens

    issued = tokens.issue_token(SECRET, tenant_id="acme", role="viewer", ttl=60)
    assert tokens.verify_token(SECRET, issued).tenant_id == "acme"
    with pytest.raises(tokens.TokenError):
        tokens.verify_token("another-secret-" + "x" * 40, issued)


def test_a_claim_holding_a_lone_surrogate_is_refused_and_its_refusal_is_sealed(
    app: Flask, api: Api, world: dict[str, Tenant]
) -> None:
    for claim, value in (("tenant_id", "\ud800"), ("project_id", "\ud800"), ("sub", "op\udcff"), ("role", "\ud800")):
        bearer = jwt.encode(claims(**{"role": "operator", claim: value}), SECRET)
        for answer in (
            api.get("/api/v1/jobs", bearer),
            api.get("/api/v1/agents", bearer),
            api.post("/api/v1/jobs", bearer, json={"workflow": WORKFLOW, "project_id": "web"}),
        ):
            assert answer.status_code == 401, (claim, answer.json)
            assert answer.json["message"] == INVALID_TOKEN.format(reason=NOT_TEXT.format(name=f"'{claim}'"))
    with app.app_context(), db.engine.connect() as connection:
        assert seal(connection) > 0  # the refusals' audit entries, and every one after them, are chained
        verdict = verify(connection)
    assert verdict.intact and verdict.pending == 0
    assert api.get("/api/v1/audit?limit=500", world["acme"].tokens["admin"]).status_code == 200


# MariaDB's default collation compares without case or trailing spaces: each of these would reach acme's rows there.
NOT_IDS = {
    "tenant in capitals": {"tenant_id": "ACME"},
    "tenant capitalised": {"tenant_id": "Acme"},
    "tenant with a trailing space": {"tenant_id": "acme "},
    "tenant with a trailing newline": {"tenant_id": "acme\n"},
    "project in capitals": {"role": "operator", "project_id": "WEB"},
    "project with a trailing space": {"role": "operator", "project_id": "web "},
    "agent in capitals": {"role": "agent", "agent_id": "A1"},
}


@pytest.mark.parametrize("variant", sorted(NOT_IDS))
def test_a_token_naming_an_id_in_another_spelling_is_refused_on_every_database(
    api: Api, world: dict[str, Tenant], variant: str
) -> None:
    bearer = jwt.encode(claims(**NOT_IDS[variant]), SECRET)
    name = next(key for key in NOT_IDS[variant] if key != "role")
    for method, path in (("GET", "/api/v1/jobs"), ("GET", f"/api/v1/jobs/{world['acme'].running}")):
        response = api.call(method, path, bearer)
        assert response.status_code == 401, response.get_data(as_text=True)
        assert response.json["message"] == INVALID_TOKEN.format(reason=NOT_AN_ID.format(name=name))
    heartbeat = api.call("POST", f"/api/v1/agents/{world['acme'].agent}/heartbeat", bearer)
    assert heartbeat.status_code == 401
    with pytest.raises(TokenError, match=f"claim '{name}' is not an id"):
        issue_token(SECRET, **{"tenant_id": "acme", "role": "viewer", **NOT_IDS[variant]})


def test_a_token_that_verification_would_refuse_is_never_issued() -> None:
    from app.auth import tokens

    with pytest.raises(tokens.TokenError, match="claim 'sub' is not valid UTF-8 text"):
        tokens.issue_token(SECRET, tenant_id="acme", role="viewer", subject="op\udcff")
    with pytest.raises(tokens.TokenError, match="claim 'tenant_id' is not valid UTF-8 text"):
        tokens.issue_token(SECRET, tenant_id="acme\udcff", role="viewer")  # not its derived sub
    with pytest.raises(tokens.TokenError, match="claim 'sub' is longer than 255 characters"):
        tokens.issue_token(SECRET, tenant_id="acme", role="viewer", subject="o" * 256)


def test_no_claim_is_longer_than_the_columns_that_store_it() -> None:
    from app.agents.models import Agent
    from app.audit.models import AuditEvent
    from app.auth.tokens import LONGEST
    from app.jobs.models import Job
    from app.tenants import models as tenants

    def width(column: Any) -> int:
        return int(column.property.columns[0].type.length)

    assert LONGEST["sub"] == width(AuditEvent.actor) == width(Job.created_by)
    assert LONGEST["tenant_id"] == width(tenants.Tenant.id) == width(AuditEvent.tenant_id) == width(Job.tenant_id)
    assert LONGEST["project_id"] == width(tenants.Project.id) == width(Job.project_id)
    assert LONGEST["agent_id"] == width(Agent.id) == width(Job.agent_id)
    assert LONGEST["role"] == width(AuditEvent.role)
