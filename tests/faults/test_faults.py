"""Faults lose nothing: no job lost, none run twice, none left running, the final states right."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import psutil
import pytest
import requests

from tests.e2e.test_dispatch import marker_workflow, runs, slow_first_run, wait_until
from tests.servers.platform import Platform
from tests.servers.proxy import Gateway

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

MakePlatform = Callable[..., Platform]


def settle(platform: Platform, tenant: str, job_ids: list[str], timeout: float = 60) -> dict[str, dict]:
    """Wait until every job is final and nothing of the tenant is running; returns the jobs by id."""
    viewer = platform.token("viewer", tenant)
    jobs = {job_id: platform.wait_for(viewer, job_id, timeout=timeout) for job_id in job_ids}
    assert platform.api("GET", "/jobs?state=running", viewer).json()["total"] == 0
    return jobs


def test_a_valkey_restart_while_jobs_are_queued_and_running_loses_nothing(make_platform: MakePlatform, tmp_path):
    platform = make_platform()
    tenant, project = platform.tenant()
    operator = platform.token("operator", tenant, project)
    platform.start_agent(tenant, project, "v1")
    running_marker = tmp_path / "running"
    running = platform.submit(operator, marker_workflow(str(running_marker), sleep=4))["job_id"]
    platform.wait_for(operator, running, {"running"})
    queued = [platform.submit(operator, marker_workflow(str(tmp_path / f"q{i}")))["job_id"] for i in range(4)]
    platform.valkey.stop()
    time.sleep(2)
    platform.valkey.start()
    jobs = settle(platform, tenant, [running, *queued], timeout=90)
    assert {job["state"] for job in jobs.values()} == {"completed"}, jobs
    assert runs(running_marker) == 1
    assert [runs(tmp_path / f"q{i}") for i in range(4)] == [1, 1, 1, 1]


def test_a_task_longer_than_the_visibility_timeout_is_not_executed_twice(make_platform: MakePlatform, tmp_path):
    platform = make_platform(BROKER_VISIBILITY_TIMEOUT="2", BROKER_RESTORE_INTERVAL="1")
    tenant, project = platform.tenant()
    operator = platform.token("operator", tenant, project)
    for agent in ("t1", "t2"):
        platform.start_agent(tenant, project, agent, BROKER_VISIBILITY_TIMEOUT="2", BROKER_RESTORE_INTERVAL="1")
    marker = tmp_path / "long"
    job_id = platform.submit(operator, marker_workflow(str(marker), sleep=8))["job_id"]
    job = settle(platform, tenant, [job_id])[job_id]
    assert job["state"] == "completed" and len(job["attempts"]) == 1
    assert runs(marker) == 1
    redelivered = "".join(platform.log(f"agent-{tenant}-{a}") for a in ("t1", "t2"))
    assert "not claimed" in redelivered  # the broker did deliver it again; the claim refused it


def test_a_broker_connection_drop_during_a_long_job_does_not_start_a_parallel_copy(
    make_platform: MakePlatform, tmp_path
):
    platform = make_platform()
    tenant, project = platform.tenant()
    operator = platform.token("operator", tenant, project)
    for agent in ("b1", "b2"):
        platform.start_agent(tenant, project, agent)
    marker = tmp_path / "long"
    job_id = platform.submit(operator, marker_workflow(str(marker), sleep=6))["job_id"]
    platform.wait_for(operator, job_id, {"running"})
    platform.valkey.client().client_kill_filter(_type="normal", skipme=True)  # every client's connection drops
    job = settle(platform, tenant, [job_id])[job_id]
    assert job["state"] == "completed" and len(job["attempts"]) == 1
    assert runs(marker) == 1


def test_killing_the_web_process_and_the_dispatcher_mid_jobs_loses_nothing(make_platform: MakePlatform, tmp_path):
    platform = make_platform()
    tenant, project = platform.tenant()
    operator = platform.token("operator", tenant, project)
    platform.start_agent(tenant, project, "k1")
    jobs = [platform.submit(operator, marker_workflow(str(tmp_path / f"j{i}"), sleep=1))["job_id"] for i in range(4)]
    platform.wait_for(operator, jobs[0], {"running"})
    platform.process("web").kill()
    platform.process("dispatcher").kill()
    time.sleep(3)  # the agent keeps running; its reports are retried with backoff
    platform.start_web()
    platform.start_dispatcher()
    finished = settle(platform, tenant, jobs, timeout=90)
    assert {job["state"] for job in finished.values()} == {"completed"}
    assert [runs(tmp_path / f"j{i}") for i in range(4)] == [1, 1, 1, 1]


def test_a_web_outage_longer_than_a_lease_leaves_running_jobs_running_in_their_first_attempt(
    make_platform: MakePlatform, tmp_path
):
    """The web is down for more than twice the lease while the dispatcher's reaper runs on (every second): no agent
    can renew a lease meanwhile, so the reaper reaps none and the agents stop no run. One job outlives the outage;
    the other ends during it, and its final state waits longer than its agent's REPORT_DEADLINE for the web. Each
    ends in its first attempt, run once. (Before the beacon, the agents stopped their runs after a lease, the reaper
    made the attempts lost, and the jobs ran again from the start.)"""
    platform = make_platform()  # a lease of 4 s, the beacon marked every 0.5 s
    tenant, project = platform.tenant()
    operator = platform.token("operator", tenant, project)
    for agent in ("o1", "o2"):
        platform.start_agent(tenant, project, agent, REPORT_DEADLINE="2")
    long, short, go = tmp_path / "long", tmp_path / "short", tmp_path / "go"
    jobs = [
        platform.submit(operator, marker_workflow(str(long), sleep=14))["job_id"],
        platform.submit(operator, marker_workflow(str(short), until=str(go)))["job_id"],
    ]
    for job_id in jobs:
        platform.wait_for(operator, job_id, {"running"})
    platform.process("web").kill()
    go.touch()  # the short job ends now, during the outage
    time.sleep(9)
    assert platform.process("dispatcher").running
    platform.start_web()
    finished = settle(platform, tenant, jobs)
    for job in finished.values():
        assert job["state"] == "completed" and [a["state"] for a in job["attempts"]] == ["completed"], job
    assert (runs(long), runs(short)) == (1, 1)
    assert "no lease is reaped" in platform.log("dispatcher")
    agents = "".join(platform.log(f"agent-{tenant}-{a}") for a in ("o1", "o2"))
    assert "the control plane cannot take it yet (its beacon says it is down or just back)" in agents


@pytest.mark.mariadb
def test_mariadb_stopped_under_submission_load_answers_503_then_recovers_with_nothing_half_written(
    make_platform: MakePlatform, mariadb_server, tmp_path
):
    database = mariadb_server.fresh_database()
    platform = make_platform(mariadb_server.url_for(database))
    tenant, project = platform.tenant()
    operator = platform.token("operator", tenant, project)
    platform.start_agent(tenant, project, "m1")
    accepted: list[str] = []
    statuses: list[int] = []
    stop = threading.Event()

    def submit_forever() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                reply = platform.api("POST", "/jobs", operator, {"workflow": marker_workflow(str(tmp_path / f"s{n}"))})
            except requests.RequestException:
                statuses.append(0)
                continue
            statuses.append(reply.status_code)
            if reply.status_code == 201:
                accepted.append(reply.json()["job_id"])
            else:
                assert reply.status_code == 503 and reply.json()["error"] == "database_unavailable", reply.text
            time.sleep(0.05)

    loader = threading.Thread(target=submit_forever)
    loader.start()
    try:
        wait_until(lambda: len(accepted) >= 5, what="some submissions")
        mariadb_server.stop()
        time.sleep(10)
        mariadb_server.start()
        count = len(accepted)
        wait_until(lambda: len(accepted) >= count + 5, timeout=60, what="submissions after the outage")
    finally:
        stop.set()
        loader.join()
    assert 503 in statuses
    finished = settle(platform, tenant, accepted, timeout=120)
    assert {job["state"] for job in finished.values()} == {"completed"}
    listed = platform.api("GET", "/jobs?limit=500", platform.token("viewer", tenant)).json()
    assert listed["total"] == len(accepted)  # no job was half-written: every stored job was acknowledged


def test_a_granted_claim_whose_answer_is_lost_is_made_again_and_runs_in_its_first_attempt(
    make_platform: MakePlatform, tmp_path
):
    """A gateway between agent and control plane loses the answer to the first claim, after the control plane
    granted it: the agent's next try of the same claim is granted again, so the job runs at once, once, in its
    first attempt, instead of waiting for the lease to expire and running in a second one."""
    platform = make_platform()
    tenant, project = platform.tenant()
    operator = platform.token("operator", tenant, project)
    gateway = Gateway(platform.url)
    try:
        platform.start_agent(tenant, project, "gw", CONTROL_PLANE_URL=gateway.url)
        gateway.lose_answers("POST", "/claim")
        marker = tmp_path / "mark"
        job_id = platform.submit(operator, marker_workflow(str(marker)))["job_id"]
        job = settle(platform, tenant, [job_id])[job_id]
        lost = gateway.lost
    finally:
        gateway.close()
    assert lost == [f"POST /api/v1/jobs/{job_id}/claim"]
    assert job["state"] == "completed" and [a["state"] for a in job["attempts"]] == ["completed"], job
    assert runs(marker) == 1


def test_an_agent_deleted_while_it_runs_a_job_stops_that_run_gives_the_next_back_and_exits(
    make_platform: MakePlatform, tmp_path
):
    """Deleted, the agent's heartbeats are refused, so its running job's lease runs out and the reaper queues the job
    again: the agent stops its copy of the run once it could not renew the lease for a lease's length (the job never
    runs twice at once), and when the next attempt's message reaches it, its claim is refused (not registered): it
    puts the message back for another agent and exits with status 3, instead of dropping it."""
    platform = make_platform()
    tenant, project = platform.tenant()
    operator = platform.token("operator", tenant, project)
    doomed = platform.start_agent(tenant, project, "doomed")
    marker = f"first-copy-{uuid.uuid4().hex}"  # in the first copy's command line, to find its process
    workflow = slow_first_run(tmp_path / "flag", name="long", timeout="60s", sleep=60, then="second", marker=marker)
    job_id = platform.submit(operator, workflow)["job_id"]
    platform.wait_for(operator, job_id, {"running"})
    deleted = platform.api("DELETE", "/agents/doomed", platform.token("tenant_admin", tenant))
    assert deleted.status_code == 204, deleted.text
    wait_until(lambda: not doomed.running, timeout=30)
    assert doomed.returncode == 3
    log = platform.log(f"agent-{tenant}-doomed")
    assert "its lease has not been renewed" in log and "refuses this agent's claims" in log, log[-3000:]
    assert not [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    platform.start_agent(tenant, project, "heir")
    job = settle(platform, tenant, [job_id])[job_id]
    assert job["state"] == "completed" and [a["state"] for a in job["attempts"]] == ["lost", "completed"], job
    assert [a["agent_id"] for a in job["attempts"]] == ["doomed", "heir"]
    assert job["tasks"][0]["output"] == "second\n"
