"""audit events found by their action, tenant and target: a job's refused claims

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-08 03:40:00

A claim refused as a second delivery of a job's message is audited once per attempt and agent: the control plane
looks for the job's earlier ``job.claim_refused`` events first. Without this index that read went through every
such event of the tenant, and audit events are never deleted.
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_audit_events_action_tenant_target", "audit_events", ["action", "tenant_id", "target_id"])


def downgrade() -> None:
    op.drop_index("ix_audit_events_action_tenant_target", table_name="audit_events")
