"""tamper-evident audit log: audit_events.seq, prev_hash, hash; the audit_chain head; existing rows chained

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 03:10:00

"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

UTCDateTime = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BATCH = 1000


def upgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("hash", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_audit_events_seq", ["seq"], unique=True)
        batch_op.create_index("ix_audit_events_action_tenant", ["action", "tenant_id"], unique=False)
    chain = op.create_table(
        "audit_chain",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("last_hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_chain")),
    )
    seq, last_hash = _chain_existing_rows()
    op.bulk_insert(chain, [{"id": 1, "seq": seq, "last_hash": last_hash}])


def _chain_existing_rows() -> tuple[int, str]:
    """Chain the rows written before this revision, in id order, exactly as the application chains new ones."""
    from app.audit.chain import GENESIS, HASHED, entry_hash

    events = sa.table(
        "audit_events",
        sa.column("id", sa.BigInteger()),
        sa.column("created_at", UTCDateTime),
        *(sa.column(name, sa.JSON() if name == "details" else sa.String()) for name in HASHED if name != "created_at"),
        sa.column("seq", sa.BigInteger()),
        sa.column("prev_hash", sa.String()),
        sa.column("hash", sa.String()),
    )
    connection = op.get_bind()
    seq, prev, last_id = 0, GENESIS, 0
    while True:
        query = sa.select(events).where(events.c.id > last_id).order_by(events.c.id).limit(BATCH)
        rows = connection.execute(query).mappings().all()
        if not rows:
            return seq, prev
        links = []
        for row in rows:
            seq += 1
            digest = entry_hash(row, seq=seq, prev_hash=prev)
            links.append({"row_id": row["id"], "new_seq": seq, "new_prev": prev, "new_hash": digest})
            prev = digest
        connection.execute(
            events.update()
            .where(events.c.id == sa.bindparam("row_id"))
            .values(seq=sa.bindparam("new_seq"), prev_hash=sa.bindparam("new_prev"), hash=sa.bindparam("new_hash")),
            links,
        )
        last_id = rows[-1]["id"]


def downgrade() -> None:
    op.drop_table("audit_chain")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_events_action_tenant")
        batch_op.drop_index("ix_audit_events_seq")
        batch_op.drop_column("hash")
        batch_op.drop_column("prev_hash")
        batch_op.drop_column("seq")
