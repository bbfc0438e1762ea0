"""A claim that carries the final states of the agent's other jobs: each recorded as if reported alone, whatever
becomes of the claim, and all of it in one commit when nothing is refused."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import event, update
from sqlalchemy.orm import Session

from app.extensions import db
from app.jobs import dispatching, fencing
from app.jobs.models import Job, JobAttempt
from app.jobs.schemas import MAX_FINISHED_PER_CLAIM, ClaimOut
from app.tenants.models import Project
from tests.app.support import Api, Tenant, token

LINE = {"ts": "2026-12-05T10:00:00Z", "task": "disk", "level": "info", "message": "47% used"}
LAST_TASK = {"name": "disk", "type": "command", "status": "succeeded", "position": 1, "output": "47%\n"}


def finished(job_id: str, state: str = "completed", **extra: Any) -> dict[str, Any]:
    return {"job_id": job_id, "attempt": 1, "state": state, "tasks": [LAST_TASK], "logs": [LINE], **extra}


def state(api: Api, tenant: Tenant, job_id: str) -> str:
    return str(api.get(f"/api/v1/jobs/{job_id}", tenant.tokens["viewer"]).json["state"])


def test_a_claim_records_the_final_state_it_carries_then_claims(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    body = {"attempt": 1, "task": "kernel", "finished": [finished(acme.running)]}
    response = api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json=body)
    assert response.status_code == 200
    granted = ClaimOut.model_validate(response.json)
    assert granted.state == "running" and granted.job_id == acme.queued
    assert [(o.job_id, o.attempt, o.status, o.state) for o in granted.finished] == [(acme.running, 1, 200, "completed")]
    detail = api.get(f"/api/v1/jobs/{acme.running}", acme.tokens["viewer"]).json
    assert detail["state"] == "completed" and detail["attempts"][0]["state"] == "completed"
    assert [(t["name"], t["output"]) for t in detail["tasks"]] == [("disk", "47%\n")]
    logs = api.get(f"/api/v1/jobs/{acme.running}/logs", acme.tokens["viewer"]).json
    assert [line["message"] for line in logs["lines"]] == ["47% used"]


def test_a_carried_report_that_is_refused_is_answered_alone_and_the_claim_goes_on(
    api: Api, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    other = token("acme", "agent", agent="a2")
    api.post("/api/v1/agents", other, json={"agent_id": "a2", "hostname": "a2", "platform": "linux"})
    body = {"attempt": 1, "finished": [finished(acme.running), finished(acme.completed, "failed")]}
    response = api.post(f"/api/v1/jobs/{acme.queued}/claim", other, json=body)  # a1 runs acme.running
    assert response.status_code == 200
    outcomes = [(o["job_id"], o["status"], o["error"]) for o in response.json["finished"]]
    assert outcomes == [(acme.running, 403, "access_denied"), (acme.completed, 403, "access_denied")]
    assert state(api, acme, acme.running) == "running" and state(api, acme, acme.queued) == "running"
    audited = api.get("/api/v1/audit?action=access.denied", acme.tokens["admin"]).json["events"]
    assert any(event["details"].get("job_id") == acme.running for event in audited)


def test_a_refused_claim_still_answers_for_the_reports_it_carried(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    api.post(f"/api/v1/jobs/{acme.queued}/cancel", acme.tokens["operator"])
    body = {"attempt": 1, "finished": [finished(acme.running, "failed", error="task 'disk' failed")]}
    response = api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json=body)
    assert response.status_code == 409 and response.json["error"] == "job_cancelled"
    assert response.json["finished"] == [
        {"job_id": acme.running, "attempt": 1, "status": 200, "state": "failed", "error": None, "message": None}
    ]
    assert state(api, acme, acme.running) == "failed"


def test_a_claim_retried_after_a_lost_answer_records_what_it_carries_once(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    body = {"attempt": 1, "finished": [finished(acme.running)]}
    assert api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json=body).status_code == 200
    again = api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json=body)
    assert again.status_code == 409 and again.json["error"] == "invalid_transition"  # the claim was made
    assert [(o["status"], o["state"]) for o in again.json["finished"]] == [(200, "completed")]  # and so was this
    detail = api.get(f"/api/v1/jobs/{acme.running}", acme.tokens["viewer"]).json
    assert len(detail["tasks"]) == 1 and [e["to_state"] for e in detail["events"]].count("completed") == 1
    logs = api.get(f"/api/v1/jobs/{acme.running}/logs", acme.tokens["viewer"]).json
    assert len(logs["lines"]) == 1


def test_a_claim_whose_carried_reports_are_malformed_changes_nothing(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    for carried in (
        [finished(acme.running, "running")],  # only final states ride with a claim
        [{"attempt": 1, "state": "completed"}],  # whose job?
        [finished(acme.running)] * (MAX_FINISHED_PER_CLAIM + 1),
    ):
        response = api.post(
            f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json={"attempt": 1, "finished": carried}
        )
        assert response.status_code == 400 and response.json["error"] == "invalid_request"
        assert state(api, acme, acme.running) == "running" and state(api, acme, acme.queued) == "queued"


@pytest.fixture
def commits() -> Iterator[list[int]]:
    """Counts the commits of every session while the test runs."""
    counted: list[int] = []

    def count(_session: Session) -> None:
        counted.append(1)

    event.listen(Session, "after_commit", count)
    yield counted
    event.remove(Session, "after_commit", count)


def queue_job(api: Api, app: Flask, tenant: Tenant, **fields: Any) -> str:
    """Submit a one-task job and open its first attempt, as dispatch would; returns its id."""
    workflow = "name: one\ntasks:\n  - {name: a, type: command, config: {command: id}}\n"
    job_id = str(
        api.post("/api/v1/jobs", tenant.tokens["operator"], json={"workflow": workflow, **fields}).json["job_id"]
    )
    with app.app_context():
        job = db.session.get(Job, job_id)
        assert job is not None
        dispatching.open_next_attempt(job, actor="test")
    return job_id


def claimed_retryable(api: Api, app: Flask, tenant: Tenant) -> str:
    """A job claimed by the tenant's agent whose failure opens a second attempt at once; returns its id."""
    job_id = queue_job(api, app, tenant, max_attempts=2, retry_backoff=0)
    assert api.post(f"/api/v1/jobs/{job_id}/claim", tenant.tokens["agent"], json={"attempt": 1}).status_code == 200
    return job_id


def test_a_claim_and_the_reports_it_carries_are_written_in_one_commit(
    api: Api, world: dict[str, Tenant], commits: list[int]
) -> None:
    acme = world["acme"]
    body = {"attempt": 1, "task": "kernel", "finished": [finished(acme.running)]}
    response = api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json=body)
    assert response.status_code == 200 and response.json["finished"][0]["state"] == "completed"
    assert len(commits) == 1
    assert state(api, acme, acme.running) == "completed" and state(api, acme, acme.queued) == "running"


def test_a_carried_report_overtaken_between_its_check_and_its_write_is_answered_alone(
    api: Api, app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    acme = world["acme"]
    assert api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json={"attempt": 1}).status_code == 200
    fresh = queue_job(api, app, acme)
    record = fencing._record_status

    def overtaken(caller: Any, job: Job, row: JobAttempt, report: Any) -> bool:
        if job.id == acme.running:  # the reaper, say, ends the attempt on another connection meanwhile
            with db.engine.begin() as other:
                other.execute(
                    update(JobAttempt).where(JobAttempt.job_id == job.id, JobAttempt.number == 1).values(state="lost")
                )
        return record(caller, job, row, report)

    monkeypatch.setattr(fencing, "_record_status", overtaken)
    body = {"attempt": 1, "finished": [finished(acme.running), finished(acme.queued, "failed", error="boom")]}
    response = api.post(f"/api/v1/jobs/{fresh}/claim", acme.tokens["agent"], json=body)
    assert response.status_code == 200 and response.json["state"] == "running"
    outcomes = [(o["job_id"], o["status"], o["state"], o["error"]) for o in response.json["finished"]]
    assert outcomes == [(acme.running, 409, None, "stale_attempt"), (acme.queued, 200, "failed", None)]
    assert state(api, acme, acme.running) == "running" and state(api, acme, acme.queued) == "failed"


def test_a_carried_failure_that_opens_the_next_attempt_is_answered_with_the_job_queued_again(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    retried = claimed_retryable(api, app, acme)
    body = {"attempt": 1, "finished": [finished(retried, "failed", error="boom"), finished(acme.running)]}
    response = api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json=body)
    assert response.status_code == 200
    assert [(o["status"], o["state"]) for o in response.json["finished"]] == [(200, "queued"), (200, "completed")]
    detail = api.get(f"/api/v1/jobs/{retried}", acme.tokens["viewer"]).json
    assert detail["attempt"] == 2 and [a["state"] for a in detail["attempts"]] == ["failed", "queued"]
    assert state(api, acme, acme.running) == "completed" and state(api, acme, acme.queued) == "running"


def test_the_retry_a_carried_failure_opens_is_logged_under_the_failed_job_not_the_claimed_one(
    api: Api, app: Flask, world: dict[str, Tenant], caplog: pytest.LogCaptureFixture
) -> None:
    acme = world["acme"]
    retried = claimed_retryable(api, app, acme)
    body = {"attempt": 1, "finished": [finished(retried, "failed", error="boom")]}
    with caplog.at_level("INFO", "app.jobs.dispatching"):
        assert api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json=body).status_code == 200
    [record] = [r for r in caplog.records if r.getMessage().startswith(f"job {retried}: attempt 1 failed")]
    # its own fields, which the request's (job_id: the claimed job, from the URL) never override
    assert (record.job_id, record.tenant_id) == (retried, "acme")  # type: ignore[attr-defined]


def test_a_carried_failure_that_commits_its_retry_is_not_recorded_again_when_a_later_report_is_overtaken(
    api: Api, app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    acme = world["acme"]
    retried = claimed_retryable(api, app, acme)
    record = fencing._record_status

    def overtaken(caller: Any, job: Job, row: JobAttempt, report: Any) -> bool:
        if job.id == acme.running:  # after the retry's commit, the reaper ends this attempt on another connection
            with db.engine.begin() as other:
                other.execute(
                    update(JobAttempt).where(JobAttempt.job_id == job.id, JobAttempt.number == 1).values(state="lost")
                )
        return record(caller, job, row, report)

    monkeypatch.setattr(fencing, "_record_status", overtaken)
    body = {"attempt": 1, "finished": [finished(retried, "failed", error="boom"), finished(acme.running)]}
    response = api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json=body)
    assert response.status_code == 200 and response.json["state"] == "running"
    outcomes = [(o["status"], o["state"], o["error"]) for o in response.json["finished"]]
    assert outcomes == [(200, "queued", None), (409, None, "stale_attempt")]  # the retry's report is not redone
    detail = api.get(f"/api/v1/jobs/{retried}", acme.tokens["viewer"]).json
    assert detail["attempt"] == 2 and [a["state"] for a in detail["attempts"]] == ["failed", "queued"]


def test_the_same_final_state_carried_twice_is_recorded_once(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    body = {"attempt": 1, "finished": [finished(acme.running), finished(acme.running)]}
    response = api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json=body)
    assert response.status_code == 200 and response.json["state"] == "running"
    assert [(o["status"], o["state"]) for o in response.json["finished"]] == [(200, "completed")] * 2
    detail = api.get(f"/api/v1/jobs/{acme.running}", acme.tokens["viewer"]).json
    assert len(detail["tasks"]) == 1 and [e["to_state"] for e in detail["events"]].count("completed") == 1
    assert len(api.get(f"/api/v1/jobs/{acme.running}/logs", acme.tokens["viewer"]).json["lines"]) == 1


def test_a_claim_refused_for_a_full_project_keeps_its_carried_reports_and_is_not_made_twice(
    api: Api, app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    acme = world["acme"]
    second = queue_job(api, app, acme)
    assert api.post(f"/api/v1/jobs/{second}/claim", acme.tokens["agent"], json={"attempt": 1}).status_code == 200
    with app.app_context():  # the operator lowers the limit below what runs now
        db.session.execute(
            update(Project).where(Project.tenant_id == "acme", Project.id == "web").values(max_running_jobs=1)
        )
        db.session.commit()
    takes: list[str] = []
    take = fencing._take

    def counted(caller: Any, job: Job, *rest: Any) -> None:
        takes.append(job.id)
        take(caller, job, *rest)

    monkeypatch.setattr(fencing, "_take", counted)
    body = {"attempt": 1, "finished": [finished(acme.running)]}  # frees one place of two: still one too many
    refused = api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json=body)
    assert refused.status_code == 409 and refused.json["error"] == "project_at_capacity"
    assert [(o["status"], o["state"]) for o in refused.json["finished"]] == [(200, "completed")]
    assert takes == [acme.queued]  # asking again in the same request would get the same answer
    assert state(api, acme, acme.running) == "completed" and state(api, acme, acme.queued) == "queued"
    detail = api.get(f"/api/v1/jobs/{acme.running}", acme.tokens["viewer"]).json
    assert len(detail["tasks"]) == 1 and [e["to_state"] for e in detail["events"]].count("completed") == 1
    alone = api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json={"attempt": 1})
    assert alone.status_code == 409 and alone.json["error"] == "project_at_capacity"
    assert takes == [acme.queued] * 2 and state(api, acme, second) == "running"
