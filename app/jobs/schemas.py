"""Request and response models of the jobs API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, Field, model_validator

import probe.results
from app.jobs.states import JobState
from app.logs.schemas import LogLineIn, numbered_within_range
from app.schemas import BIGGEST, Change, JsonObject, Moment, Page, Platform, Request, Response, Slug
from probe.workflow import NAME_LIMIT

MAX_BATCH_JOBS = 100  # jobs one POST /api/v1/jobs/batch may submit
MAX_TASKS_PER_REPORT = 16  # task results one final state report may carry
MAX_LOG_LINES_PER_REPORT = 1000  # log lines one state report may carry (more go to POST .../logs)
MAX_FINISHED_PER_CLAIM = 8  # final reports of other jobs one claim may carry

ERROR_BYTES = 16000  # of an error an agent reports: the rest is cut, never refused (the report would be lost)


def _cut(error: str) -> str:
    return probe.results.truncate(error, ERROR_BYTES)


ReportedError = Annotated[str, AfterValidator(_cut)]  # a TEXT column holds 65535 bytes

TaskStatus = Literal["succeeded", "failed", "error", "timed_out", "skipped", "cancelled"]
ReportedState = Literal["running", "completed", "failed", "timed_out", "cancelled"]
FinalState = Literal["completed", "failed", "timed_out", "cancelled"]


class JobSubmit(Request):
    """``POST /api/v1/jobs``."""

    workflow: str = Field(min_length=1)
    project_id: Slug | None = None
    tenant_id: str | None = None
    agent_id: Slug | None = None
    variables: JsonObject = Field(default_factory=dict)
    priority: int = Field(5, ge=0, le=9)
    platform: Platform | None = None
    scheduled_at: Moment | None = None
    deliver_by: Moment | None = None
    max_attempts: int | None = Field(None, ge=1, le=20)
    retry_backoff: float | None = Field(None, ge=0, le=86400)

    @model_validator(mode="after")
    def _deliver_after_schedule(self) -> JobSubmit:
        if self.deliver_by is not None and self.scheduled_at is not None and self.deliver_by <= self.scheduled_at:
            raise ValueError("deliver_by must be later than scheduled_at")
        return self


class JobBatchSubmit(Request):
    """``POST /api/v1/jobs/batch``: several jobs at once, each as ``POST /api/v1/jobs`` takes it."""

    jobs: list[JobSubmit] = Field(min_length=1, max_length=MAX_BATCH_JOBS)


class JobUpdate(Change):
    """``PUT /api/v1/jobs/{id}``: the fields to change (only while the job has not started); ``agent_id: null``
    unpins, ``platform: null`` lets the workflow choose, ``deliver_by: null`` drops the deadline."""

    NULLABLE = frozenset({"agent_id", "platform", "deliver_by"})

    workflow: str | None = Field(None, min_length=1)
    agent_id: Slug | None = None
    variables: JsonObject | None = None
    priority: int | None = Field(None, ge=0, le=9)
    platform: Platform | None = None
    scheduled_at: Moment | None = None
    deliver_by: Moment | None = None
    max_attempts: int | None = Field(None, ge=1, le=20)
    retry_backoff: float | None = Field(None, ge=0, le=86400)


class JobListQuery(Page):
    """``GET /api/v1/jobs`` filters."""

    tenant_id: Slug | None = None
    project_id: Slug | None = None
    state: JobState | None = None
    agent_id: Slug | None = None  # the agent jobs are pinned to
    ran_on: Slug | None = None  # the agent that claimed a job's current attempt
    id_prefix: str | None = Field(None, min_length=4, max_length=36, pattern=r"^[0-9a-f-]+$")


DeadLetterReason = Literal["expired", "refused", "poison", "lost", "no_agent"]


class DeadLetterQuery(Page):
    """``GET /api/v1/dead-letters`` filters."""

    tenant_id: Slug | None = None
    project_id: Slug | None = None
    reason: DeadLetterReason | None = None
    ran_on: Slug | None = None  # the agent that claimed a job's last attempt


class RequeueRequest(Request):
    """``POST /api/v1/jobs/{id}/requeue``: optionally a new delivery deadline, and another agent to pin the job to
    (``null``: any agent of its project), as a dead letter's pinned agent may be gone (``no_agent``)."""

    deliver_by: Moment | None = None
    agent_id: Slug | None = None


class CancelRequest(Request):
    """``POST /api/v1/jobs/{id}/cancel`` (the body is optional)."""

    reason: str | None = Field(None, max_length=500)


class TaskResultIn(Request):
    """One task's result, as an agent reports it."""

    name: str = Field(min_length=1, max_length=NAME_LIMIT)
    type: str = Field(min_length=1, max_length=64)
    status: TaskStatus
    position: int = Field(0, ge=0, le=BIGGEST)
    output: str = ""
    error: ReportedError | None = None
    metrics: JsonObject = Field(default_factory=dict)
    started_at: Moment | None = None
    finished_at: Moment | None = None


class TaskReport(TaskResultIn):
    """``POST /api/v1/jobs/{id}/tasks``: one task's result, and the task that started after it."""

    attempt: int = Field(ge=1, le=BIGGEST)
    next_task: str | None = Field(None, min_length=1, max_length=NAME_LIMIT, description="the task that started next")


class StatusReport(Request):
    """``POST /api/v1/jobs/{id}/status``: the attempt's state (``running`` renews the lease).

    A final state may carry the results of the tasks not reported yet (the last one, typically) and the log
    lines not shipped yet, so a short job needs no request of its own per task or for its log.
    """

    attempt: int = Field(ge=1, le=BIGGEST)
    state: ReportedState
    error: ReportedError | None = None
    tasks: list[TaskResultIn] = Field(default_factory=list, max_length=MAX_TASKS_PER_REPORT)
    logs: list[LogLineIn] = Field(default_factory=list, max_length=MAX_LOG_LINES_PER_REPORT)
    logs_first_line: int | None = Field(
        None, ge=1, le=BIGGEST
    )  # the number of the first of ``logs`` within the attempt

    @model_validator(mode="after")
    def _numbered_within_range(self) -> Self:
        numbered_within_range(self.logs_first_line, self.logs)
        return self


class FinishedReport(StatusReport):
    """The final state of another job of the calling agent, carried by a claim (as ``POST .../status`` takes it)."""

    job_id: str = Field(min_length=1, max_length=64)
    state: FinalState  # narrower than a status report's: no "running"


class ClaimRequest(Request):
    """``POST /api/v1/jobs/{id}/claim``: the attempt named in the agent's message, the task it starts first, and
    the final states of jobs of this agent that ended meanwhile (recorded first, whatever the claim's outcome)."""

    attempt: int = Field(ge=1, le=BIGGEST)
    task: str | None = Field(None, min_length=1, max_length=NAME_LIMIT, description="the first task, about to start")
    finished: list[FinishedReport] = Field(default_factory=list, max_length=MAX_FINISHED_PER_CLAIM)
    claim_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]{16,64}$",
        description="the agent's name for this claim, the same in each try: a try made after the claim was granted "
        "(its answer lost on the way) is answered as a claim again",
    )


class TaskResultOut(Response):
    """One task's result."""

    attempt: int
    position: int
    name: str
    type: str
    status: str
    output: str
    error: str | None
    metrics: dict[str, Any]
    started_at: datetime | None
    finished_at: datetime | None


class AttemptOut(Response):
    """One delivery of the job."""

    number: int
    state: str
    agent_id: str | None
    queued_at: datetime
    claimed_at: datetime | None
    lease_expires_at: datetime | None
    deadline_at: datetime | None  # the claim + the workflow's timeout + a lease: timed out if still running then
    finished_at: datetime | None
    error: str | None
    tasks: list[TaskResultOut]


class EventOut(Response):
    """One state change."""

    attempt: int
    from_state: str | None
    to_state: str
    reason: str | None
    actor: str | None
    created_at: datetime


class JobOut(Response):
    """A job as lists and writes return it."""

    job_id: str
    tenant_id: str
    project_id: str
    name: str
    state: str
    attempt: int
    max_attempts: int
    retry_backoff: float
    dead_letter_reason: str | None = None
    revision: int
    priority: int
    agent_id: str | None
    platform: str
    variables: dict[str, Any]
    cancel_requested: bool
    scheduled_at: datetime
    deliver_by: datetime | None
    created_at: datetime
    updated_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    created_by: str | None
    schedule_id: str | None = None  # the schedule that fired it


class JobSubmitted(JobOut):
    """A job as its submission returns it, with what the submitter should know (e.g. no agent to run it is online)."""

    warnings: list[str]


class JobDetail(JobOut):
    """A job with its workflow, the current attempt's task results, every attempt and every state change."""

    workflow: str
    tasks: list[TaskResultOut]
    attempts: list[AttemptOut]
    events: list[EventOut]


class JobBatchOut(Response):
    """The jobs of a batch, in the order they were submitted."""

    jobs: list[JobSubmitted]


class JobListItem(JobOut):
    """A job as the list shows it: also the agent its current attempt was claimed by (None until it is claimed)."""

    ran_on: str | None


class JobList(Response):
    """A page of jobs, newest first."""

    jobs: list[JobListItem]
    total: int
    limit: int
    offset: int


class FinishedOut(Response):
    """What became of one final report carried by a claim: ``status`` as ``POST .../status`` would have answered."""

    job_id: str
    attempt: int
    status: int
    state: str | None = None  # the job's state once recorded (status 200)
    error: str | None = None  # the error code otherwise
    message: str | None = None


class ClaimOut(Response):
    """What a successful claim hands the agent: the lease and the job's current workflow."""

    job_id: str
    attempt: int
    state: str
    lease_expires_at: datetime
    lease_seconds: int
    heartbeat_interval: int
    revision: int
    name: str
    workflow: str
    variables: dict[str, Any]
    secrets: dict[str, str]
    finished: list[FinishedOut] = Field(default_factory=list)  # in the order of the request's ``finished``
