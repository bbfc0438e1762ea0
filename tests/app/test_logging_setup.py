"""Structured logs: one JSON object per line with timestamp, level, component, job_id, tenant_id and message."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, g

from app import create_app
from app.auth.tokens import Principal
from app.config import ConfigError
from dispatch.logs import (
    FIELDS,
    REQUEST_TENANT_KEY,
    _celery_fields,
    _task_finished,
    _task_started,
    component_for,
    configure_logging,
    log_context,
)
from tests.app.conftest import config
from tests.app.support import auth, token

JOB = "0b7e2c8e-4d0f-4a6e-9c51-2f1f5c0de001"
log = logging.getLogger("tests.logging")


@pytest.fixture
def structured() -> Iterator[None]:
    """Install the structured handler on the root logger for one test, then take it away again."""
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if getattr(h, "automation", False)]:
        root.removeHandler(handler)
    root.setLevel(level)


def lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_a_log_line_is_json_with_the_structured_fields(structured: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(component="dispatcher", level="INFO", fmt="json")
    log.info("job %s failed", JOB, extra={"job_id": JOB, "tenant_id": "acme", "attempt": 2})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("with a traceback")
    first, second = lines(capsys.readouterr().err)[-2:]
    assert set(FIELDS) <= set(first)
    assert first["level"] == "INFO" and first["component"] == "dispatcher" and first["logger"] == "tests.logging"
    assert first["job_id"] == JOB and first["tenant_id"] == "acme" and first["attempt"] == 2
    assert first["message"] == f"job {JOB} failed"
    assert str(first["timestamp"]).endswith("Z") and "T" in str(first["timestamp"])
    assert second["level"] == "ERROR" and "RuntimeError: boom" in str(second["exception"])
    assert second["job_id"] is None and second["tenant_id"] is None


def test_bound_fields_and_static_fields_reach_every_line(structured: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(component="agent", fmt="json", tenant_id="acme")
    with log_context(job_id=JOB):
        log.warning("inside")
    log.warning("outside")
    inside, outside = lines(capsys.readouterr().err)[-2:]
    assert inside["job_id"] == JOB and inside["tenant_id"] == "acme" and inside["component"] == "agent"
    assert outside["job_id"] is None and outside["tenant_id"] == "acme"


def test_a_request_gives_its_lines_the_job_and_the_callers_tenant(
    app: Flask, structured: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(component="web", fmt="json")
    with app.test_request_context(f"/api/v1/jobs/{JOB}/claim", method="POST"):
        g.principal = Principal(subject="agent:a1", tenant_id="acme", role="agent", project_id="web", agent_id="a1")
        log.warning("claimed")
    with app.test_request_context("/api/v1/tenants/globex/projects"):
        log.warning("listed")
    claimed, listed = lines(capsys.readouterr().err)[-2:]
    assert claimed["job_id"] == JOB and claimed["tenant_id"] == "acme" and claimed["component"] == "web"
    assert listed["job_id"] is None and listed["tenant_id"] == "globex"


def test_a_request_leaves_its_callers_tenant_for_the_access_line(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    environs: list[dict[str, Any]] = []  # each request's WSGI environ, as the server (gunicorn) keeps it
    inner = app.wsgi_app

    def server(environ: dict[str, Any], start_response: Any) -> Any:
        environs.append(environ)
        return inner(environ, start_response)

    monkeypatch.setattr(app, "wsgi_app", server)
    client = app.test_client()
    assert client.get(f"/api/v1/jobs/{JOB}", headers=auth(token("acme", "operator"))).status_code == 404
    assert client.get(f"/api/v1/jobs/{JOB}").status_code == 401
    known, refused = environs
    assert known[REQUEST_TENANT_KEY] == "acme"  # gunicorn's access line reads it (tests/app/test_metrics.py)
    assert REQUEST_TENANT_KEY not in refused


def test_celery_lines_carry_the_job_of_their_task(structured: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(component="agent", fmt="json")
    _task_started(task_id=f"{JOB}:3")
    log.warning("running")
    _task_finished(task_id=f"{JOB}:3")
    log.warning("done")
    running, done = lines(capsys.readouterr().err)[-2:]
    assert running["job_id"] == JOB and done["job_id"] is None
    fields = {"name": "workers.run_job", "id": f"{JOB}:1"}  # as Celery's worker logs a message it received
    received = logging.LogRecord(
        "celery.worker.strategy", logging.INFO, "", 0, "Task %(name)s[%(id)s] received", (fields,), None
    )
    assert _celery_fields(received) == {"job_id": JOB}


def test_the_text_format_is_for_people(structured: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(component="cli", fmt="text")
    log.warning("hello", extra={"job_id": JOB})
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.endswith(f"WARNING cli tests.logging: hello [job={JOB}]")


def test_an_unknown_log_format_or_level_stops_the_app_at_start(database_url: str, tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()  # as in a process that no entry point configured yet
    try:
        with pytest.raises(ConfigError, match="LOG_FORMAT must be one of json, text"):
            create_app({**config(database_url), "TESTING": False, "LOG_FORMAT": "xml"})
        with pytest.raises(ConfigError, match="LOUD"):
            create_app({**config(database_url), "TESTING": False, "LOG_LEVEL": "LOUD"})
    finally:
        root.handlers[:] = saved


@pytest.mark.parametrize(
    ("argv", "component"),
    [
        (["/venv/bin/gunicorn", "app:create_app()"], "web"),
        (["/venv/lib/python3.11/site-packages/gunicorn/__main__.py", "-w", "2", "app:create_app()"], "web"),
        (["/venv/bin/celery", "-A", "app.celery_app:celery", "worker", "-Q", "control"], "dispatcher"),
        (["/venv/bin/celery", "-A", "app.celery_app:celery", "beat"], "scheduler"),
        (["/venv/bin/celery", "-A", "app.celery_app:celery", "flower"], "flower"),
        (["/venv/bin/automation", "agent"], "agent"),
        (["/venv/bin/automation", "token", "create"], "cli"),
    ],
)
def test_the_component_is_named_after_the_process(argv: list[str], component: str) -> None:
    assert component_for(argv) == component


def test_a_control_plane_process_logs_json_from_the_app_factory(tmp_path: Path) -> None:
    program = (
        "import logging; from app import create_app; create_app(); "
        f"logging.getLogger('app.demo').warning('job %s stuck', 'x', extra={{'job_id': '{JOB}'}})"
    )
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}", "JWT_SECRET": "j" * 40}
    env.pop("LOG_FORMAT", None)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    [line] = lines(done.stderr)
    assert line["component"] == "cli" and line["job_id"] == JOB and line["level"] == "WARNING"
    assert line["message"] == "job x stuck" and line["logger"] == "app.demo"
