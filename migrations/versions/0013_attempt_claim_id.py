"""job_attempts.claim_id: the agent's name for the claim that made the attempt its own, to answer that claim again

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 17:10:00

"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claim_id", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_attempts", schema=None) as batch_op:
        batch_op.drop_column("claim_id")
