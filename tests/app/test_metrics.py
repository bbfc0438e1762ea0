"""``GET /metrics``: Prometheus's format, real counts of jobs and agents, protected, summed over gunicorn workers."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from app.auth.tokens import issue_token
from app.config import ConfigError
from app.extensions import db
from tests.app.conftest import config
from tests.app.support import WORKFLOW, Api, MakeApp, Tenant, token
from tests.servers._util import ServerProcess, free_port

OUTSIDE = {"REMOTE_ADDR": "203.0.113.9"}
METRICS_TOKEN = "scrape-" + "s" * 24


def scrape(api: Api, **kwargs: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Read /metrics and parse it with prometheus_client's own parser: {(sample name, labels): value}."""
    response = api.get("/metrics", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return parse(response.text)


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_count_the_jobs_submitted_here(api: Api, world: dict[str, Tenant]) -> None:
    before = scrape(api)
    operator = world["acme"].tokens["operator"]
    for _ in range(3):
        assert api.post("/api/v1/jobs", operator, json={"workflow": WORKFLOW}).status_code == 201
    replay = {"Idempotency-Key": "once"}
    for _ in range(2):  # a replayed submission is not a new job
        api.post("/api/v1/jobs", operator, json={"workflow": WORKFLOW}, headers=replay)
    after = scrape(api)
    # The world submitted four jobs per tenant; one of each is still pending, and so are the four new ones.
    assert value(after, "automation_jobs_submitted_total", tenant="acme") == 4 + 4
    assert value(after, "automation_jobs_submitted_total", tenant="globex") == 4
    assert value(after, "automation_jobs", state="pending") == 2 + 4
    assert value(after, "automation_jobs", state="queued") == 2
    assert value(after, "automation_jobs", state="running") == 2
    assert value(after, "automation_jobs", state="completed") == 2
    assert value(after, "automation_job_attempts", state="running") == 2
    assert value(after, "automation_database_up") == 1
    posted = {"method": "POST", "endpoint": "/api/v1/jobs", "status": "201"}
    assert (
        value(after, "automation_http_requests_total", **posted)
        - value(before, "automation_http_requests_total", **posted)
        == 5
    )
    latency = {"method": "POST", "endpoint": "/api/v1/jobs"}
    assert (
        value(after, "automation_http_request_duration_seconds_count", **latency)
        - value(before, "automation_http_request_duration_seconds_count", **latency)
        == 5
    )


def test_a_finished_job_is_observed_in_the_duration_histogram(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    agent = acme.tokens["agent"]
    before = scrape(api)
    assert api.post(f"/api/v1/jobs/{acme.queued}/claim", agent, json={"attempt": 1}).status_code == 200
    reply = api.post(f"/api/v1/jobs/{acme.queued}/status", agent, json={"attempt": 1, "state": "failed"})
    assert reply.status_code == 200, reply.json
    after = scrape(api)
    count = "automation_job_duration_seconds_count"
    assert value(after, count, state="failed") - value(before, count, state="failed") == 1
    assert value(after, "automation_job_duration_seconds_bucket", state="failed", le="+Inf") >= 1
    assert value(after, "automation_jobs", state="failed") == 1


def test_agents_registered_active_and_refused_heartbeats_are_counted(
    app: Flask, api: Api, world: dict[str, Tenant]
) -> None:
    before = scrape(api)
    assert value(before, "automation_agents_registered") == 2
    assert value(before, "automation_agents_active") == 2
    assert value(before, "automation_agents_heartbeat_overdue") == 0
    wrong_agent = token("acme", "agent", agent="a2")  # an agent token beating for another agent
    assert api.post("/api/v1/agents/a1/heartbeat", wrong_agent, json={}).status_code == 403
    with app.app_context():
        db.session.execute(db.text("UPDATE agents SET last_heartbeat_at = '2020-01-01 00:00:00' WHERE id = 'g1'"))
        db.session.commit()
    after = scrape(api)
    assert value(after, "automation_agents_active") == 1
    assert value(after, "automation_agents_heartbeat_overdue") == 1
    failures = "automation_agent_heartbeat_failures_total"
    assert value(after, failures, status="403") - value(before, failures, status="403") == 1


def test_metrics_are_served_to_loopback_and_refused_from_outside(api: Api) -> None:
    assert api.get("/metrics").status_code == 200
    refused = api.get("/metrics", environ_base=OUTSIDE)
    assert refused.status_code == 403 and refused.json["error"] == "access_denied"
    relayed = api.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"})  # a proxy on this host
    assert relayed.status_code == 403


def test_the_metrics_token_lets_a_scraper_in_from_anywhere(make_app: MakeApp) -> None:
    client = Api(make_app(METRICS_TOKEN=METRICS_TOKEN, METRICS_ALLOW="none").test_client())
    missing = client.get("/metrics")
    assert missing.status_code == 401 and missing.json["error"] == "missing_token"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = client.get("/metrics", "not-the-token", environ_base=OUTSIDE)
    assert wrong.status_code == 401 and wrong.json["error"] == "invalid_token"
    assert client.get("/metrics", METRICS_TOKEN, environ_base=OUTSIDE).status_code == 200


def test_metrics_allow_names_the_networks_that_need_no_token(make_app: MakeApp) -> None:
    client = Api(make_app(METRICS_ALLOW="10.0.0.0/8, 192.168.1.7").test_client())
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "10.20.30.40"}).status_code == 200
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "192.168.1.7"}).status_code == 200
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "192.168.1.8"}).status_code == 403
    assert client.get("/metrics").status_code == 403  # loopback is no longer in the list


def test_bad_metrics_settings_stop_the_app_at_start(database_url: str) -> None:
    with pytest.raises(ConfigError, match="METRICS_ALLOW"):
        create_app(config(database_url, METRICS_ALLOW="10.0.0.0/33"))
    with pytest.raises(ConfigError, match="METRICS_TOKEN must be at least 16"):
        create_app(config(database_url, METRICS_TOKEN="short"))


def test_a_scrape_without_the_database_still_serves_the_process_metrics(tmp_path: Path) -> None:
    app = create_app(config(f"sqlite:///{tmp_path / 'no-tables.db'}"))
    samples = scrape(Api(app.test_client()))
    assert value(samples, "automation_database_up") == 0
    assert any(name == "automation_http_requests_total" for name, _ in samples)
    with app.app_context():
        db.engine.dispose()


def half_a_request(port: int) -> socket.socket:
    """Open a connection and send part of a request: a sync gunicorn worker stays busy reading the rest."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
    return sock


def start_web(tmp_path: Path, workers: int) -> tuple[ServerProcess, int, Path]:
    """gunicorn with the Procfile's config file, on SQLite; the process, its port and its metrics directory."""
    url = f"sqlite:///{tmp_path / 'web.db'}"
    app = create_app(config(url))
    with app.app_context():
        db.create_all()
        db.engine.dispose()
    port, metrics_dir = free_port(), tmp_path / "prometheus"
    env = {
        "PATH": str(Path(sys.executable).parent),
        "DATABASE_URL": url,
        "JWT_SECRET": "w" * 40,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "LOG_FORMAT": "json",
    }
    web = ServerProcess("gunicorn", tmp_path / "web.log")
    argv = [str(Path(sys.executable).parent / "gunicorn"), "-c", "python:app.system.gunicorn"]
    argv += ["--bind", f"127.0.0.1:{port}", "--workers", str(workers), "app:create_app()"]
    # A readiness check that reaches the server is answered, even slowly: one abandoned would be counted unseen.
    web.start(argv, ready=lambda: requests.get(f"http://127.0.0.1:{port}/health", timeout=30).ok, env=env)
    return web, port, metrics_dir


def test_what_gunicorn_refuses_itself_is_answered_with_the_apis_json_error(tmp_path: Path) -> None:
    web, port, _ = start_web(tmp_path, 1)
    try:
        too_long = requests.get(f"http://127.0.0.1:{port}/api/v1/agents/{'a' * 5000}", timeout=5)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n")  # a header line without a colon
            raw = sock.recv(4096)
    finally:
        web.stop()
    assert too_long.status_code == 414 and too_long.headers["Content-Type"] == "application/json"
    assert too_long.json()["error"] == "uri_too_long" and too_long.json()["message"], too_long.text
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"Content-Type: application/json" in head, raw
    assert json.loads(body)["error"] == "invalid_request", body


def test_counters_are_added_up_across_gunicorn_workers(tmp_path: Path) -> None:
    web, port, metrics_dir = start_web(tmp_path, 2)
    try:
        sent = 1  # the readiness check
        busy = half_a_request(port)  # one worker waits for the rest of this request...
        time.sleep(0.3)
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok  # ...so the other one answers
        busy.sendall(b"\r\n")
        assert busy.recv(64).startswith(b"HTTP/1.1 200")
        busy.close()
        sent += 2
        for _ in range(20):
            assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok
        sent += 20
        job, other = "0b7e2c8e-4d0f-4a6e-9c51-2f1f5c0de001", "0b7e2c8e-4d0f-4a6e-9c51-2f1f5c0de002"
        assert requests.get(f"http://127.0.0.1:{port}/api/v1/jobs/{job}", timeout=5).status_code == 401
        operator = {"Authorization": f"Bearer {issue_token('w' * 40, tenant_id='acme', role='operator')}"}
        assert (
            requests.get(f"http://127.0.0.1:{port}/api/v1/jobs/{other}", headers=operator, timeout=5).status_code == 404
        )
        samples = parse(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
        pids = {path.stem.split("_")[-1] for path in metrics_dir.glob("counter_*.db")}
    finally:
        web.stop()
    assert len(pids) == 2, pids  # both workers answered requests...
    health = {"method": "GET", "endpoint": "/health", "status": "200"}
    assert value(samples, "automation_http_requests_total", **health) == sent  # ...and the scrape adds them up
    records = [json.loads(line) for line in (tmp_path / "web.log").read_text().splitlines() if line.startswith("{")]
    assert records and all(record["component"] == "web" for record in records)
    [access] = [r for r in records if r["logger"] == "gunicorn.access" and f"/api/v1/jobs/{job}" in r["message"]]
    assert access["job_id"] == job and access["tenant_id"] is None  # refused before anyone was known
    [known] = [r for r in records if r["logger"] == "gunicorn.access" and f"/api/v1/jobs/{other}" in r["message"]]
    assert known["job_id"] == other and known["tenant_id"] == "acme"  # the caller's tenant, left by the app
