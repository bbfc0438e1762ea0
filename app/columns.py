"""Column types and helpers shared by the models: UTC timestamps, long text, exact names, identifiers."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Dialect, String, Text
from sqlalchemy.dialects import mysql
from sqlalchemy.types import TypeDecorator

# MariaDB's TEXT holds 64 KiB; workflows and task output may be larger.
LongText = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def exact(length: int) -> String:
    """A name compared as written: 'Build' and 'build' are two (MariaDB's default collation would make them one)."""
    return String(length).with_variant(mysql.VARCHAR(length, collation="utf8mb4_bin"), "mysql", "mariadb")


SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
ID_RULE = "lower-case letters, digits, '-' and '_', starting with a letter or digit, at most 63"
_ID = re.compile(SLUG_PATTERN.replace("$", r"\Z"))  # "$" would let a final line break through


def is_id(value: str) -> bool:
    """Whether ``value`` is a tenant's, project's or agent's id as the platform writes them. MariaDB's default
    collation compares text without case or trailing spaces, so an id in another spelling would find the row."""
    return _ID.match(value) is not None


def utcnow() -> datetime:
    """Return the current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def new_id() -> str:
    """Return a new random identifier for a job."""
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC (MariaDB's DATETIME has no zone) and read back as aware UTC."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        """Use microsecond precision on MariaDB."""
        if dialect.name in {"mysql", "mariadb"}:
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert an aware time to naive UTC before it is stored."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored: give a timezone")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Mark a stored time as UTC."""
        return None if value is None else value.replace(tzinfo=UTC)
