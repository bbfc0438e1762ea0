"""Human output of the CLI: tables, a job's view, log lines, and a job's live progress with a spinner."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

FINAL = frozenset({"completed", "failed", "timed_out", "cancelled", "dead_letter"})
GOOD = frozenset({"succeeded", "completed"})
NEUTRAL = frozenset({"skipped", "cancelled", "pending", "queued", "running"})
SPIN_EVERY = 0.1


class Style:
    """Marks and colours for a stream: colours on a terminal unless ``NO_COLOR`` is set, ASCII without UTF-8."""

    def __init__(self, stream: TextIO) -> None:
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.color = self.tty and not os.environ.get("NO_COLOR")
        self.fancy = (getattr(stream, "encoding", None) or "").lower().replace("-", "").startswith("utf")

    def paint(self, text: str, code: str) -> str:
        """``text`` in the ANSI style ``code`` when colours are on."""
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def mark(self, status: str) -> str:
        """The mark of a task's status or a job's final state."""
        if status in GOOD:
            return self.paint("✓" if self.fancy else "ok", "32")
        if status in NEUTRAL:
            return self.paint("\u2013" if self.fancy else "--", "33")  # an en dash
        return self.paint("✗" if self.fancy else "XX", "31")

    def bold(self, text: str) -> str:
        """``text`` in bold when colours are on."""
        return self.paint(text, "1")


def parse_time(value: Any) -> datetime | None:
    """A datetime from one of the API's ISO-8601 times, or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def when(value: Any) -> str:
    """An API time as ``2026-01-01 12:00:00Z`` (UTC, whole seconds), or ``-``."""
    moment = parse_time(value)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ") if moment else "-"


def duration(seconds: float) -> str:
    """``0.12s``, ``4.2s``, ``2m05s``, ``1h02m``."""
    if seconds < 1:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def between(start: Any, end: Any) -> float | None:
    """Seconds between two API times, or None when one is missing."""
    first, last = parse_time(start), parse_time(end)
    return (last - first).total_seconds() if first and last else None


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns two spaces apart, under a header line."""
    cells = [[str(h) for h in headers], *[["-" if c is None or c == "" else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def first_line(text: Any, width: int = 70) -> str:
    """The first line of ``text`` cut to ``width``, with ``(+N lines)`` when there are more."""
    lines = str(text or "").strip().splitlines()
    if not lines:
        return ""
    head = lines[0] if len(lines[0]) <= width else lines[0][: width - 1] + "…"
    return head + (f" (+{len(lines) - 1} lines)" if len(lines) > 1 else "")


def task_duration(task: dict[str, Any]) -> str:
    """A task result's run time from its metrics or its start and end, or ``""``."""
    ms = (task.get("metrics") or {}).get("duration_ms")
    seconds = ms / 1000 if isinstance(ms, int | float) else between(task.get("started_at"), task.get("finished_at"))
    return duration(seconds) if seconds is not None else ""


def jobs_table(jobs: Sequence[dict[str, Any]]) -> str:
    """``automation jobs list``."""
    rows = [
        (j["job_id"], j.get("name"), j.get("state"), j.get("attempt"), agent_of(j), when(j.get("created_at")))
        for j in jobs
    ]
    return table(("JOB ID", "NAME", "STATE", "ATTEMPT", "AGENT", "CREATED"), rows)


def agent_of(job: dict[str, Any]) -> str | None:
    """Where a listed job runs or ran: the agent that claimed its current attempt, else the one it is pinned to
    (marked so), else none yet."""
    if job.get("ran_on"):
        return str(job["ran_on"])
    return f"{job['agent_id']} (pinned)" if job.get("agent_id") else None


def agents_table(agents: Sequence[dict[str, Any]]) -> str:
    """``automation agents list``."""
    rows = [
        (a["agent_id"], a.get("hostname"), a.get("platform"), a.get("status"), when(a.get("last_heartbeat_at")))
        for a in agents
    ]
    return table(("AGENT ID", "HOSTNAME", "PLATFORM", "STATUS", "LAST HEARTBEAT"), rows)


def job_view(job: dict[str, Any], style: Style) -> str:
    """``automation jobs get``: the job's state and target, its times, its error and its tasks."""
    state = job.get("state", "?")
    lines = [f"{style.mark(state) if state in FINAL else ' '} job {job['job_id']}  {style.bold(str(job.get('name')))}"]
    lines.append(f"  state      {state}" + (" (cancel requested)" if job.get("cancel_requested") else ""))
    if job.get("dead_letter_reason"):
        lines.append(f"  reason     {job['dead_letter_reason']}")
    lines.append(f"  project    {job.get('tenant_id')}/{job.get('project_id')}  platform {job.get('platform')}")
    agents = [a.get("agent_id") for a in job.get("attempts") or [] if a.get("agent_id")]
    target = f"pinned to {job['agent_id']}" if job.get("agent_id") else "any agent"
    lines.append(f"  agent      {target}" + (f", ran on {agents[-1]}" if agents else ""))
    # not "attempt 2 of 1": max_attempts bounds the runs that fail; lost, replaced and requeued attempts count apart
    lines.append(
        f"  attempt    {job.get('attempt')}  max_attempts {job.get('max_attempts')}  priority {job.get('priority')}"
    )
    took = between(job.get("started_at"), job.get("finished_at"))
    lines.append(
        f"  created    {when(job.get('created_at'))} by {job.get('created_by')}"
        + (f"; finished {when(job.get('finished_at'))} ({duration(took)})" if took is not None else "")
    )
    if job.get("variables"):
        lines.append("  variables  " + ", ".join(f"{k}={v}" for k, v in job["variables"].items()))
    if job.get("error"):
        lines.append(f"  error      {job['error']}")
    tasks = sorted(job.get("tasks") or [], key=lambda t: t.get("position", 0))
    if tasks:
        lines.append(f"  tasks of attempt {tasks[0].get('attempt', job.get('attempt'))}:")
        width = max(len(t["name"]) for t in tasks)
        for task in tasks:
            text = first_line(task.get("error") if task.get("status") != "succeeded" else None) or first_line(
                task.get("output")
            )
            lines.append(
                f"    {style.mark(task['status'])} {task['name']:<{width}}  {task['status']:<9}  "
                f"{task_duration(task):>6}  {text}".rstrip()
            )
    elif state not in FINAL:
        lines.append("  tasks      none finished yet")
    return "\n".join(lines)


def log_line(line: dict[str, Any]) -> str:
    """One log line: ``2026-01-01 12:00:00Z info  task: message``."""
    return f"{when(line.get('ts'))} {line.get('level', '')!s:<7} {line.get('task') or '-'}: {line.get('message', '')}"


class Progress:
    """Prints a job's live events: a line at each state change and at each task's start and end.

    On a terminal, a spinner line under the running task shows how long it has run; elsewhere the output
    is plain lines only. Thread-safe: the spinner draws from its own thread.
    """

    def __init__(self, stream: TextIO, job_id: str, *, spinner: bool | None = None) -> None:
        self.stream = stream
        self.style = Style(stream)
        self.short = job_id[:8]
        self.spinner = self.style.tty if spinner is None else spinner
        self.frames = itertools.cycle("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏" if self.style.fancy else "|/-\\")
        self.running: dict[str, tuple[float, datetime | None]] = {}  # task -> (monotonic start, event ts)
        self.ended: set[tuple[int, str]] = set()  # (attempt, task) whose end was printed
        self.state: str | None = None
        self.attempt = 0
        self._lock = threading.Lock()
        self._drawn = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        """Print what one event (``{state, task, status, attempt, ts, ...}``) tells."""
        task, status, state = event.get("task"), event.get("status"), event.get("state")
        attempt = event.get("attempt") or 0
        if task is None:
            if state != self.state or attempt != self.attempt:
                if attempt != self.attempt:
                    self.running.clear()  # a new attempt runs the workflow from its first task
                if state not in FINAL:
                    again = f" (attempt {attempt})" if state == "running" or attempt > 1 else ""
                    self.line(f"job {self.short} {state}{again}")
                self.state, self.attempt = state, attempt
            return
        if status == "running":
            if task not in self.running:
                self.running[task] = (time.monotonic(), parse_time(event.get("ts")))
                self.line(f"  {self.style.paint('▶' if self.style.fancy else '>', '36')} {task}")
                self._spin()
            return
        started = self.running.pop(task, None)
        self.ended.add((attempt, task))
        seconds: float | None = None
        if isinstance(event.get("duration_ms"), int | float):
            seconds = event["duration_ms"] / 1000
        elif started is not None and started[1] is not None and parse_time(event.get("ts")) is not None:
            seconds = (parse_time(event["ts"]) - started[1]).total_seconds()  # type: ignore[operator]
        self._ended(task, str(status), duration(max(seconds, 0.0)) if seconds is not None else "")

    def _ended(self, task: str, status: str, took: str) -> None:
        self.line(f"  {self.style.mark(status)} {task} {status}" + (f" in {took}" if took else ""))

    def final(self, job: dict[str, Any]) -> None:
        """Print the job's end: the ends of tasks no event told of, its final state, how long it ran, and why."""
        self.close()
        for task in sorted(job.get("tasks") or [], key=lambda t: t.get("position", 0)):
            if (task.get("attempt", job.get("attempt")), task["name"]) not in self.ended:
                self._ended(task["name"], task["status"], task_duration(task))
        state = str(job.get("state"))
        took = between(job.get("started_at"), job.get("finished_at"))
        timing = f" in {duration(took)}" if took is not None else ""
        reason = f": {job['error']}" if job.get("error") and state != "completed" else ""
        name = f" ({job['name']})" if job.get("name") else ""
        self.line(f"{self.style.mark(state)} job {job['job_id']}{name} {self.style.bold(state)}{timing}{reason}")

    def line(self, text: str) -> None:
        """Print one line (over the spinner's line, which comes back below it)."""
        with self._lock:
            self._clear()
            print(text, file=self.stream, flush=True)
            self._draw()

    def close(self) -> None:
        """Stop the spinner and clear its line."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            self._clear()

    def _spin(self) -> None:
        if self.spinner and self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._loop, name="spinner", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(SPIN_EVERY):
            with self._lock:
                self._clear()
                self._draw()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\033[K")
            self._drawn = False

    def _draw(self) -> None:
        if not self.spinner or not self.running or self._stop.is_set():
            return
        task, (since, _) = next(reversed(self.running.items()))
        frame = self.style.paint(next(self.frames), "36")
        self.stream.write(f"  {frame} {task} {duration(time.monotonic() - since)}")
        self.stream.flush()
        self._drawn = True
