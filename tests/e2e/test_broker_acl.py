"""An isolated agent runs its jobs as a Valkey ACL user confined to its own queues, keys and channels."""

from __future__ import annotations

import secrets
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from dispatch import beacon
from dispatch.contract import BEACON_KEY, agent_acl, agent_queue, control_channel, shared_queue
from tests.servers.platform import BIN, Platform

pytestmark = pytest.mark.e2e

ECHO = textwrap.dedent(
    """\
    name: isolated
    tasks:
      - name: hello
        type: command
        config:
          command: echo
          args: ["hello from an isolated agent"]
    """
)

SLEEP = "name: slow\ntimeout: 5m\ntasks:\n  - {name: slow, type: command, config: {command: sleep, args: ['120']}}\n"


@pytest.fixture
def confined(platform: Platform) -> Iterator[tuple[str, str, str]]:
    """A fresh tenant, and the URL of its agent a1's ACL user (removed afterwards): (tenant, project, url)."""
    tenant, project = platform.tenant()
    password = secrets.token_urlsafe(24)
    rules = agent_acl(tenant, project, "a1", "linux", password)
    admin = platform.valkey.client()
    admin.execute_command("ACL", "SETUSER", *rules)
    url = f"redis://{rules[0]}:{password}@{platform.valkey.host}:{platform.valkey.port}/0"
    try:
        yield tenant, project, url
    finally:
        admin.execute_command("ACL", "DELUSER", rules[0])


def test_an_isolated_agent_runs_its_jobs_as_a_confined_valkey_user(
    platform: Platform, confined: tuple[str, str, str]
) -> None:
    tenant, project, url = confined
    # A long heartbeat: a cancel must come through the agent's own control channel, not the next beat.
    platform.start_agent(tenant, project, "a1", VALKEY_URL=url, AGENT_BROKER_ISOLATION="true", HEARTBEAT_INTERVAL="60")
    operator = platform.token("operator", tenant, project)
    for pinned in (None, "a1"):  # through the project's queue, then the agent's own
        job = platform.submit(operator, ECHO, **({"agent_id": pinned} if pinned else {}))
        done = platform.wait_for(operator, job["job_id"])
        assert done["state"] == "completed", done
        assert done["tasks"][0]["output"].strip() == "hello from an isolated agent"
    job_id = platform.submit(operator, SLEEP)["job_id"]
    platform.wait_for(operator, job_id, {"running"})
    time.sleep(0.5)  # the task has started
    started = time.monotonic()
    assert platform.api("POST", f"/jobs/{job_id}/cancel", operator).status_code == 202
    assert platform.wait_for(operator, job_id, timeout=10)["state"] == "cancelled"
    assert time.monotonic() - started < 5
    # Nothing it tried was refused (kombu's broker-wide bookkeeping, pidbox or event keys would have been).
    acl_log = platform.valkey.client().execute_command("ACL", "LOG")
    assert not [entry for entry in acl_log if f"agent-{tenant}-a1" in str(entry)], acl_log


def test_an_isolated_agents_credentials_reach_nothing_else(platform: Platform, confined: tuple[str, str, str]) -> None:
    tenant, project, url = confined
    agent = redis.Redis.from_url(url)
    assert agent.ping()
    assert agent.llen(agent_queue(tenant, "a1")) == 0 and agent.llen(shared_queue(tenant, project, "linux")) == 0
    seen = beacon.read(agent)  # whether the control plane can renew leases: marked by the platform's web
    assert seen is not None and seen.up
    forbidden = [
        lambda: agent.lpush(agent_queue(tenant, "a2"), "x"),  # another agent's queue
        lambda: agent.lpush(shared_queue(tenant, "other", "linux"), "x"),  # another project's
        lambda: agent.lpush(shared_queue("globex", project, "linux"), "x"),  # another tenant's
        lambda: agent.hgetall("unacked"),  # the broker-wide bookkeeping of unacknowledged messages
        lambda: agent.publish(control_channel(tenant, "a2"), "cancel"),  # another agent's control channel
        lambda: agent.publish("/0.celeryev/task.multi", "{}"),  # the broker-wide event exchange
        lambda: agent.publish("/0.celery.pidbox", "{}"),  # the broker-wide remote control
        lambda: agent.keys("*"),
        lambda: agent.get(f"automation.events.{tenant}.j1.seq"),
        lambda: agent.set(BEACON_KEY, "1 1 1"),  # the control plane's beacon: read only
    ]
    for attempt in forbidden:
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()


def test_the_cli_prints_the_acl_command(tmp_path: Path) -> None:
    command = [str(BIN / "automation"), "acl", "agent", "--tenant", "acme", "--project", "web", "--agent-id", "a1"]
    printed = subprocess.run([*command, "--password", "s3cret"], capture_output=True, text=True, check=True, timeout=60)
    assert printed.stdout.startswith("ACL SETUSER agent-acme-a1 reset on '>s3cret' resetkeys resetchannels -@all ")
    assert "'~agent.acme.a1:*'" in printed.stdout and "'&automation.control.acme.a1'" in printed.stdout
    generated = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    assert "redis://agent-acme-a1:" in generated.stderr  # a new password, with the agent's URL
    refused = subprocess.run([*command, "--platform", "amiga"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "--platform must be one of" in refused.stderr
