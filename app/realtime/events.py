"""Live events of a transaction: noted while it runs, published after it commits, forgotten if it does not.

Services note what happened (``note_state`` from ``app.jobs.states.transition``, ``note_task`` where task
starts and results are stored); the notes wait in the session and are published in the order they were
noted, in one call, once the transaction commits. A rolled-back (or closed) transaction publishes nothing:
an event may be lost (Valkey down), never invented. (Savepoints are not tracked: the control plane uses none.)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flask import current_app, has_app_context
from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from app.columns import utcnow
from app.extensions import db
from dispatch.realtime import Fanout, LiveEvent, iso_utc

if TYPE_CHECKING:
    from app.jobs.models import Job

log = logging.getLogger(__name__)

EXTENSION = "realtime"  # app.extensions key of the Fanout (absent without VALKEY_URL)
_NOTES = "automation.realtime.events"  # session.info key: the transaction's events, in order
_FANOUT = "automation.realtime.fanout"  # session.info key: where they go


def note_state(job: Job, attempt: int | None = None) -> None:
    """Note a job state change (the job's current state); published when the transaction commits."""
    _note(job, job.attempt if attempt is None else attempt, None, None)


def note_task(job: Job, attempt: int, task: str, status: str) -> None:
    """Note that a task of ``attempt`` started (status ``running``) or finished with ``status``."""
    _note(job, attempt, task, status)


def _note(job: Job, attempt: int, task: str | None, status: str | None) -> None:
    fanout = current_app.extensions.get(EXTENSION) if has_app_context() else None
    if not isinstance(fanout, Fanout):
        return  # no Valkey: there is nothing to publish to
    live = LiveEvent(
        job_id=job.id,
        tenant_id=job.tenant_id,
        project_id=job.project_id,
        attempt=attempt,
        state=job.state,
        task=task,
        status=status,
        ts=iso_utc(utcnow()),
    )
    info = db.session.info
    info[_FANOUT] = fanout
    info.setdefault(_NOTES, []).append(live)


def _publish_after_commit(session: Session) -> None:
    """Publish the committed transaction's events (a savepoint's release is not the end of the transaction)."""
    if session.in_nested_transaction():
        return
    events = session.info.pop(_NOTES, None)
    fanout = session.info.pop(_FANOUT, None)
    if events and isinstance(fanout, Fanout):
        try:
            fanout.publish_events(events)
        except Exception:  # the commit happened: a live event must never turn it into an error
            log.exception("publishing %d live event(s) failed", len(events))


def _forget_at_end(session: Session, transaction: SessionTransaction) -> None:
    """Drop what a transaction that ended without committing noted (after a commit, nothing is left)."""
    if transaction.parent is None:
        session.info.pop(_NOTES, None)
        session.info.pop(_FANOUT, None)


def install_session_hooks() -> None:
    """Publish noted events after each commit and forget them after a rollback (idempotent)."""
    for name, hook in (("after_commit", _publish_after_commit), ("after_transaction_end", _forget_at_end)):
        if not event.contains(Session, name, hook):
            event.listen(Session, name, hook)
