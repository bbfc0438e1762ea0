"""``POST /api/v1/realtime/token`` grants only the caller's channels; ``GET /api/v1/jobs/{id}/events`` streams SSE."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
import requests
from flask import Flask
from werkzeug.test import TestResponse

from app.config import ConfigError
from app.extensions import db
from app.jobs.models import Job
from app.jobs.states import JobState, transition
from app.realtime import check_settings
from app.realtime.events import note_task
from app.realtime.views import VALKEY_DOWN
from dispatch.realtime import history_key, job_channel
from dispatch.signing import generate_keypair
from tests.app.support import SECRET, Api, MakeApp, Tenant
from tests.app.test_realtime import TOKEN_SECRET, live_app, sqlite_database_url, valkey_client  # noqa: F401
from tests.servers._util import ServerProcess, free_port
from tests.servers.valkey import ValkeyServer

JobEvents = list[tuple[int, dict[str, Any]]]


def claims(encoded: str) -> dict[str, Any]:
    return jwt.decode(encoded, TOKEN_SECRET, algorithms=["HS256"])


def test_a_token_grants_the_callers_tenant_channel_and_nothing_else(live: Flask, world: dict[str, Tenant]) -> None:
    api = Api(live.test_client())
    response = api.post("/api/v1/realtime/token", world["acme"].tokens["tenant_admin"])
    assert response.status_code == 200, response.json
    body = response.json
    assert body["channels"] == {"tenant": "jobs:acme", "project": None, "job": None}
    assert list(body["subscriptions"]) == ["jobs:acme"]
    connection = claims(body["token"])
    assert connection["sub"] == body["user"] and connection["info"]["tenant_id"] == "acme"
    assert "channels" not in connection and connection["exp"] - connection["iat"] == 900
    subscription = claims(body["subscriptions"]["jobs:acme"])
    assert subscription["channel"] == "jobs:acme" and subscription["sub"] == connection["sub"]
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(body["token"], SECRET, algorithms=["HS256"])  # not an API token


def test_a_token_for_a_job_adds_that_jobs_channel(live: Flask, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    api = Api(live.test_client())
    response = api.post("/api/v1/realtime/token", acme.tokens["viewer"], json={"job_id": acme.running})
    assert response.status_code == 200, response.json
    job_channel = f"jobs:acme.{acme.running}"
    assert response.json["channels"]["job"] == job_channel
    assert claims(response.json["subscriptions"][job_channel])["channel"] == job_channel


def test_a_project_limited_token_gets_its_projects_channel_not_the_tenants(
    live: Flask, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    response = Api(live.test_client()).post(
        "/api/v1/realtime/token", acme.tokens["operator"], json={"job_id": acme.completed}
    )
    assert response.status_code == 200
    job_channel = f"jobs:acme.{acme.completed}"
    assert response.json["channels"] == {"tenant": None, "project": "jobs:acme.project.web", "job": job_channel}
    assert list(response.json["subscriptions"]) == ["jobs:acme.project.web", job_channel]
    assert claims(response.json["subscriptions"]["jobs:acme.project.web"])["channel"] == "jobs:acme.project.web"


def test_another_tenants_job_gets_no_token_and_reads_as_missing(live: Flask, world: dict[str, Tenant]) -> None:
    api = Api(live.test_client())
    globex_job = world["globex"].running
    response = api.post("/api/v1/realtime/token", world["acme"].tokens["admin"], json={"job_id": globex_job})
    assert response.status_code == 404 and response.json["error"] == "not_found"
    assert globex_job in response.json["message"]


def test_tokens_are_refused_to_agents_and_without_a_secret(
    live: Flask, make_app: MakeApp, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    refused = Api(live.test_client()).post("/api/v1/realtime/token", acme.tokens["agent"])
    assert refused.status_code == 403 and refused.json["error"] == "access_denied"
    unconfigured = Api(make_app().test_client()).post("/api/v1/realtime/token", acme.tokens["viewer"])
    assert unconfigured.status_code == 503 and unconfigured.json["error"] == "realtime_not_configured"
    assert "CENTRIFUGO_TOKEN_SECRET" in unconfigured.json["message"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"CENTRIFUGO_API_URL": "http://c:8000/api"}, "CENTRIFUGO_API_KEY"),
        ({"CENTRIFUGO_TOKEN_SECRET": "short"}, "at least 32"),
        ({"CENTRIFUGO_TOKEN_SECRET": SECRET}, "differ from JWT_SECRET"),
        ({"EVENT_HISTORY_SIZE": 0}, "EVENT_HISTORY_SIZE must be more than 0"),
        ({"SSE_MAX_STREAMS": -1}, "SSE_MAX_STREAMS must be 0 or more"),
    ],
)
def test_live_status_settings_that_cannot_work_are_refused(live: Flask, settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_settings({**live.config, **settings})


# --- Server-Sent Events --------------------------------------------------------------------------------------


def frames(response: TestResponse) -> tuple[JobEvents, int]:
    """Read a whole stream: its events (id, data) and how many keep-alive comments it had."""
    text = b"".join(response.response).decode()  # type: ignore[arg-type]
    events, comments = [], 0
    for block in text.split("\n\n"):
        if not block:
            continue
        if block == ": keep-alive":
            comments += 1
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        assert fields["event"] == "job"
        data = json.loads(fields["data"])
        assert int(fields["id"]) == data["id"]
        events.append((data["id"], data))
    return events, comments


def run_job(live: Flask, job_id: str, *states: JobState) -> None:
    with live.app_context():
        job = db.session.get(Job, job_id)
        for state in states:
            transition(job, state, actor="test")
            db.session.commit()


def stream(api: Api, job_id: str, bearer: str, **kwargs: Any) -> TestResponse:
    return api.get(f"/api/v1/jobs/{job_id}/events", bearer, buffered=False, **kwargs)


def test_a_finished_jobs_events_are_replayed_and_the_stream_ends(live: Flask, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    run_job(live, acme.running, JobState.COMPLETED)
    with live.app_context():
        job = db.session.get(Job, acme.queued)
        transition(job, JobState.RUNNING)
        note_task(job, 1, "kernel", "running")
        note_task(job, 1, "kernel", "succeeded")
        transition(job, JobState.FAILED)
        db.session.commit()
    api = Api(live.test_client())
    response = stream(api, acme.queued, acme.tokens["viewer"])
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    events, _ = frames(response)
    assert [(i, e["state"], e["task"], e["status"]) for i, e in events] == [
        (1, "running", None, None),
        (2, "running", "kernel", "running"),
        (3, "running", "kernel", "succeeded"),
        (4, "failed", None, None),
    ]


def test_last_event_id_resumes_after_that_event(live: Flask, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    run_job(live, acme.queued, JobState.RUNNING, JobState.COMPLETED)
    api = Api(live.test_client())
    header, _ = frames(stream(api, acme.queued, acme.tokens["viewer"], headers={"Last-Event-ID": "1"}))
    assert [(i, e["state"]) for i, e in header] == [(2, "completed")]
    parameter, _ = frames(
        stream(api, acme.queued, acme.tokens["viewer"], query_string={"last_event_id": "0"}, headers={})
    )
    assert [i for i, _ in parameter] == [1, 2]
    after_the_end, _ = frames(stream(api, acme.queued, acme.tokens["viewer"], headers={"Last-Event-ID": "2"}))
    assert after_the_end == []
    for value in ("two", "\u00b2", "1" * 5000, "-1"):  # '²' passes str.isdigit; 5000 digits are too many for int()
        bad = stream(api, acme.queued, acme.tokens["viewer"], headers={"Last-Event-ID": value})
        assert bad.status_code == 400 and bad.json["error"] == "invalid_request", value


def test_another_tenants_job_has_no_event_stream(live: Flask, world: dict[str, Tenant]) -> None:
    api = Api(live.test_client())
    response = stream(api, world["globex"].running, world["acme"].tokens["admin"])
    assert response.status_code == 404 and response.json["error"] == "not_found"
    assert response.mimetype == "application/json"
    assert stream(api, world["acme"].running, world["acme"].tokens["agent"]).status_code == 403


def test_events_committed_after_the_stream_opened_arrive_live_and_none_twice(
    live: Flask, world: dict[str, Tenant], valkey: redis.Redis
) -> None:
    acme = world["acme"]
    run_job(live, acme.queued, JobState.RUNNING)
    api = Api(live.test_client())
    response = stream(api, acme.queued, acme.tokens["viewer"])  # subscribed and replayed; nothing read yet
    assert response.status_code == 200
    # As if event 1 had been published between the subscription and the history read: it comes live too.
    (first,) = valkey.lrange(history_key("acme", acme.queued), 0, -1)
    valkey.publish(job_channel("acme", acme.queued), first)
    run_job(live, acme.queued, JobState.COMPLETED)
    events, _ = frames(response)
    assert [(i, e["state"]) for i, e in events] == [(1, "running"), (2, "completed")]


def test_a_finished_job_without_kept_events_gets_one_from_its_row(
    live: Flask, world: dict[str, Tenant], valkey: redis.Redis
) -> None:
    acme = world["acme"]
    run_job(live, acme.running, JobState.TIMED_OUT)
    valkey.delete(history_key("acme", acme.running))  # expired
    events, _ = frames(stream(Api(live.test_client()), acme.running, acme.tokens["viewer"]))
    assert [(i, e["state"], e["job_id"], e["task"]) for i, e in events] == [(1, "timed_out", acme.running, None)]


def test_a_quiet_stream_sends_keep_alives_and_ends_after_its_lifetime(
    make_app: MakeApp, valkey_server: ValkeyServer, world: dict[str, Tenant]
) -> None:
    app = make_app(
        VALKEY_URL=valkey_server.url, JOB_SIGNING_KEY=generate_keypair()[0], SSE_KEEPALIVE=0.1, SSE_MAX_SECONDS=1
    )
    acme = world["acme"]
    events, comments = frames(stream(Api(app.test_client()), acme.running, acme.tokens["viewer"]))
    assert events == [] and comments >= 2  # the opening one, then at least one while nothing happened


def test_a_job_finished_while_its_event_was_lost_ends_the_stream_at_the_next_keep_alive(
    make_app: MakeApp, valkey_server: ValkeyServer, world: dict[str, Tenant]
) -> None:
    app = make_app(
        VALKEY_URL=valkey_server.url, JOB_SIGNING_KEY=generate_keypair()[0], SSE_KEEPALIVE=0.1, SSE_MAX_SECONDS=60
    )
    acme = world["acme"]
    response = stream(Api(app.test_client()), acme.running, acme.tokens["viewer"])
    with app.app_context():  # the final state is committed, but its event never reaches Valkey
        app.extensions.pop("realtime")
        run_job(app, acme.running, JobState.COMPLETED)
    events, _ = frames(response)
    assert [(i, e["state"]) for i, e in events] == [(1, "completed")]


def test_without_valkey_the_event_stream_is_unavailable(api: Api, world: dict[str, Tenant]) -> None:
    response = api.get(f"/api/v1/jobs/{world['acme'].running}/events", world["acme"].tokens["viewer"])
    assert response.status_code == 503 and response.json["error"] == "events_unavailable"


def test_streams_beyond_sse_max_streams_are_refused_until_one_ends(
    make_app: MakeApp, valkey_server: ValkeyServer, world: dict[str, Tenant]
) -> None:
    app = make_app(VALKEY_URL=valkey_server.url, JOB_SIGNING_KEY=generate_keypair()[0], SSE_MAX_STREAMS=1)
    acme, api = world["acme"], Api(app.test_client())
    viewer = acme.tokens["viewer"]
    first = stream(api, acme.running, viewer)  # open, nothing read: it holds the process's one slot
    assert first.status_code == 200
    refused = stream(api, acme.queued, viewer)
    assert refused.status_code == 503 and refused.json["error"] == "events_unavailable"
    assert "1 event streams (SSE_MAX_STREAMS)" in refused.json["message"]
    assert f"GET /api/v1/jobs/{acme.queued}" in refused.json["message"]
    assert refused.headers["Retry-After"] == "5"
    assert api.get(f"/api/v1/jobs/{acme.queued}", viewer).status_code == 200  # other requests are not held
    hidden = stream(api, world["globex"].running, viewer)  # a job the caller may not see is still missing
    assert hidden.status_code == 404 and hidden.json["error"] == "not_found"
    first.close()  # the client left: the slot is free
    run_job(app, acme.queued, JobState.RUNNING, JobState.COMPLETED)
    whole = stream(api, acme.queued, viewer)
    events, _ = frames(whole)  # to its end; then the server closes it, as WSGI servers do, and the slot is free
    whole.close()
    assert [e["state"] for _, e in events] == ["running", "completed"]
    again = stream(api, acme.running, viewer)
    assert again.status_code == 200
    again.close()


def test_a_stream_that_cannot_reach_valkey_is_refused_and_gives_its_slot_back(
    make_app: MakeApp, world: dict[str, Tenant]
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    app = make_app(VALKEY_URL=nowhere, JOB_SIGNING_KEY=generate_keypair()[0], SSE_MAX_STREAMS=1)
    acme, api = world["acme"], Api(app.test_client())
    for _ in range(2):  # the second finds the one slot free again
        response = stream(api, acme.running, acme.tokens["viewer"])
        assert response.status_code == 503 and response.json["error"] == "events_unavailable"
        assert response.json["message"] == VALKEY_DOWN


def test_sse_max_streams_0_serves_no_stream(
    make_app: MakeApp, valkey_server: ValkeyServer, world: dict[str, Tenant]
) -> None:
    app = make_app(VALKEY_URL=valkey_server.url, JOB_SIGNING_KEY=generate_keypair()[0], SSE_MAX_STREAMS=0)
    response = stream(Api(app.test_client()), world["acme"].running, world["acme"].tokens["viewer"])
    assert response.status_code == 503 and response.json["error"] == "events_unavailable"


def test_under_gunicorn_a_worker_keeps_one_thread_from_event_streams(
    database_url: str, valkey_server: ValkeyServer, world: dict[str, Tenant], tmp_path: Path
) -> None:
    """The Procfile's config file: a worker of 2 threads serves one stream, and answers other requests meanwhile."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        "PATH": str(Path(sys.executable).parent),
        "DATABASE_URL": database_url,
        "JWT_SECRET": SECRET,
        "VALKEY_URL": valkey_server.url,
        "JOB_SIGNING_KEY": generate_keypair()[0],
        "RATE_LIMIT_ENABLED": "false",
        "SSE_KEEPALIVE": "0.2",  # so that the server soon sees a client that left
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
    }
    web = ServerProcess("gunicorn", tmp_path / "web.log")
    argv = [str(Path(sys.executable).parent / "gunicorn"), "-c", "python:app.system.gunicorn"]
    argv += ["--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "2", "app:create_app()"]
    web.start(argv, ready=lambda: requests.get(f"{base}/health", timeout=5).status_code in (200, 503), env=env)
    acme = world["acme"]
    headers = {"Authorization": f"Bearer {acme.tokens['viewer']}"}
    events = f"{base}/api/v1/jobs/{acme.running}/events"
    try:
        with requests.get(events, headers=headers, stream=True, timeout=10) as first:
            assert first.status_code == 200
            assert next(first.iter_lines()) == b": keep-alive"
            with requests.get(events, headers=headers, stream=True, timeout=10) as second:
                assert second.status_code == 503 and second.json()["error"] == "events_unavailable"
                assert "1 event streams" in second.json()["message"]
            assert requests.get(f"{base}/api/v1/jobs/{acme.running}", headers=headers, timeout=10).status_code == 200
        deadline = time.monotonic() + 10  # the first stream's thread ends at its next keep-alive, then frees the slot
        while (third := requests.get(events, headers=headers, stream=True, timeout=10)).status_code == 503:
            third.close()
            assert time.monotonic() < deadline, "the closed stream's slot never came back"
            time.sleep(0.1)
        assert third.status_code == 200
        third.close()
    finally:
        web.stop()
