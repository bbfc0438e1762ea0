"""A run's task results on their way to the control plane: each one as the next task starts, the rest with the
final state.

probe sends an event when a task finishes, but none for the tasks a run never reaches (``skipped`` after a failure,
``cancelled`` after a cancel): their results are only in the workflow's result. ``Reports.left`` adds them to what
the final state carries, so that the control plane stores every task of the run, as ``probe run`` lists them, and
tells watchers of each.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import probe
from workers.client import ControlPlane, ControlPlaneError

log = logging.getLogger(__name__)

RESULTS_KEPT = 16  # task results kept for after an outage (up to 64 KiB of output each): older ones are lost
RESULTS_PER_REPORT = 16  # task results one status report carries at most (the control plane's limit)
RESULTS_BYTES_PER_REPORT = 256 * 1024  # and their size encoded, at most (a larger result goes alone)

Result = dict[str, Any]


class Reports:
    """Sends a run's task results: each when the next task starts (naming it), the last with the final state.

    The control plane learns of every task's start and end without a request of its own per start: the first
    task is named in the claim, each later one in the result of the task before it.
    """

    def __init__(self, client: ControlPlane, job_id: str, attempt: int) -> None:
        self.client = client
        self.job_id = job_id
        self.attempt = attempt
        self.waiting: Result | None = None  # the finished task's result, sent when the next one starts
        self.unsent: list[Result] = []  # results the control plane could not take: sent before the end
        self.finished: set[str] = set()  # the tasks probe sent a result of

    def on_event(self, event: dict[str, Any]) -> None:
        """probe's event callback."""
        if event["event"] == "task_finished":
            self.waiting = _as_report(event["result"], event["index"])
            self.finished.add(event["task"])
        elif event["event"] == "task_started" and self.waiting is not None:
            result, self.waiting = self.waiting, None
            body = {**result, "attempt": self.attempt, "next_task": event["task"]}
            if not send_result(self.client, self.job_id, body):  # sent again before the final state
                self.unsent.append(result)

    def left(self, run: probe.WorkflowResult | None = None) -> list[Result]:
        """The results not sent yet, for the final state report, in the workflow's order: the last task's, after
        any the control plane could not take while the job ran (``RESULTS_KEPT`` at most, the latest), then those
        of the tasks ``run`` never reached, which had no event."""
        left = [*self.unsent, *([self.waiting] if self.waiting is not None else [])]
        self.unsent, self.waiting = [], None
        if len(left) > RESULTS_KEPT:
            lost = ", ".join(result["name"] for result in left[:-RESULTS_KEPT])
            log.error("job %s: the results of tasks %s could not be delivered", self.job_id, lost)
        return [*left[-RESULTS_KEPT:], *self._never_reached(run)]

    def _never_reached(self, run: probe.WorkflowResult | None) -> list[Result]:
        """The results of the tasks ``run`` lists that sent no event: those after the one that failed or was
        cancelled (they have no output: nothing to keep them from)."""
        if run is None:  # the run never started
            return []
        return [
            _as_report(task.to_dict(), position)
            for position, task in enumerate(run.tasks)
            if task.name not in self.finished
        ]


def _as_report(result: dict[str, Any], position: int) -> Result:
    """A task's result as probe gives it, as the control plane takes it (the attempts among the metrics)."""
    report = dict(result)
    report.pop("success", None)
    attempts = report.pop("attempts", 1)
    report["metrics"] = {**report.get("metrics", {}), "attempts": attempts}
    return {"position": position, **report}


def send_result(client: ControlPlane, job_id: str, body: dict[str, Any]) -> bool:
    """Send one task's result; False when the control plane could not be reached (a refusal is logged, and final)."""
    try:
        reply = client.call("POST", f"/jobs/{job_id}/tasks", body)
    except ControlPlaneError as exc:
        log.warning("job %s: the result of task %s could not be sent: %s", job_id, body["name"], exc)
        return False
    if not reply.ok:
        log.warning("job %s: task result %s refused (%s)", job_id, body["name"], reply.error)
    return True


def send_results(client: ControlPlane, job_id: str, attempt: int, results: list[Result]) -> None:
    """Send several results of a running attempt in one report (of state ``running``, which also renews its lease);
    a result that could not be delivered is logged as lost."""
    body = {"attempt": attempt, "state": "running", "tasks": results}
    names = ", ".join(result["name"] for result in results)
    try:
        reply = client.call("POST", f"/jobs/{job_id}/status", body)
    except ControlPlaneError as exc:
        log.error("job %s: the results of tasks %s are lost: %s", job_id, names, exc)
        return
    if not reply.ok:
        log.warning("job %s: the results of tasks %s refused (%s)", job_id, names, reply.error)


def in_reports(results: list[Result]) -> list[list[Result]]:
    """``results`` cut, in order, into runs one status report carries: ``RESULTS_PER_REPORT`` results and
    ``RESULTS_BYTES_PER_REPORT`` encoded at most (a larger result alone; each with up to 64 KiB of output, the
    results of a few tasks could pass the control plane's request limit)."""
    runs: list[list[Result]] = []
    size = 0
    for result in results:
        grows = len(json.dumps(result, separators=(",", ":"))) + 1  # ASCII-escaped, as the client sends it
        if runs and len(runs[-1]) < RESULTS_PER_REPORT and size + grows <= RESULTS_BYTES_PER_REPORT:
            runs[-1].append(result)
            size += grows
        else:
            runs.append([result])
            size = grows
    return runs
