"""Live events: published after the commit (never after a rollback), in order, numbered per job; Centrifugo tokens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask import Flask

from app import create_app
from app.extensions import db
from app.jobs import fencing
from app.jobs.models import Job
from app.jobs.schemas import StatusReport
from app.jobs.states import JobState, transition
from app.realtime.events import note_state, note_task
from dispatch.realtime import counters, history_key, job_channel, tenant_channel
from dispatch.signing import generate_keypair
from tests.app.conftest import config
from tests.app.support import WORKFLOW, Api, MakeApp, Tenant, agent_principal, token
from tests.servers.valkey import ValkeyServer

TOKEN_SECRET = "centrifugo-" + "c" * 40


@pytest.fixture(scope="module", name="database_url")
def sqlite_database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """These tests are about Valkey and Centrifugo, not the database: SQLite only."""
    url = f"sqlite:///{tmp_path_factory.mktemp('realtime') / 'app.db'}"
    app = create_app(config(url))
    with app.app_context():
        db.create_all()
        db.engine.dispose()
    yield url


@pytest.fixture(name="live")
def live_app(make_app: MakeApp, valkey_server: ValkeyServer) -> Flask:
    """The control plane with Valkey (live events on) and a Centrifugo token secret."""
    return make_app(
        VALKEY_URL=valkey_server.url,
        JOB_SIGNING_KEY=generate_keypair()[0],
        CENTRIFUGO_TOKEN_SECRET=TOKEN_SECRET,
    )


@pytest.fixture(name="valkey")
def valkey_client(valkey_server: ValkeyServer) -> Iterator[redis.Redis]:
    client = valkey_server.client()
    yield client
    client.close()


def history(valkey: redis.Redis, tenant: str, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in valkey.lrange(history_key(tenant, job_id), 0, -1)]


def kept(valkey: redis.Redis, tenant: str, job_id: str) -> list[tuple[int, str, str | None, str | None]]:
    return [(e["id"], e["state"], e["task"], e["status"]) for e in history(valkey, tenant, job_id)]


def published(pubsub: Any) -> list[dict[str, Any]]:
    """Every message already delivered to a subscription (the publishing call returned before this is read)."""
    messages = []
    while (message := pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)) is not None:
        messages.append(json.loads(message["data"]))
    return messages


def subscribe(valkey: redis.Redis, channel: str) -> Any:
    pubsub = valkey.pubsub()
    pubsub.subscribe(channel)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    return pubsub


def test_events_noted_in_a_rolled_back_transaction_are_never_published(
    live: Flask, world: dict[str, Tenant], valkey: redis.Redis
) -> None:
    acme = world["acme"]
    pubsub = subscribe(valkey, tenant_channel("acme"))
    with live.app_context():
        job = db.session.get(Job, acme.pending)
        transition(job, JobState.CANCELLED, reason="changed my mind")
        note_task(job, 0, "kernel", "running")
        db.session.rollback()
        assert kept(valkey, "acme", acme.pending) == []
        job = db.session.get(Job, acme.pending)
        assert job.state == "pending"
        transition(job, JobState.CANCELLED, reason="for real")
        db.session.commit()
    assert kept(valkey, "acme", acme.pending) == [(1, "cancelled", None, None)]
    assert [(e["job_id"], e["id"], e["state"]) for e in published(pubsub)] == [(acme.pending, 1, "cancelled")]
    pubsub.close()


def test_a_transactions_events_keep_their_order_and_ids_increase_per_job(
    live: Flask, world: dict[str, Tenant], valkey: redis.Redis
) -> None:
    acme = world["acme"]
    pubsub = subscribe(valkey, job_channel("acme", acme.running))
    with live.app_context():
        running = db.session.get(Job, acme.running)
        other = db.session.get(Job, acme.completed)
        note_task(running, 1, "kernel", "running")
        note_state(other)
        note_task(running, 1, "kernel", "succeeded")
        note_task(running, 1, "disk", "running")
        db.session.commit()
        note_task(running, 1, "disk", "failed")
        db.session.commit()
    assert kept(valkey, "acme", acme.running) == [
        (1, "running", "kernel", "running"),
        (2, "running", "kernel", "succeeded"),
        (3, "running", "disk", "running"),
        (4, "running", "disk", "failed"),
    ]
    assert kept(valkey, "acme", acme.completed) == [(1, "completed", None, None)]
    assert [e["id"] for e in published(pubsub)] == [1, 2, 3, 4]
    pubsub.close()


def test_an_event_has_the_shared_shape(live: Flask, world: dict[str, Tenant], valkey: redis.Redis) -> None:
    acme = world["acme"]
    with live.app_context():
        note_task(db.session.get(Job, acme.running), 1, "kernel", "running")
        db.session.commit()
    (event,) = history(valkey, "acme", acme.running)
    assert list(event) == ["id", "job_id", "tenant_id", "project_id", "attempt", "state", "task", "status", "ts"]
    assert event["tenant_id"] == "acme" and event["project_id"] == "web" and event["attempt"] == 1
    assert event["ts"].endswith("Z") and event["ts"][:2] == "20"


def test_a_job_run_through_the_api_publishes_each_state_change(
    live: Flask, world: dict[str, Tenant], valkey: redis.Redis
) -> None:
    acme = world["acme"]
    api = Api(live.test_client())
    job_id = api.post("/api/v1/jobs", acme.tokens["operator"], json={"workflow": WORKFLOW}).json["job_id"]
    assert api.post(f"/api/v1/jobs/{job_id}/claim", acme.tokens["agent"], json={"attempt": 1}).status_code == 200
    done = api.post(f"/api/v1/jobs/{job_id}/status", acme.tokens["agent"], json={"attempt": 1, "state": "completed"})
    assert done.status_code == 200
    assert [state for _, state, _, _ in kept(valkey, "acme", job_id)] == ["queued", "running", "completed"]
    assert [i for i, *_ in kept(valkey, "acme", job_id)] == [1, 2, 3]


def test_a_job_scheduled_for_later_announces_that_it_waits(
    live: Flask, world: dict[str, Tenant], valkey: redis.Redis
) -> None:
    acme = world["acme"]
    api = Api(live.test_client())
    later = {"workflow": WORKFLOW, "scheduled_at": "2099-01-01T00:00:00Z"}
    job_id = api.post("/api/v1/jobs", acme.tokens["operator"], json=later).json["job_id"]
    assert kept(valkey, "acme", job_id) == [(1, "pending", None, None)]


def test_a_claim_refused_for_capacity_publishes_nothing(
    live: Flask, world: dict[str, Tenant], valkey: redis.Redis
) -> None:
    api = Api(live.test_client())
    admin = token("acme", "admin")
    made = api.post("/api/v1/tenants/acme/projects", admin, json={"project_id": "one", "max_running_jobs": 1})
    assert made.status_code == 201, made.json
    agent = token("acme", "agent", project="one", agent="o1")
    api.post("/api/v1/agents", agent, json={"agent_id": "o1", "hostname": "o1", "platform": "linux"})
    operator = token("acme", "operator", project="one")
    first, second = (api.post("/api/v1/jobs", operator, json={"workflow": WORKFLOW}).json["job_id"] for _ in "12")
    assert api.post(f"/api/v1/jobs/{first}/claim", agent, json={"attempt": 1}).status_code == 200
    refused = api.post(f"/api/v1/jobs/{second}/claim", agent, json={"attempt": 1})
    assert refused.status_code == 409 and refused.json["error"] == "project_at_capacity"
    assert [state for _, state, _, _ in kept(valkey, "acme", second)] == ["queued"]


def test_an_unreachable_valkey_fails_no_request_and_is_counted(make_app: MakeApp, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    app = make_app(VALKEY_URL="redis://127.0.0.1:1/0", JOB_SIGNING_KEY=generate_keypair()[0])
    dropped = counters().dropped.labels("valkey", "unavailable")
    before = dropped._value.get()
    response = Api(app.test_client()).post(f"/api/v1/jobs/{acme.pending}/cancel", acme.tokens["operator"])
    assert response.status_code == 200 and response.json["state"] == "cancelled"
    assert dropped._value.get() == before + 1


def test_without_valkey_nothing_is_noted(app: Flask, world: dict[str, Tenant]) -> None:
    with app.app_context():
        job = db.session.get(Job, world["acme"].running)
        note_task(job, 1, "kernel", "running")
        assert "automation.realtime.events" not in db.session.info
        db.session.rollback()


def test_events_noted_by_the_services_of_a_real_report_follow_the_transaction(
    live: Flask, world: dict[str, Tenant], valkey: redis.Redis
) -> None:
    acme = world["acme"]
    with live.test_request_context():
        fencing.report_status(
            caller=agent_principal("acme", "a1"),
            job_id=acme.running,
            report=StatusReport(attempt=1, state="failed", error="disk full"),
        )
    assert kept(valkey, "acme", acme.running) == [(1, "failed", None, None)]
