"""Firing schedules: one ordinary job per fire time, exactly once even with concurrent schedulers; overlap,
missed runs after downtime, refused jobs and runs stranded by a crash."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select, update

from app.agents import service as agents
from app.auth.tokens import Principal
from app.columns import utcnow
from app.extensions import db
from app.jobs import service as jobs
from app.jobs.models import Job
from app.schedules import cron, firing
from app.schedules.models import Schedule, ScheduleRun
from dispatch.celery import FIRE_SCHEDULES_TASK, make_celery
from dispatch.contract import CONTROL_QUEUE
from tests.app.support import WORKFLOW, Api, MakeApp, Tenant
from tests.app.test_schedules import created, fire, runs

SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)


def first_run(api: Api, tenant: Tenant, **fields: Any) -> tuple[str, datetime]:
    """Create a schedule (every minute unless ``cron`` is given); return its id and first fire time."""
    schedule = created(api, tenant, **{"cron": "* * * * *", **fields})
    assert schedule.next_run_at is not None
    return schedule.schedule_id, schedule.next_run_at


def schedule_jobs(app: Flask, schedule_id: str) -> list[Job]:
    with app.app_context():
        return list(db.session.scalars(select(Job).where(Job.schedule_id == schedule_id).order_by(Job.created_at)))


def complete(api: Api, app: Flask, tenant: Tenant, job_id: str) -> None:
    """Publish the job, claim it as the tenant's agent and report it completed."""
    with app.app_context():
        jobs.publish_job(job_id=job_id)
    agent = tenant.tokens["agent"]
    assert api.post(f"/api/v1/jobs/{job_id}/claim", agent, json={"attempt": 1}).status_code == 200
    assert (
        api.post(f"/api/v1/jobs/{job_id}/status", agent, json={"attempt": 1, "state": "completed"}).status_code == 200
    )


def test_a_due_schedule_fires_an_ordinary_job_linked_to_its_schedule(
    api: Api, app: Flask, world: dict[str, Tenant], caplog: pytest.LogCaptureFixture
) -> None:
    schedule_id, first = first_run(api, world["acme"], variables={"HOST": "web1"}, priority=7, agent_id="a1")
    assert fire(app, first - SECOND) == 0 and runs(app, schedule_id) == []
    with caplog.at_level("INFO", "app.schedules.firing"):
        assert fire(app, first + SECOND) == 1
    [job] = schedule_jobs(app, schedule_id)
    [fired] = [r for r in caplog.records if r.getMessage().startswith(f"schedule {schedule_id} fired")]
    assert (fired.job_id, fired.tenant_id) == (job.id, "acme")  # type: ignore[attr-defined]  # the job it made
    [run] = runs(app, schedule_id)
    assert (run.scheduled_for, run.state, run.job_id, run.reason) == (first, "fired", job.id, None)
    assert job.workflow == WORKFLOW and job.variables == {"HOST": "web1"} and job.priority == 7
    assert job.agent_id == "a1" and job.project_id == "web" and job.state == "pending"
    assert job.created_by == f"schedule:{schedule_id}" and job.idempotency_key == firing.idempotency_key(
        schedule_id, first
    )
    listed = api.get("/api/v1/jobs", world["acme"].tokens["viewer"]).json["jobs"]
    assert {j["job_id"]: j["schedule_id"] for j in listed}[job.id] == schedule_id
    assert api.get(f"/api/v1/jobs/{job.id}", world["acme"].tokens["viewer"]).json["schedule_id"] == schedule_id
    audit = api.get("/api/v1/audit?action=job.submitted&limit=100", world["acme"].tokens["tenant_admin"]).json
    assert any(e["target_id"] == job.id and e["actor"] == f"schedule:{schedule_id}" for e in audit["events"])


def test_firing_twice_for_the_same_instant_makes_one_job(api: Api, app: Flask, world: dict[str, Tenant]) -> None:
    schedule_id, first = first_run(api, world["acme"])
    assert fire(app, first + SECOND) == 1
    assert fire(app, first + SECOND) == 0
    assert fire(app, first + 2 * SECOND) == 0
    assert len(runs(app, schedule_id)) == 1 and len(schedule_jobs(app, schedule_id)) == 1


def test_a_fire_time_recorded_once_is_never_fired_again_even_if_next_run_at_is_rewound(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    schedule_id, first = first_run(api, world["acme"])
    assert fire(app, first + SECOND) == 1
    with app.app_context():  # a stale writer puts the fire time back: only the unique run row stands in the way
        db.session.execute(update(Schedule).where(Schedule.id == schedule_id).values(next_run_at=first))
        db.session.commit()
    assert fire(app, first + 2 * SECOND) == 0
    assert len(runs(app, schedule_id)) == 1 and len(schedule_jobs(app, schedule_id)) == 1


def test_concurrent_schedulers_fire_every_run_exactly_once(
    api: Api, app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(firing, "CLAIM_GRACE", 86400.0)  # the runs are in the future: no "stranded" repairs
    schedule_id, first = first_run(api, world["acme"], overlap="allow")
    other_id, _ = first_run(api, world["acme"], overlap="allow")
    schedulers, times = 6, [first + n * MINUTE + SECOND for n in range(4)]
    barrier = threading.Barrier(schedulers)
    errors: list[BaseException] = []

    def scheduler() -> None:
        try:
            for now in times:
                barrier.wait(timeout=30)
                fire(app, now)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=scheduler) for _ in range(schedulers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    for sid in (schedule_id, other_id):
        recorded = runs(app, sid)
        assert [r.scheduled_for for r in recorded] == [first + n * MINUTE for n in range(4)]
        assert {r.state for r in recorded} == {"fired"}
        made = schedule_jobs(app, sid)
        assert len(made) == 4 and sorted(r.job_id or "" for r in recorded) == sorted(j.id for j in made)
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Job).where(Job.schedule_id.is_not(None))) == 8


def test_with_overlap_skip_a_run_is_skipped_while_the_previous_job_is_active(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    schedule_id, first = first_run(api, acme, overlap="skip")
    fire(app, first + SECOND)
    [job] = schedule_jobs(app, schedule_id)
    assert fire(app, first + MINUTE + SECOND) == 0
    skipped = runs(app, schedule_id)[1]
    assert skipped.state == "skipped" and skipped.job_id is None
    assert skipped.reason == f"skipped: the previous run (job {job.id}) is still pending"
    complete(api, app, acme, job.id)
    assert fire(app, first + 2 * MINUTE + SECOND) == 1
    assert [r.state for r in runs(app, schedule_id)] == ["fired", "skipped", "fired"]


def test_with_overlap_allow_a_run_fires_while_the_previous_job_is_active(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    schedule_id, first = first_run(api, world["acme"], overlap="allow")
    fire(app, first + SECOND)
    assert fire(app, first + MINUTE + SECOND) == 1
    assert [j.state for j in schedule_jobs(app, schedule_id)] == ["pending", "pending"]


def test_after_downtime_earlier_runs_are_missed_and_only_the_latest_fires(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    schedule_id, first = first_run(api, world["acme"])
    assert fire(app, first + 5 * MINUTE + 10 * SECOND) == 1
    recorded = runs(app, schedule_id)
    assert [r.scheduled_for for r in recorded] == [first + n * MINUTE for n in range(6)]
    assert [r.state for r in recorded] == ["missed"] * 5 + ["fired"]
    assert all(r.job_id is None and r.reason and r.reason.startswith("missed: ") for r in recorded[:5])
    assert len(schedule_jobs(app, schedule_id)) == 1
    detail = api.get(f"/api/v1/schedules/{schedule_id}", world["acme"].tokens["viewer"]).json
    assert detail["next_run_at"] == (first + 6 * MINUTE).isoformat().replace("+00:00", "Z")


def test_a_run_later_than_the_misfire_grace_is_missed_and_not_fired_late(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    schedule_id, first = first_run(api, world["acme"], cron="0 * * * *")
    assert fire(app, first + 5 * MINUTE) == 0
    [run] = runs(app, schedule_id)
    assert run.state == "missed" and run.reason == (
        "missed: the scheduler ran 300s after this time, later than the misfire grace of 60s"
    )
    assert schedule_jobs(app, schedule_id) == []
    assert fire(app, first + 60 * MINUTE + 30 * SECOND) == 1  # the next one is on time again


def test_the_misfire_grace_is_configurable(make_app: MakeApp, world: dict[str, Tenant]) -> None:
    app = make_app(SCHEDULE_MISFIRE_GRACE=5.0)
    schedule_id, first = first_run(Api(app.test_client()), world["acme"])
    assert fire(app, first + 20 * SECOND) == 0
    assert [r.state for r in runs(app, schedule_id)] == ["missed"]


def test_a_long_outage_records_the_first_and_the_latest_missed_runs(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    schedule_id, first = first_run(api, world["acme"])
    assert fire(app, first + timedelta(days=2, seconds=5)) == 1
    recorded = runs(app, schedule_id)
    assert len(recorded) == 1 + cron.MISSED_RECORDED + 1
    assert recorded[0].scheduled_for == first and recorded[1].scheduled_for == first + timedelta(days=2) - 100 * MINUTE
    assert recorded[0].reason and "only the latest 100 are recorded one by one" in recorded[0].reason
    assert [r.state for r in recorded[-2:]] == ["missed", "fired"]


def test_a_paused_schedule_does_not_fire(api: Api, app: Flask, world: dict[str, Tenant]) -> None:
    schedule_id, first = first_run(api, world["acme"])
    api.put(f"/api/v1/schedules/{schedule_id}", world["acme"].tokens["operator"], json={"paused": True})
    assert fire(app, first + SECOND) == 0 and runs(app, schedule_id) == []


def test_a_run_whose_job_is_refused_is_recorded_as_skipped_with_the_reason(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    schedule_id, first = first_run(api, world["acme"], agent_id="a1")
    with app.test_request_context():
        admin = Principal(subject="admin@acme", tenant_id="acme", role="tenant_admin")
        agents.delete_agent(caller=admin, agent_id="a1")
    assert fire(app, first + SECOND) == 0
    [run] = runs(app, schedule_id)
    assert run.state == "skipped" and run.job_id is None
    assert run.reason == "skipped: the job was refused: agent 'a1' is not registered in project 'web'"


def test_a_fired_run_left_without_a_job_is_completed_by_the_next_pass(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    schedule_id, _ = first_run(api, world["acme"], cron="0 0 1 1 *")  # not due again for months
    moment = utcnow().replace(microsecond=0) - MINUTE
    with app.app_context():  # a scheduler that crashed between recording the run and submitting its job
        db.session.add(ScheduleRun(schedule_id=schedule_id, scheduled_for=moment, state="fired"))
        db.session.commit()
    assert fire(app, utcnow()) == 0  # within CLAIM_GRACE: its scheduler may still be at work
    assert schedule_jobs(app, schedule_id) == []
    with app.app_context():
        db.session.execute(update(ScheduleRun).values(created_at=utcnow() - MINUTE))
        db.session.commit()
    assert fire(app, utcnow()) == 1
    assert fire(app, utcnow()) == 0
    [run] = runs(app, schedule_id)
    [job] = schedule_jobs(app, schedule_id)
    assert run.state == "fired" and run.job_id == job.id
    assert job.idempotency_key == firing.idempotency_key(schedule_id, moment)


def test_the_beat_schedule_sends_the_firing_task_to_the_control_queue() -> None:
    entries = make_celery("redis://127.0.0.1:1/0", sweeper_interval=2.0).conf.beat_schedule
    [entry] = [e for e in entries.values() if e["task"] == FIRE_SCHEDULES_TASK]
    assert entry["schedule"] == 2.0 and entry["options"] == {"queue": CONTROL_QUEUE, "expires": 10.0}


def test_a_time_skipped_when_clocks_go_forward_fires_at_the_first_valid_minute_after_it() -> None:
    before = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)  # Berlin skips 02:00-03:00 on 29 March 2026
    first = cron.next_after("30 2 * * *", "Europe/Berlin", before)
    assert first == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # 03:00 CEST
    assert cron.next_after("30 2 * * *", "Europe/Berlin", first) == datetime(2026, 3, 30, 0, 30, tzinfo=UTC)


def test_a_time_in_the_hour_repeated_when_clocks_go_back_fires_at_both_occurrences() -> None:
    before = datetime(2026, 11, 1, 0, 0, tzinfo=UTC)  # New York repeats 01:00-02:00 on 1 November 2026
    first = cron.next_after("30 1 * * *", "America/New_York", before)
    second = cron.next_after("30 1 * * *", "America/New_York", first)
    assert (first, second) == (datetime(2026, 11, 1, 5, 30, tzinfo=UTC), datetime(2026, 11, 1, 6, 30, tzinfo=UTC))
