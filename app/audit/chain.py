"""The audit log's hash chain: every entry carries the hash of the entry before it.

When a transaction that added audit events commits, ``link`` runs inside it, last: it locks the chain's head
row (``audit_chain``, id 1: a row lock on MariaDB, the write lock on SQLite), numbers the new entries after
the head (``seq``), hashes each over its canonical content and the previous entry's hash, and moves the head
on: three statements. The lock is held until the commit, so concurrent writers (web workers, the dispatcher)
take turns and the chain never forks; taking it last keeps the wait short and adds no lock-order cycles.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, event, insert, inspect, select, update
from sqlalchemy.orm import Session, UOWTransaction
from sqlalchemy.orm.attributes import set_committed_value

from app.audit.models import AuditChainHead, AuditEvent

log = logging.getLogger(__name__)

GENESIS = "0" * 64  # the "previous hash" of entry 1
HEAD_ID = 1
# The columns an entry's hash covers, with its seq and prev_hash; the row id is not covered (rows are found by seq).
HASHED = (
    "created_at",
    "tenant_id",
    "actor",
    "role",
    "action",
    "target_type",
    "target_id",
    "outcome",
    "remote_addr",
    "details",
)
_UNCHAINED = "automation.audit.unchained"  # session.info key: entries flushed in this transaction


def _timestamp(value: datetime) -> str:
    if value.tzinfo is None:  # read without the model's column type: stored times are UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(entry: Mapping[Any, Any], *, seq: int, prev_hash: str) -> bytes:
    """Return the bytes an entry's hash covers: its audited columns, its number and its predecessor's hash."""
    content = {name: entry[name] for name in HASHED}
    content["created_at"] = _timestamp(entry["created_at"])
    content["seq"] = seq
    content["prev_hash"] = prev_hash
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def entry_hash(entry: Mapping[Any, Any], *, seq: int, prev_hash: str) -> str:
    """Return the SHA-256 (hex) of an entry's canonical content."""
    return hashlib.sha256(canonical(entry, seq=seq, prev_hash=prev_hash)).hexdigest()


def _create_head(connection: Connection) -> None:
    """Create the head row, continuing the entries already chained (none on a new database)."""
    last = connection.execute(
        select(AuditEvent.seq, AuditEvent.hash)
        .where(AuditEvent.seq.is_not(None))
        .order_by(AuditEvent.seq.desc())
        .limit(1)
    ).first()
    if last is not None:
        log.warning("the audit chain's head row was missing; it continues from entry %d", last.seq)
    statement = (
        insert(AuditChainHead)
        .values(id=HEAD_ID, seq=last.seq if last else 0, last_hash=last.hash if last else GENESIS)
        .prefix_with("IGNORE", dialect="mysql")
        .prefix_with("IGNORE", dialect="mariadb")
        .prefix_with("OR IGNORE", dialect="sqlite")
    )
    connection.execute(statement)  # of two writers that both found no head, the second one's insert is ignored


def _take_head(connection: Connection) -> tuple[int, str]:
    """Lock the head row and return its seq and hash.

    The transaction has already inserted its audit rows, so on SQLite it holds the database's write lock
    and reads the latest head (SQLite has no FOR UPDATE); on MariaDB, FOR UPDATE locks the row and reads
    its latest committed version.
    """
    query = select(AuditChainHead.seq, AuditChainHead.last_hash).where(AuditChainHead.id == HEAD_ID).with_for_update()
    head = connection.execute(query).first()
    if head is None:
        _create_head(connection)
        head = connection.execute(query).one()
    return int(head.seq), str(head.last_hash)


def _as_stored(entry: AuditEvent) -> dict[str, Any]:
    """The hashed columns of a flushed entry as the database returns them (JSON details go through JSON)."""
    content = {name: getattr(entry, name) for name in HASHED}
    content["details"] = json.loads(json.dumps(entry.details))
    return content


def link(connection: Connection, entries: Sequence[AuditEvent]) -> dict[int, tuple[int, str, str]]:
    """Chain flushed, uncommitted audit rows after the head; return ``{id: (seq, prev_hash, hash)}``."""
    seq, prev = _take_head(connection)
    links: dict[int, tuple[int, str, str]] = {}
    for entry in sorted(entries, key=lambda e: e.id):
        seq += 1
        digest = entry_hash(_as_stored(entry), seq=seq, prev_hash=prev)
        links[entry.id] = (seq, prev, digest)
        prev = digest
    connection.execute(
        update(AuditEvent)
        .where(AuditEvent.id == bindparam("row_id"))
        .values(seq=bindparam("new_seq"), prev_hash=bindparam("new_prev"), hash=bindparam("new_hash")),
        [{"row_id": i, "new_seq": s, "new_prev": p, "new_hash": h} for i, (s, p, h) in links.items()],
    )
    connection.execute(update(AuditChainHead).where(AuditChainHead.id == HEAD_ID).values(seq=seq, last_hash=prev))
    return links


@event.listens_for(Session, "after_flush")
def _remember_new_entries(session: Session, _flush: UOWTransaction) -> None:
    """Note the audit events this flush inserted; they are chained when the transaction commits."""
    new = [obj for obj in session.new if isinstance(obj, AuditEvent)]
    if new:
        session.info.setdefault(_UNCHAINED, []).extend(new)


@event.listens_for(Session, "before_commit")
def _chain_before_commit(session: Session) -> None:
    """Chain the transaction's new audit events, as its last work before the commit."""
    if not session.info.get(_UNCHAINED) and not any(isinstance(obj, AuditEvent) for obj in session.new):
        return
    session.flush()  # all of the transaction's other writes first: the head's lock is the last one it takes
    pending: list[AuditEvent] = session.info.pop(_UNCHAINED, [])
    entries = [obj for obj in pending if inspect(obj).persistent and obj.seq is None]
    if not entries:
        return
    links = link(session.connection(), entries)
    for obj in entries:
        seq, prev_hash, digest = links[obj.id]
        set_committed_value(obj, "seq", seq)
        set_committed_value(obj, "prev_hash", prev_hash)
        set_committed_value(obj, "hash", digest)


@event.listens_for(Session, "after_rollback")
def _forget_on_rollback(session: Session) -> None:
    """Drop the notes of a transaction that was rolled back: its audit events were never written."""
    session.info.pop(_UNCHAINED, None)
