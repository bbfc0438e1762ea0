"""Contract tests of the jobs endpoints used by operators."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select, update

from app.agents.models import Agent
from app.columns import utcnow
from app.extensions import db
from app.jobs import dispatching, service, submission
from app.jobs.models import Job, JobAttempt
from app.jobs.schemas import JobDetail, JobList, JobOut
from tests.app.support import BAD_WORKFLOW, POWERSHELL, WORKFLOW, Api, Tenant


def test_a_submitted_job_is_pending_with_its_id_and_schedule(api: Api, world: dict[str, Tenant]) -> None:
    response = api.post("/api/v1/jobs", world["acme"].tokens["operator"], json={"workflow": WORKFLOW})
    assert response.status_code == 201
    job = JobOut.model_validate(response.json)
    assert job.state == "pending" and job.attempt == 0 and job.name == "three-steps"
    assert job.project_id == "web" and job.platform == "linux" and job.scheduled_at is not None
    assert response.json["schedule_id"] is None  # submitted directly, not fired by a schedule
    assert response.headers["Location"] == f"/api/v1/jobs/{job.job_id}"


def test_a_submission_keeps_variables_priority_schedule_and_pinned_agent(api: Api, world: dict[str, Tenant]) -> None:
    later = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    body = {
        "workflow": WORKFLOW,
        "variables": {"HOST": "web1", "N": 3},
        "priority": 9,
        "agent_id": "a1",
        "scheduled_at": later.isoformat(),
    }
    response = api.post("/api/v1/jobs", world["acme"].tokens["operator"], json=body)
    assert response.status_code == 201, response.json
    job = JobOut.model_validate(response.json)
    assert job.variables == {"HOST": "web1", "N": 3} and job.priority == 9 and job.agent_id == "a1"
    assert job.scheduled_at == later


def test_an_invalid_workflow_is_refused_with_its_yaml_line(api: Api, world: dict[str, Tenant]) -> None:
    response = api.post("/api/v1/jobs", world["acme"].tokens["operator"], json={"workflow": BAD_WORKFLOW})
    assert response.status_code == 422
    assert response.json["error"] == "invalid_workflow"
    assert response.json["line"] == 8
    assert "did you mean 'command'" in response.json["message"]
    assert response.json["problems"][0]["path"] == "tasks[1] (second).type"


def test_malformed_yaml_is_an_invalid_workflow_with_its_line(api: Api, world: dict[str, Tenant]) -> None:
    response = api.post("/api/v1/jobs", world["acme"].tokens["operator"], json={"workflow": "name: x\ntasks: [\n"})
    assert response.status_code == 422
    assert (
        response.json["error"] == "invalid_workflow" and response.json["line"] == 2
    )  # where the "[" is, not past the end


def test_a_workflow_that_looks_like_a_file_name_is_not_read_from_disk(api: Api, world: dict[str, Tenant]) -> None:
    response = api.post("/api/v1/jobs", world["acme"].tokens["operator"], json={"workflow": "/etc/passwd.yaml"})
    assert response.status_code == 422
    assert "cannot read" not in response.json["message"]


def test_a_powershell_workflow_goes_to_windows_and_never_to_a_linux_agent(api: Api, world: dict[str, Tenant]) -> None:
    operator = world["acme"].tokens["operator"]
    response = api.post("/api/v1/jobs", operator, json={"workflow": POWERSHELL})
    assert response.status_code == 201 and response.json["platform"] == "windows"
    pinned = api.post("/api/v1/jobs", operator, json={"workflow": POWERSHELL, "agent_id": "a1"})
    assert pinned.status_code == 422 and pinned.json["error"] == "incompatible_platform"
    assert pinned.json["message"] == "agent 'a1' runs linux; this workflow runs on windows"  # which agent, and why
    queued = api.post("/api/v1/jobs", operator, json={"workflow": WORKFLOW, "scheduled_at": "2999-01-01T00:00:00Z"})
    moved = api.put(f"/api/v1/jobs/{queued.json['job_id']}", operator, json={"workflow": POWERSHELL, "agent_id": "a1"})
    assert moved.status_code == 422 and moved.json["message"] == pinned.json["message"]
    forced = api.post("/api/v1/jobs", operator, json={"workflow": POWERSHELL, "platform": "linux"})
    assert forced.status_code == 422 and forced.json["error"] == "incompatible_platform"


def test_a_job_for_an_unknown_project_or_agent_is_refused(api: Api, world: dict[str, Tenant]) -> None:
    admin = world["acme"].tokens["tenant_admin"]
    response = api.post("/api/v1/jobs", admin, json={"workflow": WORKFLOW, "project_id": "nope"})
    assert response.status_code == 422 and response.json["error"] == "unknown_project"
    response = api.post("/api/v1/jobs", admin, json={"workflow": WORKFLOW})
    assert response.status_code == 422 and response.json["error"] == "unknown_project"
    response = api.post("/api/v1/jobs", admin, json={"workflow": WORKFLOW, "project_id": "db", "agent_id": "a1"})
    assert response.status_code == 422 and response.json["error"] == "unknown_agent"


def test_jobs_are_listed_newest_first_with_filters_paging_and_a_total(api: Api, world: dict[str, Tenant]) -> None:
    viewer = world["acme"].tokens["viewer"]
    listing = JobList.model_validate(api.get("/api/v1/jobs", viewer).json)
    assert listing.total == 4 and len(listing.jobs) == 4
    assert [j.created_at for j in listing.jobs] == sorted((j.created_at for j in listing.jobs), reverse=True)
    running = api.get("/api/v1/jobs?state=running", viewer).json
    assert running["total"] == 1 and running["jobs"][0]["job_id"] == world["acme"].running
    page = api.get("/api/v1/jobs?limit=2&offset=3", viewer).json
    assert page["total"] == 4 and len(page["jobs"]) == 1 and page["limit"] == 2 and page["offset"] == 3
    assert api.get("/api/v1/jobs?tenant_id=acme&project_id=web&agent_id=zz", viewer).json["total"] == 0
    bad = api.get("/api/v1/jobs?state=sleeping", viewer)
    assert bad.status_code == 400 and bad.json["error"] == "invalid_request"
    assert api.get("/api/v1/jobs?limit=0", viewer).status_code == 400
    assert api.get("/api/v1/jobs?colour=red", viewer).status_code == 400


def test_listed_jobs_name_the_agent_that_claimed_their_current_attempt(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    listing = api.get("/api/v1/jobs", acme.tokens["viewer"]).json
    ran_on = {job["job_id"]: job["ran_on"] for job in listing["jobs"]}
    assert ran_on == {acme.pending: None, acme.queued: None, acme.running: "a1", acme.completed: "a1"}
    assert {job["agent_id"] for job in listing["jobs"]} == {None}  # none is pinned: agent_id stays the pin
    ran = api.get("/api/v1/jobs?ran_on=a1", acme.tokens["viewer"]).json
    assert {job["job_id"] for job in ran["jobs"]} == {acme.running, acme.completed} and ran["total"] == 2
    assert api.get("/api/v1/jobs?ran_on=a1&state=running", acme.tokens["viewer"]).json["total"] == 1
    assert api.get("/api/v1/jobs?ran_on=g1", acme.tokens["viewer"]).json["total"] == 0  # globex's agent
    assert api.get("/api/v1/jobs?agent_id=a1", acme.tokens["viewer"]).json["total"] == 0  # the pin: none


def test_jobs_are_found_by_the_start_of_their_id_within_the_callers_tenant_only(
    api: Api, world: dict[str, Tenant]
) -> None:
    acme, globex = world["acme"], world["globex"]
    for job_id in (acme.pending, acme.completed):
        found = api.get(f"/api/v1/jobs?id_prefix={job_id[:8]}", acme.tokens["viewer"]).json
        assert [job["job_id"] for job in found["jobs"]] == [job_id] and found["total"] == 1
    whole = api.get(f"/api/v1/jobs?id_prefix={acme.running}", acme.tokens["viewer"]).json
    assert [job["job_id"] for job in whole["jobs"]] == [acme.running]
    assert api.get(f"/api/v1/jobs?id_prefix={acme.running[:8]}", globex.tokens["viewer"]).json["total"] == 0
    for bad in ("abc", "ABCD1234", "ab%d", "a_cd", acme.running + "0"):
        refused = api.get(f"/api/v1/jobs?id_prefix={bad}", acme.tokens["viewer"])
        assert refused.status_code == 400 and refused.json["error"] == "invalid_request", bad


def test_a_job_is_read_with_its_attempts_task_results_and_history(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    response = api.get(f"/api/v1/jobs/{acme.completed}", acme.tokens["viewer"])
    assert response.status_code == 200
    job = JobDetail.model_validate(response.json)
    assert job.state == "completed" and job.workflow == WORKFLOW
    assert [a.state for a in job.attempts] == ["completed"] and job.attempts[0].agent_id == "a1"
    assert [(e.from_state, e.to_state) for e in job.events] == [
        ("pending", "queued"),
        ("queued", "running"),
        ("running", "completed"),
    ]


def test_a_pending_job_can_be_changed_and_its_revision_goes_up(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    response = api.put(
        f"/api/v1/jobs/{acme.pending}", acme.tokens["operator"], json={"priority": 1, "variables": {"A": "b"}}
    )
    assert response.status_code == 200
    assert response.json["priority"] == 1 and response.json["variables"] == {"A": "b"}
    assert response.json["revision"] == 2
    queued = api.put(f"/api/v1/jobs/{acme.queued}", acme.tokens["operator"], json={"priority": 2})
    assert queued.status_code == 200
    pinned = api.put(f"/api/v1/jobs/{acme.pending}", acme.tokens["operator"], json={"agent_id": "a1"})
    assert pinned.status_code == 200 and pinned.json["agent_id"] == "a1", pinned.json
    nulls = {"agent_id": None, "platform": None, "deliver_by": None}  # unpin, let the workflow choose, no deadline
    unpinned = api.put(f"/api/v1/jobs/{acme.pending}", acme.tokens["operator"], json=nulls)
    assert unpinned.status_code == 200 and unpinned.json["agent_id"] is None, unpinned.json
    refused = api.put(
        f"/api/v1/jobs/{acme.pending}", acme.tokens["operator"], json={"variables": None, "priority": None}
    )
    assert refused.status_code == 400 and "priority, variables: may not be null" in refused.json["message"]
    assert api.get(f"/api/v1/jobs/{acme.pending}", acme.tokens["viewer"]).json["variables"] == {"A": "b"}


def test_a_queued_job_changed_to_run_later_is_sent_then_and_not_now(
    api: Api, app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its message carries the old revision, so the change opens a new attempt: that attempt waits for the new
    ``scheduled_at`` (the sweeper sends it then, as it sends a retry after its backoff) instead of going at once."""
    acme = world["acme"]
    sent: list[tuple[str, int]] = []
    monkeypatch.setattr(dispatching, "send", lambda job, attempt, **_: sent.append((job.id, attempt.number)) or True)
    later = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    changed = api.put(f"/api/v1/jobs/{acme.queued}", acme.tokens["operator"], json={"scheduled_at": later.isoformat()})
    assert changed.status_code == 200 and changed.json["state"] == "queued" and changed.json["attempt"] == 2
    assert sent == []
    with app.app_context():
        attempt = db.session.scalars(
            select(JobAttempt).where(JobAttempt.job_id == acme.queued, JobAttempt.number == 2)
        ).one()
        assert attempt.not_before == later and attempt.published_at is None
    now = api.put(f"/api/v1/jobs/{acme.queued}", acme.tokens["operator"], json={"priority": 3})  # no time asked
    assert now.status_code == 200 and now.json["attempt"] == 3
    assert sent == []  # still not before the time the previous change asked for
    with app.app_context():  # the sweeper leaves it alone until then
        monkeypatch.setattr(dispatching, "_publisher", lambda: object())
        dispatching.sweep(now=utcnow())  # it sends the world's pending jobs, not this one
        assert [number for job_id, number in sent if job_id == acme.queued] == []
        dispatching.sweep(now=later + timedelta(seconds=1))
    assert [number for job_id, number in sent if job_id == acme.queued] == [3]


def test_a_queued_job_put_off_can_be_brought_forward_but_a_retrys_backoff_stays(
    api: Api, app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    acme = world["acme"]
    sent: list[int] = []
    monkeypatch.setattr(dispatching, "send", lambda job, attempt, **_: sent.append(attempt.number) or True)
    url, operator = f"/api/v1/jobs/{acme.queued}", acme.tokens["operator"]
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert api.put(url, operator, json={"scheduled_at": later}).json["attempt"] == 2 and sent == []
    sooner = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    assert api.put(url, operator, json={"scheduled_at": sooner}).json["attempt"] == 3
    assert sent == [3]  # the time asked before gave way to the new one: sent at once
    backoff = utcnow() + timedelta(minutes=10)
    with app.app_context():  # the current attempt waits out a retry's backoff
        db.session.execute(
            update(JobAttempt)
            .where(JobAttempt.job_id == acme.queued, JobAttempt.number == 3)
            .values(published_at=None, not_before=backoff)
        )
        db.session.commit()
    assert api.put(url, operator, json={"scheduled_at": sooner}).json["attempt"] == 4
    assert sent == [3]
    with app.app_context():
        attempt = db.session.scalars(
            select(JobAttempt).where(JobAttempt.job_id == acme.queued, JobAttempt.number == 4)
        ).one()
        assert attempt.not_before == backoff


def test_a_running_or_finished_job_cannot_be_changed(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    for job_id in (acme.running, acme.completed):
        response = api.put(f"/api/v1/jobs/{job_id}", acme.tokens["operator"], json={"priority": 1})
        assert response.status_code == 409 and response.json["error"] == "invalid_transition"


def test_a_change_with_an_invalid_workflow_is_refused_and_changes_nothing(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    response = api.put(f"/api/v1/jobs/{acme.pending}", acme.tokens["operator"], json={"workflow": BAD_WORKFLOW})
    assert response.status_code == 422 and response.json["line"] == 8
    assert api.get(f"/api/v1/jobs/{acme.pending}", acme.tokens["operator"]).json["revision"] == 1


def test_cancelling_a_job_that_has_not_started_cancels_it_at_once(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    for job_id in (acme.pending, acme.queued):
        response = api.post(f"/api/v1/jobs/{job_id}/cancel", acme.tokens["operator"], json={"reason": "not today"})
        assert response.status_code == 200
        assert response.json["state"] == "cancelled" and response.json["cancel_requested"] is True
        assert response.json["error"] == "not today"
    detail = api.get(f"/api/v1/jobs/{acme.queued}", acme.tokens["operator"]).json
    assert detail["attempts"][0]["state"] == "cancelled"


def test_cancelling_a_running_job_asks_its_agent_to_stop(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    response = api.post(f"/api/v1/jobs/{acme.running}/cancel", acme.tokens["operator"])
    assert response.status_code == 202
    assert response.json["state"] == "running" and response.json["cancel_requested"] is True
    again = api.post(f"/api/v1/jobs/{acme.running}/cancel", acme.tokens["operator"])
    assert again.status_code == 202
    beat = api.post(
        "/api/v1/agents/a1/heartbeat", acme.tokens["agent"], json={"running": [{"job_id": acme.running, "attempt": 1}]}
    )
    assert beat.json["cancel"] == [acme.running]


def test_a_running_job_cancelled_with_a_reason_ends_with_it(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    reason = {"reason": "maintenance window closed"}
    assert api.post(f"/api/v1/jobs/{acme.running}/cancel", acme.tokens["operator"], json=reason).status_code == 202
    again = {"reason": "a second thought"}  # the first request's reason stands
    assert api.post(f"/api/v1/jobs/{acme.running}/cancel", acme.tokens["operator"], json=again).status_code == 202
    stopped = {"attempt": 1, "state": "cancelled", "error": "the run was cancelled"}
    reply = api.post(f"/api/v1/jobs/{acme.running}/status", acme.tokens["agent"], json=stopped)
    assert reply.status_code == 200 and reply.json["state"] == "cancelled"
    detail = api.get(f"/api/v1/jobs/{acme.running}", acme.tokens["viewer"]).json
    assert detail["error"] == "maintenance window closed"  # the operator's words, not only the agent's
    assert detail["attempts"][0]["error"] == "the run was cancelled"
    assert detail["events"][-1]["reason"] == "maintenance window closed"


def test_a_cancel_that_races_the_claim_of_the_job_asks_the_started_job_to_stop(
    app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel read the job queued, then an agent claimed it before the cancel's write: the cancel is made again
    as of the job's latest state (202, cancel requested), not refused with 409 concurrent_update."""
    acme = world["acme"]
    read = service.scoped
    claimed: list[int] = []

    def overtaken(*args: object) -> object:
        job = read(*args)  # type: ignore[arg-type]
        if not claimed:  # another request, on another thread, claims the job and commits
            url, agent = f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"]
            other = threading.Thread(
                target=lambda: claimed.append(Api(app.test_client()).post(url, agent, json={"attempt": 1}).status_code)
            )
            other.start()
            other.join()
        return job

    monkeypatch.setattr(service, "scoped", overtaken)
    cancel = Api(app.test_client()).post(
        f"/api/v1/jobs/{acme.queued}/cancel", acme.tokens["operator"], json={"reason": "stop"}
    )
    assert claimed == [200]
    assert cancel.status_code == 202, cancel.json
    assert cancel.json["state"] == "running" and cancel.json["cancel_requested"] is True


def test_a_finished_job_cannot_be_cancelled(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    response = api.post(f"/api/v1/jobs/{acme.completed}/cancel", acme.tokens["operator"])
    assert response.status_code == 409
    assert response.json == {
        "error": "invalid_transition",
        "state": "completed",
        "message": f"job {acme.completed} is completed; it cannot become cancelled",
    }


def test_a_finished_job_can_be_deleted_but_an_active_one_cannot(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    for job_id in (acme.pending, acme.queued, acme.running):
        response = api.delete(f"/api/v1/jobs/{job_id}", acme.tokens["operator"])
        assert response.status_code == 409 and response.json["error"] == "job_active"
    assert api.delete(f"/api/v1/jobs/{acme.completed}", acme.tokens["operator"]).status_code == 204
    assert api.get(f"/api/v1/jobs/{acme.completed}", acme.tokens["operator"]).status_code == 404
    assert api.delete(f"/api/v1/jobs/{acme.completed}", acme.tokens["operator"]).status_code == 404


def test_a_job_deleted_by_a_request_at_the_same_time_is_not_found_and_deleted_once(
    api: Api, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the second request read the job before the first deleted it: its DELETE finds no row
    acme = world["acme"]
    real = service.scoped
    stale: list[Job] = []

    def read_before_the_other_deleted(caller: Any, job_id: str) -> Job:
        if not stale:
            stale.append(real(caller, job_id))
            db.session.expunge(stale[0])  # read as it was, in a transaction that ends before the other request
            db.session.rollback()
            assert api.delete(f"/api/v1/jobs/{job_id}", acme.tokens["operator"]).status_code == 204  # the other
            return stale[0]
        return real(caller, job_id)

    monkeypatch.setattr(service, "scoped", read_before_the_other_deleted)
    response = api.delete(f"/api/v1/jobs/{acme.completed}", acme.tokens["operator"])
    assert response.status_code == 404, response.json
    audited = api.get("/api/v1/audit?action=job.deleted", world["acme"].tokens["admin"]).json
    assert [e["target_id"] for e in audited["events"]] == [acme.completed]


def test_an_unknown_job_is_not_found(api: Api, world: dict[str, Tenant]) -> None:
    response = api.get("/api/v1/jobs/no-such-job", world["acme"].tokens["viewer"])
    assert response.status_code == 404
    assert response.json == {"error": "not_found", "message": "job 'no-such-job' does not exist"}


def test_a_submission_warns_when_no_agent_that_could_run_it_is_online(
    api: Api, app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(submission, "_seen", {})  # what other tests' submissions saw
    acme = world["acme"]
    with app.app_context():  # a1, the project's linux agent, last heard of long ago
        db.session.execute(update(Agent).where(Agent.id == "a1").values(last_heartbeat_at=None))
        db.session.commit()
    operator = acme.tokens["operator"]
    windows = api.post("/api/v1/jobs", operator, json={"workflow": POWERSHELL})
    assert windows.status_code == 201, windows.json
    project = windows.json["project_id"]
    assert windows.json["warnings"] == [submission.NO_AGENT_ONLINE.format(platform="windows", project=project)]
    offline = api.post("/api/v1/jobs", operator, json={"workflow": WORKFLOW})
    assert offline.json["warnings"] == [submission.NO_AGENT_ONLINE.format(platform="linux", project=project)]
    pinned = api.post("/api/v1/jobs", operator, json={"workflow": WORKFLOW, "agent_id": "a1"})
    assert pinned.json["warnings"] == [submission.PINNED_AGENT_OFFLINE.format(agent="a1")]
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    scheduled = api.post("/api/v1/jobs", operator, json={"workflow": WORKFLOW, "scheduled_at": later})
    assert scheduled.json["warnings"] == []  # agents may well be back by then
    beat = api.post("/api/v1/agents/a1/heartbeat", acme.tokens["agent"], json={"running": []})
    assert beat.status_code == 200
    submission._seen.clear()  # what a process found out is trusted for SEEN_FOR seconds: as if they had passed
    online = api.post("/api/v1/jobs", operator, json={"workflow": WORKFLOW})
    assert online.json["warnings"] == []
    pinned = api.post("/api/v1/jobs", operator, json={"workflow": WORKFLOW, "agent_id": "a1"})
    assert pinned.json["warnings"] == []
    batch = api.post("/api/v1/jobs/batch", operator, json={"jobs": [{"workflow": WORKFLOW}, {"workflow": POWERSHELL}]})
    assert [len(job["warnings"]) for job in batch.json["jobs"]] == [0, 1]
    listed = api.get("/api/v1/jobs", operator).json["jobs"]
    assert all("warnings" not in job for job in listed)  # a submission's answer only
