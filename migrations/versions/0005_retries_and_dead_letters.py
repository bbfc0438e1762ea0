"""retries with backoff and dead letters: jobs.retry_backoff, jobs.dead_letter_reason, job_attempts.not_before

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 03:20:00

"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

UTCDateTime = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retry_backoff", sa.Double(), nullable=False, server_default="10"))
        batch_op.add_column(sa.Column("dead_letter_reason", sa.String(length=32), nullable=True))
        batch_op.create_index("ix_jobs_tenant_dead_letter", ["tenant_id", "dead_letter_reason"], unique=False)
    with op.batch_alter_table("job_attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("not_before", UTCDateTime, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_attempts", schema=None) as batch_op:
        batch_op.drop_column("not_before")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_tenant_dead_letter")
        batch_op.drop_column("dead_letter_reason")
        batch_op.drop_column("retry_backoff")
