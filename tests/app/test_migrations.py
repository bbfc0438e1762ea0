"""The migrations build the models' schema on an empty database, and take it down again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask_migrate import downgrade, upgrade
from sqlalchemy import Engine, String, inspect

from app import create_app
from app.extensions import db
from app.jobs.models import Job, JobAttempt, JobEvent, TaskResult
from app.tenants.models import Project, Tenant
from tests.app.conftest import config

TABLES = {"tenants", "projects", "agents", "jobs", "job_attempts", "task_results", "job_events", "audit_events"}


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrated.db'}"
    else:
        server = request.getfixturevalue("mariadb_server")
        yield server.url_for(server.fresh_database("migrations_test"))


def test_migrations_upgrade_an_empty_database_to_the_models_and_downgrade_it(empty_database: str) -> None:
    app = create_app(config(empty_database))
    with app.app_context():
        upgrade()
        assert set(inspect(db.engine).get_table_names()) >= TABLES
        indexes = {ix["name"] for ix in inspect(db.engine).get_indexes("jobs")}
        assert "ix_jobs_tenant_project_state_scheduled" in indexes
        with db.engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), db.metadata)
        assert differences == []
        assert collations(db.engine) == wanted_collations(db.engine)  # which compare_metadata does not compare
        downgrade(revision="base")
        assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
        db.engine.dispose()


def collations(engine: Engine) -> dict[tuple[str, str], str | None]:
    """The collation of each string column of the models' tables, as the database has it (None: its default)."""
    wanted = wanted_collations(engine)
    found = {}
    for table in db.metadata.sorted_tables:
        for column in inspect(engine).get_columns(table.name):
            if (table.name, column["name"]) in wanted:
                found[(table.name, column["name"])] = getattr(column["type"], "collation", None)
    return found


def wanted_collations(engine: Engine) -> dict[tuple[str, str], str | None]:
    """The collation the models give each string column on this database (None: its default; JSON has its own)."""
    return {
        (table.name, column.name): getattr(column.type.dialect_impl(engine.dialect), "collation", None)
        for table in db.metadata.sorted_tables
        for column in table.columns
        if isinstance(column.type.dialect_impl(engine.dialect), String)
    }


CHILDREN = ("job_attempts", "job_events", "task_results")


def test_a_downgrade_and_upgrade_keep_every_jobs_history(empty_database: str) -> None:
    """Rebuilding ``jobs`` (SQLite's way to drop or change a column) must not cascade to the rows that point at it."""
    app = create_app(config(empty_database))
    with app.app_context():
        upgrade()
        db.session.add(Tenant(id="acme", name="acme"))
        db.session.flush()
        db.session.add(Project(tenant_id="acme", id="web", name="web"))
        db.session.flush()
        job = Job(id="j1", tenant_id="acme", project_id="web", name="w", workflow="name: w", platform="linux")
        db.session.add(job)
        db.session.flush()
        db.session.add_all(
            [
                JobAttempt(job_id="j1", tenant_id="acme", number=1, state="completed"),
                JobEvent(job_id="j1", tenant_id="acme", attempt=1, to_state="completed"),
                TaskResult(job_id="j1", attempt=1, position=0, name="t", type="command", status="succeeded"),
            ]
        )
        db.session.commit()
        downgrade(revision="0009")  # undoes 0012, 0011 and 0010, each of which alters jobs
        assert counts() == {table: 1 for table in ("jobs", *CHILDREN)}
        upgrade()
        assert counts() == {table: 1 for table in ("jobs", *CHILDREN)}
        with db.engine.connect() as connection:
            if connection.dialect.name == "sqlite":  # the app's connections enforce foreign keys again
                assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        db.session.remove()
        db.engine.dispose()


def counts() -> dict[str, int]:
    with db.engine.connect() as connection:
        return {
            table: connection.exec_driver_sql(f"SELECT COUNT(*) FROM {table}").scalar_one()  # fixed names
            for table in ("jobs", *CHILDREN)
        }
