"""A job's live events: from ``GET /api/v1/jobs/{id}/events`` (SSE), or by polling the job when it is not served.

Either way the caller gets the same events (``{"id", "job_id", "tenant_id", "project_id", "attempt", "state",
"task", "status", "ts"}``): one per job state change (``task`` and ``status`` null), per task start (``status``
``running``) and per task end, until the job is in a final state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from app.client import sse
from app.client.http import ApiError, Client
from app.client.render import FINAL

POLL_INTERVAL = 1.0
NO_STREAM = frozenset({404, 405, 406, 501, 502, 503, 504})  # the events route is absent or unavailable


def job_path(job_id: str) -> str:
    """The job's URL path under ``/api/v1``."""
    return f"/jobs/{quote(job_id, safe='')}"


def now() -> str:
    """The current time as the API writes it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def events(
    client: Client,
    job_id: str,
    *,
    on_fallback: Callable[[str], None] = lambda why: None,
    interval: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[dict[str, Any]]:
    """Yield the job's events until one with a final state; SSE first, polling when it is not served.

    ``on_fallback`` is told why polling is used. A 404 of the events route is told apart from a 404 of the
    job (which is raised) by asking for the job itself.
    """
    try:
        yield from _streamed(client, job_id)
        return
    except ApiError as exc:
        if exc.status not in NO_STREAM:
            raise
        if exc.status == 404:
            client.call("GET", job_path(job_id))  # raises the job's own 404
        why = f"the event stream answered {exc.status} ({exc.message})"
    except sse.NotAStream as exc:
        why = str(exc)
    on_fallback(why)
    yield from poll(client, job_id, interval=interval, sleep=sleep)


def _streamed(client: Client, job_id: str) -> Iterator[dict[str, Any]]:
    """The stream's events; it ends at the job's final state event, or when it closes after any final event."""
    last = -1
    ended = False  # an event with a final state came: the server closes the stream after it
    # ``resume`` reads ``ended`` when a connection ends, not when it is made: late binding is the point.
    for message in sse.stream(client, job_path(job_id) + "/events", resume=lambda: not ended):  # noqa: B023
        if message.event != "job":
            continue
        try:
            event = json.loads(message.data)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        if isinstance(event.get("id"), int):
            if event["id"] <= last:
                continue  # already seen before a reconnection
            last = event["id"]
        yield event
        ended = ended or event.get("state") in FINAL
        if ended and event.get("task") is None:
            return


def poll(
    client: Client,
    job_id: str,
    *,
    interval: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[dict[str, Any]]:
    """Yield events made from successive ``GET /api/v1/jobs/{id}`` (every ``POLL_INTERVAL`` s) until it is final."""
    tracker = Snapshots()
    while True:
        job = client.call("GET", job_path(job_id))
        yield from tracker.update(job)
        if job.get("state") in FINAL:
            return
        sleep(POLL_INTERVAL if interval is None else interval)


def planned_tasks(workflow: Any) -> list[str]:
    """The names of a workflow's tasks in order (read with ``yaml``; [] when it cannot be read)."""
    try:
        import yaml

        document = yaml.safe_load(workflow) if isinstance(workflow, str) else None
        tasks = document.get("tasks") if isinstance(document, dict) else None
        return [str(t["name"]) for t in tasks if isinstance(t, dict) and "name" in t] if tasks else []
    except Exception:  # an unreadable workflow: followed from its results alone
        return []


class Snapshots:
    """Turns successive job snapshots into the live events they imply.

    The API lists a task once it has finished, so the task after the finished ones is reported as started
    (from the workflow's task list) while the job runs.
    """

    def __init__(self) -> None:
        self.seq = 0
        self.state: str | None = None
        self.attempt = -1
        self.planned: list[str] | None = None
        self.started: set[str] = set()
        self.finished: set[str] = set()

    def update(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        """The events since the previous snapshot."""
        if self.planned is None:
            self.planned = planned_tasks(job.get("workflow"))
        out: list[dict[str, Any]] = []
        state, attempt = job.get("state"), job.get("attempt", 0)
        if attempt != self.attempt:
            self.attempt, self.started, self.finished = attempt, set(), set()
        if state != self.state and state not in FINAL:
            out.append(self._event(job, state=state, ts=job.get("updated_at")))
        for task in sorted(job.get("tasks") or [], key=lambda t: t.get("position", 0)):
            if task.get("attempt", attempt) != attempt or task["name"] in self.finished:
                continue
            if task["name"] not in self.started and task.get("status") != "skipped":
                out.append(self._event(job, task=task["name"], status="running", ts=task.get("started_at")))
            self.started.add(task["name"])
            self.finished.add(task["name"])
            ended = self._event(job, task=task["name"], status=task.get("status"), ts=task.get("finished_at"))
            ms = (task.get("metrics") or {}).get("duration_ms")
            if isinstance(ms, int | float):
                ended["duration_ms"] = ms
            out.append(ended)
        if state == "running":
            upcoming = next((name for name in self.planned if name not in self.finished), None)
            if upcoming is not None and upcoming not in self.started:
                self.started.add(upcoming)
                out.append(self._event(job, task=upcoming, status="running", ts=now()))
        if state != self.state and state in FINAL:
            out.append(self._event(job, state=state, ts=job.get("finished_at") or job.get("updated_at")))
        self.state = state
        return out

    def _event(
        self, job: dict[str, Any], *, state: Any = None, task: str | None = None, status: Any = None, ts: Any = None
    ) -> dict[str, Any]:
        self.seq += 1
        return {
            "id": self.seq,
            "job_id": job.get("job_id"),
            "tenant_id": job.get("tenant_id"),
            "project_id": job.get("project_id"),
            "attempt": job.get("attempt", 0),
            "state": state or job.get("state"),
            "task": task,
            "status": status,
            "ts": ts or now(),
        }
