"""Fixtures of the control-plane tests: the app on SQLite and on MariaDB, a client, a world of two tenants."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import delete

from app import create_app
from app.extensions import db
from tests.app.support import SECRET, SECRETS_KEY, Api, Tenant, build_world

BACKENDS = ["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)]


def config(url: str, **overrides: Any) -> dict[str, Any]:
    """Return the test configuration of an app on ``url``."""
    return {
        "TESTING": True,
        "DATABASE_URL": url,
        "JWT_SECRET": SECRET,
        "SECRETS_KEY": SECRETS_KEY,
        "RATE_LIMIT_ENABLED": False,
        "BEACON_INTERVAL": 0,  # the reaper's tests move the clock; tests/app/test_beacon.py turns it on
        **overrides,
    }


@pytest.fixture(scope="session", params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Yield the URL of an empty database with the schema, once per back end."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'app.db'}"
    else:
        server = request.getfixturevalue("mariadb_server")
        url = server.url_for(server.fresh_database("app_tests"))
    app = create_app(config(url))
    with app.app_context():
        db.create_all()
        db.engine.dispose()
    yield url


@pytest.fixture(scope="session")
def shared_apps() -> dict[str, Flask]:
    """One app per database, shared by the tests that need no special configuration."""
    return {}


def clean(app: Flask) -> None:
    """Delete every row of every table."""
    with app.app_context():
        for table in reversed(db.metadata.sorted_tables):
            db.session.execute(delete(table))
        db.session.commit()


@pytest.fixture
def app(database_url: str, shared_apps: dict[str, Flask]) -> Flask:
    """The control plane on an empty database (SQLite or MariaDB)."""
    if database_url not in shared_apps:
        shared_apps[database_url] = create_app(config(database_url))
    app = shared_apps[database_url]
    clean(app)
    return app


@pytest.fixture
def make_app(database_url: str, app: Flask) -> Iterator[Any]:
    """Return a factory of apps with extra configuration, on the same (emptied) database."""
    made: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        new = create_app(config(database_url, **overrides))
        made.append(new)
        return new

    yield make
    for new in made:
        with new.app_context():
            db.engine.dispose()


@pytest.fixture
def api(app: Flask) -> Api:
    """A test client of the app."""
    return Api(app.test_client())


@pytest.fixture
def world(app: Flask) -> dict[str, Tenant]:
    """Tenants acme and globex, with projects web and db, agents a1 and g1, and jobs in four states."""
    return build_world(app)


@pytest.fixture
def backend(database_url: str) -> str:
    """The name of the database back end under test."""
    return "sqlite" if database_url.startswith("sqlite") else "mariadb"


@pytest.fixture
def instance_dir(tmp_path: Path) -> Path:
    """An empty instance folder."""
    return tmp_path / "instance"
