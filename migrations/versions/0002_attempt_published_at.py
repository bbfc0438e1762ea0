"""job attempts remember when their message was published (the dispatch outbox)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 03:00:00

"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

UTCDateTime = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("published_at", UTCDateTime, nullable=True))
        batch_op.create_index("ix_job_attempts_state_published", ["state", "published_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job_attempts", schema=None) as batch_op:
        batch_op.drop_index("ix_job_attempts_state_published")
        batch_op.drop_column("published_at")
