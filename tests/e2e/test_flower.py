"""Flower, started as the Procfile starts it, shows the control plane's and the agents' tasks behind basic auth;
agents send their task events a few at a time, and Flower still sees every one."""

from __future__ import annotations

import base64
import json
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import redis
import requests

from tests.servers._util import free_port
from tests.servers.platform import BIN, Platform

pytestmark = pytest.mark.e2e

USER, PASSWORD = "ops", "flower-test-password"
ECHO = textwrap.dedent(
    """\
    name: echo
    timeout: 30s
    tasks:
      - name: echo
        type: command
        config:
          command: echo
          args: ["seen by flower"]
    """
)


@pytest.fixture(scope="module")
def flower(platform: Platform) -> Iterator[str]:
    """Flower on the control plane's Celery app, with basic auth, as the Procfile's ``flower`` line runs it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**platform.env, "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}", "FLOWER_PORT": str(port)}
    process = platform.process("flower")
    process.start(
        [str(BIN / "automation"), "flower"],  # the Procfile's line
        ready=lambda: requests.get(f"{url}/healthcheck", timeout=1).ok,
        env=env,
        timeout=60,
    )
    time.sleep(1)  # Flower's event consumer subscribes just after its web server is up
    try:
        yield url
    finally:
        process.stop()


def tasks(url: str, **params: str) -> dict[str, Any]:
    reply = requests.get(f"{url}/api/tasks", params=params, auth=(USER, PASSWORD), timeout=10)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def eventually(check: Any, timeout: float = 30, what: str = "the condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def test_flower_lists_a_jobs_celery_task_run_by_an_agent(platform: Platform, flower: str) -> None:
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "a1")
    operator = platform.token("operator", tenant, project)
    job = platform.submit(operator, ECHO)
    assert platform.wait_for(operator, job["job_id"])["state"] == "completed"
    task_id = f"{job['job_id']}:1"
    task = eventually(lambda: tasks(flower).get(task_id), what=f"Flower listing {task_id}")
    assert task["name"] == "workers.run_job"
    eventually(lambda: tasks(flower)[task_id]["state"] == "SUCCESS", what="Flower seeing the task succeed")
    assert tasks(flower)[task_id]["worker"] == f"a1@{tenant}"


def task_events(watch: redis.client.PubSub, hostname: str, quiet: float = 1.0) -> list[list[dict[str, Any]]]:
    """The task events ``hostname`` published on Valkey until it sent none for ``quiet`` seconds, as they were
    sent: one list per broker message (Celery's ``task.multi`` carries several). Other workers' are skipped."""
    messages: list[list[dict[str, Any]]] = []
    deadline = time.monotonic() + 30
    last = time.monotonic()
    while time.monotonic() - last < quiet:
        assert time.monotonic() < deadline, f"{hostname} kept sending task events for 30 s"
        message = watch.get_message(timeout=0.1)  # None too for the subscription's confirmation, which it skips
        if message is None:
            continue
        envelope = json.loads(message["data"])
        body = envelope["body"]
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        payload = json.loads(body)
        events = payload if isinstance(payload, list) else [payload]
        mine = [e for e in events if e.get("hostname") == hostname and str(e.get("type")).startswith("task-")]
        if mine:
            messages.append(mine)
            last = time.monotonic()
    return messages


def test_a_busy_agent_sends_its_task_events_a_few_at_a_time_and_flower_sees_them_all(
    platform: Platform, flower: str
) -> None:
    tenant, project = platform.tenant()
    watch = redis.Redis.from_url(platform.valkey.url).pubsub(ignore_subscribe_messages=True)
    watch.psubscribe("*celeryev*")
    try:
        platform.start_agent(tenant, project, "busy")
        operator = platform.token("operator", tenant, project)
        count = 20
        reply = platform.api("POST", "/jobs/batch", operator, {"jobs": [{"workflow": ECHO}] * count})
        assert reply.status_code == 201, reply.text
        ids = [job["job_id"] for job in reply.json()["jobs"]]
        for job_id in ids:
            assert platform.wait_for(operator, job_id)["state"] == "completed"
        messages = task_events(watch, f"busy@{tenant}")
    finally:
        watch.close()
    events = [event for message in messages for event in message]
    sent = {(event["uuid"], event["type"]) for event in events}
    for job_id in ids:
        for kind in ("task-received", "task-started", "task-succeeded"):
            assert (f"{job_id}:1", kind) in sent, f"no {kind} event for job {job_id}"
    # One message per event would be 60 here (Celery's own pace for a worker running short jobs back to back: 57
    # measured). Paced, it is a few (6 measured); even jobs slow enough (0.2 s each on a loaded machine) for
    # each one's last event to go alone still send their first two together: two messages for three events.
    assert len(messages) <= len(events) * 2 / 3, f"{len(events)} task events in {len(messages)} messages"
    done = eventually(
        lambda: all(tasks(flower).get(f"{job_id}:1", {}).get("state") == "SUCCESS" for job_id in ids),
        what="Flower seeing every job's task succeed",
    )
    assert done


def test_flower_lists_the_control_planes_own_tasks(flower: str) -> None:
    reaped = eventually(lambda: tasks(flower, taskname="control.reap_leases"), what="a reaper task in Flower")
    assert {task["name"] for task in reaped.values()} == {"control.reap_leases"}


def test_flowers_api_refuses_callers_without_the_password(flower: str) -> None:
    assert requests.get(f"{flower}/api/tasks", timeout=10).status_code == 401
    assert requests.get(f"{flower}/api/tasks", auth=(USER, "wrong"), timeout=10).status_code == 401
    assert requests.get(f"{flower}/api/workers", timeout=10).status_code == 401


def test_the_control_planes_celery_processes_log_json(platform: Platform, flower: str) -> None:
    for name, component in (("dispatcher", "dispatcher"), ("scheduler", "scheduler"), ("flower", "flower")):
        records = [json.loads(line) for line in platform.log(name).splitlines() if line.startswith("{")]
        assert records, name
        assert {record["component"] for record in records} == {component}
        assert all({"timestamp", "level", "job_id", "tenant_id", "message"} <= set(record) for record in records)
    worker_lines = [json.loads(line) for line in platform.log("dispatcher").splitlines() if line.startswith("{")]
    assert any(record["message"].endswith("ready.") for record in worker_lines)


def test_flowers_login_is_not_on_its_command_line(flower: str) -> None:
    port = flower.rsplit(":", 1)[1]
    pids = {
        c.pid for c in psutil.net_connections("tcp") if c.laddr.port == int(port) and c.status == psutil.CONN_LISTEN
    }
    assert len(pids) == 1
    cmdline = psutil.Process(pids.pop()).cmdline()
    assert "flower" in cmdline and not any(PASSWORD in arg for arg in cmdline)  # `ps` shows every user this line
    assert requests.get(f"{flower}/api/tasks", timeout=10).status_code == 401
