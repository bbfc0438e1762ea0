"""Bad input on every write endpoint answers with the JSON error and writes nothing."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from app.extensions import db
from tests.app.support import WORKFLOW, Api, MakeApp, Tenant

MALFORMED = ["{", "[]", '"workflow"', "null", '{"a": 1,}', "\xff\xfe"]
LIMIT = 4096


def nested(depth: int) -> dict[str, Any]:
    """A JSON object ``depth`` levels deep, itself included."""
    document: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        document = {"a": document}
    return document


LINE = {"ts": "2030-01-01T00:00:00Z", "level": "info", "message": "x"}

# JSON that one database would refuse (MariaDB: NaN, Infinity, more than 32 levels) or store changed (SQLite: NaN)
UNSTORABLE: list[dict[str, Any]] = [{"x": float("nan")}, {"x": [float("inf")]}, nested(32), {"x": [nested(30)]}]

ENDPOINTS: dict[str, tuple[str, str, list[dict[str, Any]], int]] = {
    # name: (path with {pending}/{queued}/{running}, role, bodies with wrong types or missing fields, 4xx of those)
    "submit job": (
        "/api/v1/jobs",
        "operator",
        [
            {},
            {"workflow": 5},
            {"workflow": WORKFLOW, "priority": "9"},
            {"workflow": WORKFLOW, "priority": 10},
            {"workflow": WORKFLOW, "variables": []},
            {"workflow": WORKFLOW, "colour": "red"},
            {"workflow": WORKFLOW, "scheduled_at": "tomorrow"},
            {"workflow": WORKFLOW, "scheduled_at": "2030-01-01T00:00:00"},
            {"workflow": WORKFLOW, "scheduled_at": "2030-01-02T00:00:00Z", "deliver_by": "2030-01-01T00:00:00Z"},
            # times with no UTC form, which the database stores
            {"workflow": WORKFLOW, "scheduled_at": "0001-01-01T00:00:00+14:00"},
            {"workflow": WORKFLOW, "deliver_by": "9999-12-31T23:59:59-14:00"},
            *({"workflow": WORKFLOW, "variables": variables} for variables in UNSTORABLE),
        ],
        400,
    ),
    "create schedule": (
        "/api/v1/schedules",
        "operator",
        [{"cron": "0 * * * *", "workflow": WORKFLOW, "variables": variables} for variables in UNSTORABLE],
        400,
    ),
    "change job": (
        "/api/v1/jobs/{pending}",
        "operator",
        [
            {},
            {"priority": "high"},
            {"variables": "x"},
            {"agent_id": "Not A Slug"},
            {"scheduled_at": "0001-01-01T00:00:00+01:00"},
            # null only where it means something (agent_id, platform, deliver_by)
            *({field: None} for field in ("workflow", "variables", "priority", "scheduled_at", "max_attempts")),
            {"retry_backoff": None},
            *({"variables": variables} for variables in UNSTORABLE),
        ],
        400,
    ),
    "cancel job": ("/api/v1/jobs/{pending}/cancel", "operator", [{"reason": 5}, {"why": "x"}], 400),
    "claim job": (
        "/api/v1/jobs/{queued}/claim",
        "agent",
        [{}, {"attempt": "1"}, {"attempt": 0}, {"attempt": 1.5}, {"attempt": 2**63}],
        400,
    ),
    "report task": (
        "/api/v1/jobs/{running}/tasks",
        "agent",
        [
            {"attempt": 1, "name": "x", "type": "command"},
            {"attempt": 1, "name": "x", "type": "command", "status": "great"},
            {"attempt": 1, "name": "x", "type": "command", "status": "failed", "metrics": []},
            *({"attempt": 1, "name": "x", "type": "command", "status": "failed", "metrics": m} for m in UNSTORABLE),
            {"attempt": 10**20, "name": "x", "type": "command", "status": "failed"},
            {"attempt": 1, "name": "x", "type": "command", "status": "failed", "position": 10**20},
            {
                "attempt": 1,
                "name": "x",
                "type": "command",
                "status": "failed",
                "started_at": "0001-01-01T00:00:00+14:00",
            },
        ],
        400,
    ),
    "report status": (
        "/api/v1/jobs/{running}/status",
        "agent",
        [
            {"attempt": 1},
            {"attempt": 1, "state": "sleeping"},
            {"attempt": 1, "state": "pending"},
            {"attempt": "1", "state": "completed"},
            {"attempt": 1, "state": "completed", "logs_first_line": 10**20},
            {"attempt": 1, "state": "completed", "logs_first_line": 2**31 - 1, "logs": [LINE, LINE]},
            {
                "attempt": 1,
                "state": "completed",
                "tasks": [{"name": "x", "type": "command", "status": "succeeded", "metrics": nested(40)}],
            },
        ],
        400,
    ),
    "register agent": (
        "/api/v1/agents",
        "tenant_admin",
        [
            {"agent_id": "a9", "platform": "linux", "project_id": "web"},
            {"agent_id": "a9", "hostname": "h", "platform": "beos", "project_id": "web"},
            {"agent_id": "a9", "hostname": "h", "platform": "linux", "project_id": "web", "max_concurrent_jobs": "4"},
            {"agent_id": "a9", "hostname": "h", "platform": "linux", "project_id": "web", "task_types": "command"},
        ],
        400,
    ),
    "heartbeat": (
        "/api/v1/agents/a1/heartbeat",
        "agent",
        [
            {"running": "x"},
            {"running": ["job-id"]},
            {"running": [{"job_id": "j", "attempt": 0}]},
            {"running": [{"job_id": "j", "attempt": 10**20}]},
            {"cpu": 5},
        ],
        400,
    ),
    "create tenant": ("/api/v1/tenants", "admin", [{}, {"tenant_id": 5}, {"tenant_id": "ok", "name": ""}], 400),
    "ship logs": (
        "/api/v1/jobs/{running}/logs",
        "agent",
        [
            {"attempt": 1, "lines": [{"ts": "0001-01-01T00:00:00+14:00", "level": "info", "message": "x"}]},
            {
                "attempt": 1,
                "first_line": 10**20,
                "lines": [{"ts": "2030-01-01T00:00:00Z", "level": "info", "message": "x"}],
            },
            {"attempt": 1, "first_line": 2**31 - 1, "lines": [LINE, LINE]},  # the second one's number is too big
        ],
        400,
    ),
    "create project": (
        "/api/v1/tenants/acme/projects",
        "tenant_admin",
        [
            {},
            {"project_id": ["x"]},
            {"project_id": "p", "max_running_jobs": 0},
            {"project_id": "p", "max_running_jobs": 10**20},
        ],
        400,
    ),
}


def snapshot(app: Flask) -> dict[str, list[tuple[Any, ...]]]:
    with app.app_context():
        return {
            t.name: sorted(map(tuple, db.session.execute(select(t)).all()), key=repr) for t in db.metadata.sorted_tables
        }


@pytest.fixture
def limited(make_app: MakeApp, world: dict[str, Tenant]) -> tuple[Flask, Api, dict[str, Tenant]]:
    app: Flask = make_app(MAX_CONTENT_LENGTH=LIMIT)
    return app, Api(app.test_client()), world


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_bad_input_is_a_json_error_and_writes_nothing(
    limited: tuple[Flask, Api, dict[str, Tenant]], endpoint: str
) -> None:
    app, api, world = limited
    template, role, bodies, status = ENDPOINTS[endpoint]
    acme = world["acme"]
    path = template.format(pending=acme.pending, queued=acme.queued, running=acme.running)
    bearer = acme.tokens[role]
    method = "PUT" if endpoint == "change job" else "POST"
    before = snapshot(app)
    attempts: list[tuple[str, Any, int, str]] = []
    for text in MALFORMED:
        response = api.call(method, path, bearer, data=text, content_type="application/json")
        attempts.append(("malformed", text, response.status_code, response.json["error"]))
    for body in bodies:
        response = api.call(method, path, bearer, json=body)
        attempts.append(("body", body, response.status_code, response.json["error"]))
    huge = api.call(method, path, bearer, json={"padding": "x" * LIMIT * 2})
    attempts.append(("oversized", None, huge.status_code, huge.json["error"]))
    oversized = json.dumps({"padding": "x" * LIMIT * 2}).encode()  # sent chunked: no Content-Length to refuse
    chunked = api.call(
        method,
        path,
        bearer,
        input_stream=io.BytesIO(oversized),
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},  # as gunicorn serves a chunked body
    )
    attempts.append(("oversized", None, chunked.status_code, chunked.json["error"]))
    for kind, body, code, error in attempts:
        if kind == "malformed":
            assert code == 400 and error in ("malformed_json", "invalid_request"), (body, code, error)
        elif kind == "body":
            assert code == status and error == "invalid_request", (body, code, error)
        else:
            assert code == 413 and error == "payload_too_large"
    assert snapshot(app) == before


LONG_NAMES = [  # longer than the database's columns and the agents' reports allow
    "name: " + "n" * 201 + "\ntasks:\n  - {name: a, type: command, config: {command: 'true'}}\n",
    "name: x\ntasks:\n  - {name: " + "t" * 201 + ", type: command, config: {command: 'true'}}\n",
]


@pytest.mark.parametrize(
    "workflow", ["name: [\n", "tasks: 5\n", "- a\n- b\n", "name: x\ntasks: []\n", "\t\x00", *LONG_NAMES]
)
def test_a_malformed_or_invalid_workflow_writes_nothing(
    limited: tuple[Flask, Api, dict[str, Tenant]], workflow: str
) -> None:
    app, api, world = limited
    before = snapshot(app)
    for method, path in (("POST", "/api/v1/jobs"), ("PUT", f"/api/v1/jobs/{world['acme'].pending}")):
        response = api.call(method, path, world["acme"].tokens["operator"], json={"workflow": workflow})
        assert response.status_code == 422 and response.json["error"] == "invalid_workflow", response.json
    assert snapshot(app) == before


def test_a_value_yaml_cannot_make_is_refused_with_its_line(limited: tuple[Flask, Api, dict[str, Tenant]]) -> None:
    _app, api, world = limited
    workflow = "name: x\nx-when: 2001-13-45\ntasks:\n  - {name: a, type: command, config: {command: 'true'}}\n"
    response = api.post("/api/v1/jobs", world["acme"].tokens["operator"], json={"workflow": workflow})
    assert response.status_code == 422 and response.json["line"] == 2, response.json
    assert "'2001-13-45' cannot be read as timestamp" in response.json["message"]


@pytest.mark.parametrize(
    ("path", "role"),
    [
        ("/api/v1/jobs?offset=9223372036854775808", "operator"),
        ("/api/v1/jobs/{running}/logs?after=99999999999999999999", "operator"),
        ("/api/v1/audit?offset=99999999999999999999", "tenant_admin"),
        ("/api/v1/audit?since=0001-01-01T00:00:00%2B14:00", "tenant_admin"),
        ("/api/v1/logs?until=0001-01-01T00:00:00%2B14:00", "operator"),
        ("/api/v1/dead-letters?offset=2147483648", "viewer"),
    ],
)
def test_a_number_or_time_out_of_range_in_a_query_is_a_json_error(
    limited: tuple[Flask, Api, dict[str, Tenant]], path: str, role: str
) -> None:
    _app, api, world = limited
    acme = world["acme"]
    response = api.get(path.format(running=acme.running), acme.tokens[role])
    assert response.status_code == 400 and response.json["error"] == "invalid_request", response.json


def test_json_as_deep_as_every_database_takes_is_stored_as_it_is(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    variables = {"deep": nested(30), "big": 10**40, "small": -1.5e300}  # 31 levels with the document itself
    reply = api.post("/api/v1/jobs", acme.tokens["operator"], json={"workflow": WORKFLOW, "variables": variables})
    assert reply.status_code == 201, reply.json
    assert api.get(f"/api/v1/jobs/{reply.json['job_id']}", acme.tokens["viewer"]).json["variables"] == variables


def test_a_long_error_in_a_report_is_cut_not_refused(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    error = "é" * 40000  # 80000 bytes: more than a TEXT column holds on MariaDB
    task = {"name": "kernel", "type": "command", "status": "failed", "error": error}
    path = f"/api/v1/jobs/{acme.running}"
    alone = api.post(f"{path}/tasks", acme.tokens["agent"], json={"attempt": 1, **task})
    assert alone.status_code == 201, alone.json
    final = {"attempt": 1, "state": "failed", "error": error, "tasks": [{**task, "name": "disk"}]}
    reply = api.post(f"{path}/status", acme.tokens["agent"], json=final)
    assert reply.status_code == 200 and reply.json["state"] == "failed", reply.json
    job = api.get(path, acme.tokens["viewer"]).json
    results = {r["name"]: r for r in job["tasks"]}
    for stored in (job["error"], results["kernel"]["error"], results["disk"]["error"]):
        assert stored.startswith("é" * 7000) and len(stored.encode()) < 16100 and "truncated" in stored, stored[-80:]


@pytest.mark.parametrize("when", ["1700000000", "0", " 17e8 ", 1700000000, 0.5, True])
def test_a_number_where_a_time_is_due_is_refused_not_read_as_a_unix_time(
    limited: tuple[Flask, Api, dict[str, Tenant]], when: object
) -> None:
    app, api, world = limited
    before = snapshot(app)
    body = {"workflow": WORKFLOW, "scheduled_at": when}
    response = api.post("/api/v1/jobs", world["acme"].tokens["operator"], json=body)
    assert response.status_code == 400 and "ISO 8601" in response.json["message"], response.json
    assert snapshot(app) == before
    listed = api.get("/api/v1/audit?since=2020", world["acme"].tokens["tenant_admin"])
    assert listed.status_code == 400 and "ISO 8601" in listed.json["message"], listed.json


@pytest.mark.parametrize(
    ("path", "role"),
    [("/api/v1/agents?limit=10&limit=abc", "viewer"), ("/api/v1/jobs?state=queued&state=running", "viewer")],
)
def test_a_query_parameter_given_twice_is_refused(
    limited: tuple[Flask, Api, dict[str, Tenant]], path: str, role: str
) -> None:
    _app, api, world = limited
    response = api.get(path, world["acme"].tokens[role])
    assert response.status_code == 400 and "given more than once" in response.json["message"], response.json


@pytest.mark.parametrize(
    ("path", "role", "field", "says"),
    [
        ("/api/v1/jobs?limit=5.0", "viewer", "limit", "whole number"),
        ("/api/v1/agents?offset=%2B5", "viewer", "offset", "whole number"),
        ("/api/v1/dead-letters?limit=5_0", "viewer", "limit", "whole number"),
        ("/api/v1/schedules?paused=yes", "viewer", "paused", "true or false"),
        ("/api/v1/jobs/{running}/logs?follow=1", "operator", "follow", "true or false"),
        ("/api/v1/jobs/{running}/logs?after=%201", "operator", "after", "whole number"),
        ("/api/v1/tenants/acme?tenant_id=globex", "tenant_admin", "tenant_id", "takes no query parameters"),
        ("/api/v1/schedules/x?project_id=web", "viewer", "project_id", "takes no query parameters"),
        ("/api/v1/jobs?limit=007", "viewer", "limit", "whole number"),
        ("/api/v1/jobs/{running}/logs?wait=1_0", "operator", "wait", "number as JSON writes it"),
        ("/api/v1/jobs/{running}/logs?wait=%2B1", "operator", "wait", "number as JSON writes it"),
        ("/api/v1/jobs/{running}?fields=id&tenant_id=globex", "viewer", "fields, tenant_id", "takes no query"),
    ],
)
def test_a_query_is_read_as_written_and_one_no_endpoint_takes_is_refused(
    limited: tuple[Flask, Api, dict[str, Tenant]], path: str, role: str, field: str, says: str
) -> None:
    _app, api, world = limited
    acme = world["acme"]
    response = api.get(path.format(running=acme.running), acme.tokens[role])
    assert response.status_code == 400 and response.json["error"] == "invalid_request", response.json
    assert response.json["message"].startswith(f"invalid query: {field}: ") and says in response.json["message"]
    written = path.split("?")[0].format(running=acme.running) + "?limit=5"
    if "limit" in path or "offset" in path:
        assert api.get(written, acme.tokens[role]).status_code == 200  # the same number in digits is taken
    assert api.get("/health?probe=lb", None).status_code == 200  # public endpoints ignore a monitor's query


def test_a_query_string_is_judged_only_once_the_token_is(limited: tuple[Flask, Api, dict[str, Tenant]]) -> None:
    _app, api, world = limited
    running = world["acme"].running
    assert api.get(f"/api/v1/jobs/{running}?tenant_id=globex").status_code == 401  # no token: nothing else said
    assert api.get(f"/api/v1/jobs/{running}?tenant_id=globex", "not-a-token").json["error"] == "invalid_token"
    assert api.get("/api/v1/jobs?limit=5.0").json["error"] == "missing_token"


@pytest.mark.parametrize(
    "path", ["/api/v1/jobs?ran_on=A1", "/api/v1/jobs?agent_id=a1%20", "/api/v1/agents?project_id=WEB"]
)
def test_an_id_filter_not_written_as_an_id_is_refused(limited: tuple[Flask, Api, dict[str, Tenant]], path: str) -> None:
    _app, api, world = limited
    response = api.get(path, world["acme"].tokens["viewer"])
    assert response.status_code == 400 and response.json["error"] == "invalid_request", response.json
