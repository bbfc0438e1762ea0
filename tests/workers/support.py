"""What the job runner's tests share: an envelope of a one-task workflow, the running set, numbered log lines."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from workers.client import Reply
from workers.envelope import Envelope
from workers.jobs import Inflight, JobRunner

WORKFLOW = 'name: w\ntasks:\n  - name: noop\n    type: command\n    config:\n      command: "true"\n'


def envelope(job_id: str = "j1", attempt: int = 1) -> Envelope:
    """A verified envelope of a one-task workflow (``command: true``), valid for a minute."""
    now = int(time.time())
    return Envelope("tenant.t.p.linux", "t", "p", job_id, attempt, now, now + 60, "n", "w", WORKFLOW, {})


def running(inflight: Inflight) -> list[tuple[str, int]]:
    """The (job, attempt) pairs in the running set."""
    return [(job.job_id, job.attempt) for job in inflight.snapshot()]


def line(n: int) -> dict[str, Any]:
    """Log line number ``n``, as an agent ships it."""
    return {"ts": "2026-11-29T10:00:00Z", "task": "t", "level": "info", "message": f"line {n}"}


def granting(reply: Reply, path: str, body: dict[str, Any]) -> Reply:
    """A 2xx answer to a claim as the control plane gives it: naming the job and attempt it grants."""
    if not reply.ok:
        return reply
    return Reply(reply.status, {"job_id": path.split("/")[2], "attempt": body.get("attempt"), **reply.body})


def pauses(runner: JobRunner, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the runner's waits before claiming again instead of waiting (none is interrupted by a stop)."""
    slept: list[float] = []

    def pause(seconds: float) -> bool:
        slept.append(seconds)
        return False

    monkeypatch.setattr(runner.stopping, "wait", pause)
    return slept


def no_threads_named(monkeypatch: pytest.MonkeyPatch, *prefixes: str) -> None:
    """Make starting a thread whose name begins with one of ``prefixes`` fail as it does when the system is out of
    threads or memory (``RuntimeError: can't start new thread``); other threads start as usual."""
    start = threading.Thread.start

    def refuse(thread: threading.Thread) -> None:
        if thread.name.startswith(prefixes):
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refuse)
