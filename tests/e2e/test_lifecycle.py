"""Cancellation, retries and delivery deadlines with the platform's real processes."""

from __future__ import annotations

import base64
import itertools
import json
import textwrap
import time
from datetime import UTC, datetime, timedelta

import psutil
import pytest

from dispatch.contract import deliveries_key
from tests.e2e.test_dispatch import audit, marker_workflow, slow_first_run, wait_until
from tests.servers.platform import Platform

pytestmark = pytest.mark.e2e


def one_at_a_time(platform: Platform, prefix: str) -> str:
    """A new tenant whose project "one" runs one job at a time (max_running_jobs 1)."""
    tenant = f"{prefix}{int(time.time() * 1000) % 10**8}"
    admin = platform.token("admin", "platform")
    assert platform.api("POST", "/tenants", admin, {"tenant_id": tenant}).status_code == 201
    made = platform.api("POST", f"/tenants/{tenant}/projects", admin, {"project_id": "one", "max_running_jobs": 1})
    assert made.status_code == 201, made.text
    return tenant


def sleepers(marker: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


def test_cancelling_a_running_job_stops_it_within_five_seconds_and_keeps_every_tasks_result(
    platform: Platform, tmp_path
):
    tenant, project = platform.tenant()
    # A long heartbeat: the cancel must arrive through the direct control message, not the next beat.
    platform.start_agent(tenant, project, "x1", HEARTBEAT_INTERVAL="60")
    # ... longer than half the platform's 4 s lease: the agent says so after its first heartbeat
    wait_until(
        lambda: "more than half the control plane's lease of 4 s" in platform.log(f"agent-{tenant}-x1"),
        what="the warning",
    )
    operator = platform.token("operator", tenant, project)
    marker = f"cancel-me-{tenant}"
    workflow = textwrap.dedent(
        f"""\
        name: long
        timeout: 5m
        tasks:
          - {{name: quick, type: command, config: {{command: echo, args: [done]}}}}
          - {{name: slow, type: command, config: {{command: sh, args: ["-c", "sleep 120 # {marker}"]}}}}
          - {{name: never, type: command, config: {{command: "true"}}}}
        """
    )
    job_id = platform.submit(operator, workflow)["job_id"]
    platform.wait_for(operator, job_id, {"running"})
    wait_until(lambda: sleepers(marker), what="the slow task starting")
    started = time.monotonic()
    assert platform.api("POST", f"/jobs/{job_id}/cancel", operator).status_code == 202
    done = platform.wait_for(operator, job_id, timeout=10)
    assert time.monotonic() - started < 5
    assert done["state"] == "cancelled"
    assert [(t["name"], t["status"]) for t in done["tasks"]] == [
        ("quick", "succeeded"),
        ("slow", "cancelled"),
        ("never", "cancelled"),  # never reached: as probe lists it
    ]
    assert not sleepers(marker)


def test_a_failing_workflow_is_retried_after_its_backoff_and_then_completes(platform: Platform, tmp_path):
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "y1")
    operator = platform.token("operator", tenant, project)
    flag = tmp_path / "failed-once"
    workflow = textwrap.dedent(
        f"""\
        name: flaky
        timeout: 30s
        tasks:
          - name: flaky
            type: command
            config:
              command: sh
              args: ["-c", "if [ -e {flag} ]; then echo fine; else touch {flag}; exit 3; fi"]
        """
    )
    job_id = platform.submit(operator, workflow, max_attempts=3, retry_backoff=2)["job_id"]
    done = platform.wait_for(operator, job_id, timeout=30)
    assert done["state"] == "completed"
    first, second = done["attempts"]
    assert (first["state"], second["state"]) == ("failed", "completed")
    gap = datetime.fromisoformat(second["claimed_at"]) - datetime.fromisoformat(first["finished_at"])
    assert gap >= timedelta(seconds=1.5)  # 2 s backoff, ±20% jitter
    assert done["tasks"][-1]["output"] == "fine\n"


def given_back(valkey, queue_prefix: str) -> tuple[str, dict]:
    """The agent queue named ``queue_prefix`` (once its message is there) and a copy of the message next taken from
    it, flagged as the broker flags a message it gave back (its worker died before acknowledging it)."""
    wait_until(lambda: valkey.keys(f"{queue_prefix}*"), timeout=10)
    (queue,) = valkey.keys(f"{queue_prefix}*")
    message = json.loads(valkey.lindex(queue, -1))
    message["headers"]["redelivered"] = True
    message["properties"]["delivery_info"]["redelivered"] = True
    return queue, message


def test_a_message_that_keeps_crashing_agents_is_refused_as_poison_and_dead_lettered(platform: Platform, tmp_path):
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "v1").stop()
    operator = platform.token("operator", tenant, project)
    marker = tmp_path / "poison"
    job_id = platform.submit(operator, marker_workflow(str(marker)), agent_id="v1")["job_id"]
    # Three earlier deliveries of this message started and never finished: each crashed its agent, and the
    # broker gave the message back each time (as kombu restores an unacknowledged one: flagged redelivered).
    valkey = platform.valkey.client()
    queue, message = given_back(valkey, f"agent.{tenant}.v1")
    valkey.rpop(queue)
    valkey.rpush(queue, json.dumps(message))
    valkey.set(deliveries_key(f"{job_id}:1"), 2)  # the first delivery is not counted, the two after it are
    platform.start_agent(tenant, project, "v1")
    dead = platform.wait_for(operator, job_id, {"dead_letter"}, timeout=15)
    assert dead["dead_letter_reason"] == "poison" and "crashes agents" in dead["error"]
    assert not marker.exists()


def test_a_forged_message_over_the_poison_limit_cannot_dead_letter_the_job_it_names(platform: Platform, tmp_path):
    # With write access to the broker, push an unsigned message that names a queued job in its task id, flagged
    # redelivered, its delivery counter over the limit: the poison check must not trust that id.
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "v2").stop()
    operator = platform.token("operator", tenant, project)
    marker = tmp_path / "ran"
    job_id = platform.submit(operator, marker_workflow(str(marker)), agent_id="v2")["job_id"]
    valkey = platform.valkey.client()
    queue, forged = given_back(valkey, f"agent.{tenant}.v2")
    forged["body"] = base64.b64encode(json.dumps([[], {"junk": "no envelope at all"}, {}]).encode()).decode()
    valkey.rpush(queue, json.dumps(forged))  # taken before the genuine message
    valkey.set(deliveries_key(f"{job_id}:1"), 100)
    platform.start_agent(tenant, project, "v2")
    assert platform.wait_for(operator, job_id, timeout=20)["state"] == "completed" and marker.exists()
    [refused] = wait_until(lambda: audit(platform, tenant, "job.message_refused"), what="the refusal's audit")
    assert refused["details"]["reason"] == "unsigned", refused


def test_a_first_delivery_is_not_counted_in_the_broker(platform: Platform, tmp_path):
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "f1")
    operator = platform.token("operator", tenant, project)
    marker = tmp_path / "ran"
    job_id = platform.submit(operator, marker_workflow(str(marker), sleep=2), agent_id="f1")["job_id"]
    wait_until(marker.exists, timeout=15, what="the job starting")
    assert platform.valkey.client().exists(deliveries_key(f"{job_id}:1")) == 0  # not even while it runs
    assert platform.wait_for(operator, job_id, {"completed"})["state"] == "completed"


def test_jobs_over_a_projects_running_limit_wait_queued_and_all_run(platform: Platform, tmp_path):
    tenant = one_at_a_time(platform, "cap")
    for agent in ("c1", "c2"):
        platform.start_agent(tenant, "one", agent)
    operator = platform.token("operator", tenant, "one")
    job_ids = [platform.submit(operator, marker_workflow(str(tmp_path / f"m{i}"), sleep=1))["job_id"] for i in range(3)]
    jobs = [platform.wait_for(operator, job_id, timeout=40) for job_id in job_ids]
    assert {job["state"] for job in jobs} == {"completed"}
    spans = sorted(
        (
            datetime.fromisoformat(j["attempts"][0]["claimed_at"]),
            datetime.fromisoformat(j["attempts"][0]["finished_at"]),
        )
        for j in jobs
    )
    assert all(earlier[1] <= later[0] for earlier, later in itertools.pairwise(spans))  # one at a time
    assert {j["attempts"][0]["agent_id"] for j in jobs} <= {"c1", "c2"}


def test_a_job_scheduled_for_later_stays_pending_until_then_and_is_published_by_the_scheduler(
    platform: Platform, tmp_path
):
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "d1")
    operator = platform.token("operator", tenant, project)
    marker = tmp_path / "later"
    at = datetime.now(UTC) + timedelta(seconds=4)
    job_id = platform.submit(operator, marker_workflow(str(marker)), scheduled_at=at.isoformat())["job_id"]
    time.sleep(1.5)
    assert platform.api("GET", f"/jobs/{job_id}", operator).json()["state"] == "pending" and not marker.exists()
    done = platform.wait_for(operator, job_id, timeout=20)
    assert done["state"] == "completed"
    assert datetime.fromisoformat(done["attempts"][0]["claimed_at"]).replace(tzinfo=UTC) >= at


def test_a_run_lost_while_its_agent_was_frozen_is_stopped_when_the_agent_wakes(platform: Platform, tmp_path):
    tenant, project = platform.tenant()
    agent = platform.start_agent(tenant, project, "f1")
    operator = platform.token("operator", tenant, project)
    marker, flag = f"frozen-{tenant}", tmp_path / "ran-once"
    workflow = slow_first_run(flag, name="frozen", timeout="5m", sleep=120, then="again", marker=marker)
    job_id = platform.submit(operator, workflow)["job_id"]
    platform.wait_for(operator, job_id, {"running"})
    wait_until(lambda: sleepers(marker), what="the first run starting")
    frozen = psutil.Process(agent.pid)
    frozen.suspend()  # no heartbeat: past its 4 s lease the reaper makes the attempt lost and queues the next
    try:
        wait_until(
            lambda: platform.api("GET", f"/jobs/{job_id}", operator).json()["attempt"] == 2,
            timeout=15,
            what="the attempt lost",
        )
    finally:
        frozen.resume()
    woke = time.monotonic()
    # its first heartbeat names the lost attempt; the answer says to stop it, and the next attempt runs
    wait_until(lambda: not sleepers(marker), timeout=10, what="the lost run stopped")
    assert time.monotonic() - woke < 10  # not the 120 s of its sleep
    done = platform.wait_for(operator, job_id, timeout=30)
    assert done["state"] == "completed" and [a["state"] for a in done["attempts"]] == ["lost", "completed"]
    assert done["tasks"][-1]["output"] == "again\n"
    assert "is no longer this agent's" in platform.log(f"agent-{tenant}-f1")


def test_an_agent_stopped_while_a_job_waits_for_its_projects_capacity_gives_the_job_back(platform: Platform, tmp_path):
    tenant = one_at_a_time(platform, "give")
    operator = platform.token("operator", tenant, "one")
    platform.start_agent(tenant, "one", "g1")
    first = platform.submit(operator, marker_workflow(str(tmp_path / "first"), sleep=6))["job_id"]
    platform.wait_for(operator, first, {"running"})
    waiting = platform.start_agent(tenant, "one", "g2")
    second = platform.submit(operator, marker_workflow(str(tmp_path / "second")))["job_id"]
    wait_until(lambda: "waits: project 'one' already runs" in platform.log(f"agent-{tenant}-g2"), what="the wait")
    asked = time.monotonic()
    waiting.stop()  # SIGTERM: a warm shutdown, which the wait held until the project had room (or a day)
    assert time.monotonic() - asked < 10
    done = platform.wait_for(operator, second, timeout=30)  # its message went back to the queue: g1 runs it
    assert done["state"] == "completed" and [a["agent_id"] for a in done["attempts"]] == ["g1"], done
    assert platform.wait_for(operator, first)["state"] == "completed"
