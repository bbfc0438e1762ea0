"""Every failure is the JSON error shape, including Flask's own 404, 405, 413 and 500."""

from __future__ import annotations

import pytest
from flask import Flask
from sqlalchemy import text

from app.extensions import db
from tests.app.support import Api, MakeApp, Tenant


def test_an_unknown_path_is_a_json_404(api: Api) -> None:
    response = api.get("/api/v1/nothing-here")
    assert response.status_code == 404 and response.content_type == "application/json"
    assert response.json["error"] == "not_found" and response.json["message"]


def test_a_wrong_method_is_a_json_405_with_allow(api: Api) -> None:
    response = api.call("PATCH", "/api/v1/jobs")
    assert response.status_code == 405 and response.json["error"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


def test_an_unexpected_error_is_a_json_500_without_details(make_app: MakeApp, world: dict[str, Tenant]) -> None:
    app: Flask = make_app()

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("secret internals")

    app.config["TESTING"] = False
    app.config["PROPAGATE_EXCEPTIONS"] = False
    response = app.test_client().get("/boom")
    assert response.status_code == 500
    assert response.json["error"] == "internal_error" and "secret" not in response.json["message"]


def test_an_unreachable_database_is_a_json_503(make_app: MakeApp) -> None:
    app: Flask = make_app(DATABASE_URL="mysql+pymysql://nobody:x@127.0.0.1:1/none", SQLALCHEMY_ENGINE_OPTIONS={})
    from tests.app.support import token

    response = app.test_client().get("/api/v1/jobs", headers={"Authorization": f"Bearer {token('acme', 'viewer')}"})
    assert response.status_code == 503 and response.json["error"] == "database_unavailable"
    health = app.test_client().get("/health")
    assert health.status_code == 503 and health.json["status"] == "unavailable"


def test_a_value_the_database_refuses_is_a_500_not_database_unavailable(
    make_app: MakeApp, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """MariaDB refuses a value its CHECK constraint fails with error 4025, which PyMySQL raises as an
    OperationalError, as it does for a server out of reach; SQLite raises an IntegrityError."""
    app: Flask = make_app()

    @app.get("/refused")
    def refused() -> str:
        check = "CHECK (json_valid(j))"
        db.session.execute(text(f"CREATE TEMPORARY TABLE refused_values (j TEXT {check})"))
        db.session.execute(text("INSERT INTO refused_values (j) VALUES ('not json')"))
        return "stored"

    app.config["TESTING"] = False
    app.config["PROPAGATE_EXCEPTIONS"] = False
    with caplog.at_level("ERROR", "app.errors"):
        response = app.test_client().get("/refused")
    assert response.status_code == 500 and response.json["error"] == "internal_error", (backend, response.json)
    assert any(r.getMessage() == "unhandled error" and r.exc_info for r in caplog.records)  # logged as the bug it is
    assert app.test_client().get("/health").status_code == 200
