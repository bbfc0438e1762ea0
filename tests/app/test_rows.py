"""commit_new: the session's new objects written with plain INSERTs in order, committed, left detached and loaded; and
each statement of app.rows sent as its driver SQL with the values SQLAlchemy would have sent."""

from __future__ import annotations

import pytest
from flask import Flask
from sqlalchemy import event, insert, inspect, select
from sqlalchemy.exc import IntegrityError

from app.audit.models import AuditEvent
from app.columns import utcnow
from app.extensions import db
from app.jobs.models import Job, JobAttempt, JobEvent, TaskResult
from app.rows import commit_new, insert_row, insert_rows, update_fenced
from app.tenants import service as tenants


@pytest.fixture(name="project")
def acme_web(app: Flask) -> tuple[str, str]:
    with app.test_request_context():
        tenants.create_tenant(caller=None, tenant_id="acme")
        tenants.create_project(caller=None, tenant_id="acme", project_id="web")
    return "acme", "web"


def new_job(project: tuple[str, str], job_id: str = "job-1") -> Job:
    tenant, project_id = project
    return Job(id=job_id, tenant_id=tenant, project_id=project_id, name="n", workflow="w", platform="linux")


def test_new_objects_are_written_in_key_order_with_their_defaults_and_left_detached_and_loaded(
    app: Flask, project: tuple[str, str]
):
    with app.test_request_context():
        now = utcnow()
        job = new_job(project)
        # added children first: the foreign keys decide the order of the INSERTs, not the order of the adds
        first = JobEvent(job_id=job.id, tenant_id="acme", from_state="pending", to_state="queued", created_at=now)
        second = JobEvent(job_id=job.id, tenant_id="acme", from_state="queued", to_state="running", created_at=now)
        attempt = JobAttempt(job_id=job.id, tenant_id="acme", number=1, queued_at=now)
        audit = AuditEvent(action="job.submitted", outcome="success", tenant_id="acme", details={"k": "v"})
        db.session.add_all([first, second, attempt, audit, job])
        statements: list[str] = []

        def record(_connection: object, _cursor: object, statement: str, *_rest: object) -> None:
            statements.append(statement.split()[0].upper() + " " + statement.split()[2])

        engine = db.engine
        event.listen(engine, "before_cursor_execute", record)
        try:
            assert commit_new(db.session) == 5
        finally:
            event.remove(engine, "before_cursor_execute", record)
        # one INSERT each and nothing else; parents first; within a table, in the order of the adds
        assert sorted(statements) == sorted(
            ["INSERT audit_events", "INSERT jobs", "INSERT job_events", "INSERT job_events", "INSERT job_attempts"]
        )
        assert statements.index("INSERT jobs") < min(
            statements.index(t) for t in statements if t.startswith("INSERT job_")
        )
        assert not db.session.new and not db.session.dirty and not db.session.identity_map
        # out of the session, as after a query and an expunge: every column readable, no query to read it
        assert all(inspect(o).detached and not inspect(o).expired_attributes for o in (job, first, second, attempt))
        assert inspect(audit).detached
        assert first.id is not None and second.id is not None and first.id < second.id
        assert attempt.id is not None and audit.id is not None
        defaults = (job.state, job.attempt, job.revision, job.cancel_requested, job.variables)
        assert defaults == ("pending", 0, 1, False, {})
    with app.app_context():
        stored = db.session.get(Job, "job-1")
        assert stored is not None and stored.revision == 1 and stored.created_at is not None
        assert [a.number for a in stored.attempts] == [1]
        moves = db.session.scalars(select(JobEvent).order_by(JobEvent.id)).all()
        assert [m.to_state for m in moves] == ["queued", "running"]
        submitted = select(AuditEvent.details).where(AuditEvent.action == "job.submitted")
        assert db.session.scalars(submitted).one() == {"k": "v"}


def test_a_broken_foreign_key_writes_nothing(app: Flask, project: tuple[str, str]):
    with app.test_request_context():
        db.session.add(AuditEvent(action="job.submitted", outcome="success", tenant_id="acme"))
        db.session.add(new_job(("acme", "no-such-project")))
        with pytest.raises(IntegrityError):
            commit_new(db.session)
        db.session.rollback()
    with app.app_context():
        assert db.session.get(Job, "job-1") is None
        assert db.session.scalars(select(AuditEvent).where(AuditEvent.action == "job.submitted")).all() == []


def test_update_fenced_writes_only_while_the_guards_hold_and_leaves_nothing_for_the_flush(
    app: Flask, project: tuple[str, str]
):
    with app.test_request_context():
        job = new_job(project)
        db.session.add(job)
        commit_new(db.session)
        assert update_fenced(db.session, job, {"state": "queued", "attempt": 1}, {"state": "pending", "attempt": 0})
        assert (job.state, job.attempt) == ("queued", 1)
        assert not inspect(job).modified  # written already: the commit's flush has nothing to send
        # the row moved on: a writer that read it as it was changes nothing and is told so
        assert not update_fenced(db.session, job, {"state": "running"}, {"state": "pending"})
        assert job.state == "queued"
        db.session.commit()
        db.session.expire_all()
        assert db.session.execute(select(Job.state, Job.attempt).where(Job.id == job.id)).one() == ("queued", 1)


def test_insert_row_fills_the_column_defaults_and_returns_the_key(app: Flask, project: tuple[str, str]):
    with app.test_request_context():
        job = new_job(project)
        db.session.add(job)
        commit_new(db.session)
        first = insert_row(db.session, JobEvent, {"job_id": job.id, "tenant_id": "acme", "to_state": "queued"})
        second = insert_row(db.session, JobEvent, {"job_id": job.id, "tenant_id": "acme", "to_state": "running"})
        db.session.commit()
        assert isinstance(first, int) and second == first + 1
        stored = db.session.get(JobEvent, second)
        assert stored is not None and stored.to_state == "running"
        assert stored.attempt == 0 and stored.created_at is not None  # the columns' defaults


def test_values_sent_as_driver_sql_read_back_as_sqlalchemy_wrote_them(app: Flask, project: tuple[str, str]):
    """JSON, UTC times, text with quotes and percent signs, None: the conversions of each column's type apply."""
    with app.test_request_context():
        job = new_job(project)
        db.session.add(job)
        commit_new(db.session)
        when = utcnow()
        values = {
            "job_id": job.id,
            "attempt": 1,
            "position": 0,
            "name": "disk",
            "type": "command",
            "status": "succeeded",
            "output": "100% 'used' %(name)s %s ?\n",
            "error": None,
            "metrics": {"exit_code": 0, "tags": ["a", None]},
            "started_at": when,
            "finished_at": None,
            "reported_at": when,
        }
        statements: list[tuple[str, bool]] = []

        def record(_connection: object, _cursor: object, statement: str, _params: object, _context: object, many: bool):
            statements.append((statement.split()[0].upper(), many))

        event.listen(db.engine, "before_cursor_execute", record)
        try:
            key = insert_row(db.session, TaskResult, values)
            insert_rows(db.session, insert(JobEvent), [_move(job.id, when, "queued"), _move(job.id, when, "running")])
            assert update_fenced(db.session, job, {"state": "queued", "queued_at": when}, {"state": "pending"})
        finally:
            event.remove(db.engine, "before_cursor_execute", record)
        db.session.commit()
        assert statements == [("INSERT", False), ("INSERT", True), ("UPDATE", False)]  # several rows: one executemany
    with app.app_context():
        stored = db.session.get(TaskResult, key)
        assert stored is not None
        read = {name: getattr(stored, name) for name in values}
        assert read == values
        assert stored.started_at is not None and stored.started_at.tzinfo is not None  # UTCDateTime, aware
        moves = db.session.scalars(select(JobEvent.to_state).where(JobEvent.job_id == "job-1").order_by(JobEvent.id))
        assert moves.all() == ["queued", "running"]
        state, queued_at = db.session.execute(select(Job.state, Job.queued_at).where(Job.id == "job-1")).one()
        assert (state, queued_at) == ("queued", when)


def _move(job_id: str, when: object, to_state: str) -> dict[str, object]:
    return {
        "job_id": job_id,
        "tenant_id": "acme",
        "attempt": 1,
        "from_state": "pending",
        "to_state": to_state,
        "reason": None,
        "actor": "test",
        "created_at": when,
    }
