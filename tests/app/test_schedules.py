"""Contract tests of the schedules endpoints: validation, reading, changing, pausing, roles and tenants."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from flask import Flask
from werkzeug.test import TestResponse

from app.extensions import db
from app.jobs.models import Job
from app.schedules import firing, service
from app.schedules.models import ScheduleRun
from app.schedules.schemas import ScheduleDetail, ScheduleList, ScheduleOut
from tests.app.support import BAD_WORKFLOW, POWERSHELL, ROLES, WORKFLOW, Api, MakeApp, Tenant

PATH = "/api/v1/schedules"


def create(api: Api, tenant: Tenant, role: str = "operator", **fields: Any) -> TestResponse:
    """POST a schedule (every five minutes unless ``cron`` is given)."""
    return api.post(PATH, tenant.tokens[role], json={"cron": "*/5 * * * *", "workflow": WORKFLOW, **fields})


def created(api: Api, tenant: Tenant, role: str = "operator", **fields: Any) -> ScheduleOut:
    """Create a schedule, asserting 201."""
    response = create(api, tenant, role, **fields)
    assert response.status_code == 201, response.json
    return ScheduleOut.model_validate(response.json)


def fire(app: Flask, now: datetime) -> int:
    """Run one pass of the scheduler at ``now``."""
    with app.app_context():
        return firing.fire_due(now=now)


def runs(app: Flask, schedule_id: str) -> list[ScheduleRun]:
    """The schedule's recorded fire times, oldest first."""
    with app.app_context():
        query = db.session.query(ScheduleRun).filter_by(schedule_id=schedule_id).order_by(ScheduleRun.scheduled_for)
        return list(query)


def test_a_schedule_is_created_with_its_first_run_in_its_timezone(api: Api, world: dict[str, Tenant]) -> None:
    before = datetime.now(UTC)
    response = create(api, world["acme"], cron="30 2 * * *", timezone="Europe/Berlin", variables={"N": 1})
    assert response.status_code == 201, response.json
    schedule = ScheduleOut.model_validate(response.json)
    assert response.headers["Location"] == f"{PATH}/{schedule.schedule_id}"
    assert schedule.name == "three-steps" and schedule.platform == "linux" and schedule.project_id == "web"
    assert schedule.overlap == "skip" and not schedule.paused and schedule.revision == 1
    assert schedule.variables == {"N": 1} and schedule.created_by == "operator@acme"
    assert schedule.next_run_at is not None and before < schedule.next_run_at <= before + timedelta(days=1)
    local = schedule.next_run_at.astimezone(ZoneInfo("Europe/Berlin"))
    assert (local.hour, local.minute, local.second) == (2, 30, 0)


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("* * * *", "has 4 fields; give 5 (minute hour day-of-month month day-of-week)"),
        ("@daily", "has 1 field; give 5"),
        ("61 * * * *", "its minute field '61' is not valid (61 is out of range 0-59)"),
        ("0 25 * * *", "its hour field '25' is not valid"),
        ("0 0 * * funday", "its day-of-week field 'funday' is not valid"),
        ("1-0 * * * *", "its minute field '1-0' is not valid (the range 1-0 goes backwards"),  # croniter: every minute
        ("5-1 * * * *", "its minute field '5-1' is not valid (the range 5-1 goes backwards"),  # croniter: wraps around
        ("R * * * *", "its minute field 'R' is not valid ('R' is not a number)"),  # croniter: random, never fires
        ("*/61 * * * *", "its minute field '*/61' is not valid (the step 61 is out of range 1-60)"),
        ("0 0 * * 5#6", "its day-of-week field '5#6' is not valid ('5#6' is not a number or a day name)"),
        ("0 0 31 2 *", "never fires"),
        ("*/2 * * * * *", "has 6 fields"),
    ],
)
def test_a_malformed_cron_expression_is_refused_with_a_clear_message(
    api: Api, world: dict[str, Tenant], cron: str, message: str
) -> None:
    response = create(api, world["acme"], cron=cron)
    assert response.status_code == 422 and response.json["error"] == "invalid_cron"
    assert message in response.json["message"] and cron.split()[0] in response.json["message"]


@pytest.mark.parametrize("timezone", ["Mars/Olympus_Mons", "utc", "../../etc/passwd", "Europe/"])
def test_a_timezone_that_is_not_an_iana_name_is_refused(api: Api, world: dict[str, Tenant], timezone: str) -> None:
    response = create(api, world["acme"], timezone=timezone)
    assert response.status_code == 422 and response.json["error"] == "invalid_timezone"
    assert "is not an IANA timezone" in response.json["message"]


def test_a_seconds_field_is_accepted_only_when_the_configuration_allows_it(make_app: MakeApp, world: dict[str, Tenant]):
    api = Api(make_app(SCHEDULE_ALLOW_SECONDS=True).test_client())
    response = create(api, world["acme"], cron="*/2 * * * * *")
    assert response.status_code == 201, response.json
    next_run_at = ScheduleOut.model_validate(response.json).next_run_at
    assert next_run_at is not None and next_run_at.second % 2 == 0
    assert next_run_at - datetime.now(UTC) <= timedelta(seconds=2)
    assert create(api, world["acme"], cron="* * * * * * *").json["error"] == "invalid_cron"


def test_the_workflow_and_the_target_are_checked_as_for_a_job(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    bad = create(api, acme, workflow=BAD_WORKFLOW)
    assert bad.status_code == 422 and bad.json["error"] == "invalid_workflow" and bad.json["line"] == 8
    assert create(api, acme, "tenant_admin", project_id="nope").json["error"] == "unknown_project"
    assert create(api, acme, "tenant_admin").json["error"] == "unknown_project"  # no project in token or body
    assert create(api, acme, "tenant_admin", project_id="db", agent_id="a1").json["error"] == "unknown_agent"
    pinned = create(api, acme, workflow=POWERSHELL, agent_id="a1")
    assert pinned.status_code == 422 and pinned.json["error"] == "incompatible_platform"
    assert pinned.json["message"] == "agent 'a1' runs linux; this workflow runs on windows"
    assert created(api, acme, workflow=POWERSHELL).platform == "windows"
    assert create(api, acme, overlap="sometimes").status_code == 400
    assert create(api, acme, priority="5").status_code == 400
    assert api.post(PATH, acme.tokens["operator"], json={"workflow": WORKFLOW}).status_code == 400
    assert create(api, acme, tenant_id="globex").status_code == 403
    assert create(api, acme, project_id="db").status_code == 403  # the token is limited to project web


def test_schedules_are_listed_newest_first_with_filters_and_a_total(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    first = created(api, acme, name="first")
    second = created(api, acme, name="second", paused=True)
    created(api, acme, "tenant_admin", name="elsewhere", project_id="db", tenant_id="acme")
    viewer = acme.tokens["viewer"]
    listing = ScheduleList.model_validate(api.get(PATH, viewer).json)
    assert listing.total == 1 + 1 and [s.name for s in listing.schedules] == ["second", "first"]  # viewer: web only
    admin = ScheduleList.model_validate(api.get(f"{PATH}?limit=1", acme.tokens["tenant_admin"]).json)
    assert admin.total == 3 and len(admin.schedules) == 1
    paused = ScheduleList.model_validate(api.get(f"{PATH}?paused=true", viewer).json)
    assert [s.schedule_id for s in paused.schedules] == [second.schedule_id] and second.next_run_at is None
    active = ScheduleList.model_validate(api.get(f"{PATH}?paused=false", viewer).json)
    assert [s.schedule_id for s in active.schedules] == [first.schedule_id]
    assert api.get(f"{PATH}?tenant_id=globex", viewer).status_code == 403
    assert api.get(f"{PATH}?colour=red", viewer).status_code == 400
    assert ScheduleList.model_validate(api.get(PATH, world["globex"].tokens["viewer"]).json).total == 0


def test_a_schedule_is_read_with_its_workflow_next_run_and_latest_runs(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    schedule = created(api, acme, overlap="allow")
    assert schedule.next_run_at is not None
    fire(app, schedule.next_run_at + timedelta(seconds=1))
    fire(app, schedule.next_run_at + timedelta(minutes=5, seconds=1))
    response = api.get(f"{PATH}/{schedule.schedule_id}", acme.tokens["viewer"])
    assert response.status_code == 200
    detail = ScheduleDetail.model_validate(response.json)
    assert detail.workflow == WORKFLOW and detail.next_run_at == schedule.next_run_at + timedelta(minutes=10)
    assert [r.scheduled_for for r in detail.runs] == [
        schedule.next_run_at + timedelta(minutes=5),
        schedule.next_run_at,
    ]
    assert {r.state for r in detail.runs} == {"fired"} and {r.job_state for r in detail.runs} == {"pending"}
    assert all(r.job_id for r in detail.runs)


def test_a_schedule_can_be_changed_and_a_new_expression_moves_its_next_run(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    schedule = created(api, acme)
    path = f"{PATH}/{schedule.schedule_id}"
    changed = api.put(path, acme.tokens["operator"], json={"variables": {"A": "b"}, "priority": 9, "overlap": "allow"})
    assert changed.status_code == 200, changed.json
    out = ScheduleOut.model_validate(changed.json)
    assert out.variables == {"A": "b"} and out.priority == 9 and out.overlap == "allow" and out.revision == 2
    assert out.next_run_at == schedule.next_run_at
    hourly = ScheduleOut.model_validate(
        api.put(path, acme.tokens["operator"], json={"cron": "0 * * * *", "timezone": "Asia/Kolkata"}).json
    )
    assert hourly.next_run_at is not None and hourly.next_run_at.minute == 30  # Kolkata is UTC+05:30
    assert hourly.cron == "0 * * * *" and hourly.timezone == "Asia/Kolkata" and hourly.revision == 3
    moved = api.put(path, acme.tokens["operator"], json={"workflow": POWERSHELL, "name": "ps"}).json
    assert moved["platform"] == "windows" and moved["name"] == "ps"


def test_a_change_that_is_invalid_is_refused_and_changes_nothing(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    schedule = created(api, acme)
    path, operator = f"{PATH}/{schedule.schedule_id}", acme.tokens["operator"]
    assert api.put(path, operator, json={"cron": "* * *"}).json["error"] == "invalid_cron"
    assert api.put(path, operator, json={"cron": "1-0 * * * *"}).json["error"] == "invalid_cron"
    assert api.put(path, operator, json={"timezone": "Nowhere/Land"}).json["error"] == "invalid_timezone"
    assert api.put(path, operator, json={"workflow": BAD_WORKFLOW}).json["error"] == "invalid_workflow"
    assert api.put(path, operator, json={"agent_id": "ghost"}).json["error"] == "unknown_agent"
    assert api.put(path, operator, json={}).status_code == 400
    nulled = api.put(path, operator, json={"cron": None, "paused": None})
    assert nulled.status_code == 400 and "cron, paused: may not be null" in nulled.json["message"]
    after = ScheduleOut.model_validate(api.get(path, operator).json)
    assert after.model_dump(exclude={"created_at"}) == schedule.model_dump(exclude={"created_at"})


def test_pausing_stops_the_runs_and_resuming_starts_from_the_next_fire_time(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    schedule = created(api, acme)
    path, operator = f"{PATH}/{schedule.schedule_id}", acme.tokens["operator"]
    paused = api.put(path, operator, json={"paused": True}).json
    assert paused["paused"] is True and paused["next_run_at"] is None
    assert schedule.next_run_at is not None
    assert fire(app, schedule.next_run_at + timedelta(hours=1)) == 0
    assert runs(app, schedule.schedule_id) == []
    resumed = ScheduleOut.model_validate(api.put(path, operator, json={"paused": False}).json)
    assert resumed.next_run_at is not None and resumed.next_run_at > datetime.now(UTC)
    assert runs(app, schedule.schedule_id) == []  # the paused time is not "missed": nobody wanted it


def test_a_deleted_schedule_is_gone_with_its_runs_but_its_jobs_stay(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    schedule = created(api, acme)
    assert schedule.next_run_at is not None
    fire(app, schedule.next_run_at)
    [run] = runs(app, schedule.schedule_id)
    path = f"{PATH}/{schedule.schedule_id}"
    assert api.delete(path, acme.tokens["operator"]).status_code == 204
    assert api.get(path, acme.tokens["operator"]).status_code == 404
    assert api.delete(path, acme.tokens["operator"]).status_code == 404
    assert runs(app, schedule.schedule_id) == []
    with app.app_context():
        job = db.session.get(Job, run.job_id)
        assert job is not None and job.schedule_id == schedule.schedule_id


def test_a_schedule_deleted_by_a_request_at_the_same_time_is_not_found_and_deleted_once(
    api: Api, world: dict[str, Tenant], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the second request read the schedule before the first deleted it: its DELETE finds no row
    acme = world["acme"]
    schedule = created(api, acme)
    path = f"{PATH}/{schedule.schedule_id}"
    real = service.scoped
    first: list[Any] = []

    def read_before_the_other_deleted(caller: Any, schedule_id: str) -> Any:
        if first:
            return real(caller, schedule_id)
        first.append(real(caller, schedule_id))
        db.session.expunge(first[0])  # read as it was, in a transaction that ends before the other request
        db.session.rollback()
        assert api.delete(path, acme.tokens["operator"]).status_code == 204  # the other request
        return first[0]

    monkeypatch.setattr(service, "scoped", read_before_the_other_deleted)
    response = api.delete(path, acme.tokens["operator"])
    assert response.status_code == 404, response.json
    audited = api.get("/api/v1/audit?action=schedule.deleted", acme.tokens["admin"]).json
    assert [e["target_id"] for e in audited["events"]] == [schedule.schedule_id]


def test_viewers_only_read_schedules_and_agents_have_no_access(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    schedule = created(api, acme)
    path = f"{PATH}/{schedule.schedule_id}"
    expected = {"admin": 201, "tenant_admin": 201, "operator": 201, "viewer": 403, "agent": 403}
    body = {"cron": "0 * * * *", "workflow": WORKFLOW, "project_id": "web"}
    assert {role: api.post(PATH, acme.tokens[role], json=body).status_code for role in ROLES} == expected
    readers = {role: api.get(path, acme.tokens[role]).status_code for role in ROLES}
    assert readers == {"admin": 200, "tenant_admin": 200, "operator": 200, "viewer": 200, "agent": 403}
    assert api.get(PATH, acme.tokens["agent"]).status_code == 403
    for role in ("viewer", "agent"):
        assert api.put(path, acme.tokens[role], json={"paused": True}).status_code == 403
        assert api.delete(path, acme.tokens[role]).status_code == 403
    assert api.get(PATH).status_code == 401


def test_another_tenants_schedule_is_not_found_and_the_attempt_is_audited(api: Api, world: dict[str, Tenant]) -> None:
    schedule = created(api, world["acme"])
    path = f"{PATH}/{schedule.schedule_id}"
    globex = world["globex"].tokens
    for role in ("admin", "tenant_admin", "operator", "viewer"):
        response = api.get(path, globex[role])
        assert response.status_code == 404 and response.json == {
            "error": "not_found",
            "message": f"schedule '{schedule.schedule_id}' does not exist",
        }
    assert api.put(path, globex["operator"], json={"paused": True}).status_code == 404
    assert api.delete(path, globex["operator"]).status_code == 404
    assert api.get(path, world["acme"].tokens["viewer"]).json["paused"] is False
    log = api.get("/api/v1/audit?action=access.cross_tenant", globex["admin"]).json["events"]  # the platform's log
    assert any(e["target_type"] == "schedule" and e["target_id"] == schedule.schedule_id for e in log)
    assert not api.get("/api/v1/audit?action=access.cross_tenant", globex["tenant_admin"]).json["events"]


def test_a_project_limited_token_sees_only_its_projects_schedules(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    other = create(api, acme, "tenant_admin", project_id="db")
    assert other.status_code == 201, other.json
    path = f"{PATH}/{other.json['schedule_id']}"
    assert api.get(path, acme.tokens["operator"]).status_code == 404  # the operator's token names project web
    assert api.get(path, acme.tokens["tenant_admin"]).status_code == 200


def test_creating_changing_and_deleting_a_schedule_is_audited(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    schedule = created(api, acme)
    path = f"{PATH}/{schedule.schedule_id}"
    api.put(path, acme.tokens["operator"], json={"paused": True, "priority": 1})
    api.delete(path, acme.tokens["operator"])
    log = api.get("/api/v1/audit?limit=500", acme.tokens["tenant_admin"]).json["events"]
    mine = {e["action"]: e for e in log if e["target_id"] == schedule.schedule_id}
    assert set(mine) == {"schedule.created", "schedule.updated", "schedule.deleted"}
    assert mine["schedule.created"]["details"]["cron"] == "*/5 * * * *"
    assert mine["schedule.updated"]["details"]["fields"] == ["paused", "priority"]
    assert {e["actor"] for e in mine.values()} == {"operator@acme"}
