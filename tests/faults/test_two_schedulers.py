"""Two scheduler processes (beat) and two dispatchers fire a recurring schedule: every fire time exactly once.

The platform accepts a seconds field here (SCHEDULE_ALLOW_SECONDS), so that a schedule fires every two
seconds and a test of a few seconds sees several fire times, each raced for by both schedulers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_dispatch import marker_workflow, runs, wait_until
from tests.servers.platform import BIN, FINAL, Platform
from tests.servers.valkey import ValkeyServer

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

EVERY_TWO_SECONDS = "*/2 * * * * *"
FIRE_TASK = "control.fire_schedules"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def platform(
    request: pytest.FixtureRequest, valkey_server: ValkeyServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """The platform (web, dispatcher, scheduler) on SQLite or MariaDB, accepting cron expressions with seconds."""
    database_url = None
    if request.param == "mariadb":
        server = request.getfixturevalue("mariadb_server")
        database_url = server.url_for(server.fresh_database("schedules_e2e"))
    root = tmp_path_factory.mktemp("schedules")
    running = Platform(root, valkey_server, database_url, SCHEDULE_ALLOW_SECONDS="true")
    try:
        running.start()
        yield running
    finally:
        running.stop()


def start_second_scheduler(platform: Platform) -> None:
    """Start another Celery beat, with its own schedule file, and another dispatcher to run what it sends."""
    platform.process("scheduler2").start(
        [str(BIN / "celery"), "-A", "app.celery_app:celery", "beat", "-l", "INFO", "-s", str(platform.root / "beat-2")],
        ready=lambda: "beat: Starting" in platform.log("scheduler2"),
        env=platform.env,
    )
    platform.process("dispatcher2").start(
        [
            *(str(BIN / "celery"), "-A", "app.celery_app:celery", "worker", "-Q", "control", "-P", "threads"),
            *("-c", "2", "-n", f"dispatcher2-{platform.port}@localhost", "--without-gossip", "--without-mingle"),
            *("-l", "INFO"),
        ],
        ready=lambda: "ready" in platform.log("dispatcher2"),
        env=platform.env,
    )


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_two_schedulers_fire_every_run_of_a_schedule_exactly_once(platform: Platform, tmp_path: Path) -> None:
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "cron1")
    start_second_scheduler(platform)
    operator = platform.token("operator", tenant, project)
    marker = tmp_path / "ran"
    body = {"cron": EVERY_TWO_SECONDS, "workflow": marker_workflow(str(marker)), "overlap": "allow"}
    created = platform.api("POST", "/schedules", operator, body)
    assert created.status_code == 201, created.text
    path = f"/schedules/{created.json()['schedule_id']}"

    def fired() -> list[dict[str, Any]]:
        return [r for r in platform.api("GET", path, operator).json()["runs"] if r["state"] == "fired"]

    wait_until(lambda: len(fired()) >= 5, timeout=30, what="five fired runs")
    paused = platform.api("PUT", path, operator, {"paused": True})
    assert paused.status_code == 200 and paused.json()["next_run_at"] is None
    wait_until(  # a run recorded just before the pause gets its job linked
        lambda: all(r["job_id"] for r in platform.api("GET", path, operator).json()["runs"]),
        timeout=30,
        what="every recorded run's job",
    )

    schedule = platform.api("GET", path, operator).json()
    recorded = sorted(schedule["runs"], key=lambda r: r["scheduled_for"])
    times = [moment(r["scheduled_for"]) for r in recorded]
    assert len(times) == len(set(times)) >= 5
    assert all(b - a == timedelta(seconds=2) for a, b in pairwise(times)), times  # none lost
    assert {r["state"] for r in recorded} == {"fired"}, recorded

    def jobs() -> list[dict[str, Any]]:
        listing = platform.api("GET", f"/jobs?project_id={project}&limit=500", operator).json()
        return list(listing["jobs"])

    wait_until(lambda: all(j["state"] in FINAL for j in jobs()), timeout=60, what="every job finishing")
    done = jobs()
    assert sorted(j["job_id"] for j in done) == sorted(r["job_id"] for r in recorded)  # one job per fire time
    assert {j["state"] for j in done} == {"completed"}
    assert {j["attempt"] for j in done} == {1}
    assert runs(marker) == len(recorded)  # each job ran once, on the real agent

    time.sleep(3)  # paused: nothing fires any more
    assert len(platform.api("GET", path, operator).json()["runs"]) == len(recorded)
    for scheduler in ("scheduler", "scheduler2"):
        assert "fire-recurring-schedules" in platform.log(scheduler), scheduler
    for dispatcher in ("dispatcher", "dispatcher2"):
        assert f"Task {FIRE_TASK}[" in platform.log(dispatcher), dispatcher
