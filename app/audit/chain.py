"""The audit log's hash chain: every entry carries the hash of the entry before it.

Requests only insert their audit rows, marked ``PENDING`` (in ``prev_hash``) and unnumbered, so no request
waits for another to extend the chain. The sealer (``seal``: a periodic task of the dispatcher, and
``automation audit seal|verify``) numbers the pending rows after the chain's head in the order they were
written (``seq``), hashes each over its canonical content and the previous entry's hash, and moves the head
on, in batches. It first writes the head row (``audit_chain``, id 1: a row lock on MariaDB, the write lock on
SQLite), so two sealers take turns and the chain never forks.

A row that reaches the table without the application (no ``PENDING`` mark) is never sealed: verification
reports it as not in the chain.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, RowMapping, bindparam, insert, select, update

from app.audit.models import AuditChainHead, AuditEvent

log = logging.getLogger(__name__)

GENESIS = "0" * 64  # the "previous hash" of entry 1
HEAD_ID = 1
PENDING = "pending"  # prev_hash of a row the application wrote and the sealer has not chained yet
BATCH = 500  # rows sealed per transaction
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


def _timestamp(value: datetime) -> str:
    if value.tzinfo is None:  # read without the model's column type: stored times are UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(entry: Mapping[Any, Any], *, seq: int, prev_hash: str) -> bytes:
    """Return the bytes an entry's hash covers: its audited columns, its number and its predecessor's hash.

    UTF-8, but with ``surrogatepass``: a lone surrogate (JSON's ``"\\ud800"``, which SQLite's JSON columns keep)
    has no strict UTF-8 form, and one such row stopped the sealer at every pass, leaving every later entry
    unsealed. Valid text encodes exactly as strict UTF-8 does, so every existing entry keeps its hash.
    """
    content = {name: entry[name] for name in HASHED}
    content["created_at"] = _timestamp(entry["created_at"])
    content["seq"] = seq
    content["prev_hash"] = prev_hash
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return text.encode("utf-8", "surrogatepass")


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
    connection.execute(statement)  # of two sealers that both found no head, the second one's insert is ignored


def _take_head(connection: Connection) -> tuple[int, str]:
    """Lock the head row by writing it, then return its seq and hash.

    The write takes SQLite's write lock (SQLite has no FOR UPDATE) and the row's lock on MariaDB before
    anything is read, so the head and the pending rows read next are the latest committed ones.
    """
    touch = update(AuditChainHead).where(AuditChainHead.id == HEAD_ID).values(seq=AuditChainHead.seq)
    if connection.execute(touch).rowcount == 0:
        raise LookupError("the audit chain's head row is missing")
    head = connection.execute(
        select(AuditChainHead.seq, AuditChainHead.last_hash).where(AuditChainHead.id == HEAD_ID).with_for_update()
    ).one()
    return int(head.seq), str(head.last_hash)


def _pending(connection: Connection, limit: int) -> list[RowMapping]:
    columns = (AuditEvent.id, *(getattr(AuditEvent, name) for name in HASHED))
    query = (
        select(*columns)
        .where(AuditEvent.seq.is_(None), AuditEvent.prev_hash == PENDING)
        .order_by(AuditEvent.id)
        .limit(limit)
    )
    return list(connection.execute(query).mappings())


def seal_batch(connection: Connection, limit: int = BATCH) -> int:
    """Chain up to ``limit`` pending rows after the head, in the caller's transaction; return how many."""
    seq, prev = _take_head(connection)
    rows = _pending(connection, limit)
    if not rows:
        return 0
    links = []
    for row in rows:
        seq += 1
        digest = entry_hash(row, seq=seq, prev_hash=prev)
        links.append({"row_id": row["id"], "new_seq": seq, "new_prev": prev, "new_hash": digest})
        prev = digest
    connection.execute(
        update(AuditEvent)
        .where(AuditEvent.id == bindparam("row_id"))
        .values(seq=bindparam("new_seq"), prev_hash=bindparam("new_prev"), hash=bindparam("new_hash")),
        links,
    )
    connection.execute(update(AuditChainHead).where(AuditChainHead.id == HEAD_ID).values(seq=seq, last_hash=prev))
    return len(rows)


def seal(connection: Connection, *, batch: int = BATCH, most: int | None = None) -> int:
    """Chain every pending row (or at most ``most``), one committed batch at a time; return how many.

    ``connection`` must not be in a transaction: each batch is its own, so the head's lock is held briefly.
    """
    with connection.begin():
        missing = connection.execute(select(AuditChainHead.id).where(AuditChainHead.id == HEAD_ID)).first() is None
    if missing:  # in a transaction of its own: inserting it where the head is locked can deadlock two sealers
        with connection.begin():
            _create_head(connection)
    sealed = 0
    while most is None or sealed < most:
        with connection.begin():
            count = seal_batch(connection, batch if most is None else min(batch, most - sealed))
        sealed += count
        if count < batch:
            break
    return sealed
