"""Flask control plane: REST API, models, services and authentication.

>>> from app import create_app
>>> app = create_app()          # configured from the environment; see docs/CONFIGURATION.md
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Flask, SQLAlchemy and Celery are imported when an app is built, not when the package is: the ``automation``
# command's REST client (``automation jobs …``, app/client) starts in a tenth of a second without them.
if TYPE_CHECKING:
    from flask import Flask

MIGRATIONS = str(Path(__file__).resolve().parent.parent / "migrations")


def _version() -> str:
    try:
        return version("automation-platform")
    except PackageNotFoundError:
        return "unknown"


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the control plane: defaults, then the environment, then ``test_config`` (tests only)."""
    from flask import Flask
    from sqlalchemy import event

    from app.celery import init_celery
    from app.config import Config, from_environment
    from app.extensions import db, migrate
    from app.system.log_setup import init_logging

    app = Flask(__name__, instance_relative_config=True, static_folder=None)
    app.config.from_object(Config)
    app.config.update(from_environment(os.environ))
    if test_config is not None:
        app.config.update(test_config)
    _finish_config(app)
    init_logging(app)

    db.init_app(app)
    migrate.init_app(app, db, directory=MIGRATIONS)
    with app.app_context():
        event.listen(db.engine, "connect", _on_connect)
    if app.config["VALKEY_URL"]:
        import redis

        app.extensions["valkey"] = redis.Redis.from_url(
            app.config["VALKEY_URL"],
            socket_timeout=app.config["HEALTH_TIMEOUT"],
            socket_connect_timeout=app.config["HEALTH_TIMEOUT"],
        )

    init_celery(app)
    from app.system.beacon import init_beacon

    init_beacon(app)
    from app.system.metrics import init_metrics  # here: gunicorn's config imports app before prometheus_client

    init_metrics(app)  # before the other blueprints: its request hooks time every request, refused ones too
    _register_blueprints(app)
    return app


def _finish_config(app: Flask) -> None:
    from app.config import database_url, engine_options, job_signing_key, jwt_secret, secrets_key

    config = app.config
    config["VERSION"] = _version()
    config["SQLALCHEMY_DATABASE_URI"] = database_url(config["DATABASE_URL"], app.instance_path)
    config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", engine_options(config["SQLALCHEMY_DATABASE_URI"]))
    config["JWT_SECRET"] = jwt_secret(config["JWT_SECRET"], app.instance_path)
    if config["SECRETS_KEY"]:
        secrets_key(config["SECRETS_KEY"], app.instance_path)  # checked now; else made when a secret is first used
    if config["VALKEY_URL"]:
        config["JOB_SIGNING_KEY"] = job_signing_key(config["JOB_SIGNING_KEY"], app.instance_path)


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    """Turn on foreign keys and WAL for SQLite connections (MariaDB needs nothing)."""
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def _register_blueprints(app: Flask) -> None:
    from app.agents.views import bp as agents_bp
    from app.api import refuse_non_json
    from app.audit.views import bp as audit_bp
    from app.errors import register_error_handlers
    from app.jobs.views import bp as jobs_bp
    from app.jobs.views import dead_letters_bp
    from app.logs.views import init_logs
    from app.ratelimit import init_rate_limit
    from app.realtime import init_realtime
    from app.schedules.views import bp as schedules_bp
    from app.secretstore.views import bp as secrets_bp
    from app.system.health import bp as health_bp
    from app.system.openapi import bp as openapi_bp
    from app.tenants.views import projects_bp, tenants_bp

    blueprints = (
        jobs_bp,
        dead_letters_bp,
        schedules_bp,
        agents_bp,
        tenants_bp,
        projects_bp,
        secrets_bp,
        audit_bp,
        health_bp,
    )
    for blueprint in (*blueprints, openapi_bp):
        app.register_blueprint(blueprint)
    init_logs(app)  # the logs API, and the Quickwit forwarder when QUICKWIT_URL is set
    init_realtime(app)  # live events: the fan-out, its session hooks, tokens and the event stream
    init_rate_limit(app)  # before the JSON check: a flood of bad requests is counted too
    app.before_request(refuse_non_json)
    register_error_handlers(app)


__all__ = ["create_app"]
