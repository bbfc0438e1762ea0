"""Check the audit log's hash chain from its first entry to its head and find the first broken link."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, RowMapping, func, or_, select

from app.audit.chain import GENESIS, HASHED, HEAD_ID, PENDING, entry_hash
from app.audit.models import AuditChainHead, AuditEvent

EDITED = (
    "entry {seq} (row id {id}) was changed after it was written: its content hashes to {computed}, "
    "not to the hash it was written with, {recorded}"
)
RELINKED = (
    "entry {seq} (row id {id}) does not follow entry {previous}: it records {found} as the previous hash, "
    "but entry {previous} hashes to {expected}; one of the two was rewritten"
)
MISSING = "{entries} missing (deleted): the chain goes from entry {previous} to entry {seq} (row id {id})"
MISSING_FIRST = "{entries} missing (deleted): the chain starts at entry {seq} (row id {id})"
TRUNCATED = "{entries} missing (deleted): the chain head records {head} entries, the last one present is entry {last}"
HEAD_HASH = "the chain head records {recorded} as the hash of entry {seq}, but that entry hashes to {found}"
NO_HEAD = "the chain head (table audit_chain) is missing, so deleted newest entries could go unnoticed"
UNCHAINED = "row id {id} is not in the chain: it was written to the table directly, not by the application"


@dataclass(frozen=True)
class Break:
    """The first broken link: the row where the chain breaks (when there is one) and what differs."""

    problem: str
    seq: int | None = None
    row_id: int | None = None


@dataclass(frozen=True)
class Verdict:
    """The outcome of a check: entries checked, the head, the first break if any, and rows not sealed yet."""

    entries: int
    head_seq: int | None
    head_hash: str | None
    broken: Break | None
    pending: int = 0  # rows the application wrote that the sealer has not chained yet

    @property
    def intact(self) -> bool:
        """Tell whether the chain is unbroken."""
        return self.broken is None

    def as_dict(self) -> dict[str, Any]:
        """Return the verdict as JSON-ready data."""
        return {**asdict(self), "intact": self.intact}


def _entries(seq_from: int, seq_to: int | None) -> str:
    return f"entry {seq_from} is" if seq_from == seq_to else f"entries {seq_from} to {seq_to} are"


def _chain(connection: Connection, up_to: int | None, batch: int) -> Iterator[RowMapping]:
    """Yield the chained entries in order, batch by batch (keyset on seq)."""
    hashed = (getattr(AuditEvent, name) for name in HASHED)
    columns = (AuditEvent.id, AuditEvent.seq, AuditEvent.prev_hash, AuditEvent.hash, *hashed)
    last = 0
    while True:
        query = select(*columns).where(AuditEvent.seq > last)
        if up_to is not None:
            query = query.where(AuditEvent.seq <= up_to)
        rows = connection.execute(query.order_by(AuditEvent.seq).limit(batch)).mappings().all()
        if not rows:
            return
        yield from rows
        last = rows[-1]["seq"]


def _check(row: RowMapping, expected_seq: int, prev: str) -> Break | None:
    seq, row_id = row["seq"], row["id"]
    if seq != expected_seq:
        template = MISSING if expected_seq > 1 else MISSING_FIRST
        missing = _entries(expected_seq, seq - 1)
        return Break(template.format(entries=missing, previous=expected_seq - 1, seq=seq, id=row_id), seq, row_id)
    if row["prev_hash"] != prev:
        problem = RELINKED.format(seq=seq, id=row_id, previous=seq - 1, found=row["prev_hash"], expected=prev)
        return Break(problem, seq, row_id)
    computed = entry_hash(row, seq=seq, prev_hash=prev)
    if computed != row["hash"]:
        return Break(EDITED.format(seq=seq, id=row_id, computed=computed, recorded=row["hash"]), seq, row_id)
    return None


def verify(connection: Connection, *, batch: int = 1000) -> Verdict:
    """Walk the chain from entry 1 to the head; return the first broken link, or none."""
    top = connection.execute(
        select(AuditChainHead.seq, AuditChainHead.last_hash).where(AuditChainHead.id == HEAD_ID)
    ).first()
    head_seq, head_hash = (int(top.seq), str(top.last_hash)) if top is not None else (None, None)
    count, prev = 0, GENESIS

    def verdict(broken: Break | None, pending: int = 0) -> Verdict:
        return Verdict(entries=count, head_seq=head_seq, head_hash=head_hash, broken=broken, pending=pending)

    for row in _chain(connection, head_seq, batch):
        broken = _check(row, count + 1, prev)
        if broken is not None:
            return verdict(broken)
        count, prev = row["seq"], row["hash"]
    if head_seq is None:
        if count:
            return verdict(Break(NO_HEAD))
    elif head_seq != count:
        return verdict(Break(TRUNCATED.format(entries=_entries(count + 1, head_seq), head=head_seq, last=count)))
    elif head_hash != prev:
        return verdict(Break(HEAD_HASH.format(recorded=head_hash, seq=count, found=prev), count or None))
    unchained = AuditEvent.seq.is_(None)
    foreign = or_(AuditEvent.prev_hash.is_(None), AuditEvent.prev_hash != PENDING)
    stray = select(AuditEvent.id).where(unchained, foreign).order_by(AuditEvent.id).limit(1)
    stray_id = connection.execute(stray).scalar()
    if stray_id is not None:
        return verdict(Break(UNCHAINED.format(id=stray_id), None, stray_id))
    pending = connection.execute(select(func.count()).where(unchained, AuditEvent.prev_hash == PENDING)).scalar()
    return verdict(None, int(pending or 0))
