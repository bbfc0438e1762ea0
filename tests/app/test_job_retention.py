"""Job history stays bounded when the operator asks: finished jobs past ``JOB_RETENTION_DAYS`` are deleted with
everything that belongs to them; jobs that have not finished never are."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select, update

from app.audit.models import AuditEvent
from app.columns import utcnow
from app.extensions import db
from app.jobs import retention
from app.jobs.models import Job, JobAttempt, JobEvent, TaskResult
from app.logs.models import JobLogLine
from dispatch.celery import PRUNE_INTERVAL, PRUNE_JOBS_TASK, make_celery
from dispatch.contract import CONTROL_QUEUE
from tests.app.support import WORKFLOW, Api, MakeApp, Tenant

DAY = timedelta(days=1)


@pytest.fixture(name="keeping")
def keeping_app(make_app: MakeApp) -> Flask:
    """The control plane with a retention of 30 days."""
    return make_app(JOB_RETENTION_DAYS=30)


def submitted(api: Api, tenant: Tenant, count: int) -> list[str]:
    operator = tenant.tokens["operator"]
    return [api.post("/api/v1/jobs", operator, json={"workflow": WORKFLOW}).json["job_id"] for _ in range(count)]


def age(app: Flask, job_ids: list[str], days: float, state: str | None = "completed") -> None:
    """Make the jobs look as if they finished (or, with state None, were created) ``days`` ago."""
    when = utcnow() - timedelta(days=days)
    values: dict[str, Any] = {"created_at": when, "updated_at": when}
    if state is not None:
        values.update(state=state, finished_at=when)
    with app.app_context():
        db.session.execute(update(Job).where(Job.id.in_(job_ids)).values(**values))
        db.session.commit()


def count(app: Flask, model: Any, *where: Any) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def prune(app: Flask) -> int:
    with app.app_context():
        return retention.prune_jobs()


def test_finished_jobs_past_the_retention_go_with_everything_that_belongs_to_them(
    api: Api, keeping: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "LINES_BATCH", 2)  # its log lines go over several transactions
    acme = world["acme"]
    old = [acme.completed]  # claimed and reported: it has an attempt, results and state changes
    age(keeping, old, 40)
    with keeping.app_context():
        db.session.add_all(
            [
                JobLogLine(
                    job_id=acme.completed,
                    tenant_id="acme",
                    project_id="web",
                    attempt=1,
                    seq=n,
                    ts=utcnow(),
                    level="info",
                    message=f"line {n}",
                )
                for n in range(1, 6)
            ]
        )
        db.session.commit()
    assert count(keeping, JobAttempt, JobAttempt.job_id == acme.completed) == 1
    assert count(keeping, JobEvent, JobEvent.job_id == acme.completed) > 0
    recent = submitted(api, acme, 2)
    age(keeping, recent, 29)
    assert prune(keeping) == 1
    assert api.get(f"/api/v1/jobs/{acme.completed}", acme.tokens["viewer"]).status_code == 404
    assert count(keeping, JobLogLine, JobLogLine.job_id == acme.completed) == 0
    for model in (JobAttempt, JobEvent, TaskResult):
        assert count(keeping, model, model.job_id == acme.completed) == 0, model
    assert all(api.get(f"/api/v1/jobs/{j}", acme.tokens["viewer"]).status_code == 200 for j in recent)
    assert prune(keeping) == 0


@pytest.mark.parametrize("state", ["failed", "timed_out", "cancelled"])
def test_every_final_state_is_pruned(api: Api, keeping: Flask, world: dict[str, Tenant], state: str) -> None:
    [job_id] = submitted(api, world["acme"], 1)
    age(keeping, [job_id], 31, state)
    assert prune(keeping) == 1 and count(keeping, Job, Job.id == job_id) == 0


def test_dead_lettered_jobs_wait_for_a_person_however_old(api: Api, keeping: Flask, world: dict[str, Tenant]) -> None:
    [job_id] = submitted(api, world["acme"], 1)
    age(keeping, [job_id], 400, "dead_letter")
    assert prune(keeping) == 0 and count(keeping, Job, Job.id == job_id) == 1


def test_jobs_that_have_not_finished_are_kept_however_old(api: Api, keeping: Flask, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    active = [acme.pending, acme.queued, acme.running]
    age(keeping, active, 400, state=None)
    with keeping.app_context():  # even with an end time (which they never have): the state decides
        db.session.execute(update(Job).where(Job.id.in_(active)).values(finished_at=utcnow() - 400 * DAY))
        db.session.commit()
    assert prune(keeping) == 0
    assert count(keeping, Job, Job.id.in_(active)) == 3


def test_each_tenant_is_told_in_its_audit_log(api: Api, keeping: Flask, world: dict[str, Tenant]) -> None:
    acme, globex = submitted(api, world["acme"], 3), submitted(api, world["globex"], 1)
    age(keeping, acme + globex, 45)
    assert prune(keeping) == 4
    with keeping.app_context():
        records = db.session.scalars(select(AuditEvent).where(AuditEvent.action == "job.pruned")).all()
        told = {r.tenant_id: r.details for r in records}
    assert told["acme"]["jobs"] == 3 and told["globex"]["jobs"] == 1
    assert told["acme"]["retention_days"] == 30 and told["acme"]["finished_before"].endswith("Z")
    events = api.get("/api/v1/audit?action=job.pruned", world["globex"].tokens["tenant_admin"]).json["events"]
    assert [e["details"]["jobs"] for e in events] == [1]  # globex sees its own record only


def test_a_large_backlog_is_deleted_over_several_passes(
    api: Api, keeping: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "MAX_PER_PASS", 10)
    monkeypatch.setattr(retention, "DELETE_BATCH", 4)
    jobs = submitted(api, world["acme"], 16)
    for days, job_id in enumerate(jobs, start=60):  # the last submitted finished longest ago
        age(keeping, [job_id], days)
    assert prune(keeping) == 10
    assert count(keeping, Job, Job.id.in_(jobs)) == 6 and count(keeping, Job, Job.id.in_(jobs[:6])) == 6
    assert [prune(keeping), prune(keeping)] == [6, 0]
    assert count(keeping, Job, Job.id.in_(jobs)) == 0


def test_a_job_requeued_after_it_was_chosen_is_kept_and_not_counted(
    api: Api, keeping: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    old, requeued = submitted(api, world["acme"], 2)
    age(keeping, [old, requeued], 50)
    chosen = retention._expired

    def then_requeued(state: str, cutoff: Any, limit: int) -> list[Any]:
        rows = chosen(state, cutoff, limit)
        age(keeping, [requeued], 0, state=None)  # requeued (pending again) right after being chosen
        with keeping.app_context():
            db.session.execute(update(Job).where(Job.id == requeued).values(state="pending", finished_at=None))
            db.session.commit()
        return rows

    monkeypatch.setattr(retention, "_expired", then_requeued)
    assert prune(keeping) == 1
    assert count(keeping, Job, Job.id == requeued) == 1 and count(keeping, Job, Job.id == old) == 0
    with keeping.app_context():
        [record] = db.session.scalars(select(AuditEvent).where(AuditEvent.action == "job.pruned")).all()
    assert record.details["jobs"] == 1


def test_by_default_every_job_is_kept(api: Api, app: Flask, world: dict[str, Tenant]) -> None:
    assert app.config["JOB_RETENTION_DAYS"] == 0
    jobs = submitted(api, world["acme"], 2)
    age(app, jobs, 4000)
    assert prune(app) == 0 and count(app, Job, Job.id.in_(jobs)) == 2


def test_the_beat_schedule_prunes_jobs_hourly_on_the_control_queue() -> None:
    import app.jobs.tasks  # noqa: F401 - registers the control plane's tasks

    control = make_celery("redis://127.0.0.1:1/0")
    [entry] = [e for e in control.conf.beat_schedule.values() if e["task"] == PRUNE_JOBS_TASK]
    assert entry["schedule"] == PRUNE_INTERVAL
    assert entry["options"] == {"queue": CONTROL_QUEUE, "expires": PRUNE_INTERVAL}
    assert PRUNE_JOBS_TASK in control.tasks
