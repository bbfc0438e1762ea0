"""``POST /api/v1/jobs/batch``: several jobs in one transaction, all or none, each published after the commit."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from flask import Flask
from sqlalchemy import event, func, select

from app.audit.models import AuditEvent
from app.columns import utcnow
from app.extensions import db
from app.jobs import dispatching
from app.jobs.models import Job, JobAttempt
from app.jobs.schemas import MAX_BATCH_JOBS, JobBatchOut
from dispatch.celery import make_celery
from dispatch.publish import JobMessage, Publisher
from tests.app.support import BAD_WORKFLOW, POWERSHELL, WORKFLOW, Api, MakeApp, Tenant, build_world, token
from tests.app.test_receipts import live_app, messages, wait_for_receipt
from tests.servers.valkey import ValkeyServer

BATCH = "/api/v1/jobs/batch"
__all__ = ["live_app"]  # the fixture "live": the control plane with a broker


def stored(app: Flask) -> tuple[int, int]:
    """How many jobs and audit records the database holds."""
    with app.app_context():
        jobs = db.session.scalar(select(func.count()).select_from(Job)) or 0
        records = db.session.scalar(select(func.count()).select_from(AuditEvent)) or 0
        return jobs, records


@pytest.fixture(name="acme")
def acme_tenant(app: Flask) -> Tenant:
    return build_world(app)["acme"]


def test_a_batch_is_stored_in_one_commit_and_every_job_is_published(
    live: Flask, acme: Tenant, valkey_server: ValkeyServer
):
    before = messages(valkey_server)
    commits: list[int] = []
    with live.app_context():
        engine = db.engine

    def count(_connection: object) -> None:
        commits.append(threading.get_ident())

    event.listen(engine, "commit", count)
    try:
        reply = Api(live.test_client()).post(
            BATCH, acme.tokens["operator"], json={"jobs": [{"workflow": WORKFLOW}] * 5}
        )
    finally:
        event.remove(engine, "commit", count)
    assert reply.status_code == 201, reply.json
    jobs = JobBatchOut.model_validate(reply.json).jobs
    assert len(jobs) == 5 and len({job.job_id for job in jobs}) == 5
    assert all(job.state == "queued" and job.attempt == 1 for job in jobs)
    assert commits.count(threading.get_ident()) == 1  # five jobs, their audit records, moves and attempts
    assert messages(valkey_server) == before + 5
    for job in jobs:
        assert wait_for_receipt(live, job.job_id).published_at is not None


def test_each_entry_keeps_its_own_options_and_the_order_of_the_batch(api: Api, acme: Tenant):
    entries = [
        {"workflow": WORKFLOW, "agent_id": "a1", "priority": 9, "variables": {"HOST": "web1"}},
        {"workflow": POWERSHELL},
        {"workflow": WORKFLOW, "project_id": "web", "max_attempts": 1},
    ]
    reply = api.post(BATCH, acme.tokens["operator"], json={"jobs": entries})
    assert reply.status_code == 201, reply.json
    first, second, third = JobBatchOut.model_validate(reply.json).jobs
    assert (first.agent_id, first.priority, first.variables) == ("a1", 9, {"HOST": "web1"})
    assert (second.name, second.platform) == ("windows-only", "windows")
    assert (third.name, third.max_attempts, third.agent_id) == ("three-steps", 1, None)
    for job in (first, second, third):
        assert api.get(f"/api/v1/jobs/{job.job_id}", acme.tokens["viewer"]).json["job_id"] == job.job_id
    audited = api.get("/api/v1/audit?action=job.submitted&limit=100", acme.tokens["tenant_admin"]).json["events"]
    assert {first.job_id, second.job_id, third.job_id} <= {e["target_id"] for e in audited}


def test_one_invalid_workflow_refuses_the_whole_batch_with_its_index_and_line(app: Flask, api: Api, acme: Tenant):
    before = stored(app)
    entries = [{"workflow": WORKFLOW}, {"workflow": WORKFLOW}, {"workflow": BAD_WORKFLOW}]
    reply = api.post(BATCH, acme.tokens["operator"], json={"jobs": entries})
    assert reply.status_code == 422
    assert reply.json["error"] == "invalid_workflow" and reply.json["index"] == 2 and reply.json["line"] == 8
    assert reply.json["message"].startswith("jobs[2]: the workflow is invalid")
    assert stored(app) == before  # nothing half-written: no job, no audit record


@pytest.mark.parametrize(
    ("entry", "status", "code"),
    [
        ({"workflow": WORKFLOW, "agent_id": "nobody"}, 422, "unknown_agent"),
        ({"workflow": POWERSHELL, "agent_id": "a1"}, 422, "incompatible_platform"),
        ({"workflow": WORKFLOW, "project_id": "db"}, 403, "access_denied"),  # the token is limited to web
        ({"workflow": WORKFLOW, "tenant_id": "globex"}, 403, "access_denied"),
    ],
)
def test_an_entry_the_caller_may_not_submit_refuses_the_batch(
    app: Flask, api: Api, acme: Tenant, entry: dict[str, str], status: int, code: str
):
    before = stored(app)
    reply = api.post(BATCH, acme.tokens["operator"], json={"jobs": [{"workflow": WORKFLOW}, entry]})
    assert reply.status_code == status and reply.json["error"] == code and reply.json["index"] == 1
    assert reply.json["message"].startswith("jobs[1]: ")
    jobs, _records = stored(app)
    assert jobs == before[0]


def test_a_project_that_does_not_exist_refuses_the_batch(app: Flask, api: Api, acme: Tenant):
    before = stored(app)
    entries = [{"workflow": WORKFLOW, "project_id": "web"}, {"workflow": WORKFLOW, "project_id": "nope"}]
    reply = api.post(BATCH, acme.tokens["tenant_admin"], json={"jobs": entries})
    assert reply.status_code == 422 and reply.json["error"] == "unknown_project" and reply.json["index"] == 1
    assert stored(app) == before


@pytest.mark.parametrize(
    "body",
    [
        {"jobs": []},
        {"jobs": [{"workflow": WORKFLOW}] * (MAX_BATCH_JOBS + 1)},
        {"jobs": [{"workflow": WORKFLOW, "priority": "high"}]},
        {"jobs": [{"workflow": WORKFLOW}], "extra": 1},
        {"workflow": WORKFLOW},
    ],
)
def test_a_malformed_batch_is_a_400_that_names_the_field(app: Flask, api: Api, acme: Tenant, body: dict):
    before = stored(app)
    reply = api.post(BATCH, acme.tokens["operator"], json=body)
    assert reply.status_code == 400 and reply.json["error"] == "invalid_request", reply.json
    assert stored(app) == before


def test_a_viewer_may_not_submit_a_batch(api: Api, acme: Tenant):
    reply = api.post(BATCH, acme.tokens["viewer"], json={"jobs": [{"workflow": WORKFLOW}]})
    assert reply.status_code == 403 and reply.json["error"] == "access_denied"


def test_a_resent_batch_with_the_same_idempotency_key_returns_the_same_jobs(app: Flask, api: Api, acme: Tenant):
    operator, headers = acme.tokens["operator"], {"Idempotency-Key": "rollout-7"}
    body = {"jobs": [{"workflow": WORKFLOW, "variables": {"N": n}} for n in range(3)]}
    first = api.post(BATCH, operator, json=body, headers=headers)
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    count = stored(app)
    again = api.post(BATCH, operator, json=body, headers=headers)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert [j["job_id"] for j in again.json["jobs"]] == [j["job_id"] for j in first.json["jobs"]]
    assert all("'rollout-7' was used before" in j["warnings"][0] for j in again.json["jobs"])
    assert stored(app) == count
    with app.app_context():
        keys = db.session.scalars(select(Job.idempotency_key).where(Job.idempotency_key.like("rollout-7#%"))).all()
    assert sorted(keys) == ["rollout-7#0", "rollout-7#1", "rollout-7#2"]


def test_the_same_idempotency_key_with_another_batch_is_a_conflict(app: Flask, api: Api, acme: Tenant):
    operator, headers = acme.tokens["operator"], {"Idempotency-Key": "rollout-8"}
    api.post(BATCH, operator, json={"jobs": [{"workflow": WORKFLOW}] * 2}, headers=headers)
    count = stored(app)
    for other in ([{"workflow": WORKFLOW, "priority": 1}] * 2, [{"workflow": WORKFLOW}] * 3):
        reply = api.post(BATCH, operator, json={"jobs": other}, headers=headers)
        assert reply.status_code == 409 and reply.json["error"] == "idempotency_conflict"
    assert stored(app) == count


def test_a_batchs_idempotency_key_is_its_projects_own(app: Flask, api: Api, acme: Tenant):
    headers, body = {"Idempotency-Key": "rollout-9"}, {"jobs": [{"workflow": WORKFLOW}] * 2}
    web = api.post(BATCH, token("acme", "operator"), json=body, headers=headers)
    other = api.post(BATCH, token("acme", "operator", project="db"), json=body, headers=headers)
    assert web.status_code == other.status_code == 201 and "Idempotent-Replayed" not in other.headers, other.json
    assert not {j["job_id"] for j in web.json["jobs"]} & {j["job_id"] for j in other.json["jobs"]}
    again = api.post(BATCH, token("acme", "operator", project="db"), json=body, headers=headers)
    assert [j["job_id"] for j in again.json["jobs"]] == [j["job_id"] for j in other.json["jobs"]]


def test_an_idempotency_key_too_long_for_a_batch_is_refused(api: Api, acme: Tenant):
    reply = api.post(
        BATCH, acme.tokens["operator"], json={"jobs": [{"workflow": WORKFLOW}]}, headers={"Idempotency-Key": "k" * 253}
    )
    assert reply.status_code == 400 and "1 to 252 characters" in reply.json["message"]


def test_every_job_of_a_batch_counts_as_submitted_in_the_metrics(api: Api, acme: Tenant):
    from tests.app.test_metrics import scrape, value

    operator = acme.tokens["operator"]
    earlier = scrape(api)
    before = value(earlier, "automation_jobs_submitted_total", tenant="acme")
    headers = {"Idempotency-Key": "counted"}
    for _ in range(2):  # the replay is not three more jobs
        api.post(BATCH, operator, json={"jobs": [{"workflow": WORKFLOW}] * 3}, headers=headers)
    after = scrape(api)
    assert value(after, "automation_jobs_submitted_total", tenant="acme") == before + 3
    posted = {"method": "POST", "endpoint": "/api/v1/jobs/batch", "status": "201"}
    sent = value(after, "automation_http_requests_total", **posted) - value(
        earlier, "automation_http_requests_total", **posted
    )
    assert sent == 2


def test_an_unknown_project_before_a_pinned_agent_is_a_422_and_nothing_is_written_early(
    app: Flask, api: Api, acme: Tenant
):
    # The agent's lookup must not flush the job before it into the database (its project does not exist).
    before = stored(app)
    entries = [
        {"workflow": WORKFLOW, "project_id": "nope"},
        {"workflow": WORKFLOW, "project_id": "web", "agent_id": "a1"},
    ]
    reply = api.post(BATCH, acme.tokens["tenant_admin"], json={"jobs": entries})
    assert reply.status_code == 422 and reply.json["error"] == "unknown_project" and reply.json["index"] == 0
    assert stored(app) == before


def test_only_the_same_batch_replays_its_key(app: Flask, api: Api, acme: Tenant):
    operator = acme.tokens["operator"]
    entries = [{"workflow": WORKFLOW, "variables": {"N": n}} for n in range(3)]
    first = api.post(BATCH, operator, json={"jobs": entries}, headers={"Idempotency-Key": "K"})
    assert first.status_code == 201
    count = stored(app)
    for other in (entries[:2], entries[::-1]):  # shorter, reordered
        reply = api.post(BATCH, operator, json={"jobs": other}, headers={"Idempotency-Key": "K"})
        assert reply.status_code == 409 and reply.json["error"] == "idempotency_conflict", other
    single = api.post("/api/v1/jobs", operator, json=entries[0], headers={"Idempotency-Key": "K#0"})
    assert single.status_code == 409  # a batch's job is never a single submission's replay
    assert api.post("/api/v1/jobs", operator, json=entries[0], headers={"Idempotency-Key": "L#0"}).status_code == 201
    batch = api.post(BATCH, operator, json={"jobs": entries[:1]}, headers={"Idempotency-Key": "L"})
    assert batch.status_code == 409  # nor the other way round
    assert stored(app)[0] == count[0] + 1


def test_two_identical_batches_at_once_store_one(app: Flask, acme: Tenant):
    body = {"jobs": [{"workflow": WORKFLOW, "variables": {"N": n}} for n in range(3)]}
    before = stored(app)[0]
    start = threading.Barrier(2)
    replies = []

    def send() -> None:
        client = Api(app.test_client())
        start.wait()
        replies.append(client.post(BATCH, acme.tokens["operator"], json=body, headers={"Idempotency-Key": "race"}))

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in replies] == [201, 201], [r.json for r in replies]
    assert [j["job_id"] for j in replies[0].json["jobs"]] == [j["job_id"] for j in replies[1].json["jobs"]]
    assert stored(app)[0] == before + 3


def test_a_batch_counts_one_request_per_job_for_the_rate_limit(make_app: MakeApp, acme: Tenant):
    limited = Api(make_app(RATE_LIMIT_ENABLED=True, RATE_LIMIT="5 per minute").test_client())
    operator = token("acme", "operator", subject=f"batcher-{uuid.uuid4().hex}")
    assert limited.post(BATCH, operator, json={"jobs": [{"workflow": WORKFLOW}] * 3}).status_code == 201
    refused = limited.post(BATCH, operator, json={"jobs": [{"workflow": WORKFLOW}] * 3})
    assert refused.status_code == 429 and refused.json["error"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1


def test_a_broker_that_fails_is_tried_once_and_the_sweeper_sends_the_rest(
    live: Flask, acme: Tenant, monkeypatch: pytest.MonkeyPatch
):
    down = Publisher(make_celery("redis://127.0.0.1:1/0"), live.extensions["publisher"].signer)  # nothing listens
    tries = []

    def failing(messages: list[JobMessage]) -> None:
        tries.append(messages)
        down.publish_many(messages)

    monkeypatch.setattr(live.extensions["publisher"], "publish_many", failing)
    reply = Api(live.test_client()).post(BATCH, acme.tokens["operator"], json={"jobs": [{"workflow": WORKFLOW}] * 4})
    assert reply.status_code == 201 and [j["state"] for j in reply.json["jobs"]] == ["queued"] * 4
    assert [len(messages) for messages in tries] == [4]  # one try for the whole batch, not one per job
    with live.app_context():
        assert all(attempt.published_at is None for attempt in db.session.scalars(select(JobAttempt)))
    monkeypatch.undo()
    later = utcnow() + timedelta(seconds=live.config["SWEEP_GRACE"] + 60)
    with live.app_context():
        assert dispatching.sweep(now=later) >= 4
    for job in reply.json["jobs"]:
        assert wait_for_receipt(live, job["job_id"]).published_at is not None
