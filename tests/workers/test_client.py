"""The agent's REST client retries transient failures and never drops a result silently."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from workers.client import ControlPlane, ControlPlaneError
from workers.settings import load_settings


def settings_env(url: str, deadline: float = 10) -> dict[str, str]:
    return {
        "CONTROL_PLANE_URL": url,
        "TENANT_ID": "acme",
        "PROJECT_ID": "web",
        "AGENT_ID": "a1",
        "JWT_TOKEN": "tok",
        "VALKEY_URL": "redis://127.0.0.1:1/0",
        "JOB_VERIFY_KEY": "x",
        "REPORT_DEADLINE": str(deadline),
    }


def _through_proxy(monkeypatch, scheme: str, proxy_url: str) -> None:
    """Send ``scheme`` requests through ``proxy_url``, whatever proxy variables the environment had (Python reads
    the lower-case ones first)."""
    for name in ("http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv(f"{scheme}_proxy", proxy_url)


def client_for(url: str, deadline: float = 10) -> ControlPlane:
    return ControlPlane(load_settings(settings_env(url, deadline)))


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


@pytest.mark.parametrize("status", [408, 520, 524, 599])
def test_every_5xx_and_a_request_timeout_are_transient(http_server, status):
    answers = iter([(status, {}, b"<html>try later</html>"), (200, {}, b'{"ok": true}')])
    http_server.route("/api/v1/jobs/j/status", method="POST", body=lambda request: next(answers))
    reply = client_for(http_server.url).call("POST", "/jobs/j/status", {"attempt": 1})
    assert reply.ok and reply.body == {"ok": True} and len(http_server.requests) == 2


def test_an_answer_nested_past_the_parsers_depth_is_an_empty_body(http_server):
    deep = b"[" * 100_000 + b"]" * 100_000
    http_server.route("/api/v1/jobs/j/claim", method="POST", body=lambda request: (200, {}, deep))
    assert client_for(http_server.url).call("POST", "/jobs/j/claim", {"attempt": 1}).body == {}


def test_requests_share_one_kept_alive_connection(http_server):
    seen: list[int] = []

    def answer(request):
        seen.append(threading.get_ident())  # the server's handler thread: one per connection
        return 200, {}, b'{"n": 1}'

    http_server.route("/api/v1/agents/a1/heartbeat", method="POST", body=answer)
    client = client_for(http_server.url)
    for _ in range(5):
        assert client.call("POST", "/agents/a1/heartbeat", {"running": []}).body == {"n": 1}
    assert len(seen) == 5 and len(set(seen)) == 1
    body = http_server.requests[-1]
    assert body.header("Content-Type") == "application/json" and json.loads(body.body) == {"running": []}


def test_a_connection_the_server_closed_is_reopened_without_a_retry_delay(http_server, caplog):
    answers = iter([(200, {"Connection": "close"}, b"{}"), (201, {}, b'{"second": true}')])
    http_server.route("/api/v1/jobs/j/status", method="POST", body=lambda request: next(answers))
    client = client_for(http_server.url)
    assert client.call("POST", "/jobs/j/status", {}).ok
    with caplog.at_level("WARNING", logger="workers.client"):
        assert client.call("POST", "/jobs/j/status", {}).body == {"second": True}
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]  # a new connection, not a retry
    assert len(http_server.requests) == 2


def test_https_is_verified_against_the_configured_ca(https_server):
    https_server.route("/api/v1/agents/a1", method="GET", body=b'{"agent_id": "a1"}')
    env_ca = {"CONTROL_PLANE_CA_FILE": str(https_server.ca_file)}
    trusted = ControlPlane(load_settings({**settings_env(https_server.url), **env_ca}))
    assert trusted.call("GET", "/agents/a1").body == {"agent_id": "a1"}
    untrusted = client_for(https_server.url, deadline=0.5)  # the system's CAs do not know the test CA
    with pytest.raises(ControlPlaneError, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.call("GET", "/agents/a1")


def test_a_plain_http_proxy_from_the_environment_is_used(http_server, monkeypatch):
    http_server.route("http://control.invalid:8080/api/v1/agents/a1", method="GET", body=b'{"via": "proxy"}')
    _through_proxy(monkeypatch, "http", http_server.url)
    reply = client_for("http://control.invalid:8080").call("GET", "/agents/a1")
    assert reply.body == {"via": "proxy"}
    assert http_server.requests[-1].path == "http://control.invalid:8080/api/v1/agents/a1"


def test_an_https_control_plane_is_reached_through_an_authenticating_proxy(https_server, tunnel_proxy, monkeypatch):
    https_server.route("/api/v1/agents/a1", method="GET", body=b'{"agent_id": "a1"}')
    _through_proxy(monkeypatch, "https", tunnel_proxy.url())  # user and password percent-encoded in the URL
    client = ControlPlane(
        load_settings({**settings_env(https_server.url), "CONTROL_PLANE_CA_FILE": str(https_server.ca_file)})
    )
    assert client.call("GET", "/agents/a1").body == {"agent_id": "a1"}  # TLS verified end to end, in the tunnel
    tunnel = tunnel_proxy.tunnels[-1]
    assert tunnel.target == f"127.0.0.1:{https_server.url.rsplit(':', 1)[1]}"
    assert base64.b64decode(tunnel.headers["proxy-authorization"].removeprefix("Basic ")) == b"agent@acme:p:ss w/rd"
    assert "proxy-authorization" not in {k.lower() for k in https_server.requests[-1].headers}  # not past the proxy


def test_a_proxy_that_wants_credentials_it_was_not_given_is_a_clear_error(https_server, tunnel_proxy, monkeypatch):
    _through_proxy(monkeypatch, "https", tunnel_proxy.url(user=None))
    client = ControlPlane(
        load_settings(
            {**settings_env(https_server.url, deadline=0.5), "CONTROL_PLANE_CA_FILE": str(https_server.ca_file)}
        )
    )
    with pytest.raises(ControlPlaneError, match="407 Proxy Authentication Required"):
        client.call("GET", "/agents/a1")
    assert "proxy-authorization" not in tunnel_proxy.tunnels[-1].headers
    assert not https_server.requests


def test_a_plain_http_proxy_gets_the_credentials_of_its_url(http_server, monkeypatch):
    http_server.route("http://control.invalid:8080/api/v1/agents/a1", method="GET", body=b'{"via": "proxy"}')
    host = http_server.url.removeprefix("http://")
    _through_proxy(monkeypatch, "http", f"http://ops%40acme:s%3Acret@{host}")
    assert client_for("http://control.invalid:8080").call("GET", "/agents/a1").body == {"via": "proxy"}
    expected = "Basic " + base64.b64encode(b"ops@acme:s:cret").decode()
    assert http_server.requests[-1].header("Proxy-Authorization") == expected


def test_a_plain_http_proxy_that_wants_other_credentials_is_retried_not_taken_for_an_answer(http_server, monkeypatch):
    http_server.route("http://control.invalid:8080/api/v1/jobs/j/claim", method="POST", status=407, body=b"")
    _through_proxy(monkeypatch, "http", http_server.url)
    with pytest.raises(ControlPlaneError, match="HTTP 407"):  # a claim then waits and is made again, never dropped
        client_for("http://control.invalid:8080", deadline=0.5).call("POST", "/jobs/j/claim", {"attempt": 1})
    assert len(http_server.requests) >= 2


@pytest.mark.parametrize(
    "proxy",
    [
        "https://agent:s3cret@proxy.invalid:8443",  # TLS to the proxy: not supported, never the password in clear
        "http://agent:s3cr/et@proxy.invalid:3128",  # a "/" left unencoded: the host would be "agent"
        "http://agent:1234/s3cret@proxy.invalid",  # the same, with a password that looks like a port
        "http://agent:s3cret#x@proxy.invalid",
        "http://proxy.invalid:99999",
    ],
)
def test_a_proxy_url_the_agent_cannot_use_is_refused_at_start_without_showing_it(monkeypatch, proxy):
    _through_proxy(monkeypatch, "https", proxy)
    with pytest.raises(ValueError, match=r"must be an http:// URL") as refused:
        client_for("https://control.invalid")
    assert "s3cr" not in str(refused.value) and "1234" not in str(refused.value)
    assert "https_proxy or HTTPS_PROXY" in str(refused.value)


def test_the_agent_command_says_what_is_wrong_with_its_proxy_and_exits_2(tmp_path):
    env = {
        **{k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")},
        **settings_env("https://control.invalid"),
        "JOB_VERIFY_KEY": base64.b64encode(bytes(32)).decode(),
        "HTTPS_PROXY": "https://agent:s3cret@proxy.invalid:8443",
    }
    agent = subprocess.run(
        [sys.executable, "-m", "workers"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert agent.returncode == 2, agent.stderr
    assert "must be an http:// URL" in agent.stderr and "s3cret" not in agent.stderr + agent.stdout
