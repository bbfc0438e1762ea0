"""a run's deadline: jobs.timeout (the workflow's) and job_attempts.deadline_at, which the reaper enforces

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 13:30:00

"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

# Timestamps are naive UTC; MariaDB keeps microseconds (app.columns.UTCDateTime).
UTCDateTime = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("timeout", sa.Double(), nullable=True))
    with op.batch_alter_table("job_attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deadline_at", UTCDateTime, nullable=True))
        batch_op.create_index("ix_job_attempts_state_deadline", ["state", "deadline_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job_attempts", schema=None) as batch_op:
        batch_op.drop_index("ix_job_attempts_state_deadline")
        batch_op.drop_column("deadline_at")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("timeout")
