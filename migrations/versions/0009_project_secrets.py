"""project secrets: project_secrets (values sealed with SECRETS_KEY, bound to tenant, project and name)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 05:00:00

"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

# Timestamps are naive UTC; MariaDB keeps microseconds (app.columns.UTCDateTime).
UTCDateTime = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
LongText = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
# names are compared as written (DB_PW is not db_pw), whatever the database's default collation
SecretName = sa.String(length=128).with_variant(mysql.VARCHAR(128, collation="utf8mb4_bin"), "mysql", "mariadb")

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "project_secrets",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("name", SecretName, nullable=False),
        sa.Column("sealed", LongText, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id", "project_id"],
            ["projects.tenant_id", "projects.id"],
            name=op.f("fk_project_secrets_tenant_id_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "project_id", "name", name=op.f("pk_project_secrets")),
    )


def downgrade() -> None:
    op.drop_table("project_secrets")
