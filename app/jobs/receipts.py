"""Publish receipts: which attempts reached the broker, written to the database a few at a time.

``published_at`` tells the sweeper that an attempt's message was sent. Writing it right after each publish
would cost every submission a second transaction, so a process gathers its receipts and a short-lived
background thread writes them every ``FLUSH_EVERY`` seconds in one transaction. A receipt lost with its
process (kill -9 within that moment) only means that the sweeper sends the attempt again after
``SWEEP_GRACE``; the second message is refused at its claim, which is fenced by attempt.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time

from sqlalchemy import bindparam, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from app.columns import utcnow
from app.jobs.models import JobAttempt

log = logging.getLogger(__name__)

FLUSH_EVERY = 0.25  # seconds between writes while receipts come in; far below SWEEP_GRACE
GIVE_UP_AFTER = 30.0  # seconds of failed writes before the receipts are left to the sweeper

MARK = (
    update(JobAttempt)
    .where(JobAttempt.id == bindparam("receipt_id"), JobAttempt.published_at.is_(None))
    .values(published_at=bindparam("receipt_at"))
)


class Receipts:
    """The receipts of one process for one database; ``add`` them, a background thread writes them."""

    def __init__(self, engine: Engine, every: float = FLUSH_EVERY) -> None:
        self.engine = engine
        self.every = every
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._waiting: list[dict[str, object]] = []
        self._writer: threading.Thread | None = None
        self._pid = os.getpid()
        atexit.register(self.close)

    def add(self, attempt_id: int) -> None:
        """Note that ``attempt_id``'s message was sent now; it is written within ``every`` seconds."""
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's thread and receipts are not ours
                self._pid, self._waiting, self._writer = os.getpid(), [], None
            self._waiting.append({"receipt_id": attempt_id, "receipt_at": utcnow()})
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_while_any, name="publish-receipts", daemon=True)
                self._writer.start()

    def flush(self) -> int | None:
        """Write every waiting receipt now, in one transaction; return how many, or None when the write failed."""
        with self._lock:
            batch, self._waiting = self._waiting, []
        if not batch:
            return 0
        try:
            with self.engine.begin() as connection:
                connection.execute(MARK, batch)
        except SQLAlchemyError as exc:
            with self._lock:
                self._waiting[:0] = batch  # try again next time, oldest first
            log.warning("could not record %d publish receipts: %s", len(batch), str(exc).splitlines()[0])
            return None
        return len(batch)

    def close(self) -> None:
        """Write what is waiting and stop the writer (at exit: fewer attempts for the sweeper to send again)."""
        self._closed.set()
        self.flush()

    def _write_while_any(self) -> None:
        """The background writer: flush every ``every`` seconds until nothing is left (or writes keep failing)."""
        failing_since: float | None = None
        while not self._closed.wait(self.every):
            written = self.flush()
            with self._lock:
                left = len(self._waiting)
                if not left:
                    self._writer = None
                    return
            if written is not None:
                failing_since = None
                continue
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > GIVE_UP_AFTER:
                with self._lock:
                    dropped, self._waiting, self._writer = len(self._waiting), [], None
                log.warning("gave up on %d publish receipts; the sweeper sends those attempts again", dropped)
                return
