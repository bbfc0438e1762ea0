"""Forward committed job log lines to Quickwit's ingest API in the background, never in a request's way.

``LogSink.submit`` puts documents on a bounded queue and returns at once; a daemon thread (started on first use,
and again in a forked child) sends them as NDJSON batches to ``POST {url}/api/v1/{index}/ingest``, retrying 429,
5xx and connection errors with exponential backoff. What cannot be delivered is dropped and counted: the
database keeps every line, Quickwit is the search copy. The counters are multiprocess-safe (prometheus_client's
values); ``app.system.instruments`` serves them.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from typing import Any

import requests
from prometheus_client import Counter

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

FORWARDED = Counter("automation_log_lines_forwarded", "Log lines Quickwit's ingest API accepted", registry=None)
DROPPED = Counter(
    "automation_log_lines_dropped",
    "Log lines never forwarded to Quickwit, by reason: queue_full, rejected (a 4xx), undeliverable (retries spent)",
    ("reason",),
    registry=None,
)
FAILURES = Counter(
    "automation_log_forward_failures",
    "Ingest requests to Quickwit that failed, by status (429, 503 …) or 'unreachable'; retried ones included",
    ("status",),
    registry=None,
)
METRICS = (FORWARDED, DROPPED, FAILURES)


class LogSink:
    """A bounded, retrying, background forwarder of documents to one Quickwit index."""

    def __init__(
        self,
        url: str,
        index: str,
        *,
        timeout: float = 10.0,
        max_queue: int = 10000,
        batch_size: int = 500,
        retries: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.endpoint = f"{url.rstrip('/')}/api/v1/{index}/ingest"
        self.timeout = timeout
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._pid = -1
        self._guard = threading.Lock()
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(max_queue)
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, documents: list[dict[str, Any]]) -> None:
        """Queue documents for forwarding; never blocks and never raises (a full queue drops and counts them)."""
        try:
            self._start()
            for index, document in enumerate(documents):
                try:
                    self._queue.put_nowait(document)
                except queue.Full:
                    DROPPED.labels("queue_full").inc(len(documents) - index)
                    log.warning("the Quickwit queue is full: %d log lines dropped", len(documents) - index)
                    return
        except Exception:  # a forwarder must never cost the caller its request
            log.exception("log lines could not be queued for Quickwit")

    def flush(self, timeout: float) -> bool:
        """Wait until every queued document was sent or dropped; False if ``timeout`` seconds passed first."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def close(self) -> None:
        """Stop the thread after the batch it is sending (documents still queued are not sent)."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 1)

    def _start(self) -> None:
        if self._pid == os.getpid() and self._thread is not None:
            return
        with self._guard:
            if self._pid != os.getpid():  # a forked child: the parent's thread and queue are not ours
                self._queue = queue.Queue(self.max_queue)
                self._thread = None
                self._pid = os.getpid()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="quickwit-logsink", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        session = requests.Session()
        session.headers["Content-Type"] = "application/x-ndjson"
        while not self._closing.is_set():
            try:
                first = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._send(session, batch)
            except Exception:  # keep the thread alive whatever happens to one batch
                DROPPED.labels("undeliverable").inc(len(batch))
                log.exception("a batch of %d log lines could not be forwarded to Quickwit", len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _send(self, session: requests.Session, batch: list[dict[str, Any]]) -> None:
        payload = "".join(json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n" for doc in batch)
        data = payload.encode("utf-8")
        delay = self.backoff
        for attempt in range(1, self.retries + 2):
            wait = delay
            try:
                response = session.post(self.endpoint, data=data, timeout=self.timeout)
            except requests.RequestException as exc:
                status, problem = "unreachable", f"{type(exc).__name__}: {exc}"
            else:
                if 200 <= response.status_code < 300:
                    FORWARDED.inc(len(batch))
                    return
                status, problem = str(response.status_code), f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code not in RETRY_STATUSES:
                    FAILURES.labels(status).inc()
                    DROPPED.labels("rejected").inc(len(batch))
                    log.error("Quickwit refused %d log lines (%s); dropped", len(batch), problem)
                    return
                retry_after = response.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    wait = max(wait, float(retry_after))
            FAILURES.labels(status).inc()
            if attempt > self.retries or self._closing.is_set():
                break
            log.warning("Quickwit ingest failed (%s); retrying in %.1fs", problem, wait)
            if self._closing.wait(min(wait, self.max_backoff)):
                break
            delay = min(delay * 2, self.max_backoff)
        DROPPED.labels("undeliverable").inc(len(batch))
        log.error("%d log lines dropped: Quickwit did not take them after %d attempts", len(batch), attempt)
