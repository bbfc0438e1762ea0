"""idempotency keys are a project's own: unique per tenant and project, no longer per tenant

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-08 00:15:00

A key was unique in its tenant: a project could tell which keys another project had used (its own submission was
refused as a conflict), and could submit under the keys of another project's schedule runs, which were then
skipped. Every key stays unique under the new constraint, so the upgrade cannot fail.

The downgrade fails (a duplicate key) once two projects of a tenant hold jobs under the same key: delete those
jobs, or change their keys, first.
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("uq_jobs_tenant_idempotency_key", type_="unique")
        batch_op.create_unique_constraint(
            "uq_jobs_project_idempotency_key", ["tenant_id", "project_id", "idempotency_key"]
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("uq_jobs_project_idempotency_key", type_="unique")
        batch_op.create_unique_constraint("uq_jobs_tenant_idempotency_key", ["tenant_id", "idempotency_key"])
