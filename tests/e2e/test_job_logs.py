"""A real job's log: shipped by its agent, stored with the job, followed while it runs and searched by tenant."""

from __future__ import annotations

import textwrap
from datetime import datetime

import pytest

from tests.e2e.test_dispatch import wait_until
from tests.servers.platform import Platform
from workers.logship import MAX_LINES_PER_JOB, OUTPUT_LINES_PER_TASK

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


def test_a_commands_output_is_followed_while_it_runs_each_line_once_with_the_time_it_was_printed(
    platform: Platform,
) -> None:
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "l3")
    operator = platform.token("operator", tenant, project)
    workflow = (
        "name: slow\ntasks:\n  - {name: backup, type: command,"
        " config: {command: sh, args: ['-c', 'echo early-progress; sleep 6; echo late-progress']}}\n"
    )
    job_id = platform.submit(operator, workflow)["job_id"]

    def early_output() -> list[dict]:
        page = platform.api("GET", f"/jobs/{job_id}/logs?follow=true&wait=5", operator).json()
        said = [line["message"] for line in page["lines"]]
        return page["lines"] if "early-progress" in said and not page["finished"] else []

    lines = wait_until(early_output, what="the command's first line shipped while it runs")
    assert not any(line["message"].startswith("task succeeded") for line in lines)
    assert platform.wait_for(operator, job_id)["state"] == "completed"
    page = platform.api("GET", f"/jobs/{job_id}/logs?limit=1000", operator).json()
    said = [(line["task"], line["message"]) for line in page["lines"]]
    assert said.count(("backup", "early-progress")) == 1 and said.count(("backup", "late-progress")) == 1
    stamps = {line["message"]: datetime.fromisoformat(line["ts"].replace("Z", "+00:00")) for line in page["lines"]}
    assert (stamps["late-progress"] - stamps["early-progress"]).total_seconds() > 4


def test_a_log_over_its_bound_ends_with_one_marker_counting_every_line_dropped(platform: Platform) -> None:
    """12 tasks printing 1200 lines each: the agent ships 1000 of each task's lines and keeps 10,000 of the job's,
    as the control plane does; its marker said "2 more lines dropped" (its own two lines, over the bound)."""
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "l2")
    operator = platform.token("operator", tenant, project)
    tasks = "".join(
        f"  - {{name: t{n}, type: command, config: {{command: seq, args: ['1', '1200']}}}}\n" for n in range(12)
    )
    job_id = platform.submit(operator, f"name: chatty\ntasks:\n{tasks}")["job_id"]
    assert platform.wait_for(operator, job_id)["state"] == "completed"
    lines, after = [], 0
    while True:
        page = platform.api("GET", f"/jobs/{job_id}/logs?limit=1000&after={after}", operator).json()
        lines += page["lines"]
        after = page["next"]
        if page["finished"]:
            break
    # the workflow's first and last lines, and each task's start, 1000 output lines, the cut and its end
    written = 1 + 12 * (1 + OUTPUT_LINES_PER_TASK + 1 + 1) + 1
    markers = [line["message"] for line in lines if line["message"].startswith("[log truncated")]
    assert markers == [
        f"[log truncated: {written - MAX_LINES_PER_JOB} more lines dropped; limit 10000 lines / 5242880 bytes per job]"
    ]
    assert len(lines) == MAX_LINES_PER_JOB + 1 and page["truncated"]
