"""``GET /health``: the database, the cache (Valkey), Centrifugo and Quickwit, each ok, failing or not configured."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import requests
from flask import Blueprint, Response, current_app
from pydantic import Field
from sqlalchemy import text

from app.api import document, reply
from app.extensions import db
from app.realtime import centrifugo_check
from app.schemas import Response as Model

bp = Blueprint("health", __name__)

MEMORY_FALLBACK = "VALKEY_URL is not set: rate limits are counted in memory, separately in each web process"
NOT_CONFIGURED = "{name} is not set"


class Component(Model):
    """The health of one backing service."""

    status: Literal["ok", "error", "not_configured"]
    detail: str | None = None
    backend: str | None = None
    latency_ms: float | None = None


class Health(Model):
    """The platform's health: ``unavailable`` (503) without a database, ``degraded`` when another part fails."""

    status: Literal["ok", "degraded", "unavailable"]
    version: str
    components: dict[str, Component] = Field(description="database, cache, centrifugo, quickwit")


def _timed(check: Callable[[], object]) -> tuple[float, str | None]:
    started = time.perf_counter()
    try:
        check()
        error = None
    except Exception as exc:  # any failure is the answer, not an error of the endpoint
        first_line = (str(exc).splitlines() or [""])[0]
        error = f"{type(exc).__name__}: {first_line}"[:300]
    return round((time.perf_counter() - started) * 1000, 2), error


def _component(check: Callable[[], object], backend: str | None = None) -> Component:
    latency, error = _timed(check)
    return Component(status="error" if error else "ok", detail=error, backend=backend, latency_ms=latency)


def _http(url: str, path: str) -> Callable[[], object]:
    timeout = current_app.config["HEALTH_TIMEOUT"]
    return lambda: requests.get(url.rstrip("/") + path, timeout=timeout).raise_for_status()


def check_health() -> Health:
    """Check every component and return the verdict."""
    config = current_app.config
    database = _component(lambda: db.session.execute(text("SELECT 1")))
    dialect = db.engine.dialect  # is_mariadb is known once a connection was made
    database.backend = "mariadb" if getattr(dialect, "is_mariadb", False) else dialect.name
    components = {"database": database}
    db.session.rollback()
    valkey = current_app.extensions.get("valkey")
    if valkey is None:
        components["cache"] = Component(status="not_configured", backend="memory", detail=MEMORY_FALLBACK)
    else:
        components["cache"] = _component(valkey.ping, "valkey")
    for name, variable, path in (
        ("centrifugo", "CENTRIFUGO_URL", "/health"),
        ("quickwit", "QUICKWIT_URL", "/health/livez"),
    ):
        url = config.get(variable)
        components[name] = (
            _component(_http(url, path))
            if url
            else Component(status="not_configured", detail=NOT_CONFIGURED.format(name=variable))
        )
    centrifugo_api = centrifugo_check(config)
    if centrifugo_api is not None:  # the API with its key (an ``info`` call) rather than the open /health
        components["centrifugo"] = _component(centrifugo_api, "api")
    if components["database"].status != "ok":
        status: Literal["ok", "degraded", "unavailable"] = "unavailable"
    elif any(c.status == "error" for c in components.values()):
        status = "degraded"
    else:
        status = "ok"
    return Health(status=status, version=config["VERSION"], components=components)


@bp.get("/health")
@document(
    "Health of the control plane and its backing services (no token needed)",
    responses={200: Health, 503: Health},
    public=True,
)
def health() -> Response:
    """Report health."""
    verdict = check_health()
    return reply(verdict, 503 if verdict.status == "unavailable" else 200)
