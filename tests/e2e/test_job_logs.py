"""A real job's log: shipped by its agent, stored with the job, followed while it runs and searched by tenant."""

from __future__ import annotations

import textwrap

import pytest

from tests.e2e.test_dispatch import wait_until
from tests.servers.platform import Platform

pytestmark = pytest.mark.e2e


def test_a_jobs_log_is_followed_while_it_runs_and_complete_when_it_ends(platform: Platform) -> None:
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "l1")
    operator = platform.token("operator", tenant, project)
    workflow = textwrap.dedent(
        """\
        name: logged
        tasks:
          - {name: greet, type: command, config: {command: sh, args: ["-c", "echo hello-from-greet; echo second"]}}
          - {name: pause, type: command, config: {command: sleep, args: ["4"]}}
          - {name: bye, type: command, config: {command: echo, args: [goodbye-from-bye]}}
        """
    )
    job_id = platform.submit(operator, workflow)["job_id"]

    def early_lines() -> list[dict]:
        page = platform.api("GET", f"/jobs/{job_id}/logs?follow=true&wait=5", operator).json()
        return page["lines"] if not page["finished"] else []

    lines = wait_until(early_lines, what="log lines shipped while the job runs")
    assert platform.api("GET", f"/jobs/{job_id}", operator).json()["state"] == "running"
    assert any(line["message"] == "hello-from-greet" and line["task"] == "greet" for line in lines)

    assert platform.wait_for(operator, job_id)["state"] == "completed"
    page = platform.api("GET", f"/jobs/{job_id}/logs?limit=1000", operator).json()
    assert page["finished"] and not page["truncated"]
    messages = [(line["task"], line["message"]) for line in page["lines"]]
    assert ("greet", "hello-from-greet") in messages and ("bye", "goodbye-from-bye") in messages
    assert messages.index(("greet", "hello-from-greet")) < messages.index(("bye", "goodbye-from-bye"))
    assert any(task is None and message.startswith("workflow succeeded") for task, message in messages)
    assert [line["seq"] for line in page["lines"]] == sorted({line["seq"] for line in page["lines"]})

    found = platform.api("GET", "/logs?query=goodbye-from-bye", operator).json()
    assert [hit["job_id"] for hit in found["lines"]] == [job_id]
    other_tenant, other_project = platform.tenant()
    stranger = platform.token("operator", other_tenant, other_project)
    assert platform.api("GET", "/logs?query=goodbye-from-bye", stranger).json()["lines"] == []
    assert platform.api("GET", f"/jobs/{job_id}/logs", stranger).status_code == 404
