"""Agent-facing job services: claim with a lease, then task results and states fenced by the attempt."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from flask import current_app
from sqlalchemy import Executable, and_, bindparam, func, select

import probe.results
from app.agents.models import Agent
from app.audit import service as audit
from app.audit.models import AuditEvent
from app.auth.guard import deny
from app.auth.tokens import Principal
from app.columns import utcnow
from app.errors import AppError, Conflict
from app.extensions import db
from app.jobs import dispatching
from app.jobs.models import Job, JobAttempt, TaskResult
from app.jobs.schemas import FinishedOut, FinishedReport, StatusReport, TaskReport, TaskResultIn
from app.jobs.service import visible
from app.jobs.states import AttemptState, JobState, again_if_overtaken, transition, transition_attempt
from app.logs.service import append_lines, unseen
from app.realtime.events import note_task
from app.rows import insert_row, update_fenced
from app.secretstore import service as secretstore
from app.tenants.models import Project

LONGEST_RUN = 366 * 86400.0  # seconds: a workflow may declare a longer timeout, the deadline stops there
ENDED_MEANWHILE = "attempt {attempt} of job {job_id} ended while this report was recorded"
STALE_ATTEMPT = "attempt {attempt} of job {job_id} is not the current one (the job is at attempt {current})"
ATTEMPT_OVER = "attempt {attempt} of job {job_id} is {state}; it takes no more reports"
NOT_YOURS = "attempt {attempt} of job {job_id} belongs to another agent"
PINNED_ELSEWHERE = "job {job_id} is pinned to another agent"
CANCELLED = "job {job_id} was cancelled; drop the message"
AT_CAPACITY = "project '{project}' already runs {limit} jobs (its max_running_jobs); claim again later"
NOT_REGISTERED = "agent '{agent}' is not registered: register before claiming jobs"
WRONG_PLATFORM = "job {job_id} runs on {platform}; this agent runs {agent_platform}"
WRONG_PROJECT = "job {job_id} is of project '{project}'; this agent serves project '{agent_project}'"
NEVER_STARTED = "cancelled before its run started: the agent's claim was made again after the cancel was requested"


# The job with one of its attempts, in one statement built once; claims add what they check of the agent and project.
_JOB_AND_ATTEMPT = (
    select(Job, JobAttempt)
    .outerjoin(JobAttempt, and_(JobAttempt.job_id == Job.id, JobAttempt.number == bindparam("number")))
    .where(Job.id == bindparam("job_id"))
)
_FOR_CLAIM = (
    _JOB_AND_ATTEMPT.add_columns(Agent.platform, Agent.project_id, Project.max_running_jobs)
    .outerjoin(Agent, and_(Agent.tenant_id == Job.tenant_id, Agent.id == bindparam("agent_id")))
    .outerjoin(Project, and_(Project.tenant_id == Job.tenant_id, Project.id == Job.project_id))
)
_RESULT_ID = select(TaskResult.id).where(
    TaskResult.job_id == bindparam("job_id"),
    TaskResult.attempt == bindparam("attempt"),
    TaskResult.name == bindparam("name"),
)


def _read(caller: Principal, job_id: str, statement: Executable, parameters: dict[str, Any]) -> tuple[Any, ...]:
    """Run one of the statements above; its row, with the job first, if the caller may see the job (else 404)."""
    found = db.session.execute(statement, {"job_id": job_id, **parameters}).one_or_none()
    visible(caller, job_id, found[0] if found is not None else None)
    assert found is not None
    return tuple(found)


def _lease() -> tuple[datetime, datetime]:
    now = utcnow()
    return now, now + timedelta(seconds=current_app.config["LEASE_SECONDS"])


def run_deadline(job: Job, claimed: datetime) -> datetime | None:
    """When the control plane stops waiting for a run claimed at ``claimed``: after the workflow's own timeout,
    which its agent enforces, and a lease's length more for its final report (None: a job from before 0011)."""
    if job.timeout is None:
        return None
    seconds = min(job.timeout, LONGEST_RUN) + current_app.config["LEASE_SECONDS"]
    return claimed + timedelta(seconds=seconds)


def claim_job(
    *, caller: Principal, job_id: str, attempt: int, task: str | None = None, claim_id: str | None = None
) -> tuple[Job, JobAttempt, dict[str, str]]:
    """Move a queued job to ``running`` for the calling agent and grant a lease; 409 for any second claim, but the
    same claim made again (see ``_made_again``). The same claim made again after a cancel is refused, and ends its
    attempt and the job (``_end_unstarted``).

    ``task`` names the workflow's first task, which the agent starts right after the claim; ``claim_id`` is the
    agent's name for this claim, the same in each of its tries. Returns the job, its attempt and the values of the
    project secrets its workflow names.
    """
    if claim_id is None:
        return _claim_once(caller, job_id, attempt, task, claim_id)
    try:
        # An earlier try of this very claim (still being answered when the agent gave up on it) may be what changed
        # the job meanwhile: read again, it is granted as the same claim made again.
        return again_if_overtaken(lambda: _claim_once(caller, job_id, attempt, task, claim_id))
    except Conflict as exc:
        if exc.code == "job_cancelled":
            _end_unstarted(caller, job_id, attempt, claim_id)
        raise


def _claim_once(
    caller: Principal, job_id: str, attempt: int, task: str | None, claim_id: str | None
) -> tuple[Job, JobAttempt, dict[str, str]]:
    job, row, max_running = _claimable(caller, job_id, attempt)
    secrets = _take(caller, job, row, max_running, task, claim_id)
    db.session.commit()
    return job, row, secrets


def _claimable(caller: Principal, job_id: str, attempt: int) -> tuple[Job, JobAttempt, int | None]:
    """The job, its attempt ``attempt`` and its project's running limit, if the caller may claim it (else raise).

    Reads only: a refusal leaves nothing of the caller's transaction to roll back.
    """
    # the agent is looked up in the job's tenant, which _read has checked is the caller's
    job, row, agent_platform, agent_project, max_running = _read(
        caller, job_id, _FOR_CLAIM, {"number": attempt, "agent_id": caller.agent_id}
    )
    if agent_platform is None:
        raise Conflict(NOT_REGISTERED.format(agent=caller.agent_id), code="agent_not_registered")
    if job.agent_id is not None and job.agent_id != caller.agent_id:
        raise deny(caller, PINNED_ELSEWHERE.format(job_id=job.id), job_id=job.id)
    if attempt != job.attempt:
        raise Conflict(STALE_ATTEMPT.format(attempt=attempt, job_id=job.id, current=job.attempt), code="stale_attempt")
    if job.cancel_requested or job.state == JobState.CANCELLED.value:
        raise Conflict(CANCELLED.format(job_id=job.id), code="job_cancelled", state=job.state)
    if agent_platform != job.platform:
        raise Conflict(
            WRONG_PLATFORM.format(job_id=job.id, platform=job.platform, agent_platform=agent_platform),
            code="wrong_agent",
        )
    if agent_project != job.project_id:
        raise Conflict(
            WRONG_PROJECT.format(job_id=job.id, project=job.project_id, agent_project=agent_project),
            code="wrong_agent",
        )
    assert row is not None  # the job's current attempt
    return job, row, max_running


def _take(
    caller: Principal, job: Job, row: JobAttempt, max_running: int | None, task: str | None, claim_id: str | None
) -> dict[str, str]:
    """Move the claimable job to ``running`` with a lease, uncommitted; 409 when that is refused (a full project's
    refusal rolls back at once, releasing the project's lock; the caller rolls back any other). The same claim made
    again only renews the lease.

    Returns the values of the project secrets the workflow names, read in the same transaction: should reading
    them fail (the database gone), the claim is rolled back with it, and the agent's retry can claim again.
    """
    if _made_again(caller, row, claim_id):  # the run starts now: its deadline counts from now
        _renew(job, row, {"deadline_at": run_deadline(job, utcnow())})
        return secretstore.for_workflow(job.tenant_id, job.project_id, job.workflow)
    now, expires = _lease()
    if max_running is not None:
        # Serialize the claims of a limited project (a row lock on MariaDB; SQLite has a single writer anyway).
        max_running = db.session.scalar(
            select(Project.max_running_jobs)
            .where(Project.tenant_id == job.tenant_id, Project.id == job.project_id)
            .with_for_update()
        )
    transition(
        job,
        JobState.RUNNING,
        actor=caller.subject,
        guards={"cancel_requested": False},
        started_at=job.started_at or now,
    )
    if max_running is not None:
        running = (
            db.session.scalar(
                select(func.count())
                .select_from(Job)
                .where(
                    Job.tenant_id == job.tenant_id,
                    Job.project_id == job.project_id,
                    Job.state == JobState.RUNNING.value,
                )
            )
            or 0
        )
        if running > max_running:
            db.session.rollback()
            raise Conflict(AT_CAPACITY.format(project=job.project_id, limit=max_running), code="project_at_capacity")
        # Read the clock again now that this claim is serialized after the project's other claims and reports:
        # the attempt's claimed_at is then never before the finished_at of the job whose place it takes.
        now, expires = _lease()
    transition_attempt(
        row,
        AttemptState.RUNNING,
        agent_id=caller.agent_id,
        claim_id=claim_id,
        claimed_at=now,
        lease_expires_at=expires,
        deadline_at=run_deadline(job, now),
    )
    if task is not None:
        _task_started(job, row.number, task)
    return secretstore.for_workflow(job.tenant_id, job.project_id, job.workflow)


def _made_again(caller: Principal, row: JobAttempt, claim_id: str | None) -> bool:
    """Whether a claim repeats the one that made this attempt the caller's: the agent sends each of its tries of a
    claim with the same ``claim_id``, so a try made after a granted claim's answer was lost on the way (a gateway's
    502, a connection cut) is answered as a claim again, instead of 409 and a job that waits for its lease to expire.
    A second delivery of the job's message is claimed under another id, and refused."""
    return (
        claim_id is not None
        and row.state == AttemptState.RUNNING.value
        and row.agent_id == caller.agent_id
        and row.claim_id == claim_id
    )


def _end_unstarted(caller: Principal, job_id: str, attempt: int, claim_id: str) -> None:
    """After a claim refused for a cancel: when an earlier try of the same claim was granted (its answer lost on the
    way), end its attempt and the job now, cancelled as the agent's own report would end them. The agent drops the
    job's message on the refusal and never runs it, so nothing else would end them until the lease expired.

    Nothing is written for any other refused claim; should this write fail or lose a race, the reaper still ends the
    attempt when its lease expires.
    """

    def end() -> None:
        # not ``fenced``: an attempt that is not the caller's (a job cancelled while queued, another agent's run) is
        # no access violation here, only nothing to end
        job, row = _read(caller, job_id, _JOB_AND_ATTEMPT, {"number": attempt})
        if row is not None and job.attempt == attempt and job.cancel_requested and _made_again(caller, row, claim_id):
            report = StatusReport(attempt=attempt, state="cancelled", error=NEVER_STARTED, logs_first_line=None)
            if not _record_status(caller, job, row, report):
                db.session.commit()

    db.session.rollback()  # the refused claim wrote nothing; the reports a claim carried are committed already
    try:
        again_if_overtaken(end)
    except AppError:
        db.session.rollback()


def _task_started(job: Job, attempt: int, task: str) -> None:
    """Note that the agent started a task (a live event after the commit)."""
    note_task(job, attempt, task, "running")


def _task_finished(job: Job, result: TaskResult) -> None:
    """Note that a task's result was stored (a live event after the commit)."""
    note_task(job, result.attempt, result.name, result.status)


def fenced(caller: Principal, job_id: str, number: int) -> tuple[Job, JobAttempt]:
    """The job (scoped to the caller: 404 otherwise) and its attempt ``number``, which must be the caller's own
    (403) and the job's current one (409 ``stale_attempt``); read in one statement."""
    job, row = _read(caller, job_id, _JOB_AND_ATTEMPT, {"number": number})  # row: JobAttempt | None
    if row is None:
        raise Conflict(STALE_ATTEMPT.format(attempt=number, job_id=job.id, current=job.attempt), code="stale_attempt")
    if row.agent_id != caller.agent_id:
        raise deny(caller, NOT_YOURS.format(attempt=number, job_id=job.id), job_id=job.id)
    if number != job.attempt:
        raise Conflict(STALE_ATTEMPT.format(attempt=number, job_id=job.id, current=job.attempt), code="stale_attempt")
    return job, row


def _store_result(job: Job, number: int, report: TaskResultIn) -> tuple[TaskResult, bool]:
    """Insert or update one task's result of attempt ``number``; return it and whether it is new."""
    found = db.session.connection().execute(_RESULT_ID, {"job_id": job.id, "attempt": number, "name": report.name})
    existing = found.scalar()
    fields = report.model_dump(include=set(TaskResultIn.model_fields) - {"name"})
    fields["output"] = _cut_output(report.output, current_app.config["TASK_OUTPUT_LIMIT"])
    if existing is not None:  # a repeated report (a retry after a lost answer): updated, not a second event
        result = db.session.get_one(TaskResult, existing)
        for key, value in fields.items():
            setattr(result, key, value)
        return result, False
    # A new result is one plain INSERT (the unit of work would cost more than the statement).
    values = {"job_id": job.id, "attempt": number, "name": report.name, "reported_at": utcnow(), **fields}
    result = TaskResult(**values)  # not added to the session: only read back to answer the request
    result.id = insert_row(db.session, TaskResult, values)
    _task_finished(job, result)
    return result, True


def _cut_output(output: str, limit: int) -> str:
    """A task's output cut to ``limit`` bytes with a visible marker. Output that probe cut on the agent already ends
    with probe's marker, which counts the bytes cut there: the marker is kept and its count grows by what is cut
    here, so that it still says how much of the output is missing (cut as plain text, the marker itself was cut and
    only its own bytes counted)."""
    cut = probe.results.cut_by_probe(output)
    if cut is None:
        return probe.results.truncate(output, limit)
    return probe.results.truncate(cut[0], limit, cut[1])


def _still_running(job: Job, row: JobAttempt) -> None:
    if row.state != AttemptState.RUNNING.value:
        raise Conflict(
            ATTEMPT_OVER.format(attempt=row.number, job_id=job.id, state=row.state),
            code="stale_attempt",
            state=row.state,
        )


def _renew(job: Job, row: JobAttempt, values: dict[str, Any]) -> None:
    """Renew the lease of a running attempt (uncommitted), writing ``values`` with it; 409 ``stale_attempt`` when the
    attempt ended since it was read (the reaper made it lost, a final report was recorded): what the request wrote
    is then rolled back with it."""
    if not update_fenced(db.session, row, {"lease_expires_at": _lease()[1], **values}, {"state": row.state}):
        raise Conflict(ENDED_MEANWHILE.format(attempt=row.number, job_id=job.id), code="stale_attempt")


def report_task(*, caller: Principal, job_id: str, report: TaskReport) -> tuple[TaskResult, bool]:
    """Store one task's result of the caller's current attempt; return it and whether it is new."""
    job, row = fenced(caller, job_id, report.attempt)
    _still_running(job, row)
    result, created = _store_result(job, row.number, report)
    if report.next_task is not None:
        _task_started(job, row.number, report.next_task)
    _renew(job, row, {})  # a report is a sign of life too
    db.session.commit()
    return result, created


def report_status(*, caller: Principal, job_id: str, report: StatusReport) -> Job:
    """Apply the state an agent reports for its current attempt; ``running`` only renews the lease.

    A report whose write lost a race (the job changed after it was read: a cancel requested meanwhile refuses
    its retry) is read and applied once more, so that it is recorded as of the job's latest state.
    """
    return again_if_overtaken(lambda: _apply_status(caller, job_id, report))


def _apply_status(caller: Principal, job_id: str, report: StatusReport) -> Job:
    job, row, due = _reportable(caller, job_id, report)
    if due and not _record_status(caller, job, row, report):
        db.session.commit()
    return job


def _reportable(caller: Principal, job_id: str, report: StatusReport) -> tuple[Job, JobAttempt, bool]:
    """The job and the caller's current attempt the report is for, and whether there is anything to record (not
    when it repeats a final state already recorded; a ``running`` report always renews the lease); raise if the
    report is refused. Reads only."""
    job, row = fenced(caller, job_id, report.attempt)
    if row.state == report.state and job.state == report.state and report.state != AttemptState.RUNNING.value:
        return job, row, False  # a retried report of the same final state
    _still_running(job, row)
    return job, row, True


def _record_status(caller: Principal, job: Job, row: JobAttempt, report: StatusReport) -> bool:
    """Record the report on its checked attempt, uncommitted; True when it was committed already (a retry has
    opened and published the job's next attempt)."""
    target = report.state
    for task in report.tasks:
        _store_result(job, row.number, task)
    fresh, received = unseen(row.log_lines, report.logs_first_line, report.logs)
    if fresh:
        append_lines(job, row.number, fresh)
    counted: dict[str, Any] = {"log_lines": received} if received != row.log_lines else {}
    now = utcnow()
    if target == AttemptState.RUNNING.value:
        _renew(job, row, counted)
        return False
    transition_attempt(row, AttemptState(target), finished_at=now, error=report.error, **counted)
    if dispatching.retry_failed(job, row, now=now) is not None:
        return True
    error = report.error
    if target == JobState.CANCELLED.value and job.cancel_requested and job.cancel_reason:
        error = job.cancel_reason  # the operator's words; the attempt keeps the agent's
    transition(job, JobState(target), actor=caller.subject, reason=error, finished_at=now, error=error)
    return False


def report_finished(*, caller: Principal, report: FinishedReport) -> FinishedOut:
    """Record the final state of another job of the caller, carried by a claim, in a transaction of its own.

    A refusal (the attempt is stale, not the caller's, the job gone) is the outcome of this report alone: it is
    rolled back and answered as ``POST .../status`` would have answered it, and the claim goes on.
    """
    try:
        job = report_status(caller=caller, job_id=report.job_id, report=report)
    except AppError as exc:
        db.session.rollback()
        return _refused(report, exc)
    return _recorded(report, job)


def _recorded(report: FinishedReport, job: Job) -> FinishedOut:
    return FinishedOut(job_id=report.job_id, attempt=report.attempt, status=200, state=job.state)


def _refused(report: FinishedReport, exc: AppError) -> FinishedOut:
    return FinishedOut(
        job_id=report.job_id, attempt=report.attempt, status=exc.status, error=exc.code, message=exc.message
    )


def claim_carrying(
    *,
    caller: Principal,
    job_id: str,
    attempt: int,
    task: str | None,
    reports: Sequence[FinishedReport],
    claim_id: str | None = None,
) -> tuple[Job, JobAttempt, dict[str, str], list[FinishedOut]]:
    """Record the final states a claim carries, each as if reported alone, then make the claim.

    Every check comes first (reads only); then the reports and the claim are written in one transaction, one
    commit (a carried failure that opens its job's next attempt commits what came before it, as it must publish
    that attempt). A report refused by its check is answered alone, as ``POST .../status`` would answer it; the
    others are recorded whatever becomes of the claim. Should a report's write be refused after all (a
    concurrent update), the transaction is rolled back, each report not yet committed is recorded in a
    transaction of its own, and the claim is made alone. Should the claim's write be refused (a full project, a
    concurrent claim), the reports are recorded the same way and the refusal stands: asking again would get the
    same answer (but for a concurrent claim under the same ``claim_id``, an earlier try of this claim: the claim
    is then read again, and granted as made again).

    Returns the claimed job, its attempt, the values of the project secrets its workflow names (read before the
    commit) and the reports' outcomes, in their order. Raises the claim's refusal,
    with the reports' outcomes in its ``finished`` field.
    """
    outcomes: list[FinishedOut] = []
    due: list[tuple[int, Job, JobAttempt]] = []
    for index, report in enumerate(reports):
        try:
            job, row, todo = _reportable(caller, report.job_id, report)
        except AppError as exc:
            outcomes.append(_refused(report, exc))
            continue
        outcomes.append(_recorded(report, job))
        if todo:
            due.append((index, job, row))
    refusal: AppError | None = None
    claimable: tuple[Job, JobAttempt, int | None] | None = None
    secrets: dict[str, str] = {}
    try:
        claimable = _claimable(caller, job_id, attempt)
    except AppError as exc:
        refusal = exc
    pending = [index for index, _, _ in due]  # recorded but not committed yet
    alone = False  # the claim is made again on its own, after the reports
    try:
        for index, job, row in due:
            if _record_status(caller, job, row, reports[index]):
                pending = [later for later in pending if later > index]
            outcomes[index] = _recorded(reports[index], job)
    except AppError:
        _record_alone(caller, reports, pending, outcomes)
        alone = claimable is not None
    else:
        try:
            if claimable is not None:
                secrets = _take(caller, *claimable, task, claim_id)
        except AppError as exc:
            _record_alone(caller, reports, pending, outcomes)
            refusal = exc
            alone = exc.code == "concurrent_update" and claim_id is not None  # perhaps an earlier try of this claim
        else:
            db.session.commit()
    if alone:
        try:
            job, row, secrets = claim_job(caller=caller, job_id=job_id, attempt=attempt, task=task, claim_id=claim_id)
            claimable, refusal = (job, row, None), None
        except AppError as exc:
            refusal = exc
    elif refusal is not None and refusal.code == "job_cancelled" and claim_id is not None:
        _end_unstarted(caller, job_id, attempt, claim_id)
    if refusal is not None:
        _audit_second_delivery(caller, job_id, attempt, refusal)
        if outcomes:
            refusal.extra["finished"] = [outcome.model_dump() for outcome in outcomes]
        raise refusal
    assert claimable is not None
    return claimable[0], claimable[1], secrets, outcomes


# A claim refused with these found its attempt claimed already, ended or superseded: a second delivery of the job's
# message. The broker may redeliver one (a connection lost before the ack); anything else is a replay, such as a
# message pushed onto the queue again after its agent restarted and forgot the envelopes it had taken.
SECOND_DELIVERY = frozenset({"invalid_transition", "stale_attempt"})
CLAIM_REFUSED = "job.claim_refused"


def _audit_second_delivery(caller: Principal, job_id: str, attempt: int, refusal: AppError) -> None:
    """Audit a claim refused as a second delivery (``job.claim_refused``), nothing having run: the agent drops the
    message. A claim refused for a cancel, a full project or a lost race is the normal course, and not audited.

    Once per attempt and agent, and only for an attempt the job has had: a message can only be for one of those,
    and an agent's token claiming the same job again and again (or attempts it never had) writes no more rows."""
    if refusal.code not in SECOND_DELIVERY:
        return
    db.session.rollback()  # the refused claim wrote nothing; the reports it carried are committed already
    job = db.session.get(Job, job_id)
    if job is None or job.id != job_id or not 1 <= attempt <= job.attempt:
        return
    earlier = db.session.scalars(
        select(AuditEvent.details).where(
            AuditEvent.action == CLAIM_REFUSED,
            AuditEvent.tenant_id == caller.tenant_id,
            AuditEvent.target_id == job_id,
        )
    )
    if any(seen.get("attempt") == attempt and seen.get("agent_id") == caller.agent_id for seen in earlier):
        return
    details = {"agent_id": caller.agent_id, "attempt": attempt, "reason": refusal.code, "message": refusal.message}
    audit.record_refusal(
        action=CLAIM_REFUSED,
        principal=caller,
        outcome="refused",
        target_type="job",
        target_id=job_id,
        details=details,
    )


def _record_alone(
    caller: Principal, reports: Sequence[FinishedReport], pending: list[int], outcomes: list[FinishedOut]
) -> None:
    """Roll back the shared transaction and record each of the ``pending`` reports in a transaction of its own."""
    db.session.rollback()
    for index in pending:
        outcomes[index] = report_finished(caller=caller, report=reports[index])
