"""job logs: job_log_lines (numbered per job; the truncation marker has dropped set)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 04:00:00

"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

# Timestamps are naive UTC; MariaDB keeps microseconds (app.columns.UTCDateTime).
UTCDateTime = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_log_lines",
        sa.Column("id", BigId, nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("ts", UTCDateTime, nullable=False),
        sa.Column("task", sa.String(length=200), nullable=True),
        sa.Column("level", sa.String(length=8), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("dropped", sa.Integer(), nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_log_lines_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_log_lines")),
        sa.UniqueConstraint("job_id", "seq", name="uq_job_log_lines_job_seq"),
    )
    with op.batch_alter_table("job_log_lines", schema=None) as batch_op:
        batch_op.create_index("ix_job_log_lines_tenant_ts", ["tenant_id", "ts"], unique=False)


def downgrade() -> None:
    op.drop_table("job_log_lines")
