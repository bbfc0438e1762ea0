"""names compared as written on MariaDB: task results' names, log lines' tasks, idempotency keys

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 13:00:00

MariaDB's default collation compares text without case: the results of tasks "Build" and "build" were one row
(the second report overwrote the first), and the idempotency keys "AbC" and "abc" one key. SQLite compares
text as written already; nothing changes there.

The downgrade fails (a duplicate key) once the database holds results of tasks, or keys, that differ only in
case: delete or rename those rows first.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

COLUMNS = [("task_results", "name", 200, False), ("job_log_lines", "task", 200, True), ("jobs", "idempotency_key", 255, True)]


def _mariadb() -> bool:
    return op.get_bind().dialect.name in ("mysql", "mariadb")


def upgrade() -> None:
    if not _mariadb():
        return
    for table, column, length, nullable in COLUMNS:
        exact = mysql.VARCHAR(length, collation="utf8mb4_bin")
        op.alter_column(table, column, type_=exact, existing_type=sa.String(length), existing_nullable=nullable)


def downgrade() -> None:
    if not _mariadb():
        return
    for table, column, length, nullable in COLUMNS:
        exact = mysql.VARCHAR(length, collation="utf8mb4_bin")
        op.alter_column(table, column, type_=sa.String(length), existing_type=exact, existing_nullable=nullable)
