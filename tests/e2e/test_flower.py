"""Flower, started as the Procfile starts it, shows the control plane's and the agents' tasks behind basic auth."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
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
    env = {**platform.env, "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}
    process = platform.process("flower")
    process.start(
        [
            str(BIN / "celery"),
            "-A",
            "app.celery_app:celery",
            "flower",
            "--address=127.0.0.1",
            f"--port={port}",
            f"--basic-auth={env['FLOWER_BASIC_AUTH']}",
        ],
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
