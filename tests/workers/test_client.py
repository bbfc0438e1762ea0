"""The agent's REST client retries transient failures and never drops a result silently."""

from __future__ import annotations

import time

import pytest

from workers.client import ControlPlane, ControlPlaneError
from workers.settings import load_settings


def client_for(url: str, deadline: float = 10) -> ControlPlane:
    env = {
        "CONTROL_PLANE_URL": url,
        "TENANT_ID": "acme",
        "PROJECT_ID": "web",
        "AGENT_ID": "a1",
        "JWT_TOKEN": "tok",
        "VALKEY_URL": "redis://127.0.0.1:1/0",
        "JOB_VERIFY_KEY": "x",
        "REPORT_DEADLINE": str(deadline),
    }
    return ControlPlane(load_settings(env))


def test_transient_errors_are_retried_until_the_control_plane_answers(http_server):
    answers = iter([(503, {}, b"{}"), (429, {"Retry-After": "1"}, b"{}"), (201, {}, b'{"ok": true}')])
    http_server.route("/api/v1/jobs/j/tasks", method="POST", body=lambda request: next(answers))
    started = time.monotonic()
    reply = client_for(http_server.url).call("POST", "/jobs/j/tasks", {"attempt": 1})
    assert reply.ok and reply.body == {"ok": True}
    assert len(http_server.requests) == 3
    assert time.monotonic() - started >= 0.5  # Retry-After was honoured (jittered)
    assert all(r.headers["Authorization"] == "Bearer tok" for r in http_server.requests)


def test_a_definite_refusal_is_returned_not_retried(http_server):
    http_server.route(
        "/api/v1/jobs/j/claim",
        method="POST",
        body=lambda request: (409, {}, b'{"error": "job_cancelled", "message": "cancelled"}'),
    )
    reply = client_for(http_server.url).call("POST", "/jobs/j/claim", {"attempt": 1})
    assert reply.status == 409 and reply.error == "job_cancelled"
    assert len(http_server.requests) == 1


def test_a_control_plane_that_never_answers_is_an_error_after_the_deadline():
    with pytest.raises(ControlPlaneError, match=r"failed \d+ times"):
        client_for("http://127.0.0.1:1", deadline=1).call("POST", "/jobs/j/tasks", {})
