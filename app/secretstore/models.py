"""The project_secrets table: one encrypted value per tenant, project and name."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKeyConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from app.columns import LongText, UTCDateTime, exact, utcnow
from app.extensions import Base

SecretName = exact(128)  # DB_PW and db_pw are two secrets, as they are two placeholders


class ProjectSecret(Base):
    """A secret value of a project, sealed with ``SECRETS_KEY`` and bound to its tenant, project and name."""

    __tablename__ = "project_secrets"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "project_id"], ["projects.tenant_id", "projects.id"], ondelete="CASCADE"),
    )

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(SecretName, primary_key=True)
    sealed: Mapped[str] = mapped_column(LongText)  # base64 of nonce + ciphertext (XChaCha20-Poly1305)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(200))
