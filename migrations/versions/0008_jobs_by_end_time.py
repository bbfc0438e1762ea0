"""finished jobs are found by their end time, for the job retention (JOB_RETENTION_DAYS)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 12:00:00

"""
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_state_finished", ["state", "finished_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_state_finished")
