"""Schedule run history stays bounded: runs past the retention are deleted, each schedule's latest ones and
fired runs still waiting for their job are kept."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from app.columns import utcnow
from app.extensions import db
from app.schedules import retention
from app.schedules.models import Schedule, ScheduleRun
from app.schedules.service import RECENT_RUNS
from dispatch.celery import PRUNE_INTERVAL, PRUNE_SCHEDULE_RUNS_TASK, make_celery
from dispatch.contract import CONTROL_QUEUE
from tests.app.support import Api, MakeApp, Tenant
from tests.app.test_schedules import created, runs

DAY = timedelta(days=1)


def add_runs(app: Flask, schedule_id: str, ages: list[timedelta], **fields: Any) -> None:
    """Record runs of a schedule that fired ``ages`` ago (fired with a job, unless ``fields`` say otherwise)."""
    now = utcnow()
    with app.app_context():
        for age in ages:
            values = {"state": "fired", "job_id": f"job-{age.total_seconds():.0f}", **fields}
            db.session.add(ScheduleRun(schedule_id=schedule_id, scheduled_for=now - age, **values))
        db.session.commit()


def prune(app: Flask, **kwargs: Any) -> int:
    with app.app_context():
        return retention.prune_runs(**kwargs)


def test_runs_past_the_retention_are_deleted_and_recent_ones_kept(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    schedule_id = created(api, world["acme"], cron="* * * * *").schedule_id
    recent = [timedelta(hours=h) for h in range(1, RECENT_RUNS + 6)]  # within 30 days: all kept
    old = [timedelta(days=31, minutes=m) for m in range(40)]
    add_runs(app, schedule_id, recent + old)
    assert prune(app) == 40
    left = runs(app, schedule_id)
    assert len(left) == len(recent) and all(utcnow() - r.scheduled_for < 2 * DAY for r in left)
    assert prune(app) == 0


def test_each_schedule_keeps_its_latest_runs_however_old(api: Api, app: Flask, world: dict[str, Tenant]) -> None:
    monthly = created(api, world["acme"], cron="0 3 1 * *").schedule_id
    add_runs(app, monthly, [timedelta(days=30 * n + 1) for n in range(1, RECENT_RUNS + 6)])
    assert prune(app) == 5
    left = runs(app, monthly)
    assert len(left) == RECENT_RUNS
    assert min(utcnow() - r.scheduled_for for r in left) < timedelta(days=32)  # the newest are the ones kept


def test_a_fired_run_still_waiting_for_its_job_is_never_deleted(api: Api, app: Flask, world: dict[str, Tenant]) -> None:
    schedule_id = created(api, world["acme"], cron="* * * * *").schedule_id
    add_runs(app, schedule_id, [timedelta(days=40)], job_id=None)
    add_runs(app, schedule_id, [timedelta(days=40, minutes=1)], state="missed", job_id=None, reason="missed")
    add_runs(app, schedule_id, [timedelta(minutes=m) for m in range(1, RECENT_RUNS + 1)])
    assert prune(app) == 1
    [stranded] = [r for r in runs(app, schedule_id) if r.scheduled_for < utcnow() - 30 * DAY]
    assert stranded.state == "fired" and stranded.job_id is None


def test_a_large_backlog_is_deleted_over_several_passes(
    api: Api, app: Flask, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "MAX_PER_PASS", 30)
    monkeypatch.setattr(retention, "DELETE_BATCH", 7)
    first = created(api, world["acme"], cron="* * * * *").schedule_id
    second = created(api, world["acme"], cron="*/5 * * * *").schedule_id
    for schedule_id in (first, second):
        add_runs(app, schedule_id, [timedelta(days=60, minutes=m) for m in range(RECENT_RUNS + 25)])
    assert [prune(app), prune(app), prune(app)] == [30, 20, 0]
    assert len(runs(app, first)) == len(runs(app, second)) == RECENT_RUNS


def test_a_retention_of_zero_keeps_everything(api: Api, make_app: MakeApp, world: dict[str, Tenant]) -> None:
    keeping = make_app(SCHEDULE_RUN_RETENTION_DAYS=0)
    schedule_id = created(api, world["acme"], cron="* * * * *").schedule_id
    add_runs(keeping, schedule_id, [timedelta(days=400, minutes=m) for m in range(RECENT_RUNS + 3)])
    assert prune(keeping) == 0
    with keeping.app_context():
        assert db.session.scalar(select(func.count()).select_from(ScheduleRun)) == RECENT_RUNS + 3


def test_deleting_a_schedule_deletes_its_runs(api: Api, app: Flask, world: dict[str, Tenant]) -> None:
    schedule_id = created(api, world["acme"], cron="* * * * *").schedule_id
    add_runs(app, schedule_id, [timedelta(minutes=1)])
    assert api.delete(f"/api/v1/schedules/{schedule_id}", world["acme"].tokens["operator"]).status_code == 204
    with app.app_context():
        assert db.session.get(Schedule, schedule_id) is None
    assert runs(app, schedule_id) == []


def test_the_beat_schedule_prunes_hourly_on_the_control_queue() -> None:
    import app.jobs.tasks  # noqa: F401 - registers the control plane's tasks

    control = make_celery("redis://127.0.0.1:1/0")
    [entry] = [e for e in control.conf.beat_schedule.values() if e["task"] == PRUNE_SCHEDULE_RUNS_TASK]
    assert entry["schedule"] == PRUNE_INTERVAL == 3600.0
    assert entry["options"] == {"queue": CONTROL_QUEUE, "expires": PRUNE_INTERVAL}
    assert PRUNE_SCHEDULE_RUNS_TASK in control.tasks
