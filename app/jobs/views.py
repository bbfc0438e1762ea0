"""The jobs blueprint: ``/api/v1/jobs`` for operators, and the agent-facing claim, tasks and status."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, request
from sqlalchemy import select

from app.api import ERR_READ, ERR_WRITE, READERS, WRITERS, body, document, query, reply
from app.auth.guard import principal, require
from app.errors import BadRequest
from app.extensions import db
from app.jobs import dispatching, fencing, service, submission
from app.jobs.models import Job, JobEvent, TaskResult
from app.jobs.schemas import (
    MAX_BATCH_JOBS,
    AttemptOut,
    CancelRequest,
    ClaimOut,
    ClaimRequest,
    DeadLetterQuery,
    EventOut,
    JobBatchOut,
    JobBatchSubmit,
    JobDetail,
    JobList,
    JobListItem,
    JobListQuery,
    JobOut,
    JobSubmit,
    JobSubmitted,
    JobUpdate,
    RequeueRequest,
    StatusReport,
    TaskReport,
    TaskResultOut,
)
from app.ratelimit import charge_rate_limit
from app.schemas import Page

bp = Blueprint("jobs", __name__, url_prefix="/api/v1/jobs")

AGENT = ("agent",)
ERR_FENCED = {**ERR_WRITE, 409: ("stale_attempt", "invalid_transition", "concurrent_update")}
IDEMPOTENCY_KEY_MAX = 255
BATCH_KEY_MAX = IDEMPOTENCY_KEY_MAX - len(submission.batch_key("", MAX_BATCH_JOBS - 1))  # room for "#99"


REPLAYED = "Idempotency-Key {key!r} was used before: this is the job it submitted then, not a new one"


def submitted(job: Job, replayed: str | None = None) -> JobSubmitted:
    """Return the response model of a job just submitted, or of the one an Idempotency-Key ``replayed``, with its
    warnings."""
    warnings = [REPLAYED.format(key=replayed)] if replayed is not None else []
    return JobSubmitted(**_fields(job), warnings=warnings + submission.warnings_for(job))


def job_out(job: Job) -> JobOut:
    """Return the response model of a job."""
    return JobOut(**_fields(job))


def _job_list(jobs: list[tuple[Job, str | None]], total: int, params: Page) -> JobList:
    items = [JobListItem(**_fields(job), ran_on=ran_on) for job, ran_on in jobs]
    return JobList(jobs=items, total=total, limit=params.limit, offset=params.offset)


def _fields(job: Job) -> dict[str, Any]:
    return dict(
        job_id=job.id,
        tenant_id=job.tenant_id,
        project_id=job.project_id,
        name=job.name,
        state=job.state,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        retry_backoff=job.retry_backoff,
        dead_letter_reason=job.dead_letter_reason,
        revision=job.revision,
        priority=job.priority,
        agent_id=job.agent_id,
        platform=job.platform,
        variables=job.variables,
        cancel_requested=job.cancel_requested,
        scheduled_at=job.scheduled_at,
        deliver_by=job.deliver_by,
        created_at=job.created_at,
        updated_at=job.updated_at,
        queued_at=job.queued_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=job.error,
        created_by=job.created_by,
        schedule_id=job.schedule_id,
    )


def task_out(result: TaskResult) -> TaskResultOut:
    """Return the response model of a task result."""
    return TaskResultOut(
        attempt=result.attempt,
        position=result.position,
        name=result.name,
        type=result.type,
        status=result.status,
        output=result.output,
        error=result.error,
        metrics=result.metrics,
        started_at=result.started_at,
        finished_at=result.finished_at,
    )


def job_detail(job: Job) -> JobDetail:
    """Return a job with its workflow, attempts (each with its tasks) and state changes."""
    results = db.session.scalars(
        select(TaskResult)
        .where(TaskResult.job_id == job.id)
        .order_by(TaskResult.attempt, TaskResult.position, TaskResult.id)
    ).all()
    events = db.session.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)).all()
    attempts = [
        AttemptOut(
            number=a.number,
            state=a.state,
            agent_id=a.agent_id,
            queued_at=a.queued_at,
            claimed_at=a.claimed_at,
            lease_expires_at=a.lease_expires_at,
            deadline_at=a.deadline_at,
            finished_at=a.finished_at,
            error=a.error,
            tasks=[task_out(r) for r in results if r.attempt == a.number],
        )
        for a in job.attempts
    ]
    return JobDetail(
        **job_out(job).model_dump(),
        workflow=job.workflow,
        tasks=[task_out(r) for r in results if r.attempt == job.attempt],
        attempts=attempts,
        events=[
            EventOut(
                attempt=e.attempt,
                from_state=e.from_state,
                to_state=e.to_state,
                reason=e.reason,
                actor=e.actor,
                created_at=e.created_at,
            )
            for e in events
        ],
    )


@bp.post("")
@document(
    "Submit a workflow as a new job",
    body=JobSubmit,
    responses={201: JobSubmitted},
    errors={
        **ERR_WRITE,
        409: ("idempotency_conflict",),
        422: ("invalid_workflow", "unknown_project", "unknown_agent", "incompatible_platform", "unknown_secret"),
    },
    headers=("Idempotency-Key",),
)
@require(*WRITERS, action="submit jobs")
def submit() -> Response:
    """Submit a job."""
    key = idempotency_key(IDEMPOTENCY_KEY_MAX)
    job, created = submission.submit_job(caller=principal(), data=body(JobSubmit), idempotency_key=key)
    if created:
        dispatching.deliver(job)  # committed first; if this fails, the sweeper sends it
    headers = {"Location": f"/api/v1/jobs/{job.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return reply(submitted(job, None if created else key), 201, headers)


@bp.post("/batch")
@document(
    "Submit several jobs at once, all or none",
    body=JobBatchSubmit,
    responses={201: JobBatchOut},
    errors={
        **ERR_WRITE,
        409: ("idempotency_conflict",),
        422: ("invalid_workflow", "unknown_project", "unknown_agent", "incompatible_platform", "unknown_secret"),
    },
    headers=("Idempotency-Key",),
)
@require(*WRITERS, action="submit jobs")
def submit_batch() -> Response:
    """Submit a batch of jobs: one transaction, then each is published."""
    key = idempotency_key(BATCH_KEY_MAX)
    items = body(JobBatchSubmit).jobs
    charge_rate_limit(len(items) - 1)  # a batch counts as one request per job
    jobs, created = submission.submit_jobs(caller=principal(), items=items, idempotency_key=key)
    if created:
        dispatching.deliver_all(jobs)  # committed first; what is not sent here, the sweeper sends
    headers = {} if created else {"Idempotent-Replayed": "true"}
    return reply(JobBatchOut(jobs=[submitted(job, None if created else key) for job in jobs]), 201, headers)


def idempotency_key(longest: int) -> str | None:
    """The request's Idempotency-Key header, if any; 400 unless it has 1 to ``longest`` characters."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 0 < len(key) <= longest:
        raise BadRequest(f"Idempotency-Key must be 1 to {longest} characters")
    return key


@bp.get("")
@document("List jobs", query=JobListQuery, responses={200: JobList}, errors={**ERR_READ, 400: ("invalid_request",)})
@require(*READERS, action="list jobs")
def list_jobs() -> Response:
    """List jobs."""
    params = query(JobListQuery)
    jobs, total = service.list_jobs(caller=principal(), params=params)
    return reply(_job_list(jobs, total, params))


@bp.get("/<job_id>")
@document("Read a job with its attempts, task results and state changes", responses={200: JobDetail}, errors=ERR_READ)
@require(*READERS, *AGENT, action="read jobs")
def get_job(job_id: str) -> Response:
    """Read a job."""
    return reply(job_detail(service.get_job(caller=principal(), job_id=job_id)))


@bp.put("/<job_id>")
@document(
    "Change a job that has not started",
    body=JobUpdate,
    responses={200: JobOut},
    errors={
        **ERR_WRITE,
        409: ("invalid_transition", "concurrent_update"),
        422: ("invalid_workflow", "unknown_agent", "incompatible_platform"),
    },
)
@require(*WRITERS, action="change jobs")
def update_job(job_id: str) -> Response:
    """Change a job."""
    data = body(JobUpdate)
    return reply(job_out(service.update_job(caller=principal(), job_id=job_id, data=data)))


@bp.post("/<job_id>/requeue")
@document(
    "Requeue a dead-lettered job: a new attempt (audited)",
    body=RequeueRequest,
    responses={200: JobOut},
    errors={**ERR_WRITE, 409: ("invalid_transition", "concurrent_update")},
)
@require(*WRITERS, action="requeue jobs")
def requeue_job(job_id: str) -> Response:
    """Requeue a dead-lettered job."""
    job = service.requeue_job(caller=principal(), job_id=job_id, data=body(RequeueRequest, optional=True))
    return reply(job_out(job))


@bp.post("/<job_id>/cancel")
@document(
    "Cancel a job (202 while a running job is being stopped)",
    body=CancelRequest,
    responses={200: JobOut, 202: JobOut},
    errors={**ERR_WRITE, 409: ("invalid_transition", "concurrent_update")},
)
@require(*WRITERS, action="cancel jobs")
def cancel_job(job_id: str) -> Response:
    """Cancel a job."""
    data = body(CancelRequest, optional=True)
    job = service.cancel_job(caller=principal(), job_id=job_id, reason=data.reason)
    return reply(job_out(job), 202 if job.state == "running" else 200)


@bp.delete("/<job_id>")
@document("Delete a finished job", responses={204: None}, errors={**ERR_READ, 409: ("job_active",)})
@require(*WRITERS, action="delete jobs")
def delete_job(job_id: str) -> Response:
    """Delete a job."""
    service.delete_job(caller=principal(), job_id=job_id)
    return Response(status=204)


@bp.post("/<job_id>/claim")
@document(
    "Claim a queued job for the calling agent and take a lease (agents)",
    body=ClaimRequest,
    responses={200: ClaimOut},
    errors={
        **ERR_FENCED,
        409: (
            "stale_attempt",
            "invalid_transition",
            "job_cancelled",
            "concurrent_update",
            "agent_not_registered",
            "wrong_agent",
            "project_at_capacity",
        ),
    },
)
@require(*AGENT, action="claim jobs")
def claim(job_id: str) -> Response:
    """Claim a job."""
    data = body(ClaimRequest)
    caller = principal()
    charge_rate_limit(len(data.finished))  # each carried report counts as the request it saves
    job, attempt, secrets, finished = fencing.claim_carrying(
        caller=caller,
        job_id=job_id,
        attempt=data.attempt,
        task=data.task,
        reports=data.finished,
        claim_id=data.claim_id,
    )
    assert attempt.lease_expires_at is not None
    return reply(
        ClaimOut(
            job_id=job.id,
            attempt=attempt.number,
            state=job.state,
            lease_expires_at=attempt.lease_expires_at,
            lease_seconds=current_app.config["LEASE_SECONDS"],
            heartbeat_interval=current_app.config["HEARTBEAT_INTERVAL"],
            revision=job.revision,
            name=job.name,
            workflow=job.workflow,
            variables=job.variables,
            secrets=secrets,
            finished=finished,
        )
    )


@bp.post("/<job_id>/tasks")
@document(
    "Report one task's result of the current attempt (agents; 201 new, 200 repeated)",
    body=TaskReport,
    responses={201: TaskResultOut, 200: TaskResultOut},
    errors=ERR_FENCED,
)
@require(*AGENT, action="report task results")
def report_task(job_id: str) -> Response:
    """Report a task result."""
    data = body(TaskReport)
    result, created = fencing.report_task(caller=principal(), job_id=job_id, report=data)
    return reply(task_out(result), 201 if created else 200)


@bp.post("/<job_id>/status")
@document(
    "Report the current attempt's state (agents; 'running' renews the lease)",
    body=StatusReport,
    responses={200: JobOut},
    errors=ERR_FENCED,
)
@require(*AGENT, action="report job states")
def report_status(job_id: str) -> Response:
    """Report a job's state."""
    data = body(StatusReport)
    return reply(job_out(fencing.report_status(caller=principal(), job_id=job_id, report=data)))


dead_letters_bp = Blueprint("dead_letters", __name__, url_prefix="/api/v1/dead-letters")


@dead_letters_bp.get("")
@document(
    "List dead-lettered jobs, newest first, filterable by reason",
    query=DeadLetterQuery,
    responses={200: JobList},
    errors={**ERR_READ, 400: ("invalid_request",)},
)
@require(*READERS, action="list dead letters")
def list_dead_letters() -> Response:
    """List dead-lettered jobs."""
    params = query(DeadLetterQuery)
    jobs, total = service.list_dead_letters(caller=principal(), params=params)
    return reply(_job_list(jobs, total, params))
