"""Job logs in the database: agents ship lines fenced by their attempt, readers page and follow, search per tenant."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select, update

import probe
from app.extensions import db
from app.jobs import fencing
from app.jobs.models import Job, JobAttempt
from app.jobs.schemas import StatusReport
from app.logs import shipping
from app.logs.models import JobLogLine
from app.logs.service import append_lines
from tests.app.support import Api, MakeApp, Tenant, agent_principal, token
from workers.logship import LogBuffer, lines_from_event


def line(message: str, *, task: str | None = "disk", level: str = "info", ts: str = "2026-11-28T10:00:00Z") -> dict:
    return {"ts": ts, "task": task, "level": level, "message": message}


def ship(api: Api, tenant: Tenant, job_id: str, lines: list[dict], attempt: int = 1, bearer: str | None = None) -> Any:
    body = {"attempt": attempt, "lines": lines}
    return api.post(f"/api/v1/jobs/{job_id}/logs", bearer or tenant.tokens["agent"], json=body)


def read(api: Api, tenant: Tenant, job_id: str, query: str = "") -> Any:
    return api.get(f"/api/v1/jobs/{job_id}/logs{query}", tenant.tokens["viewer"])


def stored(app: Flask) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(JobLogLine)) or 0


def finish(api: Api, tenant: Tenant, job_id: str, state: str = "completed") -> None:
    response = api.post(f"/api/v1/jobs/{job_id}/status", tenant.tokens["agent"], json={"attempt": 1, "state": state})
    assert response.status_code == 200, response.json


def test_shipped_lines_are_read_back_in_order_page_by_page(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    response = ship(
        api, acme, acme.running, [line(f"line {n}", level="warning" if n == 3 else "info") for n in range(5)]
    )
    assert response.json == {"job_id": acme.running, "accepted": 5, "dropped": 0, "repeated": 0}
    first = read(api, acme, acme.running, "?limit=2").json
    assert [x["message"] for x in first["lines"]] == ["line 0", "line 1"] and first["next"] == 2
    assert first["lines"][0] == {
        "seq": 1,
        "ts": "2026-11-28T10:00:00Z",
        "attempt": 1,
        "task": "disk",
        "level": "info",
        "message": "line 0",
    }
    second = read(api, acme, acme.running, f"?after={first['next']}&limit=2").json
    assert [x["seq"] for x in second["lines"]] == [3, 4] and second["lines"][1]["level"] == "warning"
    last = read(api, acme, acme.running, f"?after={second['next']}").json
    assert [x["message"] for x in last["lines"]] == ["line 4"] and last["next"] == 5
    assert last["finished"] is False and last["truncated"] is False  # the job is still running
    ship(api, acme, acme.running, [line("more")])
    assert [x["seq"] for x in read(api, acme, acme.running, "?after=5").json["lines"]] == [6]


def test_a_finished_job_read_to_its_end_says_finished(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    ship(api, acme, acme.running, [line("a"), line("b")])
    finish(api, acme, acme.running)
    assert read(api, acme, acme.running, "?limit=1").json["finished"] is False  # one line is left
    end = read(api, acme, acme.running, "?after=1").json
    assert end["finished"] is True and end["next"] == 2
    assert read(api, acme, acme.running, "?after=2").json == {
        "job_id": acme.running,
        "lines": [],
        "next": 2,
        "finished": True,
        "truncated": False,
    }


def test_a_job_over_its_line_bound_keeps_one_marker_that_counts_every_dropped_line(
    api: Api, make_app: MakeApp, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    api = Api(make_app(LOG_MAX_LINES_PER_JOB=3).test_client())
    assert ship(api, acme, acme.running, [line("1"), line("2")]).json["accepted"] == 2
    assert ship(api, acme, acme.running, [line("3"), line("4"), line("5")]).json == {
        "job_id": acme.running,
        "accepted": 1,
        "dropped": 2,
        "repeated": 0,
    }
    assert ship(api, acme, acme.running, [line(str(n)) for n in range(4)]).json["dropped"] == 4
    page = read(api, acme, acme.running).json
    assert [x["message"] for x in page["lines"][:3]] == ["1", "2", "3"]
    assert len(page["lines"]) == 4 and page["truncated"] is True
    marker = page["lines"][3]
    assert marker["level"] == "warning" and marker["task"] is None and marker["seq"] == 4
    assert marker["message"].startswith("[log truncated: 6 more lines dropped; limit 3 lines")


@pytest.mark.parametrize("bound", [5, 3])
def test_lines_an_agent_dropped_are_counted_on_the_jobs_one_marker(
    api: Api, make_app: MakeApp, world: dict[str, Tenant], bound: int
) -> None:
    """The agent keeps at most 5 lines of the 12 here and adds its notice and its count of the 7 it dropped: over
    the job's bound (the same, or lower), those two are not lines to count as dropped but the agent's count, so
    that the job's one marker says how many lines are missing (it said "2 more lines dropped")."""
    acme = world["acme"]
    api = Api(make_app(LOG_MAX_LINES_PER_JOB=bound).test_client())
    buffer = LogBuffer(lambda lines, first: None, batch_lines=100, max_delay=600, max_lines=5)
    buffer.add([line(str(n)) for n in range(12)])
    lines = buffer.drain()  # 5 lines, the notice, the count
    ship(api, acme, acme.running, lines[:6])  # shipped while the job runs
    limits = f"limit {bound} lines / 5242880 bytes per job"
    early = "later lines are dropped" if bound == 5 else "2 more lines dropped"  # the agent's count is to come
    assert read(api, acme, acme.running).json["lines"][-1]["message"] == f"[log truncated: {early}; {limits}]"
    body = {"attempt": 1, "state": "completed", "logs": lines[6:], "logs_first_line": 7}
    assert api.post(f"/api/v1/jobs/{acme.running}/status", acme.tokens["agent"], json=body).status_code == 200
    page = read(api, acme, acme.running).json
    assert [x["message"] for x in page["lines"][:-1]] == [str(n) for n in range(bound)] and page["truncated"]
    assert page["lines"][-1]["message"] == f"[log truncated: {12 - bound} more lines dropped; {limits}]"


def test_an_agents_count_too_large_for_the_marker_is_a_line_or_held_at_the_largest(
    api: Api, make_app: MakeApp, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    api = Api(make_app(LOG_MAX_LINES_PER_JOB=1).test_client())
    counts = [
        {**line(f"[log truncated on the agent: {n} lines dropped in all]"), "task": None} for n in ("9" * 4400, "9" * 9)
    ]
    for _ in range(3):  # 999,999,999 three times: over what the marker's INTEGER column holds
        assert ship(api, acme, acme.running, [line("a"), *counts]).status_code == 200
    marker = read(api, acme, acme.running).json["lines"][-1]["message"]
    assert marker.startswith(f"[log truncated: {2**31 - 1} more lines dropped"), marker


def test_the_byte_bound_counts_bytes_not_characters(api: Api, make_app: MakeApp, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    api = Api(make_app(LOG_MAX_BYTES_PER_JOB=20).test_client())
    wide = "é" * 5  # 5 characters, 10 bytes
    assert ship(api, acme, acme.running, [line(wide), line(wide)]).json["accepted"] == 2
    assert ship(api, acme, acme.running, [line(wide)]).json == {
        "job_id": acme.running,
        "accepted": 0,
        "dropped": 1,
        "repeated": 0,
    }
    page = read(api, acme, acme.running).json
    assert [x["message"] for x in page["lines"][:2]] == [wide, wide] and page["truncated"] is True


def test_a_long_line_is_cut_with_a_visible_marker(api: Api, make_app: MakeApp, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    api = Api(make_app(LOG_LINE_MAX_BYTES=256).test_client())
    ship(api, acme, acme.running, [line("x" * 1000)])
    message = read(api, acme, acme.running).json["lines"][0]["message"]
    assert len(message.encode()) <= 256 and message.startswith("x" * 200)
    assert message.endswith("more bytes]") and "line cut" in message


def test_lines_are_refused_from_anyone_but_the_agent_running_the_attempt(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    acme, globex = world["acme"], world["globex"]
    other = token("acme", "agent", agent="a2")
    api.post("/api/v1/agents", other, json={"agent_id": "a2", "hostname": "a2", "platform": "linux"})
    refusals = {
        "another agent of the tenant": (ship(api, acme, acme.running, [line("x")], bearer=other), 403, "access_denied"),
        "another tenant's agent": (ship(api, globex, acme.running, [line("x")]), 404, "not_found"),
        "a later attempt": (ship(api, acme, acme.running, [line("x")], attempt=2), 409, "stale_attempt"),
        "a finished attempt": (ship(api, acme, acme.completed, [line("x")]), 409, "stale_attempt"),
        "a queued job (not claimed)": (ship(api, acme, acme.queued, [line("x")]), 403, "access_denied"),
        "an operator": (
            ship(api, acme, acme.running, [line("x")], bearer=acme.tokens["operator"]),
            403,
            "access_denied",
        ),
    }
    for case, (response, status, code) in refusals.items():
        assert (response.status_code, response.json["error"]) == (status, code), case
    assert stored(app) == 0


@pytest.mark.parametrize(
    "body",
    [
        {"attempt": "1", "lines": [line("x")]},
        {"attempt": 1, "lines": [{**line("x"), "message": 5}]},
        {"attempt": 1, "lines": [line("x", level="loud")]},
        {"attempt": 1, "lines": [line("x", ts="2026-11-28T10:00:00")]},
        {"attempt": 1, "lines": [{**line("x"), "extra": True}]},
        {"attempt": 1, "lines": [line("fine"), line("x", task="t" * 201)]},
        {"attempt": 1},
        {"attempt": 1, "lines": "x"},
    ],
    ids=[
        "string attempt",
        "number message",
        "unknown level",
        "naive time",
        "unknown field",
        "long task",
        "no lines",
        "lines not a list",
    ],
)
def test_a_malformed_batch_is_a_json_400_and_stores_nothing(
    api: Api, app: Flask, world: dict[str, Tenant], body: dict
) -> None:
    acme = world["acme"]
    response = api.post(f"/api/v1/jobs/{acme.running}/logs", acme.tokens["agent"], json=body)
    assert response.status_code == 400 and response.json["error"] == "invalid_request"
    assert stored(app) == 0


@pytest.mark.parametrize("raw", ["{", "[]", "null", '{"attempt": 1, "lines": [],}', "\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_a_json_400(
    api: Api, app: Flask, world: dict[str, Tenant], raw: str
) -> None:
    acme = world["acme"]
    response = api.post(
        f"/api/v1/jobs/{acme.running}/logs", acme.tokens["agent"], data=raw, content_type="application/json"
    )
    assert response.status_code == 400 and response.json["error"] in ("malformed_json", "invalid_request")
    assert stored(app) == 0


def test_too_many_lines_or_too_large_a_body_is_a_json_413_and_stores_nothing(
    make_app: MakeApp, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    made = make_app(LOG_BATCH_MAX_LINES=3, MAX_CONTENT_LENGTH=4096)
    api = Api(made.test_client())
    response = ship(api, acme, acme.running, [line(str(n)) for n in range(4)])
    assert response.status_code == 413 and response.json["error"] == "payload_too_large"
    assert "LOG_BATCH_MAX_LINES" in response.json["message"]
    response = ship(api, acme, acme.running, [line("x" * 5000)])
    assert response.status_code == 413 and response.json["error"] == "payload_too_large"
    response = api.post(
        f"/api/v1/jobs/{acme.running}/logs", acme.tokens["agent"], data="attempt=1", content_type="text/plain"
    )
    assert response.status_code == 415 and response.json["error"] == "unsupported_media_type"
    assert stored(made) == 0


def test_a_service_caller_gets_a_400_for_malformed_lines_and_nothing_is_added(
    app: Flask, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    with app.test_request_context():
        job = db.session.get(Job, acme.running)
        assert job is not None
        assert (
            append_lines(job, 1, [line("kept"), {"ts": "2026-11-28T10:00:01+02:00", "level": "error", "message": "y"}])
            == 2
        )
        with pytest.raises(Exception, match="invalid log lines") as refused:
            append_lines(job, 1, [line("fine"), {"message": "no level"}])
        assert getattr(refused.value, "status", None) == 400
        db.session.commit()
    assert stored(app) == 2


def test_another_tenants_or_projects_job_log_is_404(api: Api, world: dict[str, Tenant]) -> None:
    acme, globex = world["acme"], world["globex"]
    ship(api, acme, acme.running, [line("secret plans")])
    assert read(api, globex, acme.running).status_code == 404
    db_only = token("acme", "viewer", project="db")
    response = api.get(f"/api/v1/jobs/{acme.running}/logs", db_only)
    assert response.status_code == 404 and response.json["error"] == "not_found"
    assert api.get(f"/api/v1/jobs/{acme.running}/logs", acme.tokens["agent"]).status_code == 403
    assert read(api, acme, acme.running).json["lines"][0]["message"] == "secret plans"


def test_bad_read_parameters_are_a_json_400(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    for query in ("?after=-1", "?limit=0", "?limit=1001", "?wait=31", "?follow=maybe", "?tenant_id=acme"):
        response = read(api, acme, acme.running, query)
        assert response.status_code == 400 and response.json["error"] == "invalid_request", query


def test_follow_returns_new_lines_or_the_end_of_the_job(api: Api, app: Flask, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    quiet = read(api, acme, acme.running, "?follow=true&wait=0.3").json
    assert quiet["lines"] == [] and quiet["finished"] is False
    results: dict[str, Any] = {}

    def follow(name: str, after: int) -> None:
        client = Api(app.test_client())
        results[name] = read(client, acme, acme.running, f"?follow=true&wait=30&after={after}").json

    waiting = threading.Thread(target=follow, args=("lines", 0))
    waiting.start()
    ship(api, acme, acme.running, [line("hello")])
    waiting.join(40)
    assert [x["message"] for x in results["lines"]["lines"]] == ["hello"]
    waiting = threading.Thread(target=follow, args=("end", 1))
    waiting.start()
    finish(api, acme, acme.running, "failed")
    waiting.join(40)
    assert results["end"] == {"job_id": acme.running, "lines": [], "next": 1, "finished": True, "truncated": False}


def search(api: Api, bearer: str, **params: str) -> Any:
    return api.get("/api/v1/logs", bearer, query_string=params)


def test_database_search_finds_only_the_callers_tenant_whatever_the_query(api: Api, world: dict[str, Tenant]) -> None:
    acme, globex = world["acme"], world["globex"]
    ship(api, acme, acme.running, [line("disk full on /var", level="error"), line("all good")])
    ship(api, globex, globex.running, [line("disk full on /srv", level="error"), line("tenant_id:acme OR disk")])
    found = search(api, acme.tokens["viewer"], query="disk").json
    assert found["backend"] == "database" and found["total"] == 1
    assert [(h["message"], h["job_id"], h["project_id"]) for h in found["lines"]] == [
        ("disk full on /var", acme.running, "web")
    ]
    for crafted in ("tenant_id:globex OR disk", "%", "_", "') OR 1=1 --", "tenant_id:acme OR disk"):
        hits = search(api, acme.tokens["viewer"], query=crafted).json["lines"]
        assert all(h["job_id"] == acme.running for h in hits), crafted
    everything = search(api, globex.tokens["viewer"]).json
    assert everything["total"] == 2 and {h["job_id"] for h in everything["lines"]} == {globex.running}


def test_database_search_filters_by_job_task_level_and_time(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    ship(
        api,
        acme,
        acme.running,
        [
            line("Disk at 91%", task="disk", level="warning", ts="2026-11-28T10:00:01Z"),
            line("disk at 99%", task="disk", level="error", ts="2026-11-28T10:00:02Z"),
            line("uptime 3 days", task="uptime", ts="2026-11-28T10:00:03Z"),
        ],
    )
    viewer = acme.tokens["viewer"]
    newest_first = search(api, viewer, job_id=acme.running).json["lines"]
    assert [h["message"] for h in newest_first] == ["uptime 3 days", "disk at 99%", "Disk at 91%"]
    assert [h["message"] for h in search(api, viewer, query="DISK %").json["lines"]] == ["disk at 99%", "Disk at 91%"]
    assert [h["level"] for h in search(api, viewer, level="error").json["lines"]] == ["error"]
    assert search(api, viewer, task="uptime").json["total"] == 1
    window = search(api, viewer, since="2026-11-28T10:00:02Z", until="2026-11-28T10:00:03Z").json["lines"]
    assert [h["message"] for h in window] == ["disk at 99%"]
    assert search(api, viewer, job_id=acme.queued).json["total"] == 0
    paged = search(api, viewer, limit="1", offset="1").json
    assert paged["total"] == 3 and [h["message"] for h in paged["lines"]] == ["disk at 99%"]


def test_search_of_another_project_with_a_project_token_is_403(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    ship(api, acme, acme.running, [line("in web")])
    db_only = token("acme", "viewer", project="db")
    assert search(api, db_only).json["total"] == 0  # the web project's line is not the db project's
    response = search(api, db_only, project_id="web")
    assert response.status_code == 403 and response.json["error"] == "access_denied"
    for bad in ({"level": "loud"}, {"limit": "0"}, {"since": "yesterday"}, {"tenant_id": "globex"}):
        response = search(api, acme.tokens["viewer"], **bad)
        assert response.status_code == 400 and response.json["error"] == "invalid_request", bad
    assert search(api, acme.tokens["agent"]).status_code == 403


def test_a_secret_in_a_workflows_output_never_reaches_the_stored_log(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    secret = "s3cr3t-Value-42"
    workflow = probe.load_workflow(
        b"name: leaky\n"
        b"tasks:\n"
        b"  - name: echo\n"
        b"    type: command\n"
        b"    config:\n"
        b'      command: "echo password={{.secrets.PASSWORD}}; echo {{.secrets.PASSWORD}} >&2; exit 1"\n'
        b"      shell: true\n",
        name="leaky",
    )
    events: list[dict] = []
    result = probe.run_workflow(workflow, secrets={"PASSWORD": secret}, on_event=events.append)
    assert not result.success
    lines = [shipped for event in events for shipped in lines_from_event(event)]
    assert ship(api, acme, acme.running, lines).status_code == 200
    messages = [x["message"] for x in read(api, acme, acme.running).json["lines"]]
    assert "password=***" in messages and any(m.startswith("error: ") and "***" in m for m in messages)
    assert not any(secret in m for m in messages)
    assert search(api, acme.tokens["viewer"], query=secret).json["total"] == 0


def test_lines_added_in_the_final_status_reports_transaction_are_committed_with_it(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    with app.test_request_context():
        job = db.session.get(Job, acme.running)
        assert job is not None
        append_lines(job, 1, [line("last words")])  # what the agent's final report will carry
        fencing.report_status(
            caller=agent_principal("acme", "a1"), job_id=acme.running, report=StatusReport(attempt=1, state="failed")
        )
    page = read(api, acme, acme.running).json
    assert [x["message"] for x in page["lines"]] == ["last words"] and page["finished"] is True


def ship_numbered(api: Api, tenant: Tenant, job_id: str, lines: list[dict], first: int) -> Any:
    body = {"attempt": 1, "lines": lines, "first_line": first}
    return api.post(f"/api/v1/jobs/{job_id}/logs", tenant.tokens["agent"], json=body)


def test_a_batch_sent_again_after_a_lost_answer_is_stored_once(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    batch = [line("a"), line("b"), line("c")]
    first = ship_numbered(api, acme, acme.running, batch, 1)
    assert first.json == {"job_id": acme.running, "accepted": 3, "dropped": 0, "repeated": 0}
    again = ship_numbered(api, acme, acme.running, batch, 1)  # its answer was lost: the agent sends it again
    assert again.status_code == 200 and again.json == {
        "job_id": acme.running,
        "accepted": 0,
        "dropped": 0,
        "repeated": 3,
    }
    overlapping = ship_numbered(api, acme, acme.running, [line("c"), line("d")], 3)
    assert overlapping.json["accepted"] == 1 and overlapping.json["repeated"] == 1
    assert ship(api, acme, acme.running, [line("e")]).json["accepted"] == 1  # unnumbered: new, and counted
    assert ship_numbered(api, acme, acme.running, [line("f")], 6).json["accepted"] == 1
    assert [x["message"] for x in read(api, acme, acme.running).json["lines"]] == ["a", "b", "c", "d", "e", "f"]


def test_a_final_report_stores_only_the_log_lines_not_received_before(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    ship_numbered(api, acme, acme.running, [line("a"), line("b")], 1)
    body = {"attempt": 1, "state": "completed", "logs": [line("b"), line("c")], "logs_first_line": 2}
    assert api.post(f"/api/v1/jobs/{acme.running}/status", acme.tokens["agent"], json=body).status_code == 200
    assert [x["message"] for x in read(api, acme, acme.running).json["lines"]] == ["a", "b", "c"]


@pytest.mark.parametrize("first", [0, -1, "one"])
def test_a_batch_numbered_below_one_is_refused_and_nothing_is_stored(
    app: Flask, api: Api, world: dict[str, Tenant], first: Any
) -> None:
    acme = world["acme"]
    response = ship_numbered(api, acme, acme.running, [line("a")], first)
    assert response.status_code == 400 and response.json["error"] == "invalid_request"
    assert stored(app) == 0


def test_a_batch_racing_another_request_of_its_attempt_is_refused_and_stores_nothing(
    app: Flask, api: Api, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    acme = world["acme"]
    real = shipping.fenced

    def fenced_then_raced(*args: Any, **kwargs: Any) -> Any:
        job, row = real(*args, **kwargs)  # read with its count of lines; another request now stores two lines
        attempts = JobAttempt.__table__
        db.session.connection().execute(update(attempts).where(attempts.c.id == row.id).values(log_lines=2))
        return job, row

    monkeypatch.setattr(shipping, "fenced", fenced_then_raced)
    response = ship_numbered(api, acme, acme.running, [line("a")], 1)
    assert response.status_code == 409 and response.json["error"] == "concurrent_update"
    assert stored(app) == 0


def test_tasks_whose_names_differ_only_in_case_keep_their_own_results_and_lines(
    api: Api, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    job = f"/api/v1/jobs/{acme.running}"
    for name, status in (("Build", "succeeded"), ("build", "failed")):
        report = {"attempt": 1, "name": name, "type": "command", "status": status, "output": name}
        assert api.post(f"{job}/tasks", acme.tokens["agent"], json=report).status_code == 201
    tasks = api.get(job, acme.tokens["viewer"]).json["tasks"]
    assert sorted((t["name"], t["status"], t["output"]) for t in tasks) == [
        ("Build", "succeeded", "Build"),
        ("build", "failed", "build"),
    ]
    ship(api, acme, acme.running, [line("upper", task="Build"), line("lower", task="build")])
    found = search(api, acme.tokens["viewer"], job_id=acme.running, task="build").json
    assert [h["message"] for h in found["lines"]] == ["lower"]
