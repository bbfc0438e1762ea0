"""Contract tests of the agents endpoints."""

from __future__ import annotations

import threading
from datetime import timedelta

from flask import Flask
from sqlalchemy import event

from app.agents.models import Agent
from app.agents.schemas import AgentList, AgentOut, HeartbeatOut
from app.columns import utcnow
from app.extensions import db
from app.jobs import dispatching
from tests.app.support import Api, Tenant, token

REGISTRATION = {
    "agent_id": "a2",
    "hostname": "web-2.example.com",
    "platform": "linux",
    "version": "0.1.0",
    "task_types": ["command"],
    "labels": {"rack": "r1"},
    "max_concurrent_jobs": 4,
}


def test_an_agent_registers_itself_and_is_online(api: Api, world: dict[str, Tenant]) -> None:
    response = api.post("/api/v1/agents", token("acme", "agent", agent="a2"), json=REGISTRATION)
    assert response.status_code == 201
    agent = AgentOut.model_validate(response.json)
    assert agent.status == "online" and agent.project_id == "web" and agent.labels == {"rack": "r1"}
    assert agent.max_concurrent_jobs == 4 and agent.task_types == ["command"]


def test_registering_again_updates_the_agent(api: Api, world: dict[str, Tenant]) -> None:
    bearer = token("acme", "agent", agent="a2")
    api.post("/api/v1/agents", bearer, json=REGISTRATION)
    response = api.post("/api/v1/agents", bearer, json={**REGISTRATION, "version": "0.2.0", "hostname": "web-2b"})
    assert response.status_code == 200
    assert response.json["version"] == "0.2.0" and response.json["hostname"] == "web-2b"
    assert api.get("/api/v1/agents", world["acme"].tokens["viewer"]).json["total"] == 2


def test_a_tenant_admin_registers_an_agent_in_a_named_project(api: Api, world: dict[str, Tenant]) -> None:
    admin = world["acme"].tokens["tenant_admin"]
    response = api.post("/api/v1/agents", admin, json={**REGISTRATION, "project_id": "db"})
    assert response.status_code == 201 and response.json["project_id"] == "db"
    missing = api.post("/api/v1/agents", admin, json=REGISTRATION)
    assert missing.status_code == 422 and missing.json["error"] == "unknown_project"


def test_a_caller_limited_to_a_project_cannot_take_another_projects_agent(api: Api, world: dict[str, Tenant]) -> None:
    # a1 serves project web; a tenant admin (or an agent token) limited to project db would move it, stranding its
    # pinned jobs and failing its claims: 404, as GET and DELETE answer that caller for a1
    for bearer in (token("acme", "tenant_admin", project_override="db"), token("acme", "agent", project="db")):
        taken = api.post("/api/v1/agents", bearer, json={**REGISTRATION, "agent_id": "a1", "project_id": "db"})
        assert taken.status_code == 404 and taken.json["error"] == "not_found", taken.json
        assert api.get("/api/v1/agents/a1", bearer).status_code == 404
    agent = api.get("/api/v1/agents/a1", world["acme"].tokens["viewer"]).json
    assert (agent["project_id"], agent["hostname"]) == ("web", "a1.local")
    # a caller who sees both projects moves it
    moved = api.post(
        "/api/v1/agents",
        world["acme"].tokens["tenant_admin"],
        json={**REGISTRATION, "agent_id": "a1", "project_id": "db"},
    )
    assert moved.status_code == 200 and moved.json["project_id"] == "db"


def test_two_first_registrations_of_an_agent_at_once_make_one_agent(app: Flask, world: dict[str, Tenant]) -> None:
    both_read = threading.Barrier(2, timeout=10)
    replies = []

    def wait_for_the_other(*args: object) -> None:  # each request found no agent, and makes one
        both_read.wait()

    def register() -> None:
        replies.append(Api(app.test_client()).post("/api/v1/agents", world["acme"].tokens["tenant_admin"], json=body))

    body = {**REGISTRATION, "agent_id": "racer", "project_id": "web"}
    event.listen(Agent, "init", wait_for_the_other)
    try:
        threads = [threading.Thread(target=register) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        event.remove(Agent, "init", wait_for_the_other)
    assert sorted(r.status_code for r in replies) == [200, 201], [r.json for r in replies]
    with app.app_context():
        assert db.session.get(Agent, ("acme", "racer")) is not None


def test_an_agent_token_cannot_register_another_agent(api: Api, world: dict[str, Tenant]) -> None:
    response = api.post("/api/v1/agents", world["acme"].tokens["agent"], json=REGISTRATION)
    assert response.status_code == 403 and response.json["error"] == "access_denied"


def test_agents_are_listed_with_online_and_offline_status(api: Api, app: Flask, world: dict[str, Tenant]) -> None:
    api.post("/api/v1/agents", token("acme", "agent", agent="a2"), json=REGISTRATION)
    with app.app_context():
        agent = db.session.get(Agent, ("acme", "a2"))
        assert agent is not None
        agent.last_heartbeat_at = utcnow() - timedelta(minutes=5)
        db.session.commit()
    viewer = world["acme"].tokens["viewer"]
    listing = AgentList.model_validate(api.get("/api/v1/agents", viewer).json)
    assert {(a.agent_id, a.status) for a in listing.agents} == {("a1", "online"), ("a2", "offline")}
    assert [a["agent_id"] for a in api.get("/api/v1/agents?status=offline", viewer).json["agents"]] == ["a2"]
    assert [a["agent_id"] for a in api.get("/api/v1/agents?status=online", viewer).json["agents"]] == ["a1"]
    assert api.get("/api/v1/agents?status=asleep", viewer).status_code == 400


def test_an_agent_is_read_by_id(api: Api, world: dict[str, Tenant]) -> None:
    response = api.get("/api/v1/agents/a1", world["acme"].tokens["operator"])
    assert response.status_code == 200 and response.json["hostname"] == "a1.local"
    assert api.get("/api/v1/agents/nope", world["acme"].tokens["operator"]).status_code == 404


def test_a_heartbeat_renews_the_leases_of_the_jobs_the_agent_says_it_runs(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    response = api.post(
        "/api/v1/agents/a1/heartbeat", acme.tokens["agent"], json={"running": [{"job_id": acme.running, "attempt": 1}]}
    )
    assert response.status_code == 200
    beat = HeartbeatOut.model_validate(response.json)
    assert beat.status == "online" and beat.heartbeat_interval == 30 and beat.cancel == []
    assert [(lease.job_id, lease.attempt) for lease in beat.leases] == [(acme.running, 1)]


def test_a_heartbeat_does_not_renew_a_running_job_the_agent_no_longer_reports(
    api: Api, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    before = api.get(f"/api/v1/jobs/{acme.running}", acme.tokens["operator"]).json["attempts"][0]["lease_expires_at"]
    beat = api.post("/api/v1/agents/a1/heartbeat", acme.tokens["agent"], json={"running": []})
    assert beat.status_code == 200 and beat.json["leases"] == []
    assert api.post("/api/v1/agents/a1/heartbeat", acme.tokens["agent"]).json["leases"] == []
    after = api.get(f"/api/v1/jobs/{acme.running}", acme.tokens["operator"]).json["attempts"][0]["lease_expires_at"]
    assert after == before


def test_a_heartbeat_tells_the_agent_to_stop_what_it_no_longer_holds(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    said = [(acme.running, 1), (acme.running, 2), (acme.queued, 1)]  # its own; one never claimed; one not started
    body = {"running": [{"job_id": job_id, "attempt": number} for job_id, number in said]}
    beat = HeartbeatOut.model_validate(api.post("/api/v1/agents/a1/heartbeat", acme.tokens["agent"], json=body).json)
    assert [(lease.job_id, lease.attempt) for lease in beat.leases] == [(acme.running, 1)]
    assert sorted((ref.job_id, ref.attempt) for ref in beat.stop) == sorted(said[1:])
    with app.app_context():  # its lease ran out meanwhile (a partition): lost, and run again elsewhere
        dispatching.reap(now=utcnow() + timedelta(seconds=app.config["LEASE_SECONDS"] + 1))
    beat = HeartbeatOut.model_validate(api.post("/api/v1/agents/a1/heartbeat", acme.tokens["agent"], json=body).json)
    assert beat.leases == [] and sorted((ref.job_id, ref.attempt) for ref in beat.stop) == sorted(said)


def test_an_agent_cannot_heartbeat_for_another_agent(api: Api, world: dict[str, Tenant]) -> None:
    api.post("/api/v1/agents", token("acme", "agent", agent="a2"), json=REGISTRATION)
    response = api.post("/api/v1/agents/a2/heartbeat", world["acme"].tokens["agent"])
    assert response.status_code == 403 and response.json["error"] == "access_denied"


def test_an_agent_registration_is_deleted(api: Api, world: dict[str, Tenant]) -> None:
    admin = world["acme"].tokens["tenant_admin"]
    assert api.delete("/api/v1/agents/a1", admin).status_code == 204
    assert api.get("/api/v1/agents/a1", admin).status_code == 404
    assert api.delete("/api/v1/agents/a1", admin).status_code == 404
    assert api.get(f"/api/v1/jobs/{world['acme'].completed}", admin).json["attempts"][0]["agent_id"] == "a1"
