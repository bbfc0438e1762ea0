"""The operator CLI against the running platform: ``automation jobs ...`` and ``automation agents list`` as
subprocesses, configured by CONTROL_PLANE_URL and JWT_TOKEN, with a real agent running the jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.auth.tokens import issue_token
from app.client import sse
from app.client.http import Client
from tests.servers._util import free_port
from tests.servers.platform import Platform

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
GREETING = "hello-from-the-cli"
SUCCEEDS = textwrap.dedent(
    f"""\
    name: greets
    timeout: 30s
    tasks:
      - name: greet
        type: command
        config: {{command: echo, args: ["{GREETING} {{{{.WHO}}}}"]}}
      - name: pause
        type: command
        config: {{command: sleep, args: ["0.5"]}}
    """
)
FAILS = textwrap.dedent(
    """\
    name: breaks
    timeout: 30s
    tasks:
      - name: fine
        type: command
        config: {command: "true"}
      - name: broken
        type: command
        config: {command: sh, args: ["-c", "echo oops >&2; exit 3"]}
    """
)
SLOW = textwrap.dedent(
    """\
    name: slow
    timeout: 5m
    tasks:
      - name: wait
        type: command
        config: {command: sh, args: ["-c", "sleep 60 # cli-cancel"]}
    """
)
INVALID = "name: typo\ntasks:\n  - name: first\n    type: comand\n    config: {command: echo}\n"  # line 4


@dataclass
class Fleet:
    """A tenant with one project, its running agent and an operator's token."""

    platform: Platform
    tenant: str
    project: str
    operator: str
    files: Path

    def run(self, *args: str, token: str | None = None, url: str | None = None) -> subprocess.CompletedProcess[str]:
        """``automation ARGS`` as a subprocess; returns the finished process (exit code, stdout, stderr)."""
        env = {
            **os.environ,
            "CONTROL_PLANE_URL": url or self.platform.url,
            "JWT_TOKEN": token or self.operator,
            "NO_COLOR": "1",
        }
        return subprocess.run(
            [str(BIN / "automation"), *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )

    def workflow(self, name: str, text: str) -> str:
        """Write a workflow file; returns its path."""
        path = self.files / name
        path.write_text(text)
        return str(path)

    def submitted(self, text: str, *args: str) -> dict:
        """Submit a workflow with ``--json`` (and ``args``); returns the job."""
        done = self.run("jobs", "submit", self.workflow("w.yaml", text), "--json", *args)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))


@pytest.fixture(scope="module")
def fleet(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "cli1")
    operator = platform.token("operator", tenant, project)
    return Fleet(platform, tenant, project, operator, tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def finished(fleet: Fleet) -> dict:
    """A job that completed, submitted with ``--wait --json``."""
    done = fleet.run("jobs", "submit", fleet.workflow("ok.yaml", SUCCEEDS), "--var", "WHO=ops", "--wait", "--json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_submit_wait_of_a_succeeding_workflow_shows_each_task_and_exits_0(fleet: Fleet) -> None:
    done = fleet.run("jobs", "submit", fleet.workflow("ok.yaml", SUCCEEDS), "--var", "WHO=ops", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("submitted job ") and lines[0].endswith("(greets)")
    job_id = lines[0].split()[2]
    tasks = [line.split()[1:3] for line in lines if line.startswith("  ")]
    assert tasks == [["greet"], ["greet", "succeeded"], ["pause"], ["pause", "succeeded"]]
    assert lines[-1].split()[1:5] == ["job", job_id, "(greets)", "completed"]


def test_submit_wait_of_a_failing_workflow_exits_1_with_the_reason(fleet: Fleet) -> None:
    done = fleet.run("jobs", "submit", fleet.workflow("fails.yaml", FAILS), "--wait")
    assert done.returncode == 1, done.stdout + done.stderr
    assert [line.split()[1:3] for line in done.stdout.splitlines() if line.startswith("  ")][-1] == [
        "broken",
        "failed",
    ]
    assert " failed" in done.stdout.splitlines()[-1]


def test_json_outputs_are_the_apis_json(fleet: Fleet, finished: dict) -> None:
    assert finished["state"] == "completed" and finished["variables"] == {"WHO": "ops"}
    assert finished["tasks"][0]["output"] == f"{GREETING} ops\n"
    listed = json.loads(fleet.run("jobs", "list", "--json", "--state", "completed").stdout)
    assert finished["job_id"] in [job["job_id"] for job in listed["jobs"]]
    assert {job["state"] for job in listed["jobs"]} == {"completed"}
    got = json.loads(fleet.run("jobs", "get", finished["job_id"], "--json").stdout)
    assert (got["job_id"], got["name"], got["state"]) == (finished["job_id"], "greets", "completed")
    agents = json.loads(fleet.run("agents", "list", "--json").stdout)
    assert [agent["agent_id"] for agent in agents["agents"]] == ["cli1"]
    events = [json.loads(line) for line in fleet.run("jobs", "watch", finished["job_id"], "--json").stdout.splitlines()]
    assert events[-1]["state"] == "completed" and events[-1]["task"] is None
    assert {e["job_id"] for e in events} == {finished["job_id"]}
    assert [e["id"] for e in events] == sorted({e["id"] for e in events})
    assert [(e["task"], e["status"]) for e in events if e["task"]] == [
        ("greet", "running"),
        ("greet", "succeeded"),
        ("pause", "running"),
        ("pause", "succeeded"),
    ]


def test_list_and_get_show_tables_and_a_readable_job(fleet: Fleet, finished: dict) -> None:
    listed = fleet.run("jobs", "list", "--limit", "5")
    assert listed.returncode == 0
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["JOB", "ID", "NAME", "STATE", "ATTEMPT", "AGENT", "CREATED"]
    assert any(row.split()[:5] == [finished["job_id"], "greets", "completed", "1", "cli1"] for row in rows), rows
    shown = fleet.run("jobs", "get", finished["job_id"])
    assert shown.returncode == 0
    assert f"job {finished['job_id']}  greets" in shown.stdout and "ran on cli1" in shown.stdout
    assert "WHO=ops" in shown.stdout
    assert "greet  succeeded" in shown.stdout and GREETING in shown.stdout


def test_the_eight_characters_watch_prints_name_the_job_for_every_command(fleet: Fleet, finished: dict) -> None:
    short = finished["job_id"][:8]
    watched = fleet.run("jobs", "watch", short)
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.splitlines()[-1].split()[1:3] == ["job", finished["job_id"]]
    shown = fleet.run("jobs", "get", short)
    assert shown.returncode == 0 and f"job {finished['job_id']}  greets" in shown.stdout
    logs = fleet.run("jobs", "logs", short)
    assert logs.returncode == 0 and GREETING in logs.stdout
    other, _ = fleet.platform.tenant()
    elsewhere = fleet.run("jobs", "get", short, token=fleet.platform.token("viewer", other))
    assert elsewhere.returncode == 3 and f"no job of yours has an id that starts with '{short}'" in elsewhere.stderr


def test_a_running_job_is_cancelled_and_watch_exits_1(fleet: Fleet) -> None:
    job = fleet.submitted(SLOW)
    fleet.platform.wait_for(fleet.operator, job["job_id"], {"running"})
    cancelled = fleet.run("jobs", "cancel", job["job_id"], "--reason", "from the cli")
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith(f"cancel requested: job {job['job_id']} is running")
    watched = fleet.run("jobs", "watch", job["job_id"])
    assert watched.returncode == 1, watched.stdout + watched.stderr
    assert watched.stdout.splitlines()[-1].split()[4] == "cancelled"
    again = fleet.run("jobs", "cancel", job["job_id"])
    assert again.returncode == 3 and "cancelled" in again.stderr and again.stdout == ""


def test_agents_list_shows_the_agent_its_platform_and_heartbeat(fleet: Fleet) -> None:
    done = fleet.run("agents", "list")
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()
    assert header.split() == ["AGENT", "ID", "HOSTNAME", "PLATFORM", "STATUS", "LAST", "HEARTBEAT"]
    assert row.split()[0] == "cli1" and row.split()[2:4] == ["linux", "online"] and row.endswith("Z")


def test_an_invalid_workflow_is_refused_with_exit_3_and_its_line(fleet: Fleet) -> None:
    done = fleet.run("jobs", "submit", fleet.workflow("bad.yaml", INVALID))
    assert done.returncode == 3 and done.stdout == ""
    assert done.stderr.startswith("automation: the workflow is invalid")
    assert "did you mean 'command'?" in done.stderr and "(line 4)" in done.stderr
    missing = fleet.run("jobs", "submit", str(fleet.files / "missing.yaml"))
    assert missing.returncode == 2 and "cannot read the workflow file" in missing.stderr


def test_an_unreachable_control_plane_exits_4(fleet: Fleet) -> None:
    done = fleet.run("jobs", "list", url=f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 4 and "cannot reach the control plane" in done.stderr


def test_a_wrong_token_exits_3(fleet: Fleet) -> None:
    forged = issue_token("x" * 64, tenant_id=fleet.tenant, role="operator", project_id=fleet.project)
    done = fleet.run("jobs", "list", token=forged)
    assert done.returncode == 3 and done.stdout == "" and "token" in done.stderr


def test_another_tenants_job_is_not_found(fleet: Fleet, finished: dict) -> None:
    other, _ = fleet.platform.tenant()
    done = fleet.run("jobs", "get", finished["job_id"], token=fleet.platform.token("viewer", other))
    assert done.returncode == 3 and "does not exist" in done.stderr and done.stdout == ""
    watched = fleet.run("jobs", "watch", finished["job_id"], token=fleet.platform.token("viewer", other))
    assert watched.returncode == 3 and "does not exist" in watched.stderr


def test_watch_of_a_finished_job_replays_it_and_exits_by_its_state(fleet: Fleet, finished: dict) -> None:
    done = fleet.run("jobs", "watch", finished["job_id"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert ["greet", "succeeded"] in [line.split()[1:3] for line in lines]
    assert lines[-1].split()[1:5] == ["job", finished["job_id"], "(greets)", "completed"]


def test_logs_of_a_job_show_what_its_tasks_printed(fleet: Fleet, finished: dict) -> None:
    done = fleet.run("jobs", "logs", finished["job_id"])
    assert done.returncode == 0, done.stderr
    assert f"greet: {GREETING} ops" in done.stdout
    followed = fleet.run("jobs", "logs", finished["job_id"], "--follow", "--json")
    assert followed.returncode == 0
    lines = [json.loads(line) for line in followed.stdout.splitlines()]
    assert {"ts", "task", "level", "message"} <= set(lines[0])
    assert any(line["task"] == "greet" and GREETING in line["message"] for line in lines)


# The platform's own endpoints (shared contracts 2 and 3) as the CLI reads them; the fallbacks for a control
# plane without them (polling, the tasks' output) are tested in tests/app/test_client_cli.py.


def test_watch_reads_the_platforms_event_stream_and_resumes_it(fleet: Fleet, finished: dict) -> None:
    watched = fleet.run("jobs", "watch", finished["job_id"], "--json")
    assert watched.returncode == 0 and "polling" not in watched.stderr
    events = [json.loads(line) for line in watched.stdout.splitlines()]
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert [e["state"] for e in events if e["task"] is None] == ["queued", "running", "completed"]
    assert all(e["ts"].endswith("Z") and e["tenant_id"] == fleet.tenant for e in events)
    client = Client(fleet.platform.url, fleet.operator)
    replay = sse.stream(client, f"/jobs/{finished['job_id']}/events", last_id="2")
    resumed = [json.loads(next(replay).data) for _ in events[2:]]
    replay.close()
    assert resumed == events[2:]


def test_logs_read_the_platforms_stored_lines_with_their_cursor(fleet: Fleet, finished: dict) -> None:
    every = fleet.run("jobs", "logs", finished["job_id"], "--json")
    assert every.returncode == 0 and "does not serve" not in every.stderr
    lines = [json.loads(line) for line in every.stdout.splitlines()]
    assert [line["seq"] for line in lines] == sorted({line["seq"] for line in lines}) and len(lines) >= 1
    assert any(line["task"] == "greet" and GREETING in line["message"] for line in lines)
    rest = fleet.run("jobs", "logs", finished["job_id"], "--after", str(lines[0]["seq"]), "--json")
    assert [json.loads(line) for line in rest.stdout.splitlines()] == lines[1:]


def test_secrets_are_set_from_stdin_or_a_variable_listed_without_values_used_and_deleted(fleet: Fleet) -> None:
    admin = fleet.platform.token("tenant_admin", fleet.tenant)
    value = f"pw-{uuid.uuid4().hex}"
    base = ["--project", fleet.project]
    env = {**os.environ, "CONTROL_PLANE_URL": fleet.platform.url, "JWT_TOKEN": admin, "NO_COLOR": "1"}

    def secrets(*args: str, stdin: str | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "automation"), "secrets", *args],
            env={**env, **extra},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    piped = secrets("set", "DB_PW", *base, stdin=value + "\n")  # the tenant comes from the token
    assert piped.returncode == 0 and "secret DB_PW of project" in piped.stdout, piped.stderr
    from_env = secrets("set", "API_KEY", *base, "--from-env", "MY_KEY", MY_KEY="key-1")
    assert from_env.returncode == 0, from_env.stderr
    assert secrets("set", "EMPTY", *base, stdin="").returncode == 2  # no value: a usage error
    listed = secrets("list", *base)
    assert listed.returncode == 0 and listed.stdout.splitlines()[0].startswith("API_KEY  set ")
    assert "DB_PW  set" in listed.stdout and value not in listed.stdout and "key-1" not in listed.stdout
    assert secrets("list", *base, JWT_TOKEN=fleet.operator).returncode == 3  # an operator may not
    check = "name: uses\ntasks:\n  - {name: s, type: command, config: {command: test, args: [X, '=', Y]}}\n"
    job = fleet.submitted(check.replace("X", "'{{.secrets.DB_PW}}'").replace("Y", repr(value)), "--wait")
    assert job["state"] == "completed", job  # the agent got the value piped in, without its newline
    assert secrets("delete", "DB_PW", *base).returncode == 0
    assert secrets("delete", "DB_PW", *base).returncode == 3  # no longer there
