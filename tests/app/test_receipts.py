"""A submission is one transaction; its publish receipt follows a moment later; the sweeper covers a lost one."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from flask import Flask
from sqlalchemy import create_engine, event, select

from app.columns import utcnow
from app.extensions import db
from app.jobs import dispatching
from app.jobs.models import Job, JobAttempt, JobEvent
from app.jobs.receipts import Receipts
from dispatch.signing import generate_keypair
from tests.app.support import WORKFLOW, Api, MakeApp, Tenant, build_world
from tests.servers.valkey import ValkeyServer

QUEUE = "tenant.acme.web.linux"


@pytest.fixture(name="live")
def live_app(make_app: MakeApp, valkey_server: ValkeyServer) -> Flask:
    """The control plane with a broker and a signing key: submissions are published."""
    valkey_server.client().flushdb()
    return make_app(VALKEY_URL=valkey_server.url, JOB_SIGNING_KEY=generate_keypair()[0])


@pytest.fixture(name="acme")
def acme_tenant(app: Flask) -> Tenant:
    """Tenant acme, made through the app without a broker (the world's jobs in their states, none published)."""
    return build_world(app)["acme"]


def messages(valkey_server: ValkeyServer) -> int:
    client = valkey_server.client()
    return sum(int(client.llen(QUEUE if step == 0 else f"{QUEUE}:{step}")) for step in range(10))


def attempt_of(app: Flask, job_id: str) -> JobAttempt:
    with app.app_context():
        attempt = db.session.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id)).one()
        db.session.expunge(attempt)
        return attempt


def wait_for_receipt(app: Flask, job_id: str, seconds: float = 5.0) -> JobAttempt:
    deadline = time.monotonic() + seconds
    while (attempt := attempt_of(app, job_id)).published_at is None:
        assert time.monotonic() < deadline, "the publish receipt was never written"
        time.sleep(0.05)
    return attempt


def test_a_submission_is_stored_queued_with_its_attempt_in_one_transaction(
    live: Flask, acme: Tenant, valkey_server: ValkeyServer
):
    before = messages(valkey_server)
    commits: list[int] = []

    def count(_connection: object) -> None:
        commits.append(threading.get_ident())

    with live.app_context():
        engine = db.engine
    event.listen(engine, "commit", count)
    try:
        reply = Api(live.test_client()).post("/api/v1/jobs", acme.tokens["operator"], json={"workflow": WORKFLOW})
    finally:
        event.remove(engine, "commit", count)
    assert reply.status_code == 201, reply.json
    assert reply.json["state"] == "queued"
    # the job, its audit record, its move to queued and its attempt: one commit by the request itself
    assert commits.count(threading.get_ident()) == 1
    assert messages(valkey_server) == before + 1
    job_id = reply.json["job_id"]
    with live.app_context():
        moves = db.session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
        assert [(m.from_state, m.to_state, m.attempt) for m in moves] == [("pending", "queued", 1)]
    attempt = wait_for_receipt(live, job_id)
    assert attempt.number == 1 and attempt.state == "queued"


def test_a_job_queued_only_when_it_is_published_is_answered_as_queued(
    live: Flask, acme: Tenant, valkey_server: ValkeyServer, monkeypatch: pytest.MonkeyPatch
):
    """A job not due in its submission's transaction but due by its publish (scheduled a moment ahead) is queued
    then, and the answer says so, as the stored job does."""
    monkeypatch.setattr(dispatching, "queue_new", lambda _job, **_kwargs: False)
    api = Api(live.test_client())
    before = messages(valkey_server)
    one = api.post("/api/v1/jobs", acme.tokens["operator"], json={"workflow": WORKFLOW})
    assert one.status_code == 201, one.json
    two = api.post("/api/v1/jobs/batch", acme.tokens["operator"], json={"jobs": [{"workflow": WORKFLOW}] * 2})
    assert two.status_code == 201, two.json
    answered = [one.json, *two.json["jobs"]]
    assert [(job["state"], job["attempt"]) for job in answered] == [("queued", 1)] * 3
    with live.app_context():
        for job in answered:
            stored = db.session.get(Job, job["job_id"])
            assert stored is not None and (stored.state, stored.attempt) == ("queued", 1)
    assert messages(valkey_server) == before + 3


def test_the_sweeper_leaves_a_receipted_attempt_alone_and_resends_one_whose_receipt_was_lost(
    live: Flask, acme: Tenant, valkey_server: ValkeyServer, monkeypatch: pytest.MonkeyPatch
):
    api = Api(live.test_client())
    later = utcnow() + timedelta(seconds=live.config["SWEEP_GRACE"] + 60)
    with live.app_context():
        dispatching.sweep(now=later)  # the world's jobs that were never published
    kept = api.post("/api/v1/jobs", acme.tokens["operator"], json={"workflow": WORKFLOW}).json["job_id"]
    wait_for_receipt(live, kept)
    # the process dies between its publish and its receipt writer's next turn: the receipt is gone
    monkeypatch.setattr(live.extensions["receipts"], "add", lambda *_args, **_kwargs: None)
    lost = api.post("/api/v1/jobs", acme.tokens["operator"], json={"workflow": WORKFLOW}).json["job_id"]
    assert attempt_of(live, lost).published_at is None
    sent = messages(valkey_server)
    with live.app_context():
        assert dispatching.sweep(now=later) == 1  # only the job whose receipt was lost
        assert dispatching.sweep(now=later) == 0  # and only once: the sweeper records its own sends at once
    assert messages(valkey_server) == sent + 1
    assert attempt_of(live, lost).published_at is not None


def test_receipts_that_cannot_be_written_are_kept_and_written_later(live: Flask, acme: Tenant, tmp_path):
    api = Api(live.test_client())
    job_ids = [
        api.post("/api/v1/jobs", acme.tokens["operator"], json={"workflow": WORKFLOW}).json["job_id"] for _ in range(3)
    ]
    for job_id in job_ids:
        wait_for_receipt(live, job_id)
    ids = [attempt_of(live, job_id).id for job_id in job_ids]
    with live.app_context():
        db.session.execute(JobAttempt.__table__.update().values(published_at=None))
        db.session.commit()
        good = db.engine
    receipts = Receipts(create_engine(f"sqlite:///{tmp_path / 'missing' / 'nothing.db'}"), every=3600)
    for attempt_id in ids:
        receipts.add(attempt_id)
    assert receipts.flush() is None  # the database cannot be opened: nothing is lost
    receipts.engine = good
    assert receipts.flush() == 3  # one transaction for all three
    assert all(attempt_of(live, job_id).published_at is not None for job_id in job_ids)
    assert receipts.flush() == 0
    receipts.close()
