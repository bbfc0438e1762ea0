"""The agent's log shipping: probe's run events become log lines, sent in batches by size and age.

``lines_from_event`` turns one ``on_event`` event of ``probe.run_workflow`` into lines ``{"ts", "task", "level",
"message"}`` (issue 6, contract 3): a line when the workflow and each task start and finish, each line a task
logs, each retry, and the task's output (already redacted by probe), cut to a number of lines per task. Output that
probe reads line by line as the task runs (a process's) comes in ``task_output`` events, each line stamped with the
time it was read; when such a task finishes, its output is not shipped again, only what says what the lines lack.
Output given only at the end (ssh, http) is cut into lines then, all stamped with the task's end.

``LogBuffer`` collects them and calls ``send(lines)`` from a background thread when ``batch_lines`` lines
are waiting or the oldest has waited ``max_delay`` seconds; ``drain()`` stops it and returns what is left,
for the final status report (a short job needs no log request of its own, nor a thread: the buffer's thread
starts when its first batch is due, woken by one alarm thread that serves every buffer of the process). It
keeps at most ``max_lines`` lines and ``max_bytes`` bytes per job, then says so in one marker line and counts the
rest.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from probe.results import TRUNCATION_MARKER, cut_by_probe

log = logging.getLogger(__name__)

Line = dict[str, Any]
Send = Callable[[list[Line], int], None]  # a batch, and the number of its first line within the attempt (from 1)

LEVELS = {"debug": "debug", "info": "info", "warning": "warning", "warn": "warning", "error": "error"}
FINISH_LEVELS = {"succeeded": "info", "skipped": "info", "cancelled": "warning"}  # anything else: error
OUTPUT_LINES_PER_TASK = 1000
LINE_MAX_BYTES = 8192
MAX_LINES_PER_JOB = 10000
MAX_BYTES_PER_JOB = 5 * 1024 * 1024
OUTPUT_CUT = "[… {more} more lines of output not shipped; the task's result keeps its output]"
OUTPUT_TRUNCATED = (
    "[… {more} more lines of output not shipped, and {dropped} more bytes were cut from it: the task's result keeps"
    " only its first {kept} bytes]"
)
ATTEMPT_CUT = "[… {more} more lines of attempt {attempt}'s output not shipped]"
LINE_CUT = " [… line cut: {dropped} more bytes]"
AGENT_MARKER = "[log truncated on the agent: later lines are dropped; limit {lines} lines / {size} bytes per job]"
AGENT_TOTAL = "[log truncated on the agent: {dropped} lines dropped in all]"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _line(ts: str, task: str | None, level: str, message: str) -> Line:
    return {"ts": ts, "task": task, "level": level, "message": message}


def _output_lines(ts: str, task: str, output: str, limit: int) -> list[Line]:
    text = output.splitlines()
    while text and not text[-1].strip():
        text.pop()
    lines = [_line(ts, task, "info", part) for part in text[:limit]]
    if len(text) > limit:
        more = len(text) - limit
        if cut_by_probe(output) is not None:
            more -= 1  # probe's marker is the last of the lines not shipped
        lines.append(_line(ts, task, "warning", _not_shipped(output, more)))
    return lines


def _after_streamed(
    ts: str, task: str, output: str, streamed: int, unstreamed: int, limit: int, *, attempt: object = None
) -> list[Line]:
    """What the lines of an attempt's output shipped as it ran lack, said as it ends: the lines over its budget, or
    else the bytes probe read and did not keep (the result lacks them too). ``attempt`` names an attempt that is
    retried, whose output the result will not hold."""
    if streamed > limit:
        if attempt is not None:
            return [_line(ts, task, "warning", ATTEMPT_CUT.format(more=streamed - limit, attempt=attempt))]
        return [_line(ts, task, "warning", _not_shipped(output, streamed - limit))]
    if unstreamed:
        return [_line(ts, task, "info", TRUNCATION_MARKER.format(dropped=unstreamed).strip())]
    return []


def _not_shipped(output: str, more: int) -> str:
    """The line that ends a task's output cut to its lines: how many more lines of output there were and, when probe
    had cut the output already, how many bytes it cut, which the result lacks too."""
    cut = cut_by_probe(output)
    if cut is None:
        return OUTPUT_CUT.format(more=more)
    kept = len(cut[0].encode("utf-8", "replace"))
    return OUTPUT_TRUNCATED.format(more=more, dropped=cut[1], kept=kept)


def lines_from_event(event: dict[str, Any], *, output_lines: int = OUTPUT_LINES_PER_TASK) -> list[Line]:
    """Return the log lines of one probe event (none for an event that says nothing worth a line)."""
    kind = event.get("event")
    ts = str(event.get("ts") or _now())
    task = event.get("task")
    if kind == "workflow_started":
        names = [str(name) for name in event.get("tasks", [])]
        message = f"workflow '{event.get('workflow')}' started: {len(names)} tasks ({', '.join(names)})"
        return [_line(ts, None, "info", message)]
    if kind == "task_started":
        attempt = int(event.get("attempt") or 1)
        again = f", attempt {attempt}" if attempt > 1 else ""
        return [_line(ts, task, "info", f"task started ({event.get('type')}{again})")]
    if kind == "task_log":
        level = LEVELS.get(str(event.get("level", "info")).lower(), "info")
        return [_line(ts, task, level, part) for part in str(event.get("message", "")).splitlines() or [""]]
    if kind == "task_output":  # numbered from 0 across the task's attempts: its budget counts them
        room = max(0, output_lines - int(event.get("first") or 0))
        return [_line(ts, task, "info", str(part)) for part in list(event.get("lines") or [])[:room]]
    if kind == "task_retrying":
        error = f": {event['error']}" if event.get("error") else ""
        message = f"attempt {event.get('attempt')} {event.get('status')}{error}; retrying"
        streamed = int(event.get("streamed_lines") or 0)
        unstreamed = int(event.get("unstreamed_bytes") or 0)
        lacking = _after_streamed(ts, str(task), "", streamed, unstreamed, output_lines, attempt=event.get("attempt"))
        return [*lacking, _line(ts, task, "warning", message)]
    if kind == "task_finished":
        result = event.get("result") or {}
        status = str(event.get("status") or result.get("status"))
        output = str(result.get("output") or "")
        streamed = int(event.get("streamed_lines") or 0)
        if streamed:
            unstreamed = int(event.get("unstreamed_bytes") or 0)
            lines = _after_streamed(ts, str(task), output, streamed, unstreamed, output_lines)
        else:
            lines = _output_lines(ts, str(task), output, output_lines)
        duration = (result.get("metrics") or {}).get("duration_ms")
        took = f" in {duration} ms" if duration is not None else ""
        lines.append(_line(ts, task, FINISH_LEVELS.get(status, "error"), f"task {status}{took}"))
        if result.get("error"):
            lines.append(_line(ts, task, "error", f"error: {result['error']}"))
        return lines
    if kind == "workflow_finished":
        status = str(event.get("status"))
        error = f": {event['error']}" if event.get("error") else ""
        message = f"workflow {status} in {event.get('duration_ms')} ms{error}"
        return [_line(ts, None, FINISH_LEVELS.get(status, "error"), message)]
    return []


def cut_line(message: str, limit: int) -> str:
    """Return ``message`` cut to ``limit`` bytes of UTF-8, its end replaced by a visible marker if cut."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    suffix = LINE_CUT.format(dropped=len(data) - limit)
    return data[: max(0, limit - len(suffix.encode()))].decode("utf-8", "ignore") + suffix


class _Alarm:
    """One thread per process that rings each buffer when its oldest line is due; a job that ends sooner has
    been spared a thread of its own.

    The thread wakes only when a buffer is due that has not ended, or when a buffer due sooner than any other
    comes: an agent running short jobs back to back wakes it about once every ``max_delay``, not once a job.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._due: list[tuple[float, int, LogBuffer]] = []  # a heap: when, order set, buffer
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def at(self, when: float, buffer: LogBuffer) -> None:
        """Ring ``buffer`` at monotonic time ``when``."""
        with self._changed:
            if self._pid != os.getpid():  # a forked child: the parent's thread is not in this process
                self._pid, self._due, self._thread = os.getpid(), [], None
            sooner = not self._due or when < self._due[0][0]  # than the thread is waiting for
            heapq.heappush(self._due, (when, next(self._order), buffer))
            if self._thread is None or not self._thread.is_alive():
                thread = threading.Thread(target=self._run, name="logship-alarm", daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # started by the next buffer's lines; it rings this one too when due
                    log.warning("could not start the log shipping alarm (%s): lines wait", exc)
                    return
                self._thread = thread
                # After a fork the condition still lists the parent's thread as waiting: a notify now wakes that
                # one, so that the next entry due sooner wakes this process's own thread.
                sooner = True
            if sooner:
                self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    if self._due and self._due[0][2].ended:  # forget every buffer that ended: none needs ringing
                        self._due = [entry for entry in self._due if not entry[2].ended]
                        heapq.heapify(self._due)
                    if self._due and (left := self._due[0][0] - time.monotonic()) <= 0:
                        break
                    self._changed.wait(left if self._due else None)
                buffer = heapq.heappop(self._due)[2]
            try:
                buffer._ring()  # outside the alarm's lock: the buffer takes its own, and add() holds it to call at()
            except Exception:  # a thread that could not start: the lines still ride with the final report
                log.exception("could not start sending a job's log lines")


_ALARM = _Alarm()


class LogBuffer:
    """Buffers one job's log lines and sends them in batches from a background thread; thread-safe.

    ``send`` raising means "not delivered": the lines are kept, tried again after ``max_delay`` (with the same
    numbers, so that the control plane stores a batch it did receive only once), and returned by ``drain()`` if
    still unsent. ``send`` returning means they were taken care of.
    """

    def __init__(
        self,
        send: Send,
        *,
        batch_lines: int = 200,
        max_delay: float = 2.0,
        max_lines: int = MAX_LINES_PER_JOB,
        max_bytes: int = MAX_BYTES_PER_JOB,
        line_max_bytes: int = LINE_MAX_BYTES,
    ) -> None:
        self.send = send
        self.batch_lines = batch_lines
        self.max_delay = max_delay
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.line_max_bytes = line_max_bytes
        self.dropped = 0  # lines refused over the job's bounds
        self._totalled = False  # drain() added the line that counts them
        self._kept_lines = 0
        self._kept_bytes = 0
        self._first = 1  # the number (within the attempt) of the first pending line
        self._pending: list[Line] = []
        self._oldest = 0.0  # monotonic time the oldest pending line arrived
        self._not_before = 0.0  # after a failed send: no new try before this
        self._closed = False
        self._changed = threading.Condition()
        self._sending = threading.Lock()
        self._thread: threading.Thread | None = None
        self._alarm_set = False  # the alarm rings this buffer when its oldest line is due
        self._threadless = False  # no sending thread could be started: every line waits for drain()

    def add(self, lines: Iterable[Line]) -> None:
        """Take lines (within the job's bounds); a batch goes out from the background thread when due."""
        with self._changed:
            for line in lines:
                self._keep(line)
            if self._thread is not None:
                self._changed.notify()
            elif not self._closed and self._pending and not self._threadless:
                if len(self._pending) >= self.batch_lines:
                    self._start()
                elif not self._alarm_set:
                    self._alarm_set = True
                    _ALARM.at(self._oldest + self.max_delay, self)

    @property
    def ended(self) -> bool:
        """Whether the job's lines were drained (read without the lock: it only ever becomes true)."""
        return self._closed

    def _ring(self) -> None:
        """The alarm: the oldest line is due, unless the job has ended (drained) since."""
        with self._changed:
            self._alarm_set = False
            if self._thread is None and not self._closed and self._pending and not self._threadless:
                self._start()

    def _start(self) -> None:
        """Start the sending thread (under ``_changed``); it stays until ``drain()``. When the system cannot start
        one (out of threads or memory), the lines wait for ``drain()`` and go with the final report."""
        thread = threading.Thread(target=self._run, name="logship", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:
            log.warning("could not start sending a job's log lines (%s): they go with the final report", exc)
            self._threadless = True
            return
        self._thread = thread

    def _keep(self, line: Line) -> None:
        message = cut_line(str(line.get("message", "")), self.line_max_bytes)
        size = len(message.encode("utf-8", "replace"))
        if self._kept_lines + 1 > self.max_lines or self._kept_bytes + size > self.max_bytes:
            if not self.dropped:
                text = AGENT_MARKER.format(lines=self.max_lines, size=self.max_bytes)
                self._append(_line(_now(), None, "warning", text))
            self.dropped += 1
            return
        self._kept_lines += 1
        self._kept_bytes += size
        self._append({**line, "message": message})

    def _append(self, line: Line) -> None:
        if not self._pending:
            self._oldest = time.monotonic()
        self._pending.append(line)

    def _due(self) -> float | None:
        """Seconds until the next batch is due (0: now); None when nothing is waiting."""
        if not self._pending:
            return None
        now = time.monotonic()
        due = self._oldest + self.max_delay
        if len(self._pending) >= self.batch_lines:
            due = now
        return max(due, self._not_before) - now

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._closed and ((wait := self._due()) is None or wait > 0):
                    self._changed.wait(wait)
                if self._closed:
                    return
                # Taking the send lock before the lines lets drain() wait for a send in flight.
                self._sending.acquire()
                batch, self._pending = self._pending[: self.batch_lines], self._pending[self.batch_lines :]
                first, self._first = self._first, self._first + len(batch)
                self._oldest = time.monotonic()
            try:
                self.send(batch, first)
            except Exception as exc:
                log.warning("%d log lines not delivered (%s); kept for later", len(batch), exc)
                with self._changed:
                    self._pending[:0] = batch
                    self._first = first
                    self._not_before = time.monotonic() + self.max_delay
            finally:
                self._sending.release()

    @property
    def first_pending(self) -> int:
        """The number (within the attempt, from 1) of the first line not sent: after ``drain()``, of its first."""
        with self._changed:
            return self._first

    def drain(self) -> list[Line]:
        """Stop sending (waiting for a send in flight) and return the lines not sent yet, for the final report."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        with self._sending, self._changed:
            lines, self._pending = self._pending, []
            if self.dropped and not self._totalled:
                lines.append(_line(_now(), None, "warning", AGENT_TOTAL.format(dropped=self.dropped)))
                self._totalled = True
        if self._thread is not None:
            self._thread.join(5)
        return lines
