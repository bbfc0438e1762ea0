"""Final reports, delivered by threads of their own: a task thread hands its job's final state over and takes the
next message.

The control plane answers a final report in a few milliseconds, but an agent that waited for the answer before
acknowledging its message would fetch, verify and claim the next job only after it. With the outbox, the next
claim and the last report travel at the same time. Nothing is lost by it:

- a job stays in the agent's running set, and its lease is renewed by the heartbeat, until its report is
  delivered (or given up after ``REPORT_DEADLINE``, when the lease runs out and the control plane retries it; not
  while the control plane's beacon says that it is down);
- the outbox delivers with as many threads as the agent runs jobs at once, so a report that the control plane
  keeps refusing with 5xx holds up only its own thread; and it holds at most that many reports, so a control
  plane that does not answer holds up the task threads instead of piling up reports;
- the agent delivers what is left before it exits; an agent killed before that leaves a ``running`` attempt whose
  lease expires, exactly as when it is killed while the workflow runs.

A busy agent saves the control plane a request per job: its next claim carries the reports still waiting
(``take``), and a report put with a ``linger`` waits that long for such a claim before a thread delivers it.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dispatch.logs import log_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinalReport:
    """What an agent reports when a workflow has run: its state, results and log lines not sent yet."""

    job_id: str
    attempt: int
    state: str
    error: str | None
    tasks: list[dict[str, Any]] = field(default_factory=list)
    lines: list[dict[str, Any]] = field(default_factory=list)
    first_line: int = 1  # the number of the first of ``lines`` in the attempt's log


Taken = list[tuple[int, FinalReport]]  # reports taken for a claim to carry, with their numbers in the outbox


class Outbox:
    """Delivers final reports with up to ``limit`` threads of its own, started on first use."""

    def __init__(self, deliver: Callable[[FinalReport], object], limit: int = 1) -> None:
        self._deliver = deliver
        self._limit = max(1, limit)
        self._waiting: deque[tuple[int, FinalReport, float]] = deque()  # number, report, when a thread takes it
        self._unfinished: set[int] = set()  # handed over and not yet delivered: waiting, taken, or being delivered
        self._numbers = itertools.count()
        # One lock, two conditions: the delivery threads wait for reports to deliver (``_queued``); ``put``,
        # ``flush`` and ``close`` wait for reports to be finished (``_finished``). A claim that takes or settles
        # reports, once a job, then wakes no thread that has nothing to do.
        lock = threading.Lock()
        self._queued = threading.Condition(lock)
        self._finished = threading.Condition(lock)
        self._closed = False
        self._threads: list[threading.Thread] = []
        # When each delivery thread waiting in _next looks again (inf: when woken). A report due later than all of
        # them wakes none: a busy agent's reports, each taken by the next claim, then wake a thread about once a
        # linger, not twice a job.
        self._looks_at: list[float] = []

    def put(self, report: FinalReport, linger: float = 0.0) -> None:
        """Hand a report over, for a thread to deliver after ``linger`` seconds unless a claim takes it first;
        blocks while ``limit`` reports are unfinished. Once closed, delivers it at once."""
        with self._finished:
            self._finished.wait_for(lambda: self._closed or len(self._unfinished) < self._limit)
            if not self._closed and self._start_threads():
                number = next(self._numbers)
                due = time.monotonic() + linger
                self._waiting.append((number, report, due))
                self._unfinished.add(number)
                if any(when > due for when in self._looks_at):
                    self._queued.notify_all()
                return
        # A task that ends while the agent shuts down, or when no delivery thread could be started: its caller
        # delivers the report itself.
        self._deliver(report)

    def take(self, limit: int, fits: Callable[[int, FinalReport], bool] = lambda _n, _r: True) -> Taken:
        """Take up to ``limit`` waiting reports, oldest first, that ``fits`` accepts (it is asked about each in turn
        until ``limit`` are taken), for a request of the caller to carry; the caller then settles them (delivered,
        or refused for good) or gives them back. ``fits`` runs under the outbox's lock, which is not reentrant: it
        must not call the outbox."""
        with self._queued:
            if self._closed:
                return []
            taken: Taken = []
            for number, report, _ in self._waiting:
                if len(taken) == limit:
                    break
                if fits(number, report):
                    taken.append((number, report))
            numbers = {number for number, _ in taken}
            self._waiting = deque(item for item in self._waiting if item[0] not in numbers)
            # No thread to wake: one waiting for a report that is gone wakes when it was due, and looks again.
            return taken

    def settle(self, taken: Taken) -> None:
        """The reports taken were delivered (or refused for good): they are finished."""
        with self._finished:
            self._unfinished.difference_update(number for number, _ in taken)
            self._finished.notify_all()

    def back(self, taken: Taken) -> None:
        """The request that carried the reports taken failed: the threads deliver them now, oldest first (once
        closed, the caller does)."""
        if not taken:  # a claim whose carried reports were all settled gives nothing back: no thread to wake
            return
        with self._queued:
            if not self._closed:
                now = time.monotonic()
                self._waiting.extendleft((number, report, now) for number, report in reversed(taken))
                self._queued.notify_all()
                return
        for item in taken:
            self._deliver_one(item)

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver now the reports handed over before this call and wait until they are delivered; True if there
        were some and they were delivered within ``timeout``."""
        with self._finished:
            if not self._unfinished:
                return False
            last = max(self._unfinished)
            self._waiting = deque((number, report, 0.0) for number, report, _ in self._waiting)
            self._queued.notify_all()
            return self._finished.wait_for(lambda: not any(n <= last for n in self._unfinished), timeout)

    def close(self, timeout: float) -> bool:
        """Deliver what was handed over, then stop; False if reports were still unfinished after ``timeout``."""
        with self._finished:
            self._closed = True
            self._queued.notify_all()
            self._finished.notify_all()  # a put waiting for room delivers its report itself
            done = self._finished.wait_for(lambda: not self._unfinished, timeout)
            if not done:
                log.error("%d final reports were not delivered before the agent stopped", len(self._unfinished))
            return done

    def _start_threads(self) -> bool:
        """Start the delivery threads missing (called with the lock held, before anything is queued); whether at
        least one runs. A thread the system cannot start (out of threads or memory) is tried again at the next put.
        """
        while len(self._threads) < self._limit:
            thread = threading.Thread(target=self._run, name=f"agent-reports-{len(self._threads)}", daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:  # "can't start new thread"
                log.warning(
                    "could not start a thread to deliver final reports (%s); %d running", exc, len(self._threads)
                )
                break
            self._threads.append(thread)
        return bool(self._threads)

    def _next(self) -> tuple[int, FinalReport] | None:
        """Wait for the turn of the report due first (its linger over, or the outbox closed); None once closed and
        empty."""
        with self._queued:
            while True:
                if self._waiting:
                    first = min(self._waiting, key=lambda item: item[2])  # the oldest of those due first
                    left = first[2] - time.monotonic()
                    if left <= 0 or self._closed:
                        self._waiting.remove(first)
                        return first[0], first[1]
                    self._wait(left)
                elif self._closed:
                    return None
                else:
                    self._wait(None)

    def _wait(self, seconds: float | None) -> None:
        """Wait on ``_queued`` (lock held) for ``seconds`` (None: until woken), telling ``put`` when this thread looks
        again."""
        when = math.inf if seconds is None else time.monotonic() + seconds
        self._looks_at.append(when)
        try:
            self._queued.wait(seconds)
        finally:
            self._looks_at.remove(when)

    def _run(self) -> None:
        while (item := self._next()) is not None:
            self._deliver_one(item)

    def _deliver_one(self, item: tuple[int, FinalReport]) -> None:
        """Deliver one report and settle it, whatever happens: one bad report never stops the others."""
        report = item[1]
        with log_context(job_id=report.job_id):  # the outbox's threads run no job of their own
            try:
                self._deliver(report)
            except Exception:  # deliver logs what it knows (on the caller's thread after close, nothing more is caught)
                log.exception("job %s: delivering the final state %s failed", report.job_id, report.state)
            finally:
                self.settle([item])
