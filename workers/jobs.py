"""Run one verified job: claim it, run its workflow with probe, report every task and the final state."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import probe
from workers.client import ControlPlane, ControlPlaneError, Reply
from workers.envelope import Envelope, EnvelopeRefused

log = logging.getLogger(__name__)

MAX_CAPACITY_WAIT = 10.0  # seconds between two claims of a job whose project is at its limit
FINAL_STATE = {"succeeded": "completed", "failed": "failed", "timed_out": "timed_out", "cancelled": "cancelled"}


@dataclass
class RunningJob:
    """A job this agent is running: what the heartbeat reports, and how a cancel reaches it."""

    job_id: str
    attempt: int
    cancel: threading.Event = field(default_factory=threading.Event)


class Inflight:
    """The jobs this agent is running right now, shared by the task threads and the heartbeat."""

    def __init__(self) -> None:
        self._jobs: dict[str, RunningJob] = {}
        self._lock = threading.Lock()

    @contextmanager
    def track(self, job_id: str, attempt: int) -> Iterator[RunningJob]:
        """Hold a job in the set while it runs."""
        running = RunningJob(job_id, attempt)
        with self._lock:
            self._jobs[job_id] = running
        try:
            yield running
        finally:
            with self._lock:
                self._jobs.pop(job_id, None)

    def snapshot(self) -> list[RunningJob]:
        """The jobs running now."""
        with self._lock:
            return list(self._jobs.values())

    def cancel(self, job_ids: list[str]) -> None:
        """Stop the named jobs' running tasks (their workflows end ``cancelled``)."""
        with self._lock:
            for job_id in job_ids:
                running = self._jobs.get(job_id)
                if running is not None and not running.cancel.is_set():
                    log.info("job %s: cancel requested by the control plane", job_id)
                    running.cancel.set()


def report_refusal(client: ControlPlane, agent_id: str, refusal: EnvelopeRefused, task_id: str | None) -> None:
    """Tell the control plane that a message was refused (it records it in the audit log)."""
    claims = refusal.claims
    body = {
        "reason": refusal.reason,
        "message": str(refusal),
        "task_id": task_id,
        "job_id": claims.get("job_id") if isinstance(claims.get("job_id"), str) else None,
        "attempt": claims.get("attempt") if isinstance(claims.get("attempt"), int) else None,
    }
    try:
        client.call("POST", f"/agents/{agent_id}/refusals", body, deadline=60)
    except ControlPlaneError:
        log.error("could not report the refused message %s (%s) to the control plane", task_id, refusal.reason)


class JobRunner:
    """Claims and runs verified envelopes for one agent."""

    def __init__(self, client: ControlPlane, inflight: Inflight) -> None:
        self.client = client
        self.inflight = inflight

    def run(self, envelope: Envelope) -> str:
        """Run one envelope to its end; returns what happened (``completed``, ``dropped: …``)."""
        job_id, attempt = envelope.job_id, envelope.attempt
        claim = self._claim(envelope)
        if not claim.ok:
            log.info(
                "job %s attempt %d not claimed (%s %s): message dropped",
                job_id,
                attempt,
                claim.status,
                claim.error or claim.body.get("message", ""),
            )
            return f"dropped: {claim.error or claim.status}"
        secrets = claim.body.get("secrets") or {}
        with self.inflight.track(job_id, attempt) as running:
            try:
                workflow = probe.load_workflow(envelope.workflow.encode(), name=envelope.name)
                result = probe.run_workflow(
                    workflow,
                    variables=envelope.variables,
                    secrets=secrets,
                    cancel=running.cancel,
                    on_event=lambda event: self._on_event(job_id, attempt, event),
                )
            except probe.WorkflowError as exc:
                return self._finish(job_id, attempt, "failed", f"the workflow cannot run here: {exc}")
            return self._finish(job_id, attempt, FINAL_STATE[result.status.value], result.error)

    def _claim(self, envelope: Envelope) -> Reply:
        """Claim the attempt; while its project runs as many jobs as it may, wait (holding the message)."""
        delay = 1.0
        while True:
            claim = self.client.call("POST", f"/jobs/{envelope.job_id}/claim", {"attempt": envelope.attempt})
            if claim.error != "project_at_capacity" or time.time() + delay > envelope.expires_at:
                return claim
            log.info("job %s waits: %s", envelope.job_id, claim.body.get("message", "project at capacity"))
            time.sleep(delay)
            delay = min(delay * 1.5, MAX_CAPACITY_WAIT)

    def _on_event(self, job_id: str, attempt: int, event: dict[str, Any]) -> None:
        if event["event"] != "task_finished":
            return
        result = dict(event["result"])
        result.pop("success", None)
        attempts = result.pop("attempts", 1)
        result["metrics"] = {**result.get("metrics", {}), "attempts": attempts}
        body = {"attempt": attempt, "position": event["index"], **result}
        try:
            reply = self.client.call("POST", f"/jobs/{job_id}/tasks", body)
        except ControlPlaneError:
            log.error("job %s: the result of task %s could not be delivered", job_id, result["name"])
            raise
        if not reply.ok:
            log.warning("job %s: task result %s refused (%s)", job_id, result["name"], reply.error)

    def _finish(self, job_id: str, attempt: int, state: str, error: str | None) -> str:
        reply = self.client.call("POST", f"/jobs/{job_id}/status", {"attempt": attempt, "state": state, "error": error})
        if not reply.ok:
            log.warning("job %s: final state %s refused (%s)", job_id, state, reply.error)
            return f"refused: {reply.error}"
        log.info("job %s attempt %d %s", job_id, attempt, state)
        return state
