"""Request limits: size (413), JSON only (415), the per-token rate limit (429), and Idempotency-Key."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from flask import Flask
from limits import parse as parse_item

from app.auth.tokens import issue_token
from app.config import ConfigError
from app.ratelimit import BLOCK, KEY_PREFIX, Reservations
from tests.app.support import WORKFLOW, Api, MakeApp, Tenant, token
from tests.servers.valkey import ValkeyServer


def test_an_oversized_body_is_refused_with_413(make_app: MakeApp, world: dict[str, Tenant]) -> None:
    app: Flask = make_app(MAX_CONTENT_LENGTH=2000)
    api = Api(app.test_client())
    response = api.post("/api/v1/jobs", world["acme"].tokens["operator"], json={"workflow": WORKFLOW + "#" * 3000})
    assert response.status_code == 413 and response.json["error"] == "payload_too_large"


def test_an_oversized_workflow_is_refused_with_413(make_app: MakeApp, world: dict[str, Tenant]) -> None:
    app: Flask = make_app(MAX_WORKFLOW_BYTES=200)
    response = Api(app.test_client()).post(
        "/api/v1/jobs", world["acme"].tokens["operator"], json={"workflow": WORKFLOW}
    )
    assert response.status_code == 413 and "at most 200" in response.json["message"]


def test_a_body_that_is_not_json_is_refused_with_415(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    for path in ("/api/v1/jobs", f"/api/v1/jobs/{acme.pending}/cancel", "/api/v1/agents"):
        response = api.post(path, acme.tokens["tenant_admin"], data=WORKFLOW, content_type="application/yaml")
        assert response.status_code == 415 and response.json["error"] == "unsupported_media_type"
    form = api.post("/api/v1/jobs", acme.tokens["operator"], data={"workflow": WORKFLOW})
    assert form.status_code == 415


def test_the_rate_limit_answers_429_with_retry_after_per_token(make_app: MakeApp, world: dict[str, Tenant]) -> None:
    app: Flask = make_app(RATE_LIMIT_ENABLED=True, RATE_LIMIT="3 per minute")
    api = Api(app.test_client())
    viewer, other = world["acme"].tokens["viewer"], token("acme", "viewer", subject="someone-else")
    assert [api.get("/api/v1/jobs", viewer).status_code for _ in range(3)] == [200, 200, 200]
    limited = api.get("/api/v1/jobs", viewer)
    assert limited.status_code == 429 and limited.json["error"] == "rate_limited"
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    assert api.get("/api/v1/jobs", other).status_code == 200
    assert api.get("/health").status_code == 200


def test_agents_have_a_rate_limit_of_their_own(make_app: MakeApp, world: dict[str, Tenant]) -> None:
    app: Flask = make_app(RATE_LIMIT_ENABLED=True, RATE_LIMIT="2 per minute", AGENT_RATE_LIMIT="5 per minute")
    api = Api(app.test_client())
    agent, operator = world["acme"].tokens["agent"], world["acme"].tokens["operator"]
    assert [api.get("/api/v1/agents/a1", agent).status_code for _ in range(6)] == [200] * 5 + [429]
    assert [api.get("/api/v1/jobs", operator).status_code for _ in range(3)] == [200, 200, 429]


def test_a_forged_agent_token_counts_under_the_ordinary_limit(make_app: MakeApp) -> None:
    app: Flask = make_app(RATE_LIMIT_ENABLED=True, RATE_LIMIT="2 per minute", AGENT_RATE_LIMIT="50 per minute")
    forged = issue_token("x" * 40, tenant_id="acme", role="agent", project_id="web", agent_id="a1")
    statuses = [Api(app.test_client()).get("/api/v1/agents/a1", forged).status_code for _ in range(3)]
    assert statuses == [401, 401, 429]


def test_a_malformed_rate_limit_is_a_clear_error(make_app: MakeApp) -> None:
    for name in ("RATE_LIMIT", "AGENT_RATE_LIMIT"):
        with pytest.raises(ConfigError, match=f"{name} must be like '600 per minute'.*'lots'"):
            make_app(RATE_LIMIT_ENABLED=True, **{name: "lots"})


def test_the_rate_limit_is_shared_through_valkey(
    make_app: MakeApp, valkey_server: ValkeyServer, world: dict[str, Tenant]
) -> None:
    url = valkey_server.url
    first: Flask = make_app(RATE_LIMIT_ENABLED=True, RATE_LIMIT="4 per minute", VALKEY_URL=url)
    second: Flask = make_app(RATE_LIMIT_ENABLED=True, RATE_LIMIT="4 per minute", VALKEY_URL=url)
    viewer = token("acme", "viewer", subject=f"valkey-{uuid.uuid4().hex}")
    statuses = [Api(app.test_client()).get("/api/v1/jobs", viewer).status_code for app in (first, second) * 3]
    assert statuses == [200, 200, 200, 200, 429, 429]
    cache = first.test_client().get("/health").json["components"]["cache"]
    assert cache["status"] == "ok" and cache["backend"] == "valkey" and cache["detail"] is None


def test_far_from_its_limit_a_process_takes_hits_from_valkey_in_blocks(valkey_server: ValkeyServer) -> None:
    client = redis.Redis.from_url(valkey_server.url)
    reservations, key = Reservations(client), f"token:{uuid.uuid4().hex}"
    item = parse_item("1000 per minute")
    results = [reservations.hit(item, key) for _ in range(25)]
    assert all(allowed for allowed, _ in results) and all(0 < ends_in <= 60 for _, ends_in in results)
    assert int(client.get(KEY_PREFIX + item.key_for(key)) or 0) == 3 * BLOCK  # three round trips, not 25


def test_near_its_limit_the_count_is_exact_across_processes(valkey_server: ValkeyServer) -> None:
    client = redis.Redis.from_url(valkey_server.url)
    first, second = Reservations(client), Reservations(client)  # two web processes
    key, item = f"token:{uuid.uuid4().hex}", parse_item("40 per minute")
    allowed = [process.hit(item, key)[0] for _ in range(30) for process in (first, second)]
    assert allowed == [True] * 40 + [False] * 20
    refused, ends_in = first.hit(item, key)
    assert not refused and 0 < ends_in <= 60


def test_a_request_that_costs_several_hits_takes_them_all_or_none(valkey_server: ValkeyServer) -> None:
    client = redis.Redis.from_url(valkey_server.url)
    first, second = Reservations(client), Reservations(client)
    key, item = f"token:{uuid.uuid4().hex}", parse_item("40 per minute")
    assert first.hit(item, key, cost=25)[0]  # a batch of 25 jobs
    assert not second.hit(item, key, cost=25)[0]  # 15 are left: refused whole
    assert [second.hit(item, key)[0] for _ in range(15)] == [True] * 15  # what it was granted stays usable
    assert not first.hit(item, key)[0] and not first.hit(item, key, cost=3)[0]
    assert int(client.get(KEY_PREFIX + item.key_for(key)) or 0) >= 40


def test_a_new_window_starts_afresh(valkey_server: ValkeyServer) -> None:
    reservations, key = Reservations(redis.Redis.from_url(valkey_server.url)), f"token:{uuid.uuid4().hex}"
    item = parse_item("3 per second")
    assert [reservations.hit(item, key)[0] for _ in range(4)] == [True, True, True, False]
    time.sleep(1.1)
    assert reservations.hit(item, key)[0]


def test_the_same_idempotency_key_and_body_return_the_same_job(api: Api, world: dict[str, Tenant]) -> None:
    operator = world["acme"].tokens["operator"]
    headers = {"Idempotency-Key": "deploy-42"}
    first = api.post("/api/v1/jobs", operator, json={"workflow": WORKFLOW}, headers=headers)
    second = api.post("/api/v1/jobs", operator, json={"workflow": WORKFLOW}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json["job_id"] == second.json["job_id"] and second.headers["Idempotent-Replayed"] == "true"
    assert api.get("/api/v1/jobs", operator).json["total"] == 5
    replayed = "Idempotency-Key 'deploy-42' was used before: this is the job it submitted then, not a new one"
    assert replayed not in first.json["warnings"] and second.json["warnings"][0] == replayed  # what the CLI prints


def test_the_same_idempotency_key_with_another_body_is_a_conflict(api: Api, world: dict[str, Tenant]) -> None:
    operator = world["acme"].tokens["operator"]
    headers = {"Idempotency-Key": "deploy-43"}
    api.post("/api/v1/jobs", operator, json={"workflow": WORKFLOW}, headers=headers)
    response = api.post("/api/v1/jobs", operator, json={"workflow": WORKFLOW, "priority": 1}, headers=headers)
    assert response.status_code == 409 and response.json["error"] == "idempotency_conflict"


def test_idempotency_keys_are_per_tenant(api: Api, world: dict[str, Tenant]) -> None:
    headers = {"Idempotency-Key": "shared-key"}
    acme = api.post("/api/v1/jobs", world["acme"].tokens["operator"], json={"workflow": WORKFLOW}, headers=headers)
    globex = api.post("/api/v1/jobs", world["globex"].tokens["operator"], json={"workflow": WORKFLOW}, headers=headers)
    assert acme.status_code == globex.status_code == 201 and acme.json["job_id"] != globex.json["job_id"]


def test_idempotency_keys_are_a_projects_own(api: Api, world: dict[str, Tenant]) -> None:
    # another project's key is neither a conflict (which told a project the keys another one used) nor a replay
    headers = {"Idempotency-Key": "deploy-2026-12-07"}
    web = api.post("/api/v1/jobs", token("acme", "operator"), json={"workflow": WORKFLOW}, headers=headers)
    db_ = api.post(
        "/api/v1/jobs", token("acme", "operator", project="db"), json={"workflow": WORKFLOW}, headers=headers
    )
    assert web.status_code == db_.status_code == 201, db_.json
    assert web.json["job_id"] != db_.json["job_id"] and "Idempotent-Replayed" not in db_.headers
    again = api.post(
        "/api/v1/jobs", token("acme", "operator", project="db"), json={"workflow": WORKFLOW}, headers=headers
    )
    assert again.json["job_id"] == db_.json["job_id"] and again.headers["Idempotent-Replayed"] == "true"


def test_idempotency_keys_differing_only_in_case_are_two_keys(api: Api, world: dict[str, Tenant]) -> None:
    operator = world["acme"].tokens["operator"]
    upper = api.post("/api/v1/jobs", operator, json={"workflow": WORKFLOW}, headers={"Idempotency-Key": "Deploy-44"})
    lower = api.post("/api/v1/jobs", operator, json={"workflow": WORKFLOW}, headers={"Idempotency-Key": "deploy-44"})
    assert upper.status_code == lower.status_code == 201 and upper.json["job_id"] != lower.json["job_id"], lower.json
    assert "Idempotent-Replayed" not in lower.headers


def test_an_overlong_idempotency_key_is_refused(api: Api, world: dict[str, Tenant]) -> None:
    response = api.post(
        "/api/v1/jobs",
        world["acme"].tokens["operator"],
        json={"workflow": WORKFLOW},
        headers={"Idempotency-Key": "k" * 256},
    )
    assert response.status_code == 400


def test_an_unreachable_valkey_does_not_stop_the_api(make_app: MakeApp, world: dict[str, Tenant]) -> None:
    app: Flask = make_app(RATE_LIMIT_ENABLED=True, RATE_LIMIT="2 per minute", VALKEY_URL="redis://127.0.0.1:1/0")
    api = Api(app.test_client())
    viewer = world["acme"].tokens["viewer"]
    statuses = [api.get("/api/v1/jobs", viewer).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]  # counted in memory meanwhile
    assert api.get("/health").json["components"]["cache"]["status"] == "error"
