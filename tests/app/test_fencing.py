"""The agent-facing endpoints: claim before work, leases, and results fenced by the attempt number."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
from flask import Flask
from sqlalchemy import func, select, update

import probe
from app.columns import utcnow
from app.extensions import db
from app.jobs import dispatching, fencing
from app.jobs import service as jobs
from app.jobs.models import JobAttempt, JobEvent
from app.jobs.schemas import ClaimOut
from app.tenants.models import Project
from tests.app.support import Api, MakeApp, Tenant, token


def claim(api: Api, bearer: str, job_id: str, attempt: int = 1) -> object:
    return api.post(f"/api/v1/jobs/{job_id}/claim", bearer, json={"attempt": attempt})


def test_a_claim_moves_a_queued_job_to_running_and_grants_a_lease(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    response = api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json={"attempt": 1})
    assert response.status_code == 200
    granted = ClaimOut.model_validate(response.json)
    assert granted.state == "running" and granted.attempt == 1 and granted.lease_seconds == 90
    assert granted.workflow.startswith("name: three-steps") and granted.secrets == {}
    assert 85 <= (granted.lease_expires_at - datetime.now(granted.lease_expires_at.tzinfo)).total_seconds() <= 90
    detail = api.get(f"/api/v1/jobs/{acme.queued}", acme.tokens["viewer"]).json
    assert detail["state"] == "running" and detail["attempts"][0]["agent_id"] == "a1"


def test_a_second_claim_of_the_same_job_is_refused(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    response = api.post(f"/api/v1/jobs/{acme.running}/claim", acme.tokens["agent"], json={"attempt": 1})
    assert response.status_code == 409 and response.json["error"] == "invalid_transition"


def test_a_claim_of_a_pending_or_superseded_attempt_is_refused(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    for job_id, attempt in ((acme.pending, 1), (acme.queued, 2), (acme.queued, 0)):
        response = api.post(f"/api/v1/jobs/{job_id}/claim", acme.tokens["agent"], json={"attempt": attempt})
        assert response.status_code in (400, 409)
    assert (
        api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json={"attempt": 2}).json["error"]
        == "stale_attempt"
    )


def test_a_claim_of_a_cancelled_job_is_refused(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    api.post(f"/api/v1/jobs/{acme.queued}/cancel", acme.tokens["operator"])
    response = api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json={"attempt": 1})
    assert response.status_code == 409 and response.json["error"] == "job_cancelled"


def test_a_job_pinned_to_another_agent_cannot_be_claimed(api: Api, app: Flask, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    other = token("acme", "agent", agent="a2")
    api.post("/api/v1/agents", other, json={"agent_id": "a2", "hostname": "a2", "platform": "linux"})
    pinned = api.post(
        "/api/v1/jobs",
        acme.tokens["operator"],
        json={"workflow": "name: p\ntasks:\n  - {name: a, type: command, config: {command: id}}\n", "agent_id": "a1"},
    ).json["job_id"]
    with app.app_context():
        jobs.publish_job(job_id=pinned)
    response = api.post(f"/api/v1/jobs/{pinned}/claim", other, json={"attempt": 1})
    assert response.status_code == 403 and response.json["error"] == "access_denied"
    assert api.post(f"/api/v1/jobs/{pinned}/claim", acme.tokens["agent"], json={"attempt": 1}).status_code == 200


def test_a_claim_by_an_agent_of_another_project_is_refused_naming_both_projects(
    api: Api, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    other = token("acme", "agent", agent="a2", project=None)  # it may see the job: the refusal is the project's
    registered = api.post(
        "/api/v1/agents", other, json={"agent_id": "a2", "hostname": "a2", "platform": "linux", "project_id": "db"}
    )
    assert registered.status_code == 201, registered.json
    response = api.post(f"/api/v1/jobs/{acme.queued}/claim", other, json={"attempt": 1})
    assert response.status_code == 409 and response.json["error"] == "wrong_agent"
    assert response.json["message"] == f"job {acme.queued} is of project 'web'; this agent serves project 'db'"


def test_an_unregistered_agent_cannot_claim(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    response = api.post(f"/api/v1/jobs/{acme.queued}/claim", token("acme", "agent", agent="ghost"), json={"attempt": 1})
    assert response.status_code == 409 and response.json["error"] == "agent_not_registered"


def test_concurrent_claims_of_one_job_have_exactly_one_winner(app: Flask, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    bearer = token("acme", "agent", agent="a2")
    Api(app.test_client()).post(
        "/api/v1/agents", bearer, json={"agent_id": "a2", "hostname": "a2", "platform": "linux"}
    )
    statuses: list[int] = []
    barrier = threading.Barrier(6)

    def contend(who: str) -> None:
        client = Api(app.test_client())
        barrier.wait()
        statuses.append(client.post(f"/api/v1/jobs/{acme.queued}/claim", who, json={"attempt": 1}).status_code)

    threads = [threading.Thread(target=contend, args=(acme.tokens["agent"] if i % 2 else bearer,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200, 409, 409, 409, 409, 409]


def test_task_results_of_the_current_attempt_are_stored_and_a_retry_is_idempotent(
    api: Api, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    report = {
        "attempt": 1,
        "name": "kernel",
        "type": "command",
        "status": "succeeded",
        "output": "Linux\n",
        "metrics": {"exit_code": 0},
        "started_at": "2026-01-01T00:00:00Z",
        "finished_at": "2026-01-01T00:00:01Z",
    }
    first = api.post(f"/api/v1/jobs/{acme.running}/tasks", acme.tokens["agent"], json=report)
    assert first.status_code == 201 and first.json["output"] == "Linux\n"
    again = api.post(f"/api/v1/jobs/{acme.running}/tasks", acme.tokens["agent"], json=report)
    assert again.status_code == 200
    detail = api.get(f"/api/v1/jobs/{acme.running}", acme.tokens["viewer"]).json
    assert [t["name"] for t in detail["tasks"]] == ["kernel"] and detail["tasks"][0]["metrics"] == {"exit_code": 0}


def test_task_output_is_truncated_with_a_visible_marker(make_app: MakeApp, world: dict[str, Tenant]) -> None:
    app = make_app(TASK_OUTPUT_LIMIT=100)
    api, acme = Api(app.test_client()), world["acme"]
    report = {"attempt": 1, "name": "kernel", "type": "command", "status": "succeeded", "output": "x" * 1000}
    stored = api.post(f"/api/v1/jobs/{acme.running}/tasks", acme.tokens["agent"], json=report).json["output"]
    assert stored.startswith("x" * 50) and "truncated" in stored and len(stored) < 300


SEQ = "name: big\ntasks:\n  - {name: count, type: command, config: {command: seq, args: ['1', '200000']}}\n"


@pytest.mark.parametrize("limit", [64 * 1024, 1000])
def test_output_probe_cut_keeps_its_marker_counting_every_byte_cut_on_the_agent_and_here(
    make_app: MakeApp, world: dict[str, Tenant], limit: int
) -> None:
    """``seq 1 200000`` prints 1.29 MB; probe keeps 64 KiB and its marker. Cut again here, the marker was cut off and
    the new one counted only its 57 bytes."""
    output = probe.run_workflow(probe.load_workflow(SEQ.encode())).tasks[0].output
    printed = sum(len(f"{n}\n") for n in range(1, 200001))
    assert output.endswith(f"\n[... output truncated: {printed - 65536} more bytes not shown ...]")
    api, acme = Api(make_app(TASK_OUTPUT_LIMIT=limit).test_client()), world["acme"]
    report = {"attempt": 1, "name": "count", "type": "command", "status": "succeeded", "output": output}
    stored = api.post(f"/api/v1/jobs/{acme.running}/tasks", acme.tokens["agent"], json=report).json["output"]
    assert stored == output[:limit] + f"\n[... output truncated: {printed - limit} more bytes not shown ...]"


def test_output_ending_like_probes_marker_with_a_huge_count_is_stored_as_plain_text(
    make_app: MakeApp, world: dict[str, Tenant]
) -> None:
    # what a workflow prints: a count too long for int() (4300 digits) made the report, and each retry of it, a 500
    fake = "x" * 200 + "\n[... output truncated: " + "9" * 4400 + " more bytes not shown ...]"
    api, acme = Api(make_app(TASK_OUTPUT_LIMIT=1000).test_client()), world["acme"]
    report = {"attempt": 1, "name": "kernel", "type": "command", "status": "succeeded", "output": fake}
    response = api.post(f"/api/v1/jobs/{acme.running}/tasks", acme.tokens["agent"], json=report)
    assert response.status_code == 201, response.json
    assert response.json["output"].startswith(fake[:1000]) and "truncated" in response.json["output"][1000:]


def test_results_of_a_superseded_attempt_are_refused(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    for path, body in (
        ("tasks", {"name": "kernel", "type": "command", "status": "failed"}),
        ("status", {"state": "completed"}),
    ):
        response = api.post(f"/api/v1/jobs/{acme.running}/{path}", acme.tokens["agent"], json={"attempt": 2, **body})
        assert response.status_code == 409 and response.json["error"] == "stale_attempt"


def test_results_from_an_agent_that_does_not_hold_the_attempt_are_refused(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    intruder = token("acme", "agent", agent="a2")
    response = api.post(f"/api/v1/jobs/{acme.running}/status", intruder, json={"attempt": 1, "state": "failed"})
    assert response.status_code == 403 and response.json["error"] == "access_denied"
    assert api.get(f"/api/v1/jobs/{acme.running}", acme.tokens["viewer"]).json["state"] == "running"


def test_a_final_state_ends_the_job_and_the_attempt_and_a_repeat_is_harmless(
    api: Api, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    body = {"attempt": 1, "state": "failed", "error": "task disk failed"}
    first = api.post(f"/api/v1/jobs/{acme.running}/status", acme.tokens["agent"], json=body)
    assert first.status_code == 200 and first.json["state"] == "failed" and first.json["error"] == "task disk failed"
    assert api.post(f"/api/v1/jobs/{acme.running}/status", acme.tokens["agent"], json=body).status_code == 200
    other = api.post(f"/api/v1/jobs/{acme.running}/status", acme.tokens["agent"], json={**body, "state": "completed"})
    assert other.status_code == 409
    late = api.post(
        f"/api/v1/jobs/{acme.running}/tasks",
        acme.tokens["agent"],
        json={"attempt": 1, "name": "x", "type": "command", "status": "failed"},
    )
    assert late.status_code == 409


def test_a_running_report_renews_the_lease_and_stores_what_it_carries(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    with app.app_context():  # a lease about to run out
        soon = utcnow() + timedelta(seconds=5)
        db.session.execute(update(JobAttempt).where(JobAttempt.job_id == acme.running).values(lease_expires_at=soon))
        db.session.commit()
    result = {"name": "kernel", "type": "command", "status": "succeeded", "position": 0, "output": "Linux\n"}
    line = {"ts": "2026-12-07T10:00:00Z", "task": "kernel", "level": "info", "message": "Linux"}
    body = {"attempt": 1, "state": "running", "tasks": [result], "logs": [line], "logs_first_line": 1}
    response = api.post(f"/api/v1/jobs/{acme.running}/status", acme.tokens["agent"], json=body)
    assert response.status_code == 200 and response.json["state"] == "running"
    detail = api.get(f"/api/v1/jobs/{acme.running}", acme.tokens["viewer"]).json
    renewed = datetime.fromisoformat(detail["attempts"][0]["lease_expires_at"].replace("Z", "+00:00"))
    assert renewed >= soon + timedelta(seconds=app.config["LEASE_SECONDS"] - 10)
    assert [(t["name"], t["output"]) for t in detail["tasks"]] == [("kernel", "Linux\n")]
    logs = api.get(f"/api/v1/jobs/{acme.running}/logs", acme.tokens["viewer"]).json
    assert [entry["message"] for entry in logs["lines"]] == ["Linux"]


def test_an_agent_may_read_the_jobs_it_claimed_and_no_others(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    assert api.get(f"/api/v1/jobs/{acme.running}", acme.tokens["agent"]).status_code == 200
    assert api.get(f"/api/v1/jobs/{acme.pending}", acme.tokens["agent"]).status_code == 403
    assert api.get("/api/v1/jobs", acme.tokens["agent"]).status_code == 403


def test_a_final_state_carries_the_last_task_results_in_one_transaction(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    first = {"attempt": 1, "name": "kernel", "type": "command", "status": "succeeded", "output": "Linux\n"}
    first_reply = api.post(
        f"/api/v1/jobs/{acme.running}/tasks", acme.tokens["agent"], json={**first, "next_task": "disk"}
    )
    assert first_reply.status_code == 201
    last = {"name": "disk", "type": "command", "status": "failed", "position": 1, "output": "full", "error": "exit 1"}
    body = {"attempt": 1, "state": "failed", "error": "task 'disk' failed", "tasks": [last]}
    response = api.post(f"/api/v1/jobs/{acme.running}/status", acme.tokens["agent"], json=body)
    assert response.status_code == 200 and response.json["state"] == "failed"
    detail = api.get(f"/api/v1/jobs/{acme.running}", acme.tokens["viewer"]).json
    assert [(t["name"], t["status"], t["output"]) for t in detail["tasks"]] == [
        ("kernel", "succeeded", "Linux\n"),
        ("disk", "failed", "full"),
    ]
    assert api.post(f"/api/v1/jobs/{acme.running}/status", acme.tokens["agent"], json=body).status_code == 200


def test_a_final_state_with_a_bad_task_result_changes_nothing(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    bad = {"name": "disk", "type": "command", "status": "exploded"}
    body = {"attempt": 1, "state": "completed", "tasks": [bad]}
    response = api.post(f"/api/v1/jobs/{acme.running}/status", acme.tokens["agent"], json=body)
    assert response.status_code in (400, 422) and "error" in response.json
    too_many = {"attempt": 1, "state": "completed", "tasks": [{**bad, "status": "succeeded"}] * 17}
    assert api.post(f"/api/v1/jobs/{acme.running}/status", acme.tokens["agent"], json=too_many).status_code in (
        400,
        422,
    )
    detail = api.get(f"/api/v1/jobs/{acme.running}", acme.tokens["viewer"]).json
    assert detail["state"] == "running" and detail["tasks"] == []


def test_a_claim_may_name_the_first_task_it_starts(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    bad = api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json={"attempt": 1, "task": ""})
    assert bad.status_code in (400, 422)
    response = api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json={"attempt": 1, "task": "a"})
    assert response.status_code == 200 and response.json["state"] == "running"


def test_a_claim_made_again_under_its_claim_id_is_granted_again_and_only_renews_the_lease(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    """The agent's first try was granted, but its answer was lost on the way: the same claim, tried again, is granted
    again (the lease renewed, nothing else written), not refused as a second claim."""
    acme = world["acme"]
    body = {"attempt": 1, "task": "a", "claim_id": "c" * 32}
    first = api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json=body)
    assert first.status_code == 200
    of_the_job = select(JobAttempt).where(JobAttempt.job_id == acme.queued)
    with app.app_context():
        soon = utcnow() + timedelta(seconds=5)  # the agent tries again late in the lease
        db.session.execute(
            update(JobAttempt)
            .where(JobAttempt.job_id == acme.queued)
            .values(lease_expires_at=soon, deadline_at=soon + timedelta(seconds=30))
        )
        db.session.commit()
        before = db.session.scalars(of_the_job).one()
        claimed_at, claim_id, deadline = before.claimed_at, before.claim_id, before.deadline_at
        events = db.session.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == acme.queued))
    assert claim_id == "c" * 32 and deadline is not None
    again = api.post(f"/api/v1/jobs/{acme.queued}/claim", acme.tokens["agent"], json=body)
    assert again.status_code == 200, again.json
    granted = ClaimOut.model_validate(again.json)
    assert granted.attempt == 1 and granted.state == "running" and granted.workflow == first.json["workflow"]
    assert (granted.lease_expires_at - datetime.now(granted.lease_expires_at.tzinfo)).total_seconds() > 80
    with app.app_context():
        row = db.session.scalars(of_the_job).one()
        assert (row.claimed_at, row.claim_id, row.state) == (claimed_at, claim_id, "running")
        assert row.deadline_at is not None and row.deadline_at > deadline + timedelta(seconds=30)  # the run starts now
        count = select(func.count()).select_from(JobEvent).where(JobEvent.job_id == acme.queued)
        assert db.session.scalar(count) == events  # no second state change
    detail = api.get(f"/api/v1/jobs/{acme.queued}", acme.tokens["viewer"]).json
    assert detail["state"] == "running" and len(detail["attempts"]) == 1


def test_a_claim_made_again_is_granted_in_a_full_project_but_not_once_the_reaper_ended_its_attempt(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    body = {"attempt": 1, "claim_id": "f" * 16}
    url = f"/api/v1/jobs/{acme.queued}/claim"
    assert api.post(url, acme.tokens["agent"], json=body).status_code == 200
    with app.app_context():  # the project is full, even over its limit (lowered since): a new claim is refused
        db.session.execute(
            update(Project).where(Project.tenant_id == "acme", Project.id == "web").values(max_running_jobs=1)
        )
        db.session.commit()
    again = api.post(url, acme.tokens["agent"], json=body)
    assert again.status_code == 200, again.json  # it is one of the running jobs, not one more
    with app.app_context():
        dispatching.reap(now=utcnow() + timedelta(seconds=app.config["LEASE_SECONDS"] + 1))
    late = api.post(url, acme.tokens["agent"], json=body)
    assert late.status_code == 409 and late.json["error"] == "stale_attempt", late.json
    attempts = api.get(f"/api/v1/jobs/{acme.queued}", acme.tokens["viewer"]).json["attempts"]
    assert [a["state"] for a in attempts][:1] == ["lost"]


@pytest.mark.parametrize("carrying", [False, True])
def test_a_claim_made_again_after_a_cancel_ends_its_unstarted_attempt_and_the_job_at_once(
    api: Api, world: dict[str, Tenant], carrying: bool
) -> None:
    """The first try was granted but its answer lost; the operator cancelled; the agent's next try is refused and it
    drops the message, so the run never starts: the attempt and the job are cancelled now, not left running until
    the reaper finds the lease expired."""
    acme = world["acme"]
    url = f"/api/v1/jobs/{acme.queued}/claim"
    body: dict[str, object] = {"attempt": 1, "task": "a", "claim_id": "n" * 16}
    assert api.post(url, acme.tokens["agent"], json=body).status_code == 200
    cancel = {"reason": "wrong host"}
    assert api.post(f"/api/v1/jobs/{acme.queued}/cancel", acme.tokens["operator"], json=cancel).status_code == 202
    if carrying:  # the claim carries its agent's other job's final state, recorded all the same
        body["finished"] = [{"job_id": acme.running, "attempt": 1, "state": "completed"}]
    refused = api.post(url, acme.tokens["agent"], json=body)
    assert refused.status_code == 409 and refused.json["error"] == "job_cancelled", refused.json
    if carrying:
        assert [f["status"] for f in refused.json["finished"]] == [200]
        assert api.get(f"/api/v1/jobs/{acme.running}", acme.tokens["viewer"]).json["state"] == "completed"
    detail = api.get(f"/api/v1/jobs/{acme.queued}", acme.tokens["viewer"]).json
    assert detail["state"] == "cancelled" and detail["error"] == "wrong host", detail
    [attempt] = detail["attempts"]
    assert attempt["state"] == "cancelled" and attempt["error"] == fencing.NEVER_STARTED
    assert attempt["finished_at"] is not None
    # the agent's own report of the end, should it send one, is taken as the state already recorded
    status = {"attempt": 1, "state": "cancelled"}
    assert api.post(f"/api/v1/jobs/{acme.queued}/status", acme.tokens["agent"], json=status).status_code == 200


def test_a_second_delivery_refused_for_a_cancel_leaves_the_run_of_the_first_claim_alone(
    api: Api, world: dict[str, Tenant]
) -> None:
    """Only the claim that made the attempt is known not to run it: a second delivery of the message, refused for
    the cancel, is no sign that the granted run stopped (its agent stops it when the heartbeat says so). Nor is it
    an access violation when it reaches another agent."""
    acme = world["acme"]
    url = f"/api/v1/jobs/{acme.queued}/claim"
    assert api.post(url, acme.tokens["agent"], json={"attempt": 1, "claim_id": "r" * 16}).status_code == 200
    api.post(f"/api/v1/jobs/{acme.queued}/cancel", acme.tokens["operator"])
    other = token("acme", "agent", agent="a2")
    api.post("/api/v1/agents", other, json={"agent_id": "a2", "hostname": "a2", "platform": "linux"})
    for bearer, body in (
        (acme.tokens["agent"], {"attempt": 1, "claim_id": "s" * 16}),
        (acme.tokens["agent"], {"attempt": 1}),
        (other, {"attempt": 1, "claim_id": "r" * 16}),
    ):
        refused = api.post(url, bearer, json=body)
        assert refused.status_code == 409 and refused.json["error"] == "job_cancelled", (body, refused.json)
    detail = api.get(f"/api/v1/jobs/{acme.queued}", acme.tokens["viewer"]).json
    assert detail["state"] == "running" and detail["cancel_requested"] is True
    assert [a["state"] for a in detail["attempts"]] == ["running"]
    assert not denials(api, acme)


def test_a_claim_of_a_job_cancelled_while_queued_writes_nothing_and_audits_no_violation(
    api: Api, world: dict[str, Tenant]
) -> None:
    """The most common refusal for a cancel: the job was cancelled before any agent claimed it, and its message is
    delivered all the same. Its attempt is no agent's, and that is no access violation."""
    acme = world["acme"]
    assert api.post(f"/api/v1/jobs/{acme.queued}/cancel", acme.tokens["operator"]).status_code in (200, 202)
    before = api.get(f"/api/v1/jobs/{acme.queued}", acme.tokens["viewer"]).json
    claim_url = f"/api/v1/jobs/{acme.queued}/claim"
    refused = api.post(claim_url, acme.tokens["agent"], json={"attempt": 1, "claim_id": "q" * 16})
    assert refused.status_code == 409 and refused.json["error"] == "job_cancelled"
    after = api.get(f"/api/v1/jobs/{acme.queued}", acme.tokens["viewer"]).json
    assert after == before and after["state"] == "cancelled"
    assert not denials(api, acme)


def denials(api: Api, tenant: Tenant) -> list[dict[str, object]]:
    """The tenant's audited access violations."""
    response = api.get("/api/v1/audit", tenant.tokens["admin"])
    assert response.status_code == 200, response.json
    return [e for e in response.json["events"] if e["action"] in ("access.denied", "access.cross_tenant")]


@pytest.mark.parametrize("carrying", [False, True])
def test_a_try_of_a_claim_that_overlaps_an_earlier_try_which_wins_is_granted_too(
    app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch, carrying: bool
) -> None:
    """The agent gave up waiting for its first try (a timeout) and tried again while the first was still being
    answered: the second read the job queued, then lost the write to the first. It is read again and granted, as
    the same claim made again, instead of 409 concurrent_update and a dropped message."""
    acme = world["acme"]
    body: dict[str, object] = {"attempt": 1, "claim_id": "o" * 20}
    if carrying:  # the claim carries its agent's other job's final state, recorded whatever the race
        body["finished"] = [{"job_id": acme.running, "attempt": 1, "state": "completed"}]
    alone = {"attempt": 1, "claim_id": body["claim_id"]}  # the earlier try carried nothing (it was sent earlier)
    read = fencing._claimable
    earlier: list[int] = []
    overtaking = threading.Event()

    def overtaken(*args: object) -> object:
        found = read(*args)  # type: ignore[arg-type]
        if not overtaking.is_set():  # this try has read the job queued; the earlier one commits before it writes
            overtaking.set()
            thread = threading.Thread(
                target=lambda: earlier.append(
                    Api(app.test_client()).post(claim_url, acme.tokens["agent"], json=alone).status_code
                )
            )
            thread.start()
            thread.join()
        return found

    claim_url = f"/api/v1/jobs/{acme.queued}/claim"
    monkeypatch.setattr(fencing, "_claimable", overtaken)
    later = Api(app.test_client()).post(claim_url, acme.tokens["agent"], json=body)
    assert earlier == [200] and later.status_code == 200, later.json
    assert later.json["attempt"] == 1 and later.json["state"] == "running"
    if carrying:
        assert [f["status"] for f in later.json["finished"]] == [200]
    other = Api(app.test_client()).post(claim_url, acme.tokens["agent"], json={**body, "claim_id": "p" * 20})
    assert other.status_code == 409  # a second delivery is still refused


def test_a_second_claim_under_another_claim_id_or_none_or_by_another_agent_is_still_refused(
    api: Api, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    url = f"/api/v1/jobs/{acme.queued}/claim"
    ours = "k" * 16
    for bad in ("short", "x" * 65, "no spaces here at all"):
        assert api.post(url, acme.tokens["agent"], json={"attempt": 1, "claim_id": bad}).status_code in (400, 422)
    assert api.post(url, acme.tokens["agent"], json={"attempt": 1, "claim_id": ours}).status_code == 200
    other = token("acme", "agent", agent="a2")
    api.post("/api/v1/agents", other, json={"agent_id": "a2", "hostname": "a2", "platform": "linux"})
    for bearer, body in (
        (acme.tokens["agent"], {"attempt": 1, "claim_id": "m" * 16}),  # a second delivery of the message
        (acme.tokens["agent"], {"attempt": 1}),
        (other, {"attempt": 1, "claim_id": ours}),
    ):
        response = api.post(url, bearer, json=body)
        assert response.status_code == 409 and response.json["error"] == "invalid_transition", (body, response.json)
    api.post(f"/api/v1/jobs/{acme.queued}/cancel", acme.tokens["operator"])
    refused = api.post(url, acme.tokens["agent"], json={"attempt": 1, "claim_id": ours})
    assert refused.status_code == 409 and refused.json["error"] == "job_cancelled"
    status = {"attempt": 1, "state": "cancelled"}
    assert api.post(f"/api/v1/jobs/{acme.queued}/status", acme.tokens["agent"], json=status).status_code == 200
    over = api.post(url, acme.tokens["agent"], json={"attempt": 1, "claim_id": ours})
    assert over.status_code == 409 and over.json["error"] in ("job_cancelled", "invalid_transition")


def claims_refused(api: Api, tenant: Tenant) -> list[dict[str, object]]:
    """The tenant's audited second deliveries."""
    response = api.get("/api/v1/audit?action=job.claim_refused", tenant.tokens["admin"])
    assert response.status_code == 200, response.json
    return list(response.json["events"])


@pytest.mark.parametrize("carrying", [False, True])
def test_a_second_delivery_is_refused_at_its_claim_and_audited_as_one(
    api: Api, world: dict[str, Tenant], carrying: bool
) -> None:
    """An agent that restarted has forgot the envelopes it took: a message replayed to it then passes its own
    check, and only the claim stops it. The refusal is in the audit log, as the agent's own refusal would be: once
    per attempt and agent, and only for an attempt the job has had."""
    acme = world["acme"]
    url = f"/api/v1/jobs/{acme.queued}/claim"
    first = {"attempt": 1, "claim_id": "f" * 16}
    assert api.post(url, acme.tokens["agent"], json=first).status_code == 200
    assert api.post(url, acme.tokens["agent"], json=first).status_code == 200  # the same claim again: no replay
    assert claims_refused(api, acme) == []
    carried = {"finished": [{"job_id": acme.running, "attempt": 1, "state": "completed"}]} if carrying else {}
    replay = {"attempt": 1, "claim_id": "r" * 16, **carried}
    refused = api.post(url, acme.tokens["agent"], json=replay)
    assert refused.status_code == 409 and refused.json["error"] == "invalid_transition", refused.json
    for again in range(3):  # the same replay again, and claims of attempts the job never had: refused, not audited
        assert api.post(url, acme.tokens["agent"], json={"attempt": 1, "claim_id": f"{again}" * 16}).status_code == 409
        never = api.post(url, acme.tokens["agent"], json={"attempt": 2 + again, "claim_id": "s" * 16})
        assert never.status_code == 409 and never.json["error"] == "stale_attempt", never.json
    other = token("acme", "agent", agent="a2")
    api.post("/api/v1/agents", other, json={"agent_id": "a2", "hostname": "a2", "platform": "linux"})
    assert api.post(url, other, json={"attempt": 1, "claim_id": "o" * 16}).status_code == 409
    events = claims_refused(api, acme)
    assert [
        (e["outcome"], e["target_id"], e["details"]["reason"], e["details"]["agent_id"]) for e in reversed(events)
    ] == [
        ("refused", acme.queued, "invalid_transition", "a1"),
        ("refused", acme.queued, "invalid_transition", "a2"),
    ]
    assert events[-1]["details"]["attempt"] == 1
    if carrying:  # the report it carried is recorded all the same
        assert api.get(f"/api/v1/jobs/{acme.running}", acme.tokens["viewer"]).json["state"] == "completed"
    api.post(f"/api/v1/jobs/{acme.queued}/cancel", acme.tokens["operator"])
    cancelled = api.post(url, other, json={"attempt": 1, "claim_id": "c" * 16})
    assert cancelled.status_code == 409 and len(claims_refused(api, acme)) == 2  # a cancel is the normal course


def test_a_stale_attempts_message_is_audited_as_a_second_delivery(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    url = f"/api/v1/jobs/{acme.running}/claim"
    with app.app_context():  # the running attempt is lost, and the job's next attempt queued
        dispatching.reap(now=utcnow() + timedelta(seconds=app.config["LEASE_SECONDS"] + 1))
    assert api.get(f"/api/v1/jobs/{acme.running}", acme.tokens["viewer"]).json["attempt"] == 2
    stale = api.post(url, acme.tokens["agent"], json={"attempt": 1, "claim_id": "z" * 16})
    assert stale.status_code == 409 and stale.json["error"] == "stale_attempt", stale.json
    assert [(e["details"]["reason"], e["details"]["attempt"]) for e in claims_refused(api, acme)] == [
        ("stale_attempt", 1)
    ]
