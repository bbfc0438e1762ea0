"""The audit log is a hash chain, sealed after the commit: an edited, deleted or foreign row is found by ``verify``."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import pytest
from flask import Flask
from flask_migrate import upgrade
from sqlalchemy import select, text

from app import create_app
from app.audit import service as audit
from app.audit.chain import GENESIS, PENDING, entry_hash, seal
from app.audit.models import AuditEvent
from app.audit.verify import verify
from app.cli import main
from app.extensions import db
from tests.app.conftest import config
from tests.app.support import SECRET, Api, Tenant


@pytest.fixture
def command_line(app: Flask, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the ``automation`` command at the test database."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("JWT_SECRET", SECRET)


def write(app: Flask, count: int, action: str = "test.written", *, sealed: bool = True) -> None:
    """Write ``count`` audit events, each in its own transaction, then seal them as the dispatcher does."""
    with app.app_context():
        for number in range(count):
            audit.record(action=action, principal=None, details={"number": number, "note": "ünïcode ✓"})
            db.session.commit()
    if sealed:
        seal_all(app)


def seal_all(app: Flask) -> int:
    """Run the sealer once, as the dispatcher's periodic task does."""
    with app.app_context(), db.engine.connect() as connection:
        return seal(connection)


def sql(app: Flask, statement: str) -> None:
    """Change the database behind the application's back."""
    with app.app_context():
        db.session.execute(text(statement))
        db.session.commit()


def verify_from_the_command_line(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["audit", "verify", *args])
    return code, capsys.readouterr().out


def test_every_entry_carries_the_hash_of_the_one_before(app: Flask, api: Api, world: dict[str, Tenant]) -> None:
    assert seal_all(app) > 0
    events = api.get("/api/v1/audit?limit=500", world["acme"].tokens["admin"]).json["events"]
    chain = sorted(events, key=lambda e: e["seq"])
    assert [e["seq"] for e in chain] == list(range(1, len(chain) + 1))
    assert chain[0]["prev_hash"] == GENESIS
    for before, after in pairwise(chain):
        assert after["prev_hash"] == before["hash"] and len(after["hash"]) == 64


def test_an_intact_audit_log_verifies_and_exits_zero(
    app: Flask, command_line: None, capsys: pytest.CaptureFixture[str]
) -> None:
    write(app, 5)
    code, out = verify_from_the_command_line(capsys)
    assert code == 0, out
    assert "intact: 5 entries" in out
    code, out = verify_from_the_command_line(capsys, "--json")
    verdict = json.loads(out)
    assert code == 0 and verdict["intact"] is True and verdict["entries"] == 5 and verdict["head_seq"] == 5


def test_an_empty_audit_log_is_intact(app: Flask, command_line: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify_from_the_command_line(capsys) == (0, "audit log intact: no entries yet\n")


def test_a_database_without_the_audit_log_cannot_be_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    monkeypatch.setenv("JWT_SECRET", SECRET)
    assert main(["audit", "verify"]) == 2
    assert "cannot read the audit log" in capsys.readouterr().err


def test_a_row_edited_in_the_database_is_reported_with_its_id(
    app: Flask, command_line: None, capsys: pytest.CaptureFixture[str]
) -> None:
    write(app, 5)
    with app.app_context():
        row_id = db.session.scalar(text("SELECT id FROM audit_events WHERE seq = 3"))
    sql(app, "UPDATE audit_events SET actor = 'mallory' WHERE seq = 3")
    code, out = verify_from_the_command_line(capsys)
    assert code == 1
    assert f"entry 3 (row id {row_id}) was changed after it was written" in out
    verdict = json.loads(verify_from_the_command_line(capsys, "--json")[1])
    assert verdict["broken"]["row_id"] == row_id and verdict["broken"]["seq"] == 3 and verdict["entries"] == 2


def test_a_row_whose_hash_was_recomputed_breaks_the_link_to_the_next(app: Flask) -> None:
    write(app, 4)
    sql(app, "UPDATE audit_events SET hash = '" + "f" * 64 + "' WHERE seq = 2")
    with app.app_context(), db.engine.connect() as connection:
        verdict = verify(connection)
    assert verdict.broken is not None and verdict.broken.seq == 2  # its content no longer matches its hash
    sql(app, "UPDATE audit_events SET prev_hash = '" + "f" * 64 + "' WHERE seq = 3")
    sql(app, "UPDATE audit_events SET hash = '" + "e" * 64 + "' WHERE seq = 3")
    with app.app_context(), db.engine.connect() as connection:
        broken = verify(connection).broken
    assert broken is not None and broken.seq == 2


def test_a_deleted_row_is_reported(app: Flask, command_line: None, capsys: pytest.CaptureFixture[str]) -> None:
    write(app, 6)
    with app.app_context():
        next_id = db.session.scalar(text("SELECT id FROM audit_events WHERE seq = 5"))
    sql(app, "DELETE FROM audit_events WHERE seq = 4")
    code, out = verify_from_the_command_line(capsys)
    assert code == 1
    assert f"entry 4 is missing (deleted): the chain goes from entry 3 to entry 5 (row id {next_id})" in out


def test_deleting_the_newest_entries_is_reported(
    app: Flask, command_line: None, capsys: pytest.CaptureFixture[str]
) -> None:
    write(app, 6)
    sql(app, "DELETE FROM audit_events WHERE seq >= 5")
    code, out = verify_from_the_command_line(capsys)
    assert code == 1 and "entries 5 to 6 are missing (deleted): the chain head records 6 entries" in out


def test_deleting_the_first_entry_is_reported(app: Flask) -> None:
    write(app, 3)
    sql(app, "DELETE FROM audit_events WHERE seq = 1")
    with app.app_context(), db.engine.connect() as connection:
        broken = verify(connection).broken
    assert broken is not None and broken.problem.startswith("entry 1 is missing (deleted): the chain starts at entry 2")


def test_a_row_inserted_behind_the_applications_back_is_reported(app: Flask) -> None:
    write(app, 2)
    sql(
        app,
        "INSERT INTO audit_events (created_at, action, outcome, details) "
        "VALUES ('2026-01-01 00:00:00', 'job.submitted', 'success', '{}')",
    )
    with app.app_context(), db.engine.connect() as connection:
        broken = verify(connection).broken
    assert broken is not None and "is not in the chain" in broken.problem and broken.row_id is not None


def test_a_rolled_back_audit_event_leaves_no_gap(app: Flask) -> None:
    write(app, 2)
    with app.app_context():
        audit.record(action="test.rolled_back", principal=None)
        db.session.flush()
        db.session.rollback()
    write(app, 2)
    with app.app_context(), db.engine.connect() as connection:
        verdict = verify(connection)
    assert verdict.intact and verdict.entries == 4


def test_concurrent_writers_never_fork_the_chain(app: Flask) -> None:
    writers, each = 6, 8
    start = threading.Barrier(writers)
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            start.wait()
            write(app, each, action="test.concurrent")
        except BaseException as exc:  # reported by the test, not lost in a thread
            failures.append(exc)
        finally:
            with app.app_context():
                db.session.remove()

    threads = [threading.Thread(target=writer) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    seal_all(app)
    with app.app_context(), db.engine.connect() as connection:
        verdict = verify(connection)
    assert verdict.intact, verdict.broken
    assert verdict.entries == verdict.head_seq == writers * each


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'chained.db'}"
    server = request.getfixturevalue("mariadb_server")
    return str(server.url_for(server.fresh_database("audit_chain_migration")))


def test_the_migration_chains_the_rows_written_before_it(empty_database: str) -> None:
    app = create_app(config(empty_database))
    with app.app_context():
        upgrade(revision="0002")
        for number in range(3):
            db.session.execute(
                text(
                    "INSERT INTO audit_events (created_at, action, outcome, details) "
                    "VALUES (:at, 'old.action', 'success', :details)"
                ),
                {"at": f"2026-01-0{number + 1} 12:00:00.123456", "details": json.dumps({"n": number})},
            )
        db.session.commit()
        upgrade()
        audit.record(action="new.action", principal=None)
        db.session.commit()
        with db.engine.connect() as connection:
            assert seal(connection) == 1
            verdict = verify(connection)
        db.engine.dispose()
    assert verdict.intact, verdict.broken
    assert verdict.entries == 4


def test_requests_leave_entries_pending_until_the_sealer_chains_them_in_order(app: Flask) -> None:
    write(app, 2)
    write(app, 3, action="test.later", sealed=False)
    with app.app_context(), db.engine.connect() as connection:
        verdict = verify(connection)
        pending = connection.execute(text("SELECT id, prev_hash FROM audit_events WHERE seq IS NULL ORDER BY id"))
        pending_ids = [row.id for row in pending if row.prev_hash == PENDING]
    assert verdict.intact and verdict.entries == 2 and verdict.pending == 3 and len(pending_ids) == 3
    assert seal_all(app) == 3
    with app.app_context(), db.engine.connect() as connection:
        verdict = verify(connection)
        order = connection.execute(text("SELECT id FROM audit_events WHERE seq > 2 ORDER BY seq")).scalars().all()
    assert verdict.intact and verdict.entries == verdict.head_seq == 5 and verdict.pending == 0
    assert list(order) == pending_ids
    assert seal_all(app) == 0


def test_verify_seals_pending_entries_first_unless_told_not_to(
    app: Flask, command_line: None, capsys: pytest.CaptureFixture[str]
) -> None:
    write(app, 2, sealed=False)
    code, out = verify_from_the_command_line(capsys, "--no-seal")
    assert code == 0 and "no entries yet" in out and "2 entries written since are not sealed yet" in out
    code, out = verify_from_the_command_line(capsys)
    assert code == 0 and "sealed 2 pending audit entries" in out and "intact: 2 entries" in out
    write(app, 1, sealed=False)
    assert main(["audit", "seal"]) == 0
    assert "sealed 1 pending" in capsys.readouterr().out


def test_concurrent_sealers_never_fork_the_chain(app: Flask) -> None:
    write(app, 60, sealed=False)
    failures: list[BaseException] = []
    counts: list[int] = []

    def sealer() -> None:
        try:
            with app.app_context(), db.engine.connect() as connection:
                counts.append(seal(connection, batch=7))
        except BaseException as exc:  # reported by the test, not lost in a thread
            failures.append(exc)

    threads = [threading.Thread(target=sealer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    assert sum(counts) == 60
    with app.app_context(), db.engine.connect() as connection:
        verdict = verify(connection)
    assert verdict.intact and verdict.entries == verdict.head_seq == 60


def test_a_pending_row_holding_a_lone_surrogate_is_sealed_and_the_chain_goes_on(
    app: Flask, backend: str, command_line: None, capsys: pytest.CaptureFixture[str]
) -> None:
    if backend == "mariadb":
        pytest.skip("MariaDB's JSON check refuses a lone surrogate: such a row cannot get in there")
    write(app, 2)
    sql(  # as a refused token's audit entry was written before tokens were checked for them
        app,
        "INSERT INTO audit_events (created_at, tenant_id, action, outcome, details, prev_hash) "
        "VALUES ('2026-01-01 00:00:00', 'acme', 'access.denied', 'denied', "
        "'{\"reason\": \"the token is limited to project \\ud800\"}', 'pending')",
    )
    with app.app_context():
        audit.record(action="test.later", principal=None, tenant_id="globex")  # another tenant's, after it
        db.session.commit()
        stored = db.session.scalar(select(AuditEvent.details).where(AuditEvent.action == "access.denied"))
    assert stored == {"reason": "the token is limited to project \ud800"}  # as SQLite's JSON column reads it back
    assert seal_all(app) == 2
    code, out = verify_from_the_command_line(capsys)
    assert code == 0 and "intact: 4 entries" in out, out
    with app.app_context(), db.engine.connect() as connection:
        unsealed = connection.execute(text("SELECT count(*) FROM audit_events WHERE seq IS NULL")).scalar()
    assert unsealed == 0


def test_an_entry_of_valid_text_keeps_the_hash_it_was_sealed_with() -> None:
    entry = {
        "created_at": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        "tenant_id": "acme",
        "actor": "opérateur 😀",
        "role": "operator",
        "action": "job.submitted",
        "target_type": "job",
        "target_id": "j1",
        "outcome": "success",
        "remote_addr": "127.0.0.1",
        "details": {"note": "ünïcode ✓", "n": 1},
    }
    # as computed before rows holding a lone surrogate could be sealed: the chains sealed then still verify
    assert (
        entry_hash(entry, seq=7, prev_hash=GENESIS)
        == "c3416df4d94c5f3f1f3b9c0f7f2a388c94d5fa968b7cbf1e874b1ef2303baf49"
    )
