"""The audit sealer, a periodic task of the dispatcher: it hash-chains the audit entries written since its last run."""

from __future__ import annotations

from celery import shared_task

from app.audit.chain import seal
from app.extensions import db
from dispatch.celery import SEAL_AUDIT_TASK


@shared_task(name=SEAL_AUDIT_TASK)
def seal_audit() -> int:
    """Chain every pending audit entry after the chain's head; return how many."""
    with db.engine.connect() as connection:
        return seal(connection)
