"""Run one verified job: claim it, run its workflow with probe, report every task and the final state.

The final state goes through the outbox (``workers/outbox.py``): the task thread hands it over and returns, so the
agent acknowledges the message and takes the next one while the report is delivered. An agent that runs jobs back
to back lets the report wait a moment (``LINGER``) for its next claim, which carries it: one request per job
fewer for the control plane.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import probe
from dispatch.contract import is_shared_queue
from dispatch.logs import log_context
from workers.client import ControlPlane, ControlPlaneError, Reply, transient
from workers.envelope import Envelope, EnvelopeRefused
from workers.logship import LogBuffer, lines_from_event
from workers.outbox import FinalReport, Outbox, Taken
from workers.reports import RESULTS_PER_REPORT, Reports, in_reports, send_results

log = logging.getLogger(__name__)

ABANDONED = (
    "job %s attempt %d: its lease has not been renewed for %.0f s (the control plane's lease: %.0f s); the control "
    "plane takes the run for lost and runs the job again: stopping it, its final state is not reported"
)
REFUSED_AGENT = "the control plane refuses this agent's claims (HTTP {status} {error}: {message})"
NOT_OURS = (
    "job %s attempt %d is no longer this agent's on the control plane (lost, timed out, or recorded); stopping it"
)
MALFORMED_SECRETS = "the claim's answer carried secrets that are not names and text values; nothing ran"
UNDELIVERED = (
    "job %s attempt %d: the final state %s could not be delivered (%s); the control plane will retry the job when its"
    " lease expires"
)
WAITING = (
    "job %s attempt %d: the control plane cannot take it yet (its beacon says it is down or just back); the final"
    " state %s waits for it (%s)"
)
WAIT_WHILE_DOWN = 5.0  # seconds between two tries of a final state while the reaper waits
LOG_LINES_WITH_FINAL_STATE = 500  # log lines the final state report carries; a longer backlog is sent before it
LOG_BYTES_WITH_FINAL_STATE = 512 * 1024  # and their size encoded, at most (the control plane takes 1 MiB a request)
LOG_BATCH_BYTES = 512 * 1024  # the size of one request's log lines, encoded, at most
MAX_CAPACITY_WAIT = 10.0  # seconds between two claims of a job whose project is at its limit
WORKFLOWS_KEPT = 32  # parsed workflows an agent keeps: a fleet runs the same few again and again
LINGER = 0.05  # seconds a busy agent's final report waits for the next claim to carry it
BACK_TO_BACK = 0.02  # a job whose message came within this many seconds of the last final report: the agent is busy
CARRIED_PER_CLAIM = 8  # final reports one claim carries at most (the control plane's limit)
CARRIED_BYTES = 256 * 1024  # encoded final reports one claim carries at most (the control plane takes 1 MiB)
# why a claim waits and is made again, holding the message: the project is full, or no answer came that says
WAIT_AND_CLAIM_AGAIN = frozenset({"project_at_capacity", "unreachable", "not_a_claim"})
FINAL_STATE = {"succeeded": "completed", "failed": "failed", "timed_out": "timed_out", "cancelled": "cancelled"}


@dataclass
class RunningJob:
    """An attempt this agent runs, or ran and has not reported yet: what the heartbeat reports, and how a cancel
    reaches it."""

    job_id: str
    attempt: int
    cancel: threading.Event = field(default_factory=threading.Event)
    renewed: float = field(default_factory=time.monotonic)  # when its lease was last renewed, as far as we know
    abandoned: bool = False  # stopped because its lease could not be renewed: the control plane runs it again
    ended: bool = False  # its run has ended (its final state may still wait to be delivered)


def _late(now: float, running: RunningJob, up_for: float | None) -> float:
    """How long a run's lease has gone without renewal while the control plane could renew it."""
    late = now - running.renewed
    return late if up_for is None else min(late, up_for)


class Stopping(Exception):
    """The agent stops while a job waits to be claimed: its message goes back to the queue, for another agent."""


class NotAccepted(Stopping):
    """The control plane refuses this agent's claims (its token, its registration): the message goes back to the
    queue, for another agent, and this agent stops."""


class Inflight:
    """The jobs this agent is running, or has run and not yet reported; shared by the task threads, the outbox and
    the heartbeat (which renews their leases)."""

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, int], RunningJob] = {}
        self._lock = threading.Lock()
        self.lease: float | None = None  # the control plane's lease in seconds, once an answer has said it

    def note_lease(self, seconds: object) -> None:
        """Keep the lease a claim's or heartbeat's answer gives (anything but a positive number is ignored)."""
        if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds > 0:
            self.lease = float(seconds)

    def renewed(self, attempts: list[tuple[str, int]], at: float) -> None:
        """Note that the control plane renewed the named attempts' leases as of ``at`` (``time.monotonic()``)."""
        with self._lock:
            for key in attempts:
                running = self._jobs.get(key)
                if running is not None:
                    running.renewed = max(running.renewed, at)

    def until_expiry(self, now: float, up_for: float | None = None) -> float | None:
        """Seconds until the first run not abandoned yet has gone a lease without renewal (None: no such run, or
        the lease is not known yet). ``up_for``: for how long the control plane has been able to renew leases, as
        its beacon says (None: not known); the time before that does not count (see ``abandon_expired``)."""
        lease = self.lease
        if lease is None:
            return None
        with self._lock:
            ages = [_late(now, job, up_for) for job in self._jobs.values() if not job.abandoned and not job.ended]
        return max(0.0, lease - max(ages)) if ages else None

    def abandon_expired(self, now: float, up_for: float | None = None) -> None:
        """Stop every run whose lease this agent has not been able to renew for longer than a lease (its heartbeats
        did not get through, or were refused): the control plane's reaper takes such a run for lost and runs the
        job again, perhaps on another agent, so this copy must not go on. Its final state is not reported. A run
        that has ended already keeps its final state, delivered (or refused) when the control plane answers.

        ``up_for`` is how long the control plane has been able to renew leases, from its beacon (0 while it is down;
        None when the beacon could not be read): a lease runs out only in that time, on this side as on the
        reaper's, so an outage of the control plane stops no run."""
        lease = self.lease
        if lease is None:
            return
        with self._lock:
            for running in self._jobs.values():
                late = _late(now, running, up_for)
                if late > lease and not running.abandoned and not running.ended:
                    running.abandoned = True
                    with log_context(job_id=running.job_id):
                        log.error(ABANDONED, running.job_id, running.attempt, late, lease)
                    running.cancel.set()

    def add(self, job_id: str, attempt: int, claimed: float | None = None) -> RunningJob:
        """Hold an attempt in the set, its lease granted as of ``claimed`` (``time.monotonic()``; default: now)."""
        running = RunningJob(job_id, attempt) if claimed is None else RunningJob(job_id, attempt, renewed=claimed)
        with self._lock:
            self._jobs[job_id, attempt] = running
        return running

    def discard(self, job_id: str, attempt: int) -> None:
        """Drop an attempt from the set (it may not be in it)."""
        with self._lock:
            self._jobs.pop((job_id, attempt), None)

    def snapshot(self) -> list[RunningJob]:
        """The attempts in the set now."""
        with self._lock:
            return list(self._jobs.values())

    def stop(self, attempts: list[tuple[str, int]]) -> None:
        """Stop the named attempts' running tasks: the control plane no longer has them running on this agent (their
        leases ran out, they passed their deadline), so their results would be refused while another may run."""
        wanted = set(attempts)
        self._stop_where(lambda job: (job.job_id, job.attempt) in wanted, logging.WARNING, NOT_OURS)

    def cancel(self, job_ids: list[str]) -> None:
        """Stop the named jobs' running tasks (their workflows end ``cancelled``)."""
        wanted = set(job_ids)
        self._stop_where(lambda job: job.job_id in wanted, logging.INFO, "job %s attempt %d: cancel requested")

    def _stop_where(self, chosen: Callable[[RunningJob], bool], level: int, why: str) -> None:
        """Set the cancel event of each chosen attempt not stopped yet, logging ``why`` (job id, attempt) once."""
        with self._lock:
            for running in self._jobs.values():
                if chosen(running) and not running.cancel.is_set():
                    with log_context(job_id=running.job_id):  # the heartbeat's or control listener's thread
                        log.log(level, why, running.job_id, running.attempt)
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


@functools.lru_cache(maxsize=WORKFLOWS_KEPT)
def _load(text: str, name: str) -> probe.Workflow:
    """The workflow of an envelope, parsed once per text: nothing changes a Workflow while it runs (probe renders
    each task's options into a new dict), so runs share it; a WorkflowError is not kept."""
    return probe.load_workflow(text.encode(), name=name)


class JobRunner:
    """Claims and runs verified envelopes for one agent; ``concurrency`` is how many Celery runs at once, and how
    many final reports the outbox delivers at once."""

    def __init__(
        self,
        client: ControlPlane,
        inflight: Inflight,
        concurrency: int = 1,
        reaper_waits: Callable[[], bool] | None = None,
    ) -> None:
        self.client = client
        self.inflight = inflight
        self.reaper_waits = reaper_waits  # the beacon says so: a final state that could not be delivered waits too
        self.outbox = Outbox(self._deliver, limit=concurrency)
        self.stopping = threading.Event()  # set when the agent shuts down: no more waiting for a claim
        self._last_report = float("-inf")  # time.monotonic() of the last final report handed to the outbox

    def run(self, envelope: Envelope) -> str:
        """Run one envelope and hand its final state to the outbox; returns what happened (``completed``,
        ``dropped: …``), the final state before the control plane has recorded it."""
        job_id, attempt = envelope.job_id, envelope.attempt
        linger = LINGER if time.monotonic() - self._last_report < BACK_TO_BACK else 0.0
        workflow: probe.Workflow | None = None
        try:
            workflow = _load(envelope.workflow, envelope.name)
        except probe.WorkflowError as exc:
            problem = str(exc)
        first = workflow.tasks[0].name if workflow is not None and workflow.tasks else None
        claim, asked = self._claim(envelope, first)
        # A job of the shared queue is of this agent's project and platform: refused as of another, it is the
        # agent's registration that is wrong. One pinned to it may be the job's own problem (its platform changed).
        shared = is_shared_queue(envelope.audience)
        if claim.status == 401 or claim.error == "agent_not_registered" or (shared and claim.error == "wrong_agent"):
            message = claim.body.get("message", "")
            raise NotAccepted(REFUSED_AGENT.format(status=claim.status, error=claim.error, message=message))
        if not claim.ok:
            log.info(
                "job %s attempt %d not claimed (%s %s): message dropped",
                job_id,
                attempt,
                claim.status,
                claim.error or claim.body.get("message", ""),
            )
            return f"dropped: {claim.error or claim.status}"
        self.inflight.note_lease(claim.body.get("lease_seconds"))
        running = self.inflight.add(job_id, attempt, asked)  # until its final state is delivered: leases renewed
        try:
            secrets = claim.body.get("secrets") or {}
            if workflow is None:
                report = FinalReport(job_id, attempt, "failed", f"the workflow cannot run here: {problem}")
            elif not isinstance(secrets, dict) or not all(isinstance(v, str) for v in secrets.values()):
                report = FinalReport(job_id, attempt, "failed", MALFORMED_SECRETS)
            else:
                report = self._execute(envelope, workflow, running, secrets)
            running.ended = True
            if running.abandoned and report.state == "cancelled":  # the control plane runs it again: not ours now
                self.inflight.discard(job_id, attempt)
                return "abandoned"
            self._last_report = time.monotonic()
            self.outbox.put(report, linger)
        except BaseException:
            self.inflight.discard(job_id, attempt)
            raise
        return report.state

    def _execute(
        self, envelope: Envelope, workflow: probe.Workflow, running: RunningJob, secrets: dict[str, Any]
    ) -> FinalReport:
        """Run the workflow, sending each task's result as the next one starts; the final report of the run."""
        job_id, attempt = envelope.job_id, envelope.attempt
        reports = Reports(self.client, job_id, attempt)
        logs = LogBuffer(self._log_sender(job_id, attempt))

        def on_event(event: dict[str, Any]) -> None:
            logs.add(lines_from_event(event))
            reports.on_event(event)

        error: str | None
        result: probe.WorkflowResult | None = None
        try:
            result = probe.run_workflow(
                workflow,
                variables=envelope.variables,
                secrets=secrets,
                cancel=running.cancel,
                on_event=on_event,
            )
        except probe.WorkflowError as exc:
            state, error = "failed", f"the workflow cannot run here: {exc}"
        else:
            state, error = FINAL_STATE[result.status.value], result.error
        lines = logs.drain()
        return FinalReport(job_id, attempt, state, error, reports.left(result), lines, logs.first_pending)

    def _deliver(self, report: FinalReport) -> None:
        """Deliver a final report (in the outbox's thread); the attempt leaves the running set either way. One that
        could not be delivered in ``REPORT_DEADLINE`` is tried again while the control plane's beacon says that the
        reaper waits too (the control plane is down, or not back for long), unless the agent is stopping."""
        try:
            while True:
                try:
                    self._finish(report)
                    return
                except ControlPlaneError as exc:
                    if self.stopping.is_set() or not self._reaper_waits():
                        log.error(UNDELIVERED, report.job_id, report.attempt, report.state, exc)
                        return
                    log.warning(WAITING, report.job_id, report.attempt, report.state, exc)
                    if self.stopping.wait(WAIT_WHILE_DOWN):
                        log.error(UNDELIVERED, report.job_id, report.attempt, report.state, "the agent stops")
                        return
        finally:
            self.inflight.discard(report.job_id, report.attempt)

    def _reaper_waits(self) -> bool:
        """Whether the beacon says that the reaper leaves expired leases alone now (False without a beacon)."""
        if self.reaper_waits is None:
            return False
        try:
            return self.reaper_waits()
        except Exception:  # a callable of tests, or one day another reader: given up, as without a beacon
            log.exception("reading the control plane's beacon failed")
            return False

    def _claim(self, envelope: Envelope, first_task: str | None) -> tuple[Reply, float]:
        """Claim the attempt. While its project runs as many jobs as it may, the control plane cannot be reached, or
        it answers with something that is not this claim (a proxy's page), wait and claim again, holding the
        message, until its envelope expires; raises Stopping when the agent stops meanwhile. Every try carries the
        same ``claim_id``: a try after a granted claim whose answer was lost is granted again, not refused. Returns
        the answer and when its request was sent (``time.monotonic()``: the lease runs from no earlier)."""
        delay = 1.0
        request: dict[str, Any] = {"attempt": envelope.attempt, "claim_id": uuid.uuid4().hex}
        if first_task is not None:
            request["task"] = first_task  # it starts right after the claim: the control plane tells watchers
        flushed = False
        while True:
            if self.stopping.is_set():  # a message taken as the agent stops: back to the queue, unclaimed
                raise Stopping(f"job {envelope.job_id}: the agent stops before the job was claimed")
            asked = time.monotonic()
            try:
                claim = self._claim_carrying(envelope.job_id, request)
            except ControlPlaneError as exc:
                claim = Reply(503, {"error": "unreachable", "message": f"the control plane cannot be reached: {exc}"})
            if claim.ok and not _grants(claim, envelope):  # a proxy's page, say: not an answer of the control plane
                claim = Reply(503, {"error": "not_a_claim", "message": f"HTTP {claim.status} is not a claim's answer"})
            if claim.error not in WAIT_AND_CLAIM_AGAIN or time.time() + delay > envelope.expires_at:
                return claim, asked
            if claim.error == "project_at_capacity" and not flushed:
                flushed = True  # jobs of ours that ended may still count as running: once reported, ask again
                if self.outbox.flush(min(MAX_CAPACITY_WAIT, envelope.expires_at - time.time())):
                    continue
            log.info("job %s waits: %s", envelope.job_id, claim.body.get("message", claim.error))
            self.stopping.wait(delay)
            delay = min(delay * 1.5, MAX_CAPACITY_WAIT)

    def _claim_carrying(self, job_id: str, request: dict[str, Any]) -> Reply:
        """Send a claim carrying the final reports waiting in the outbox; each is settled by the answer, or handed
        back to the outbox's threads when the answer does not say what became of it."""
        carried: dict[int, dict[str, Any]] = {}  # by the report's number in the outbox: the body it adds to the claim
        room = CARRIED_BYTES

        def fits(number: int, report: FinalReport) -> bool:
            nonlocal room
            # _finish sends first a log backlog, and the results one report cannot take: more than it may hold, or
            # over RESULTS_BYTES_PER_REPORT (and so over CARRIED_BYTES: refused below)
            if len(report.lines) > LOG_LINES_WITH_FINAL_STATE or len(report.tasks) > RESULTS_PER_REPORT:
                return False
            body = {"job_id": report.job_id, **_status_body(report, report.lines, report.first_line)}
            size = len(json.dumps(body, separators=(",", ":")))  # ASCII-escaped: its length is its size in bytes
            if size > room:
                return False
            room -= size
            carried[number] = body
            return True

        taken = self.outbox.take(CARRIED_PER_CLAIM, fits)
        if not taken:
            return self.client.call("POST", f"/jobs/{job_id}/claim", request)
        try:
            claim = self.client.call("POST", f"/jobs/{job_id}/claim", {**request, "finished": list(carried.values())})
        except BaseException:
            self.outbox.back(taken)
            raise
        outcomes = claim.body.get("finished")
        if not isinstance(outcomes, list) or len(outcomes) != len(taken):  # refused before they were recorded
            self.outbox.back(taken)
            if claim.ok:
                return claim
            return self.client.call("POST", f"/jobs/{job_id}/claim", request)  # the claim goes alone
        done: Taken = []
        try:
            for item, outcome in zip(taken, outcomes, strict=True):
                if self._settled(item[1], outcome if isinstance(outcome, dict) else {}):
                    done.append(item)
        finally:
            self.outbox.settle(done)
            self.outbox.back([item for item in taken if item not in done])  # not recorded yet: sent again alone
        return claim

    def _settled(self, report: FinalReport, outcome: dict[str, Any]) -> bool:
        """Log what the control plane did with a final report carried by a claim; False when it could not record
        it for now (to be sent again). Once recorded or refused for good, the attempt leaves the running set."""
        status = outcome.get("status")
        with log_context(job_id=report.job_id):  # not the job whose claim carried it
            if not isinstance(status, int) or transient(status):
                log.warning("job %s: final state %s not recorded yet (%s)", report.job_id, report.state, status)
                return False
            if status == 200:
                log.info("job %s attempt %d %s", report.job_id, report.attempt, report.state)
            else:
                log.warning("job %s: final state %s refused (%s)", report.job_id, report.state, outcome.get("error"))
        self.inflight.discard(report.job_id, report.attempt)
        return True

    def _log_sender(self, job_id: str, attempt: int) -> Callable[[list[dict[str, Any]], int], None]:
        """Send a batch of log lines numbered from ``first``; ControlPlaneError propagates (the buffer keeps them)."""

        def post(lines: list[dict[str, Any]], first: int) -> None:
            body = {"attempt": attempt, "lines": lines, "first_line": first}
            reply = self.client.call("POST", f"/jobs/{job_id}/logs", body)
            if reply.status == 413 and len(lines) > 1:  # the control plane takes fewer lines a request: halve
                half = len(lines) // 2
                post(lines[:half], first)
                post(lines[half:], first + half)
            elif not reply.ok:
                log.warning("job %s: %d log lines refused (%s)", job_id, len(lines), reply.error)

        def send(lines: list[dict[str, Any]], first: int) -> None:
            with log_context(job_id=job_id):  # also in the log buffer's own thread, which runs no job
                for start, batch in _batches(lines, LOG_BATCH_BYTES):
                    post(batch, first + start)

        return send

    def _finish(self, report: FinalReport) -> str:
        """Send the final state with the results and log lines not sent yet; returns what the control plane did."""
        job_id, attempt, state = report.job_id, report.attempt, report.state
        lines, first_line = report.lines, report.first_line
        if len(report.tasks) > 1:  # those the control plane could not take while the job ran, of tasks not reached
            report = self._results_first(report)
        riding = _riding(lines)
        send = self._log_sender(job_id, attempt)
        if riding < len(lines):  # a backlog: ship it first, so the final report stays small
            surplus, lines = lines[: len(lines) - riding], lines[len(lines) - riding :]
            for start in range(0, len(surplus), LOG_LINES_WITH_FINAL_STATE):
                try:
                    send(surplus[start : start + LOG_LINES_WITH_FINAL_STATE], first_line + start)
                except ControlPlaneError as exc:  # the next batches would wait as long: the final state goes now
                    log.error("job %s: %d log lines lost: %s", job_id, len(surplus) - start, exc)
                    break
            first_line += len(surplus)
        reply = self.client.call("POST", f"/jobs/{job_id}/status", _status_body(report, lines, first_line))
        if reply.status == 413 and lines:  # the control plane takes less a request: the lines first, then the state
            try:
                send(lines, first_line)
            except ControlPlaneError as exc:
                log.error("job %s: %d log lines lost: %s", job_id, len(lines), exc)
            reply = self.client.call("POST", f"/jobs/{job_id}/status", _status_body(report, [], first_line))
        if not reply.ok:
            log.warning("job %s: final state %s refused (%s)", job_id, state, reply.error)
            return f"refused: {reply.error}"
        log.info("job %s attempt %d %s", job_id, attempt, state)
        return state

    def _results_first(self, report: FinalReport) -> FinalReport:
        """Send first, in order, the task results one report cannot carry with the rest (``in_reports``), in reports
        of state ``running``; the final report with the last of them, which stays small."""
        *first, last = in_reports(report.tasks)
        for results in first:
            send_results(self.client, report.job_id, report.attempt, results)
        return dataclasses.replace(report, tasks=last)


def _grants(claim: Reply, envelope: Envelope) -> bool:
    """Whether a 2xx answer to a claim is the control plane's grant of this envelope's job and attempt."""
    return (claim.body.get("job_id"), claim.body.get("attempt")) == (envelope.job_id, envelope.attempt)


def _size(line: dict[str, Any]) -> int:
    """A log line's size in a request's body (JSON, ASCII-escaped as the client sends it)."""
    return len(json.dumps(line, separators=(",", ":"))) + 1


def _batches(lines: list[dict[str, Any]], limit: int) -> list[tuple[int, list[dict[str, Any]]]]:
    """``lines`` cut into runs of at most ``limit`` bytes encoded (a longer line alone), each with its offset."""
    batches: list[tuple[int, list[dict[str, Any]]]] = []
    start, size = 0, 0
    for index, line in enumerate(lines):
        grows = _size(line)
        if index > start and size + grows > limit:
            batches.append((start, lines[start:index]))
            start, size = index, 0
        size += grows
    if start < len(lines):
        batches.append((start, lines[start:]))
    return batches


def _riding(lines: list[dict[str, Any]]) -> int:
    """How many of the last ``lines`` go with the final state: ``LOG_LINES_WITH_FINAL_STATE`` at most, and
    ``LOG_BYTES_WITH_FINAL_STATE`` encoded."""
    count, size = 0, 0
    for line in reversed(lines[-LOG_LINES_WITH_FINAL_STATE:]):
        size += _size(line)
        if size > LOG_BYTES_WITH_FINAL_STATE:
            break
        count += 1
    return count


def _status_body(report: FinalReport, lines: list[dict[str, Any]], first_line: int) -> dict[str, Any]:
    """The body of a final state report with ``lines`` of its log, numbered from ``first_line``."""
    body: dict[str, Any] = {"attempt": report.attempt, "state": report.state, "error": report.error}
    if report.tasks:
        body["tasks"] = report.tasks  # the last task's result rides with the final state: one request fewer
    if lines:
        body["logs"] = lines  # so does the rest of the log
        body["logs_first_line"] = first_line
    return body
