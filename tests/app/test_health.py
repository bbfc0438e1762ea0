"""``GET /health``: each component ok, failing, or not configured; the memory fallback is said."""

from __future__ import annotations

from flask import Flask

from app.system.health import MEMORY_FALLBACK, Health
from tests.app.support import Api, MakeApp
from tests.servers.http import HTTPTestServer


def test_health_without_optional_services_says_what_is_not_configured(api: Api, backend: str) -> None:
    response = api.get("/health")
    assert response.status_code == 200
    health = Health.model_validate(response.json)
    assert health.status == "ok"
    assert health.components["database"].status == "ok" and health.components["database"].backend == backend
    assert health.components["cache"].status == "not_configured"
    assert health.components["cache"].backend == "memory" and health.components["cache"].detail == MEMORY_FALLBACK
    assert health.components["centrifugo"].status == "not_configured"
    assert health.components["quickwit"].status == "not_configured"


def test_health_is_degraded_when_a_configured_service_is_down(make_app: MakeApp, http_server: HTTPTestServer) -> None:
    server = http_server
    server.route("/health", body=b"{}")
    server.route("/health/livez", status=503, body=b"down")
    app: Flask = make_app(
        VALKEY_URL="redis://127.0.0.1:1/0",
        CENTRIFUGO_URL=server.url,
        QUICKWIT_URL=server.url,
    )
    response = app.test_client().get("/health")
    assert response.status_code == 200
    health = Health.model_validate(response.json)
    assert health.status == "degraded"
    assert health.components["cache"].status == "error" and health.components["cache"].backend == "valkey"
    assert health.components["centrifugo"].status == "ok"
    assert health.components["quickwit"].status == "error"
