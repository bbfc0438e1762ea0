"""The job runner's reports: a long log's backlog goes in numbered batches before the final state."""

from __future__ import annotations

from typing import Any

from workers.client import Reply
from workers.jobs import LOG_LINES_WITH_FINAL_STATE, Inflight, JobRunner


class Recorder:
    """A control plane that accepts everything and remembers each request."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, **_: Any) -> Reply:
        self.calls.append((method, path, body or {}))
        return Reply(200, {})


def line(n: int) -> dict[str, Any]:
    return {"ts": "2026-11-29T10:00:00Z", "task": "t", "level": "info", "message": f"line {n}"}


def test_a_backlog_is_sent_in_numbered_batches_and_the_rest_rides_with_the_final_state() -> None:
    recorder = Recorder()
    runner = JobRunner(recorder, Inflight())  # type: ignore[arg-type]
    size = LOG_LINES_WITH_FINAL_STATE
    lines = [line(n) for n in range(41, 41 + 2 * size + 7)]  # lines 1-40 went out in batches already
    assert runner._finish("j1", 2, "completed", None, [], lines, 41) == "completed"
    logs = [(path, body.get("first_line"), len(body["lines"])) for _, path, body in recorder.calls[:-1]]
    assert logs == [("/jobs/j1/logs", 41, size), ("/jobs/j1/logs", 41 + size, 7)]
    method, path, final = recorder.calls[-1]
    assert (method, path, final["state"], final["attempt"]) == ("POST", "/jobs/j1/status", "completed", 2)
    assert final["logs_first_line"] == 41 + size + 7 and final["logs"] == lines[size + 7 :]
