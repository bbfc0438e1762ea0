"""Retries with backoff, dead letters, requeue and delivery deadlines, decided by the control plane."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import create_engine, delete, select, update

from app.agents.models import Agent
from app.columns import utcnow
from app.extensions import db
from app.jobs import dispatching, fencing, service
from app.jobs.models import Job, JobAttempt, JobEvent
from tests.app.support import WORKFLOW, Api, Tenant, token
from tests.app.test_receipts import acme_tenant, live_app, messages
from tests.servers.valkey import ValkeyServer

__all__ = ["acme_tenant", "live_app"]  # the fixtures "acme" and "live": the control plane with a broker

FAILING = "name: f\ntasks:\n  - {name: a, type: command, config: {command: 'false'}}\n"


def submit(api: Api, tenant: Tenant, **fields: Any) -> str:
    reply = api.post("/api/v1/jobs", tenant.tokens["operator"], json={"workflow": FAILING, **fields})
    assert reply.status_code == 201, reply.json
    return str(reply.json["job_id"])


def publish_and_claim(api: Api, app: Flask, tenant: Tenant, job_id: str) -> int:
    """Open the job's next attempt (as dispatch would) and claim it as the tenant's agent; returns its number."""
    with app.app_context():
        job = db.session.get(Job, job_id)
        assert job is not None
        if job.state == "pending":
            dispatching.open_next_attempt(job, actor="test")
        number = job.attempt
    reply = api.post(f"/api/v1/jobs/{job_id}/claim", tenant.tokens["agent"], json={"attempt": number})
    assert reply.status_code == 200, reply.json
    return number


def report(api: Api, tenant: Tenant, job_id: str, attempt: int, state: str = "failed") -> Any:
    return api.post(
        f"/api/v1/jobs/{job_id}/status",
        tenant.tokens["agent"],
        json={"attempt": attempt, "state": state, "error": f"run {attempt} {state}"},
    )


def attempts(app: Flask, job_id: str) -> list[JobAttempt]:
    with app.app_context():
        return list(db.session.query(JobAttempt).filter_by(job_id=job_id).order_by(JobAttempt.number))


def test_a_failed_workflow_runs_again_until_its_max_attempts_are_used(api: Api, app: Flask, world: dict[str, Tenant]):
    acme = world["acme"]
    job_id = submit(api, acme, max_attempts=3, retry_backoff=0)
    for number in (1, 2):
        assert publish_and_claim(api, app, acme, job_id) == number
        assert report(api, acme, job_id, number).status_code == 200
        job = api.get(f"/api/v1/jobs/{job_id}", acme.tokens["operator"]).json
        assert job["state"] == "queued" and job["attempt"] == number + 1
    publish_and_claim(api, app, acme, job_id)
    assert report(api, acme, job_id, 3, "timed_out").json["state"] == "timed_out"
    assert [a.state for a in attempts(app, job_id)] == ["failed", "failed", "timed_out"]


def test_by_default_a_failed_workflow_is_not_retried(api: Api, app: Flask, world: dict[str, Tenant]):
    acme = world["acme"]
    job_id = submit(api, acme)
    publish_and_claim(api, app, acme, job_id)
    assert report(api, acme, job_id, 1).json["state"] == "failed"


def test_the_next_run_waits_for_its_backoff_which_doubles_with_jitter(api: Api, app: Flask, world: dict[str, Tenant]):
    acme = world["acme"]
    job_id = submit(api, acme, max_attempts=3, retry_backoff=10)
    before = utcnow()
    publish_and_claim(api, app, acme, job_id)
    report(api, acme, job_id, 1)
    second = attempts(app, job_id)[1]
    assert second.state == "queued" and second.published_at is None and second.not_before is not None
    assert timedelta(seconds=8) <= second.not_before - before <= timedelta(seconds=13)
    delays = [dispatching.retry_delay(10, failures, 600) for failures in (1, 2, 3, 10)]
    assert 8 <= delays[0] <= 12 and 16 <= delays[1] <= 24 and 32 <= delays[2] <= 48 and delays[3] <= 720


def test_the_sweeper_sends_a_retry_when_its_backoff_is_over_and_not_before(
    live: Flask, acme: Tenant, valkey_server: ValkeyServer
):
    api = Api(live.test_client())
    grace = timedelta(seconds=live.config["SWEEP_GRACE"] + 1)
    with live.app_context():
        dispatching.sweep(now=utcnow() + grace)  # the world's jobs, never published
    job_id = submit(api, acme, max_attempts=2, retry_backoff=600)
    publish_and_claim(api, live, acme, job_id)
    assert report(api, acme, job_id, 1).json["state"] == "queued"
    second = attempts(live, job_id)[1]
    assert second.not_before is not None
    sent = messages(valkey_server)
    with live.app_context():
        assert dispatching.sweep(now=utcnow() + grace) == 0  # past the grace, but the backoff is not over
        assert dispatching.sweep(now=second.not_before - timedelta(seconds=1)) == 0
    assert attempts(live, job_id)[1].published_at is None and messages(valkey_server) == sent
    with live.app_context():
        assert dispatching.sweep(now=second.not_before) == 1
    assert attempts(live, job_id)[1].published_at is not None and messages(valkey_server) == sent + 1
    assert publish_and_claim(api, live, acme, job_id) == 2


def test_a_job_whose_cancel_was_requested_is_not_retried(api: Api, app: Flask, world: dict[str, Tenant]):
    acme = world["acme"]
    job_id = submit(api, acme, max_attempts=3, retry_backoff=0)
    publish_and_claim(api, app, acme, job_id)
    assert api.post(f"/api/v1/jobs/{job_id}/cancel", acme.tokens["operator"]).status_code == 202
    assert report(api, acme, job_id, 1).json["state"] == "failed"


def test_a_job_not_claimed_before_its_deadline_is_dead_lettered_listed_and_can_be_requeued(
    api: Api, app: Flask, world: dict[str, Tenant]
):
    acme, globex = world["acme"], world["globex"]
    soon = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    job_id = submit(api, acme, deliver_by=soon)
    with app.app_context():
        dispatching.sweep(now=utcnow() + timedelta(seconds=5))
    job = api.get(f"/api/v1/jobs/{job_id}", acme.tokens["operator"]).json
    assert job["state"] == "dead_letter" and job["dead_letter_reason"] == "expired"
    assert "deliver_by" in job["error"]
    listed = api.get("/api/v1/dead-letters?reason=expired", acme.tokens["viewer"]).json
    assert [j["job_id"] for j in listed["jobs"]] == [job_id] and listed["total"] == 1
    assert api.get("/api/v1/dead-letters?reason=lost", acme.tokens["viewer"]).json["total"] == 0
    unknown = api.get("/api/v1/dead-letters?reason=undeliverable", acme.tokens["viewer"])  # no job ever has it
    assert unknown.status_code == 400 and "Input should be 'expired'" in unknown.json["message"], unknown.json
    assert api.get("/api/v1/dead-letters", globex.tokens["viewer"]).json["total"] == 0
    assert api.post(f"/api/v1/jobs/{job_id}/requeue", globex.tokens["operator"]).status_code == 404
    requeued = api.post(f"/api/v1/jobs/{job_id}/requeue", acme.tokens["operator"])
    assert requeued.status_code == 200, requeued.json
    assert requeued.json["state"] == "queued" and requeued.json["attempt"] == 1  # it expired while pending
    assert requeued.json["dead_letter_reason"] is None and requeued.json["deliver_by"] is None
    audited = api.get("/api/v1/audit?action=job.requeued", token("acme", "tenant_admin")).json
    assert audited["total"] == 1
    again = api.post(f"/api/v1/jobs/{job_id}/requeue", acme.tokens["operator"])
    assert again.status_code == 409 and again.json["error"] == "invalid_transition"
    with app.app_context():  # dead-lettered once more, it is requeued with a new deadline
        job = db.session.get(Job, job_id)
        assert job is not None
        dispatching.dead_letter(job, reason="lost", message="lost", actor="test")
    deadline = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    later = api.post(
        f"/api/v1/jobs/{job_id}/requeue", acme.tokens["operator"], json={"deliver_by": deadline.isoformat()}
    )
    assert later.status_code == 200, later.json
    assert datetime.fromisoformat(later.json["deliver_by"].replace("Z", "+00:00")) == deadline


def test_a_message_an_agent_refused_as_forged_dead_letters_its_job_but_a_replay_does_not(
    api: Api, app: Flask, world: dict[str, Tenant]
):
    acme = world["acme"]
    forged, replayed = submit(api, acme), submit(api, acme)
    with app.app_context():
        for job_id in (forged, replayed):
            job = db.session.get(Job, job_id)
            assert job is not None
            dispatching.open_next_attempt(job, actor="test")
    for job_id, reason in ((forged, "bad_signature"), (replayed, "replayed")):
        reply = api.post(
            "/api/v1/agents/a1/refusals",
            acme.tokens["agent"],
            json={"reason": reason, "message": "no", "job_id": job_id, "attempt": 1, "task_id": f"{job_id}:1"},
        )
        assert reply.status_code == 201
    assert api.get(f"/api/v1/jobs/{forged}", acme.tokens["viewer"]).json["dead_letter_reason"] == "refused"
    assert api.get(f"/api/v1/jobs/{replayed}", acme.tokens["viewer"]).json["state"] == "queued"


def test_an_agent_cannot_dead_letter_a_job_whose_messages_never_reach_it(
    api: Api, app: Flask, world: dict[str, Tenant]
):
    acme = world["acme"]
    strangers = {
        "d1": token("acme", "agent", project="db", agent="d1"),
        "a2": token("acme", "agent", agent="a2"),
        "w1": token("acme", "agent", agent="w1"),
    }
    for agent_id, bearer in strangers.items():
        platform = "windows" if agent_id == "w1" else "linux"
        registered = api.post(
            "/api/v1/agents", bearer, json={"agent_id": agent_id, "hostname": agent_id, "platform": platform}
        )
        assert registered.status_code in (200, 201), registered.json
    other_project, pinned, linux = submit(api, acme), submit(api, acme, agent_id="a1"), submit(api, acme)
    with app.app_context():
        for job_id in (other_project, pinned, linux):
            job = db.session.get(Job, job_id)
            assert job is not None
            dispatching.open_next_attempt(job, actor="test")
    # d1 serves project db, the job is web's; a2 serves web, but the job is pinned to a1; w1 serves web's windows
    # queue, the job is on its linux queue
    for agent_id, job_id in (("d1", other_project), ("a2", pinned), ("w1", linux)):
        reply = api.post(
            f"/api/v1/agents/{agent_id}/refusals",
            strangers[agent_id],
            json={"reason": "bad_signature", "message": "no", "job_id": job_id, "attempt": 1, "task_id": f"{job_id}:1"},
        )
        assert reply.status_code == 201  # audited all the same
        assert api.get(f"/api/v1/jobs/{job_id}", acme.tokens["viewer"]).json["state"] == "queued", agent_id
    audited = api.get("/api/v1/audit?action=job.message_refused", token("acme", "tenant_admin")).json
    assert {event["details"]["agent_id"] for event in audited["events"]} == {"d1", "a2", "w1"}


def test_too_many_lost_attempts_dead_letter_the_job(
    api: Api, app: Flask, world: dict[str, Tenant], caplog: pytest.LogCaptureFixture
):
    acme = world["acme"]
    job_id = submit(api, acme, max_attempts=5)
    app.config["MAX_LOST_ATTEMPTS"] = 2
    try:
        for _ in (1, 2):
            publish_and_claim(api, app, acme, job_id)
            with app.app_context(), caplog.at_level("INFO", "app.jobs.dispatching"):
                lost = dispatching.reap(now=utcnow() + timedelta(seconds=app.config["LEASE_SECONDS"] + 1))
            assert lost >= 1
        job = api.get(f"/api/v1/jobs/{job_id}", acme.tokens["viewer"]).json
        assert job["state"] == "dead_letter" and job["dead_letter_reason"] == "lost"
        assert [a["state"] for a in job["attempts"]] == ["lost", "lost"]
        listed = api.get("/api/v1/dead-letters?reason=lost", acme.tokens["viewer"]).json["jobs"]
        assert [(j["job_id"], j["ran_on"]) for j in listed] == [(job_id, acme.agent)]  # where it was lost
        on = api.get(f"/api/v1/dead-letters?ran_on={acme.agent}", acme.tokens["viewer"]).json["jobs"]
        assert [j["job_id"] for j in on] == [job_id]
        assert api.get("/api/v1/dead-letters?ran_on=a2", acme.tokens["viewer"]).json["total"] == 0
    finally:
        app.config["MAX_LOST_ATTEMPTS"] = 3
    # the reaper runs in the dispatcher, with no job of its own: its lines name the job they are about
    about = [r for r in caplog.records if job_id in r.getMessage()]
    assert [r.getMessage().split(": ")[0] for r in about if "queueing attempt" in r.getMessage()] == [f"job {job_id}"]
    assert any("dead-lettered" in r.getMessage() for r in about)
    assert {(r.job_id, r.tenant_id) for r in about} == {(job_id, "acme")}  # type: ignore[attr-defined]
    with app.app_context():
        assert db.session.get(Agent, ("acme", "a1")) is not None


def lose(app: Flask) -> None:
    """Let the reaper find every running attempt's lease expired."""
    with app.app_context():
        assert dispatching.reap(now=utcnow() + timedelta(seconds=app.config["LEASE_SECONDS"] + 1)) >= 1


def test_a_requeued_job_has_its_whole_budget_of_runs_and_lost_attempts_again(
    api: Api, app: Flask, world: dict[str, Tenant]
):
    acme = world["acme"]
    job_id = submit(api, acme, max_attempts=2, retry_backoff=0)

    def state() -> tuple[str, int, str | None]:
        job = api.get(f"/api/v1/jobs/{job_id}", acme.tokens["viewer"]).json
        return job["state"], job["attempt"], job["dead_letter_reason"]

    app.config["MAX_LOST_ATTEMPTS"] = 2
    try:
        assert publish_and_claim(api, app, acme, job_id) == 1
        assert report(api, acme, job_id, 1).json["state"] == "queued"  # one failed run of two
        for _ in (2, 3):
            publish_and_claim(api, app, acme, job_id)
            lose(app)
        assert state() == ("dead_letter", 3, "lost")
        assert api.post(f"/api/v1/jobs/{job_id}/requeue", acme.tokens["operator"]).status_code == 200
        assert publish_and_claim(api, app, acme, job_id) == 4
        assert report(api, acme, job_id, 4).json["state"] == "queued"  # the first failed run since the requeue
        assert publish_and_claim(api, app, acme, job_id) == 5
        lose(app)  # the first loss since the requeue
        assert state() == ("queued", 6, None)
        assert publish_and_claim(api, app, acme, job_id) == 6
        assert report(api, acme, job_id, 6).json["state"] == "failed"  # the second failed run since the requeue
        assert [a.state for a in attempts(app, job_id)] == ["failed", "lost", "lost", "failed", "lost", "failed"]
    finally:
        app.config["MAX_LOST_ATTEMPTS"] = 3


def elsewhere(app: Flask, *statements: Any) -> None:
    """Commit ``statements`` through another connection (another process), each changing one row."""
    other = create_engine(app.config["SQLALCHEMY_DATABASE_URI"])
    try:
        with other.begin() as connection:
            for statement in statements:
                assert connection.execute(statement).rowcount == 1, statement
    finally:
        other.dispose()


def cancel_meanwhile(app: Flask, job_id: str) -> None:
    """An operator's cancel of the running job, committed by another connection (another web process)."""
    elsewhere(app, update(Job).where(Job.id == job_id, Job.state == "running").values(cancel_requested=True))


def test_a_running_job_whose_cancel_was_requested_is_cancelled_when_its_agent_is_lost(
    api: Api, app: Flask, world: dict[str, Tenant]
):
    acme = world["acme"]
    job_id = submit(api, acme, max_attempts=3)
    publish_and_claim(api, app, acme, job_id)
    cancel = api.post(f"/api/v1/jobs/{job_id}/cancel", acme.tokens["operator"], json={"reason": "wrong host"})
    assert cancel.status_code == 202
    with app.app_context():
        dispatching.reap(now=utcnow() + timedelta(seconds=app.config["LEASE_SECONDS"] + 1))
    job = api.get(f"/api/v1/jobs/{job_id}", acme.tokens["viewer"]).json
    assert job["state"] == "cancelled" and job["attempt"] == 1, job
    assert [a["state"] for a in job["attempts"]] == ["lost"]
    assert job["error"] == "wrong host; attempt 1 lost: agent 'a1' stopped renewing its lease"  # the operator's words


def test_a_cancel_committed_while_the_reaper_works_wins(
    api: Api, app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
):
    acme = world["acme"]
    job_id = submit(api, acme, max_attempts=3)
    publish_and_claim(api, app, acme, job_id)
    reap_one = dispatching._reap_one

    def cancelled_first(job: Job, attempt: JobAttempt, now: datetime) -> int:
        if job.id == job_id and not job.cancel_requested:
            cancel_meanwhile(app, job_id)  # after the reaper read the job
        return reap_one(job, attempt, now)

    monkeypatch.setattr(dispatching, "_reap_one", cancelled_first)
    later = utcnow() + timedelta(seconds=app.config["LEASE_SECONDS"] + 1)
    with app.app_context():
        dispatching.reap(now=later)
    job = api.get(f"/api/v1/jobs/{job_id}", acme.tokens["viewer"]).json
    assert job["state"] == "running" and job["cancel_requested"]  # the reaper's write was refused, nothing changed
    with app.app_context():
        dispatching.reap(now=later)  # its next round
    job = api.get(f"/api/v1/jobs/{job_id}", acme.tokens["viewer"]).json
    assert job["state"] == "cancelled" and [a["state"] for a in job["attempts"]] == ["lost"], job


def test_a_cancel_committed_while_a_failure_is_reported_stops_the_retry(
    api: Api, app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
):
    acme = world["acme"]
    job_id = submit(api, acme, max_attempts=3, retry_backoff=0)
    publish_and_claim(api, app, acme, job_id)
    record = fencing._record_status
    raced: list[str] = []

    def cancelled_first(caller: Any, job: Job, row: JobAttempt, report: Any) -> bool:
        if not raced:
            raced.append(job.id)
            cancel_meanwhile(app, job.id)  # after the report read the job
        return record(caller, job, row, report)

    monkeypatch.setattr(fencing, "_record_status", cancelled_first)
    reply = report(api, acme, job_id, 1)
    assert reply.status_code == 200 and reply.json["state"] == "failed", reply.json
    job = api.get(f"/api/v1/jobs/{job_id}", acme.tokens["viewer"]).json
    assert raced == [job_id] and job["cancel_requested"]
    assert [a["state"] for a in job["attempts"]] == ["failed"]  # recorded once, and not run again


def test_a_requeued_job_can_be_claimed_whatever_was_asked_of_it_before(api: Api, app: Flask, world: dict[str, Tenant]):
    acme = world["acme"]
    job_id = submit(api, acme)
    with app.app_context():
        job = db.session.get(Job, job_id)
        assert job is not None
        dispatching.dead_letter(job, reason="lost", message="lost", actor="test")
        db.session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))  # a cancel of old
        db.session.commit()
    requeued = api.post(f"/api/v1/jobs/{job_id}/requeue", acme.tokens["operator"])
    assert requeued.status_code == 200 and not requeued.json["cancel_requested"], requeued.json
    publish_and_claim(api, app, acme, job_id)


def test_a_job_pinned_to_an_agent_that_is_deleted_is_dead_lettered_once_due(
    api: Api, app: Flask, world: dict[str, Tenant]
):
    acme = world["acme"]
    queued = submit(api, acme, agent_id="a1")
    later = submit(api, acme, agent_id="a1", scheduled_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat())
    shared = submit(api, acme)  # any agent of the project may run it
    put_off = submit(api, acme, agent_id="a1")
    with app.app_context():
        for job_id in (queued, put_off):
            job = db.session.get(Job, job_id)
            assert job is not None
            dispatching.open_next_attempt(job, actor="test")
    in_an_hour = (datetime.now(UTC) + timedelta(hours=1)).isoformat()  # queued, then changed to run later
    moved = api.put(f"/api/v1/jobs/{put_off}", acme.tokens["operator"], json={"scheduled_at": in_an_hour})
    assert moved.status_code == 200, moved.json
    assert api.delete("/api/v1/agents/a1", token("acme", "tenant_admin")).status_code == 204
    job = api.get(f"/api/v1/jobs/{queued}", acme.tokens["viewer"]).json
    assert job["state"] == "dead_letter" and job["dead_letter_reason"] == "no_agent", job
    assert job["error"] == "pinned to agent 'a1', which is no longer registered"
    assert job["attempts"][0]["state"] == "dead_letter"
    with app.app_context():  # the move is the deleting admin's
        actors = db.session.scalars(select(JobEvent.actor).where(JobEvent.to_state == "dead_letter")).all()
        assert actors == ["tenant_admin@acme"]
    # the jobs scheduled later may still be pinned to another agent: they are left alone until they are due
    assert api.get(f"/api/v1/jobs/{later}", acme.tokens["viewer"]).json["state"] == "pending"
    assert api.get(f"/api/v1/jobs/{put_off}", acme.tokens["viewer"]).json["state"] == "queued"
    with app.app_context():
        dispatching.sweep(now=utcnow() + timedelta(hours=2))
    for job_id in (later, put_off):
        job = api.get(f"/api/v1/jobs/{job_id}", acme.tokens["viewer"]).json
        assert job["state"] == "dead_letter" and job["dead_letter_reason"] == "no_agent", job
    assert api.get(f"/api/v1/jobs/{shared}", acme.tokens["viewer"]).json["state"] == "pending"
    listed = api.get("/api/v1/dead-letters?reason=no_agent", acme.tokens["viewer"]).json
    assert sorted(j["job_id"] for j in listed["jobs"]) == sorted([queued, later, put_off])


def test_a_dead_letter_whose_agent_is_gone_is_requeued_pinned_to_another_or_to_none(
    api: Api, app: Flask, world: dict[str, Tenant]
):
    acme = world["acme"]
    other = token("acme", "agent", agent="a2")
    api.post("/api/v1/agents", other, json={"agent_id": "a2", "hostname": "a2", "platform": "linux"})
    moved, freed = submit(api, acme, agent_id="a1"), submit(api, acme, agent_id="a1")
    with app.app_context():
        for job_id in (moved, freed):
            job = db.session.get(Job, job_id)
            assert job is not None
            dispatching.open_next_attempt(job, actor="test")
    assert api.delete("/api/v1/agents/a1", token("acme", "tenant_admin")).status_code == 204
    url = "/api/v1/jobs/{}/requeue"
    gone = api.post(url.format(moved), acme.tokens["operator"], json={"agent_id": "a1"})
    assert gone.status_code == 422 and gone.json["error"] == "unknown_agent"
    assert api.get(f"/api/v1/jobs/{moved}", acme.tokens["viewer"]).json["state"] == "dead_letter"  # nothing written
    requeued = api.post(url.format(moved), acme.tokens["operator"], json={"agent_id": "a2"})
    assert requeued.status_code == 200, requeued.json
    assert requeued.json["agent_id"] == "a2" and requeued.json["state"] == "queued" and requeued.json["revision"] == 2
    unpinned = api.post(url.format(freed), acme.tokens["operator"], json={"agent_id": None})
    assert unpinned.status_code == 200 and unpinned.json["agent_id"] is None and unpinned.json["platform"] == "linux"
    with app.app_context():  # the sweeper no longer finds them pinned nowhere
        dispatching.sweep(now=utcnow() + timedelta(seconds=60))
    for job_id in (moved, freed):
        assert api.get(f"/api/v1/jobs/{job_id}", acme.tokens["viewer"]).json["state"] == "queued"
    claim = api.post(f"/api/v1/jobs/{moved}/claim", other, json={"attempt": 2})
    assert claim.status_code == 200, claim.json
    audited = api.get("/api/v1/audit?action=job.requeued", token("acme", "tenant_admin")).json["events"]
    assert {e["details"].get("agent_id", "-") for e in audited} == {"a2", None}


def test_a_job_pinned_to_another_agent_while_its_agent_is_deleted_is_left_alone(
    api: Api, app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
):
    acme = world["acme"]
    job_id = submit(api, acme, agent_id="a1")
    dead_letter = dispatching.dead_letter

    def repinned_first(job: Job, **fields: Any) -> None:
        other = create_engine(app.config["SQLALCHEMY_DATABASE_URI"])
        try:
            with other.begin() as connection:  # an operator's change of agent, committed after the sweeper's read
                repin = update(Job).where(Job.id == job.id).values(agent_id="a2", revision=Job.revision + 1)
                assert connection.execute(repin).rowcount == 1
        finally:
            other.dispose()
        dead_letter(job, **fields)

    monkeypatch.setattr(dispatching, "dead_letter", repinned_first)
    with app.app_context():
        db.session.execute(delete(Agent).where(Agent.tenant_id == "acme", Agent.id == "a1"))
        db.session.commit()
        assert dispatching.strand(now=utcnow()) == 0
    job = api.get(f"/api/v1/jobs/{job_id}", acme.tokens["viewer"]).json
    assert job["state"] == "pending" and job["agent_id"] == "a2", job


def test_a_job_pinned_to_an_agent_that_moves_to_another_platform_or_project_is_dead_lettered(
    api: Api, app: Flask, world: dict[str, Tenant]
):
    acme = world["acme"]
    agent = {"agent_id": "a1", "hostname": "a1.local", "platform": "linux"}
    kept = submit(api, acme, agent_id="a1")
    again = api.post("/api/v1/agents", acme.tokens["agent"], json=agent)  # a restart: nothing changes
    assert again.status_code == 200, again.json
    assert api.get(f"/api/v1/jobs/{kept}", acme.tokens["viewer"]).json["state"] == "pending"
    moved = api.post("/api/v1/agents", acme.tokens["agent"], json={**agent, "platform": "windows"})
    assert moved.status_code == 200, moved.json
    job = api.get(f"/api/v1/jobs/{kept}", acme.tokens["viewer"]).json
    assert job["state"] == "dead_letter" and job["dead_letter_reason"] == "no_agent", job
    assert job["error"] == (
        "pinned to agent 'a1', which now serves project 'web' on windows; the job needs project 'web' on linux"
    )


def test_a_lost_job_pinned_to_an_agent_that_was_deleted_is_dead_lettered_not_queued_again(
    api: Api, app: Flask, world: dict[str, Tenant]
):
    acme = world["acme"]
    job_id = submit(api, acme, agent_id="a1", max_attempts=3)
    publish_and_claim(api, app, acme, job_id)
    assert api.delete("/api/v1/agents/a1", token("acme", "tenant_admin")).status_code == 204
    assert api.get(f"/api/v1/jobs/{job_id}", acme.tokens["viewer"]).json["state"] == "running"
    with app.app_context():
        dispatching.reap(now=utcnow() + timedelta(seconds=app.config["LEASE_SECONDS"] + 1))
    job = api.get(f"/api/v1/jobs/{job_id}", acme.tokens["viewer"]).json
    assert job["state"] == "dead_letter" and job["dead_letter_reason"] == "no_agent", job
    assert [a["state"] for a in job["attempts"]] == ["lost"]
    assert job["error"] == (
        "attempt 1 lost: agent 'a1' stopped renewing its lease; pinned to agent 'a1', which is no longer registered"
    )


def test_the_sweeper_dead_letters_a_queued_job_whose_agent_is_gone(api: Api, app: Flask, world: dict[str, Tenant]):
    acme = world["acme"]
    job_id = submit(api, acme, agent_id="a1")
    with app.app_context():
        job = db.session.get(Job, job_id)
        assert job is not None
        dispatching.open_next_attempt(job, actor="test")
        # the agent's deletion committed, then its process died before it dead-lettered the agent's jobs
        db.session.execute(delete(Agent).where(Agent.tenant_id == "acme", Agent.id == "a1"))
        db.session.commit()
        dispatching.sweep()
    job = api.get(f"/api/v1/jobs/{job_id}", acme.tokens["viewer"]).json
    assert job["state"] == "dead_letter" and job["dead_letter_reason"] == "no_agent", job


def test_a_lease_renewed_after_an_earlier_rollback_of_the_reaper_keeps_its_attempt_running(
    api: Api, app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
):
    acme = world["acme"]
    first, second = submit(api, acme, max_attempts=3), submit(api, acme, max_attempts=3)
    publish_and_claim(api, app, acme, first)
    publish_and_claim(api, app, acme, second)
    later = utcnow() + timedelta(seconds=app.config["LEASE_SECONDS"] + 1)
    reap_one = dispatching._reap_one
    raced: list[str] = []

    def racing(job: Job, attempt: JobAttempt, now: datetime) -> int:
        if not raced and job.id in (first, second):
            # while the reaper works on one job, its agent completes it (the reaper's write is refused and
            # rolled back), and the other job's agent renews its lease
            other = second if job.id == first else first
            raced.append(other)
            engine = create_engine(app.config["SQLALCHEMY_DATABASE_URI"])
            try:
                with engine.begin() as connection:
                    connection.execute(update(JobAttempt).where(JobAttempt.id == attempt.id).values(state="completed"))
                    connection.execute(update(Job).where(Job.id == job.id).values(state="completed"))
                    renewed = update(JobAttempt).where(JobAttempt.job_id == other, JobAttempt.state == "running")
                    connection.execute(renewed.values(lease_expires_at=later + timedelta(minutes=5)))
            finally:
                engine.dispose()
        return reap_one(job, attempt, now)

    monkeypatch.setattr(dispatching, "_reap_one", racing)
    with app.app_context():
        dispatching.reap(now=later)
    job = api.get(f"/api/v1/jobs/{raced[0]}", acme.tokens["viewer"]).json
    assert job["state"] == "running" and [a["state"] for a in job["attempts"]] == ["running"], job


def test_a_job_whose_message_expired_unclaimed_is_dead_lettered(api: Api, app: Flask, world: dict[str, Tenant]):
    acme = world["acme"]
    deadline = (datetime.now(UTC) + timedelta(days=3)).isoformat()  # its envelope is valid until then
    job_ids = {
        "unclaimed": submit(api, acme),
        "recent": submit(api, acme),
        "deadline": submit(api, acme, deliver_by=deadline),
    }
    ttl = app.config["ENVELOPE_TTL"]
    sent = utcnow() - timedelta(seconds=ttl + app.config["SWEEP_GRACE"] + 1)
    with app.app_context():
        for name, job_id in job_ids.items():
            job = db.session.get(Job, job_id)
            assert job is not None
            attempt = dispatching.open_next_attempt(job, actor="test")
            moment = utcnow() if name == "recent" else sent  # sent now, or a day ago and never claimed
            db.session.execute(update(JobAttempt).where(JobAttempt.id == attempt.id).values(published_at=moment))
            db.session.commit()
        dispatching.sweep()
    states = {name: api.get(f"/api/v1/jobs/{job_id}", acme.tokens["viewer"]).json for name, job_id in job_ids.items()}
    unclaimed = states["unclaimed"]
    assert unclaimed["state"] == "dead_letter" and unclaimed["dead_letter_reason"] == "expired", unclaimed
    assert unclaimed["error"].startswith("not claimed before its message expired (sent ")
    assert f"valid for ENVELOPE_TTL, {ttl} s" in unclaimed["error"]
    assert states["recent"]["state"] == "queued" and states["deadline"]["state"] == "queued"


def ten_minutes(name: str = "slow", timeout: str = "10m") -> str:
    return f"name: {name}\ntimeout: {timeout}\ntasks:\n  - {{name: a, type: command, config: {{command: 'true'}}}}\n"


@pytest.mark.parametrize("max_attempts", [1, 2])
def test_a_run_that_never_ends_times_out_at_its_deadline_though_its_agent_beats(
    api: Api, app: Flask, world: dict[str, Tenant], max_attempts: int
):
    acme = world["acme"]
    job_id = submit(api, acme, workflow=ten_minutes(timeout="1h"), max_attempts=max_attempts, retry_backoff=0)
    changed = api.put(f"/api/v1/jobs/{job_id}", acme.tokens["operator"], json={"workflow": ten_minutes()})
    assert changed.status_code == 200, changed.json  # the deadline follows the workflow the job runs
    publish_and_claim(api, app, acme, job_id)
    with app.app_context():
        attempt = db.session.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id)).one()
        assert attempt.claimed_at is not None and attempt.deadline_at is not None
        grace = app.config["LEASE_SECONDS"]
        assert attempt.deadline_at - attempt.claimed_at == timedelta(seconds=600 + grace)
        deadline = attempt.deadline_at
        # the agent beats all along (its lease never runs out) but the run never ends
        db.session.execute(
            update(JobAttempt).where(JobAttempt.id == attempt.id).values(lease_expires_at=deadline + timedelta(hours=1))
        )
        db.session.commit()
        dispatching.reap(now=deadline - timedelta(seconds=1))  # (the world's running jobs are lost meanwhile)
    assert api.get(f"/api/v1/jobs/{job_id}", acme.tokens["viewer"]).json["state"] == "running"
    with app.app_context():
        dispatching.reap(now=deadline + timedelta(seconds=1))
    job = api.get(f"/api/v1/jobs/{job_id}", acme.tokens["viewer"]).json
    assert job["attempts"][0]["state"] == "timed_out" and job["attempts"][0]["deadline_at"] is not None
    stamp = deadline.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds")
    assert job["attempts"][0]["error"] == (
        f"attempt 1 timed out: agent 'a1' had not reported its end by its deadline {stamp}Z (the claim, the "
        "workflow's timeout of 10m00s, and a lease more)"
    )
    if max_attempts == 1:
        assert job["state"] == "timed_out" and job["error"] == job["attempts"][0]["error"], job
    else:
        assert job["state"] == "queued" and job["attempt"] == 2, job  # a timed-out run is retried like any other
    late = report(api, acme, job_id, 1, "completed")  # the run ends after all: too late, refused
    assert late.status_code == 409 and late.json["error"] == "stale_attempt", late.json


def test_a_run_past_its_deadline_whose_cancel_was_requested_is_cancelled(
    api: Api, app: Flask, world: dict[str, Tenant]
):
    acme = world["acme"]
    job_id = submit(api, acme, workflow=ten_minutes(), max_attempts=3)
    publish_and_claim(api, app, acme, job_id)
    assert api.post(f"/api/v1/jobs/{job_id}/cancel", acme.tokens["operator"]).status_code == 202
    with app.app_context():
        attempt = db.session.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id)).one()
        assert attempt.deadline_at is not None
        later = attempt.deadline_at + timedelta(seconds=1)
        renewed = update(JobAttempt).where(JobAttempt.id == attempt.id).values(lease_expires_at=later + timedelta(1))
        db.session.execute(renewed)
        db.session.commit()
        dispatching.reap(now=later)
    job = api.get(f"/api/v1/jobs/{job_id}", acme.tokens["viewer"]).json
    assert job["state"] == "cancelled" and [a["state"] for a in job["attempts"]] == ["timed_out"], job
    assert job["error"].startswith("cancelled by operator@acme; attempt 1 timed out")  # who asked, and how it ended


def changed_after_a_rollback(app: Flask, monkeypatch: pytest.MonkeyPatch, job_ids: list[str], change: Any) -> list[str]:
    """While a batch of the sweeper's works on its first job, that job is claimed (its write is refused and rolled
    back, which reloads the batch's other jobs) and ``change(job_id)`` changes the other; returns [first, other]."""
    dead_letter = dispatching.dead_letter
    seen: list[str] = []

    def raced(job: Job, **fields: Any) -> None:
        if not seen:
            other = job_ids[1] if job.id == job_ids[0] else job_ids[0]
            seen.extend([job.id, other])
            elsewhere(app, update(Job).where(Job.id == job.id).values(state="running"))
            change(other)
        dead_letter(job, **fields)

    monkeypatch.setattr(dispatching, "dead_letter", raced)
    return seen


def test_a_job_changed_while_the_sweeper_strands_a_batch_is_left_alone(
    api: Api, app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
):
    acme = world["acme"]
    agent = {"agent_id": "a2", "hostname": "a2.local", "platform": "linux", "project_id": "web"}
    assert api.post("/api/v1/agents", token("acme", "tenant_admin"), json=agent).status_code == 201
    job_ids = [submit(api, acme, agent_id="a1"), submit(api, acme, agent_id="a1")]
    with app.app_context():
        db.session.execute(delete(Agent).where(Agent.tenant_id == "acme", Agent.id == "a1"))
        db.session.commit()

    def repin(job_id: str) -> None:
        elsewhere(app, update(Job).where(Job.id == job_id).values(agent_id="a2", revision=Job.revision + 1))

    seen = changed_after_a_rollback(app, monkeypatch, job_ids, repin)
    with app.app_context():
        assert dispatching.strand(now=utcnow()) == 0
    job = api.get(f"/api/v1/jobs/{seen[1]}", acme.tokens["viewer"]).json
    assert job["state"] == "pending" and job["agent_id"] == "a2", job


def test_a_job_changed_while_the_sweeper_expires_a_batch_is_left_alone(
    api: Api, app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
):
    acme = world["acme"]
    job_ids = [submit(api, acme), submit(api, acme)]
    sent = utcnow() - timedelta(seconds=app.config["ENVELOPE_TTL"] + app.config["SWEEP_GRACE"] + 1)
    with app.app_context():
        for job_id in job_ids:
            job = db.session.get(Job, job_id)
            assert job is not None
            attempt = dispatching.open_next_attempt(job, actor="test")
            db.session.execute(update(JobAttempt).where(JobAttempt.id == attempt.id).values(published_at=sent))
            db.session.commit()

    def change(job_id: str) -> None:  # a new attempt, to be sent now
        assert api.put(f"/api/v1/jobs/{job_id}", acme.tokens["operator"], json={"priority": 7}).status_code == 200

    seen = changed_after_a_rollback(app, monkeypatch, job_ids, change)
    with app.app_context():
        dispatching.expire(now=utcnow())
    job = api.get(f"/api/v1/jobs/{seen[1]}", acme.tokens["viewer"]).json
    assert job["state"] == "queued" and job["attempt"] == 2, job


@pytest.mark.parametrize("report", ["task", "running"])
def test_a_report_read_before_the_reaper_ended_its_attempt_records_nothing(
    api: Api, app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch, report: str
):
    acme = world["acme"]
    checked = fencing._still_running

    def reaped_meanwhile(job: Job, row: JobAttempt) -> None:  # after the report's read, before its writes
        checked(job, row)
        lost = update(JobAttempt).where(JobAttempt.job_id == acme.running, JobAttempt.number == 1)
        elsewhere(app, lost.values(state="lost", lease_expires_at=datetime(2000, 1, 1, tzinfo=UTC)))

    monkeypatch.setattr(fencing, "_still_running", reaped_meanwhile)
    result = {"name": "kernel", "type": "command", "status": "succeeded", "position": 0, "output": "x"}
    if report == "task":
        reply = api.post(f"/api/v1/jobs/{acme.running}/tasks", acme.tokens["agent"], json={"attempt": 1, **result})
    else:
        body = {"attempt": 1, "state": "running", "tasks": [result]}
        reply = api.post(f"/api/v1/jobs/{acme.running}/status", acme.tokens["agent"], json=body)
    assert (reply.status_code, reply.json["error"]) == (409, "stale_attempt"), reply.json  # the fenced write saw it
    job = api.get(f"/api/v1/jobs/{acme.running}", acme.tokens["viewer"]).json
    assert job["attempts"][0]["state"] == "lost" and job["attempts"][0]["lease_expires_at"].startswith("2000-")
    assert job["tasks"] == []


def test_of_two_cancels_of_a_running_job_at_once_the_first_committed_keeps_its_reason(
    api: Api, app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
):
    acme = world["acme"]
    clock = service.utcnow
    first: list[str] = []

    def first_commits_meanwhile() -> datetime:  # after the second request read the job as not yet asked
        if not first:
            first.append("done")
            asked = update(Job).where(Job.id == acme.running).values(cancel_requested=True, cancel_reason="first")
            elsewhere(app, asked)
        return clock()

    monkeypatch.setattr(service, "utcnow", first_commits_meanwhile)
    second = api.post(f"/api/v1/jobs/{acme.running}/cancel", acme.tokens["operator"], json={"reason": "second"})
    assert second.status_code == 202 and second.json["cancel_requested"], second.json  # asked: that is what it wanted
    with app.app_context():
        job = db.session.get(Job, acme.running)
        assert job is not None and job.cancel_reason == "first"


def test_a_delivery_deadline_that_has_passed_is_refused_on_submission_change_and_requeue(
    api: Api, app: Flask, world: dict[str, Tenant]
):
    # the envelope outlives its send by a second at least: such a job was queued and run after its deadline
    acme = world["acme"]
    operator = acme.tokens["operator"]
    for past in ("2020-01-01T00:00:00Z", "0001-01-02T00:00:00Z"):
        refused = api.post("/api/v1/jobs", operator, json={"workflow": WORKFLOW, "deliver_by": past})
        assert refused.status_code == 400 and "has passed" in refused.json["message"], refused.json
        batch = api.post("/api/v1/jobs/batch", operator, json={"jobs": [{"workflow": WORKFLOW, "deliver_by": past}]})
        assert batch.status_code == 400 and batch.json["index"] == 0, batch.json
    soon = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    job_id = submit(api, acme, deliver_by=soon)
    with app.app_context():
        dispatching.sweep(now=utcnow() + timedelta(seconds=5))
    assert api.get(f"/api/v1/jobs/{job_id}", operator).json["state"] == "dead_letter"
    late = api.post(f"/api/v1/jobs/{job_id}/requeue", operator, json={"deliver_by": "2020-01-01T00:00:00Z"})
    assert late.status_code == 400 and api.get(f"/api/v1/jobs/{job_id}", operator).json["state"] == "dead_letter"
    # a change is checked as a submission: its deadline after the time it is due, and after now
    later = datetime.now(UTC) + timedelta(hours=1)
    for change in (
        {"scheduled_at": later.isoformat(), "deliver_by": (later - timedelta(minutes=1)).isoformat()},
        {"deliver_by": "2020-01-01T00:00:00Z"},
    ):
        changed = api.put(f"/api/v1/jobs/{acme.pending}", operator, json=change)
        assert changed.status_code == 400, (change, changed.json)
    assert api.get(f"/api/v1/jobs/{acme.pending}", operator).json["revision"] == 1


def test_a_changed_workflow_naming_a_secret_the_project_lacks_is_refused(api: Api, world: dict[str, Tenant]):
    acme = world["acme"]
    workflow = WORKFLOW.replace("uname -a", "echo {{.secrets.NOPE}}")
    assert workflow != WORKFLOW
    changed = api.put(f"/api/v1/jobs/{acme.pending}", acme.tokens["operator"], json={"workflow": workflow})
    assert changed.status_code == 422 and changed.json["error"] == "unknown_secret", changed.json
