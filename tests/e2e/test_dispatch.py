"""A job submitted over REST runs on the right agent through Celery and Valkey, and nothing is lost."""

from __future__ import annotations

import hashlib
import json
import signal
import textwrap
import time
import uuid

import psutil
import pytest

from app import create_app
from app.auth.tokens import Principal
from app.jobs import submission
from app.jobs.schemas import JobSubmit
from dispatch import beacon
from dispatch.celery import make_celery
from dispatch.contract import RUN_JOB_TASK, agent_queue
from dispatch.signing import Signer, generate_keypair, load_signing_key
from tests.servers.platform import Platform

pytestmark = pytest.mark.e2e

UNAME = textwrap.dedent(
    """\
    name: uname
    timeout: 30s
    tasks:
      - name: uname
        type: command
        timeout: 10s
        config:
          command: uname
          args: ["-a"]
    """
)


def test_a_submitted_uname_job_completes_with_its_output_stored(platform: Platform):
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "a1")
    operator = platform.token("operator", tenant, project)
    job = platform.submit(operator, UNAME)
    assert job["state"] in ("queued", "running", "completed")
    done = platform.wait_for(operator, job["job_id"])
    assert done["state"] == "completed", done
    [task] = done["tasks"]
    assert task["status"] == "succeeded" and task["output"].startswith("Linux ")
    assert done["attempts"][0]["agent_id"] == "a1"
    agent = platform.api("GET", "/agents/a1", operator).json()
    assert agent["status"] == "online" and agent["platform"] == "linux"
    assert {"command", "db", "downloadexec", "http", "ssh"} <= set(agent["task_types"])
    assert "powershell" not in agent["task_types"]  # no PowerShell on this host


def marker_workflow(path: str, *, sleep: float = 0, name: str = "mark", until: str | None = None) -> str:
    """A workflow that appends one line to ``path`` (so runs can be counted), then optionally sleeps, or waits until
    the file ``until`` exists."""
    rest = f"sleep {sleep}" if until is None else f"until [ -e {until} ]; do sleep 0.1; done"
    return textwrap.dedent(
        f"""\
        name: {name}
        timeout: 60s
        tasks:
          - name: mark
            type: command
            config:
              command: sh
              args: ["-c", "echo ran >> {path}; {rest}"]
        """
    )


def slow_first_run(flag, *, name: str, timeout: str, sleep: int, then: str, marker: str = "") -> str:
    """A workflow whose first run leaves ``flag`` and sleeps ``sleep`` s, its process naming ``marker``; a later run
    finds the flag and prints ``then`` at once."""
    script = f"if [ -e {flag} ]; then echo {then}; else touch {flag}; sleep {sleep}; : {marker}; fi"
    return textwrap.dedent(
        f"""\
        name: {name}
        timeout: {timeout}
        tasks:
          - name: work
            type: command
            config:
              command: sh
              args: ["-c", "{script}"]
        """
    )


def runs(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def audit(platform: Platform, tenant: str, action: str) -> list[dict]:
    reply = platform.api("GET", f"/audit?action={action}&limit=100", platform.token("tenant_admin", tenant))
    assert reply.status_code == 200, reply.text
    return list(reply.json()["events"])


def wait_until(check, timeout: float = 20, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def nothing_running(platform: Platform, tenant: str) -> None:
    reply = platform.api("GET", "/jobs?state=running", platform.token("viewer", tenant))
    assert reply.json()["total"] == 0


def test_pinned_jobs_run_on_their_agent_and_shared_jobs_are_shared_by_the_projects_agents(platform: Platform, tmp_path):
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "s1")
    platform.start_agent(tenant, project, "s2")
    operator = platform.token("operator", tenant, project)
    shared = [
        platform.submit(operator, marker_workflow(str(tmp_path / f"s{i}"), sleep=0.4))["job_id"] for i in range(6)
    ]
    pinned = platform.submit(operator, marker_workflow(str(tmp_path / "p")), agent_id="s2")["job_id"]
    ran_on = set()
    for job_id in shared:
        job = platform.wait_for(operator, job_id)
        assert job["state"] == "completed", job
        ran_on.add(job["attempts"][-1]["agent_id"])
    assert ran_on == {"s1", "s2"}
    assert platform.wait_for(operator, pinned)["attempts"][-1]["agent_id"] == "s2"
    nothing_running(platform, tenant)


def test_a_batch_runs_each_job_on_its_agent_and_the_shared_ones_on_either(platform: Platform, tmp_path):
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "b1")
    platform.start_agent(tenant, project, "b2")
    operator = platform.token("operator", tenant, project)
    entries = [{"workflow": marker_workflow(str(tmp_path / "pinned1")), "agent_id": "b1"}]
    entries += [{"workflow": marker_workflow(str(tmp_path / "pinned2")), "agent_id": "b2"}]
    entries += [{"workflow": marker_workflow(str(tmp_path / f"shared{i}"), sleep=0.3)} for i in range(4)]
    reply = platform.api("POST", "/jobs/batch", operator, {"jobs": entries})
    assert reply.status_code == 201, reply.text
    jobs = [platform.wait_for(operator, job["job_id"]) for job in reply.json()["jobs"]]
    assert all(job["state"] == "completed" for job in jobs), jobs
    assert [job["attempts"][-1]["agent_id"] for job in jobs[:2]] == ["b1", "b2"]
    assert {job["attempts"][-1]["agent_id"] for job in jobs[2:]} <= {"b1", "b2"}
    assert runs(tmp_path / "pinned1") == runs(tmp_path / "pinned2") == 1
    assert all(runs(tmp_path / f"shared{i}") == 1 for i in range(4))
    nothing_running(platform, tenant)


def test_a_powershell_workflow_never_reaches_a_linux_agent(platform: Platform):
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "lin")
    operator = platform.token("operator", tenant, project)
    workflow = "name: ps\ntasks:\n  - {name: a, type: powershell, config: {script: Get-Date}}\n"
    pinned = platform.api("POST", "/jobs", operator, {"workflow": workflow, "agent_id": "lin"})
    assert pinned.status_code == 422 and pinned.json()["error"] == "incompatible_platform"
    job = platform.submit(operator, workflow)
    assert job["platform"] == "windows"
    time.sleep(3)
    after = platform.api("GET", f"/jobs/{job['job_id']}", operator).json()
    assert after["state"] == "queued" and after["attempts"][0]["agent_id"] is None
    assert (
        platform.valkey.client().llen(f"tenant.{tenant}.{project}.windows")
        + sum(platform.valkey.client().llen(f"tenant.{tenant}.{project}.windows:{p}") for p in range(1, 10))
        == 1
    )


def push(platform: Platform, queue: str, kwargs: dict, task_id: str) -> None:
    """Put a message straight onto a queue with valid broker access, as an intruder on the broker could."""
    celery = make_celery(platform.valkey.url)
    try:
        celery.send_task(RUN_JOB_TASK, kwargs=kwargs, queue=queue, task_id=task_id)
    finally:
        celery.close()


def envelope(
    platform: Platform,
    key: str,
    *,
    audience: str,
    tenant: str,
    project: str,
    job_id: str,
    workflow: str,
    now: float | None = None,
    expires_at: float | None = None,
) -> dict:
    return Signer(load_signing_key(key)).sign(
        audience=audience,
        tenant=tenant,
        project=project,
        job_id=job_id,
        attempt=1,
        name="intruder",
        workflow=workflow,
        variables={},
        now=now,
        expires_at=expires_at,
    )


def test_forged_expired_and_misaddressed_messages_never_run_and_are_audited(platform: Platform, tmp_path):
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "f1")
    queue = agent_queue(tenant, "f1")
    other_key, _ = generate_keypair()
    cases = {
        "bad_signature": (other_key, {"audience": queue}),
        "expired": (
            platform.signing_key,
            {"audience": queue, "now": time.time() - 7200, "expires_at": time.time() - 3600},
        ),
        "wrong_audience": (platform.signing_key, {"audience": agent_queue(tenant, "someone-else")}),
    }
    markers = {}
    for reason, (key, fields) in cases.items():
        markers[reason] = tmp_path / reason
        kwargs = envelope(
            platform,
            key,
            tenant=tenant,
            project=project,
            job_id=f"forged-{reason}",
            workflow=marker_workflow(str(markers[reason])),
            **fields,
        )
        push(platform, queue, kwargs, f"forged-{reason}:1")
    push(platform, queue, {"workflow": marker_workflow(str(tmp_path / "unsigned"))}, "unsigned:1")
    refused = wait_until(
        lambda: (
            len(audit(platform, tenant, "job.message_refused")) >= 4 and audit(platform, tenant, "job.message_refused")
        ),
        what="four audited refusals",
    )
    assert sorted(e["details"]["reason"] for e in refused) == ["bad_signature", "expired", "unsigned", "wrong_audience"]
    assert all(e["outcome"] == "refused" and e["details"]["agent_id"] == "f1" for e in refused)
    assert not any(path.exists() for path in [*markers.values(), tmp_path / "unsigned"])


def test_a_message_delivered_twice_runs_once_and_a_replay_is_audited_even_after_a_restart(platform: Platform, tmp_path):
    tenant, project = platform.tenant()
    agent = platform.start_agent(tenant, project, "r1")
    operator = platform.token("operator", tenant, project)
    marker = tmp_path / "replayed"
    workflow = marker_workflow(str(marker))
    job = platform.submit(operator, workflow, agent_id="r1")
    assert platform.wait_for(operator, job["job_id"])["state"] == "completed"
    # The same genuine envelope, delivered twice more: the claim refuses the first, the nonce the second.
    kwargs = envelope(
        platform,
        platform.signing_key,
        audience=agent_queue(tenant, "r1"),
        tenant=tenant,
        project=project,
        job_id=job["job_id"],
        workflow=workflow,
    )
    push(platform, agent_queue(tenant, "r1"), kwargs, f"{job['job_id']}:1")
    push(platform, agent_queue(tenant, "r1"), kwargs, f"{job['job_id']}:1")
    replays = wait_until(lambda: audit(platform, tenant, "job.message_refused"), what="the replay's audit")
    assert [e["details"]["reason"] for e in replays] == ["replayed"]
    claims = wait_until(lambda: audit(platform, tenant, "job.claim_refused"), what="the refused claim's audit")
    assert [(e["details"]["reason"], e["details"]["agent_id"]) for e in claims] == [("invalid_transition", "r1")]
    # Restarted, the agent has forgot the envelopes it took: the claim alone stops the replay (audited once per
    # attempt and agent, above).
    agent.stop()
    refused_before = platform.log(f"agent-{tenant}-r1").count("not claimed")
    platform.start_agent(tenant, project, "r1")
    push(platform, agent_queue(tenant, "r1"), kwargs, f"{job['job_id']}:1")
    wait_until(
        lambda: platform.log(f"agent-{tenant}-r1").count("not claimed") > refused_before,
        what="the restarted agent's claim of the replay refused",
    )
    assert len(audit(platform, tenant, "job.message_refused")) == 1  # not refused by the agent: it forgot
    assert len(audit(platform, tenant, "job.claim_refused")) == 1
    time.sleep(1)
    assert runs(marker) == 1


def test_a_job_cancelled_while_queued_never_runs(platform: Platform, tmp_path):
    tenant, project = platform.tenant()
    agent = platform.start_agent(tenant, project, "c1")
    agent.stop()  # registered, but not consuming: the job waits in its queue
    operator = platform.token("operator", tenant, project)
    marker = tmp_path / "cancelled"
    job = platform.submit(operator, marker_workflow(str(marker)), agent_id="c1")
    assert platform.api("GET", f"/jobs/{job['job_id']}", operator).json()["state"] == "queued"
    cancelled = platform.api("POST", f"/jobs/{job['job_id']}/cancel", operator)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    platform.start_agent(tenant, project, "c1")
    wait_until(lambda: "not claimed" in platform.log(f"agent-{tenant}-c1"), what="the agent dropping the message")
    assert not marker.exists()
    assert platform.api("GET", f"/jobs/{job['job_id']}", operator).json()["state"] == "cancelled"


def steady(platform: Platform) -> bool:
    """Whether the platform's beacon says its control plane has been up long enough for the reaper to reap."""
    seen = beacon.read(platform.valkey.client())
    lease, interval = float(platform.env["LEASE_SECONDS"]), float(platform.env["BEACON_INTERVAL"])
    return seen is not None and seen.up and seen.up_for >= lease + beacon.gap_of(interval)


def test_an_agent_killed_mid_job_loses_its_attempt_and_the_next_attempt_runs_on_another_agent(
    platform: Platform, tmp_path
):
    tenant, project = platform.tenant()
    first = platform.start_agent(tenant, project, "k1")
    operator = platform.token("operator", tenant, project)
    flag = tmp_path / "first-attempt"
    workflow = slow_first_run(flag, name="survive", timeout="60s", sleep=30, then="second")
    job_id = platform.submit(operator, workflow)["job_id"]
    platform.wait_for(operator, job_id, {"running"})
    wait_until(flag.exists, what="the first attempt starting its task")
    platform.start_agent(tenant, project, "k2")
    # The bound below holds once the control plane has been up for a lease and its beacon's gap (docs/OPERATIONS.md,
    # "Control plane outages"): a platform just started, or one back from an outage, waits that long first.
    wait_until(lambda: steady(platform), what="the control plane up for a lease and the beacon's gap")
    first.kill()
    killed_at = time.monotonic()
    lost = wait_until(
        lambda: (
            (job := platform.api("GET", f"/jobs/{job_id}", operator).json())["attempts"][0]["state"] == "lost" and job
        ),
        timeout=30,
        what="the first attempt becoming lost",
    )
    assert time.monotonic() - killed_at <= 4 + 1 + 3  # lease + reaper interval + slack
    assert lost["attempts"][0]["agent_id"] == "k1"
    done = platform.wait_for(operator, job_id)
    assert done["state"] == "completed", done
    assert [(a["number"], a["state"], a["agent_id"]) for a in done["attempts"]] == [
        (1, "lost", "k1"),
        (2, "completed", "k2"),
    ]
    assert done["tasks"][-1]["output"] == "second\n"
    nothing_running(platform, tenant)


def test_an_agent_asked_to_stop_delivers_its_last_final_state_before_it_exits(platform: Platform, tmp_path):
    tenant, project = platform.tenant()
    agent = platform.start_agent(tenant, project, "s1")
    operator = platform.token("operator", tenant, project)
    go, ran = tmp_path / "go", tmp_path / "ran"
    script = f"until [ -e {go} ]; do sleep 0.05; done; touch {ran}"
    workflow = textwrap.dedent(
        f"""\
        name: last
        tasks:
          - {{name: work, type: command, config: {{command: sh, args: ["-c", "{script}"]}}}}
        """
    )
    job_id = platform.submit(operator, workflow)["job_id"]
    platform.wait_for(operator, job_id, {"running"})
    web = psutil.Process(platform.processes["web"].pid)
    frozen = [web, *web.children(recursive=True)]
    for process in frozen:  # the control plane stops answering: the final state waits in the agent's outbox
        process.suspend()
    try:
        assert agent._process is not None
        agent._process.send_signal(signal.SIGTERM)  # a warm shutdown: the job ends, then the agent stops
        go.touch()  # the job ends only now, while the control plane does not answer
        wait_until(ran.exists, what="the job's command")
        time.sleep(0.7)
        assert agent._process.poll() is None  # still there, with the report it could not deliver yet
    finally:
        for process in frozen:
            process.resume()
    assert agent._process.wait(timeout=30) == 0
    done = platform.wait_for(operator, job_id, timeout=5)
    assert done["state"] == "completed" and [a["state"] for a in done["attempts"]] == ["completed"]


def test_a_job_whose_publish_never_happened_is_published_by_the_sweeper(platform: Platform, tmp_path):
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "w1")
    marker = tmp_path / "swept"
    # The web process crashed between commit and publish: the job is committed and nothing was sent.
    flask_app = create_app(
        {"DATABASE_URL": platform.env["DATABASE_URL"], "VALKEY_URL": None, "JWT_SECRET": platform.jwt_secret}
    )
    with flask_app.app_context():
        caller = Principal(subject="operator", tenant_id=tenant, role="operator", project_id=project)
        job, _ = submission.submit_job(caller=caller, data=JobSubmit(workflow=marker_workflow(str(marker))))
        job_id = job.id
    operator = platform.token("operator", tenant, project)
    assert platform.api("GET", f"/jobs/{job_id}", operator).json()["state"] == "pending"
    done = platform.wait_for(operator, job_id, timeout=20)
    assert done["state"] == "completed"
    assert runs(marker) == 1


def test_a_queued_job_that_is_changed_runs_its_new_workflow_not_the_published_one(platform: Platform, tmp_path):
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "u1").stop()
    operator = platform.token("operator", tenant, project)
    old, new = tmp_path / "old", tmp_path / "new"
    job_id = platform.submit(operator, marker_workflow(str(old)), agent_id="u1")["job_id"]
    changed = platform.api("PUT", f"/jobs/{job_id}", operator, {"workflow": marker_workflow(str(new))})
    assert changed.status_code == 200 and changed.json()["attempt"] == 2
    platform.start_agent(tenant, project, "u1")
    done = platform.wait_for(operator, job_id)
    assert done["state"] == "completed"
    assert [(a["number"], a["state"]) for a in done["attempts"]] == [(1, "cancelled"), (2, "completed")]
    assert runs(new) == 1 and not old.exists()


def test_messages_that_never_reach_the_agents_code_are_recorded(platform: Platform):
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "n1")
    queue = agent_queue(tenant, "n1")
    celery = make_celery(platform.valkey.url)
    try:
        celery.send_task("workers.no_such_task", kwargs={}, queue=queue, task_id="unknown:1")
        with celery.producer_or_acquire() as producer:  # a pickled body: never accepted by a JSON-only agent
            producer.publish(
                b"\x80\x04K\x01.",
                routing_key=queue,
                exchange="",
                content_type="application/x-python-serialize",
                content_encoding="binary",
                headers={"task": RUN_JOB_TASK, "id": "pickled:1"},
            )
    finally:
        celery.close()
    refused = wait_until(
        lambda: len(events := audit(platform, tenant, "job.message_refused")) >= 2 and events,
        what="both messages recorded",
    )
    assert sorted(e["details"]["reason"] for e in refused) == ["undecodable", "unknown_task"]


def test_a_workflow_cannot_read_the_agents_credentials(platform: Platform):
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "e1")
    operator = platform.token("operator", tenant, project)
    agent_token = platform.agent_env(tenant, project, "e1")["JWT_TOKEN"]
    snoop = textwrap.dedent(
        """\
        name: snoop
        tasks:
          - name: env
            type: command
            config: {command: sh, args: ["-c", "echo token=${JWT_TOKEN:-none} broker=${VALKEY_URL:-none}"]}
        """
    )
    job = platform.wait_for(operator, platform.submit(operator, snoop)["job_id"])
    assert job["tasks"][0]["output"] == "token=none broker=none\n"
    # Linux shows the environment a process was started with to every process of its user (`ps e`, /proc): the
    # agent, started with its credentials, must not show them there either. The task's parent is the agent.
    started_with = snoop.replace(
        "echo token=${JWT_TOKEN:-none} broker=${VALKEY_URL:-none}", "tr '\\\\0' '\\\\n' < /proc/$PPID/environ"
    )
    job = platform.wait_for(operator, platform.submit(operator, started_with)["job_id"])
    shown = job["tasks"][0]["output"]
    assert job["state"] == "completed" and "CONTROL_PLANE_URL=" in shown, job
    assert agent_token not in shown and "JWT_TOKEN" not in shown and "VALKEY_URL" not in shown, shown
    placeholder = snoop.replace("echo token=${JWT_TOKEN:-none} broker=${VALKEY_URL:-none}", "echo {{.JWT_TOKEN}}")
    reply = platform.api("POST", "/jobs", operator, {"workflow": placeholder})
    if reply.status_code == 201:  # the control plane may not know the name; the agent must not resolve it
        job = platform.wait_for(operator, reply.json()["job_id"])
        assert job["state"] == "failed" and "variable 'JWT_TOKEN' is not defined" in (job["error"] or "")
    assert agent_token not in json.dumps(job)


def test_a_projects_secret_reaches_its_workflow_on_the_agent_and_shows_nowhere(platform: Platform):
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "s1")
    operator = platform.token("operator", tenant, project)
    value = f"db-pass-{uuid.uuid4().hex}"
    path = f"/tenants/{tenant}/projects/{project}/secrets/DB_PW"
    assert platform.api("PUT", path, platform.token("tenant_admin", tenant), {"value": value}).status_code == 201
    use = textwrap.dedent(
        """\
        name: use-secret
        tasks:
          - name: digest
            type: command
            config:
              command: python3
              args: ["-c", "import hashlib, sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest(), sys.argv[1])",
                     "{{.secrets.DB_PW}}"]
        """
    )
    job = platform.wait_for(operator, platform.submit(operator, use)["job_id"])
    assert job["state"] == "completed", job
    # the agent had the value (its digest), and masked it where it printed it
    assert job["tasks"][0]["output"] == f"{hashlib.sha256(value.encode()).hexdigest()} ***\n"
    lines = platform.api("GET", f"/jobs/{job['job_id']}/logs", operator).json()["lines"]
    assert value not in json.dumps(job) and value not in json.dumps(lines)
    assert value not in platform.log(f"agent-{tenant}-s1") and value not in platform.log("web")
