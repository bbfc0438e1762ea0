"""``scripts/demo``: the whole platform from one command, and the deploy files that run the same processes."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tests.servers._util import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
HELLO_TASKS = ("greet", "host", "disk", "recap")
UNITS = {"web", "dispatcher", "scheduler", "agent", "flower"}


def procfile() -> dict[str, str]:
    """The Procfile's commands by process name."""
    found = (re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line) for line in (REPO / "Procfile").read_text().splitlines())
    return {match[1]: match[2].strip() for match in found if match}


def processes_of(state: Path) -> list[psutil.Process]:
    """Living processes started by the demo whose state folder is ``state``: they carry it in their environment."""
    found = []
    for proc in psutil.process_iter(["cmdline", "environ", "status"]):
        info = proc.info
        if info["status"] == psutil.STATUS_ZOMBIE:
            continue
        environ = info["environ"] or {}
        if environ.get("DEMO_STATE_DIR") == str(state) or any(str(state) in arg for arg in info["cmdline"] or ()):
            found.append(proc)
    return found


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_the_demo_runs_hello_through_the_whole_platform_and_leaves_no_process_behind(tmp_path):
    state = tmp_path / "demo"
    env = {
        **os.environ,
        "DEMO_PORT": str(free_port()),
        "DEMO_VALKEY_PORT": str(free_port()),
        "DEMO_STATE_DIR": str(state),
        "NO_COLOR": "1",
    }
    try:
        result = subprocess.run(
            [str(REPO / "scripts" / "demo"), "--once"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=50,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        for task in HELLO_TASKS:
            assert re.search(rf"^\s+{task}\s+succeeded\s+\S", output, re.MULTILINE), output
        assert re.search(r"^\S+ workflow hello completed", output, re.MULTILINE), output
        assert "hello, world" in output
        assert {"valkey", "web", "dispatcher", "scheduler", "agent"} <= {log.stem for log in (state / "logs").iterdir()}
        assert not processes_of(state)
    finally:
        for proc in processes_of(state):  # never leak into the rest of the session, even when the demo did
            proc.kill()


def test_the_procfile_has_exactly_the_platforms_processes():
    assert set(procfile()) == UNITS


@pytest.mark.parametrize("name", sorted(UNITS))
def test_each_systemd_unit_runs_its_procfile_line(name):
    unit = (REPO / "deploy" / "systemd" / f"automation-{name}.service").read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", unit, re.MULTILINE)
    assert exec_start is not None
    argv = [arg.replace("$$", "$") for arg in shlex.split(exec_start[1])]  # $$ is systemd's literal $
    assert argv == ["/bin/sh", "-c", f"exec {procfile()[name]}"]


def test_the_example_env_files_name_every_variable_the_code_reads():
    from app.config import ENVIRONMENT

    control_plane = (REPO / "deploy" / "env" / "control-plane.env.example").read_text()
    agent = (REPO / "deploy" / "env" / "agent.env.example").read_text()
    agent_names = set(re.findall(r'"([A-Z][A-Z0-9]*_[A-Z0-9_]+)"', (REPO / "workers" / "settings.py").read_text()))
    procfile_names = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (REPO / "Procfile").read_text()))
    for name in {*ENVIRONMENT, *procfile_names}:
        assert re.search(rf"^#?\s*{name}=", control_plane, re.MULTILINE), name
    for name in agent_names:
        assert re.search(rf"^#?\s*{name}=", agent, re.MULTILINE), name


QUICK = "name: quick\ntasks:\n  - name: t\n    type: command\n    config:\n      command: 'true'\n"
SLEEPER = (
    "name: sleeper\ntasks:\n  - name: nap\n    type: command\n    config:\n      command: sleep\n      args: ['300']\n"
)


@dataclass
class Serving:
    """A demo started without ``--once``, serving once it printed its welcome."""

    demo: subprocess.Popen[bytes]
    output: Path
    state: Path
    api: str
    headers: dict[str, str]

    def text(self) -> str:
        return self.output.read_text()


@contextlib.contextmanager
def serving_demo(tmp_path: Path) -> Iterator[Serving]:
    """Start the demo and wait until it serves; kill whatever is left of it at the end."""
    state = tmp_path / "demo"
    port = free_port()
    env = {
        **os.environ,
        "DEMO_PORT": str(port),
        "DEMO_VALKEY_PORT": str(free_port()),
        "DEMO_STATE_DIR": str(state),
        "NO_COLOR": "1",
    }
    output = tmp_path / "demo.out"
    with output.open("w") as sink:
        demo = subprocess.Popen(
            [str(REPO / "scripts" / "demo")], cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink
        )
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C stops all" not in output.read_text():
            assert demo.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.2)
        headers = {"Authorization": f"Bearer {(state / 'operator.token').read_text().strip()}"}
        yield Serving(demo, output, state, f"http://127.0.0.1:{port}/api/v1", headers)
    finally:
        if demo.poll() is None:
            demo.kill()
        for proc in processes_of(state):
            proc.kill()


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_the_demo_stopped_while_a_job_runs_cancels_it_and_leaves_no_process_behind(tmp_path):
    with serving_demo(tmp_path) as serving:
        demo, state = serving.demo, serving.state
        reply = requests.post(f"{serving.api}/jobs", json={"workflow": SLEEPER}, headers=serving.headers, timeout=10)
        job_id = reply.json()["job_id"]
        deadline = time.monotonic() + 30
        while not any(p.info["cmdline"] == ["sleep", "300"] for p in processes_of(state)):  # the job runs
            assert time.monotonic() < deadline, serving.text()
            time.sleep(0.2)
        stopping = time.monotonic()
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 128 + signal.SIGINT, serving.text()
        took = time.monotonic() - stopping
        text = serving.text()
        assert f"cancelling 1 running job(s): {job_id[:8]}" in text, text
        with sqlite3.connect(state / "automation.db") as db:
            row = db.execute("SELECT state, error FROM jobs WHERE id = ?", (job_id,)).fetchone()
        assert row == ("cancelled", "the demo stopped"), text
        assert not processes_of(state), [p.info["cmdline"] for p in processes_of(state)]  # no sleep left either
        assert took < 30, text  # the agent had nothing left to wait for


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_a_demo_process_that_dies_is_started_again_and_jobs_go_on(tmp_path):
    with serving_demo(tmp_path) as serving:
        for name, marker in (("agent", "automation agent"), ("web", "gunicorn")):
            leader = next(p for p in processes_of(serving.state) if leads(p, marker))
            os.killpg(leader.pid, signal.SIGKILL)
            wait_for_text(serving, f"{name} exited with code -9: started it again (1 of 3")
        job = wait_for_answer(
            lambda: requests.post(f"{serving.api}/jobs", json={"workflow": QUICK}, headers=serving.headers, timeout=5)
        )
        deadline = time.monotonic() + 60
        while (
            state := requests.get(f"{serving.api}/jobs/{job['job_id']}", headers=serving.headers, timeout=5).json()[
                "state"
            ]
        ) != "completed":
            assert state in ("pending", "queued", "running") and time.monotonic() < deadline, (state, serving.text())
            time.sleep(0.3)
        assert serving.demo.poll() is None, serving.text()
        serving.demo.send_signal(signal.SIGINT)
        assert serving.demo.wait(60) == 128 + signal.SIGINT, serving.text()


def alive(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs (a zombie does not)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def leads(proc: psutil.Process, marker: str) -> bool:
    """Whether ``proc`` runs ``marker`` and leads its process group (it may have exited meanwhile: then not)."""
    try:
        return marker in " ".join(proc.info["cmdline"] or ()) and proc.pid == os.getpgid(proc.pid)
    except ProcessLookupError:
        return False


def wait_for_text(serving: Serving, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in serving.text():
        assert serving.demo.poll() is None and time.monotonic() < deadline, serving.text()
        time.sleep(0.2)


def wait_for_answer(send: Callable[[], requests.Response], timeout: float = 60) -> dict[str, Any]:
    """The JSON of the first 201 ``send`` gets: the web may still be starting again."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(requests.RequestException):
            reply = send()
            if reply.status_code == 201:
                return dict(reply.json())
        assert time.monotonic() < deadline, "the web never answered again"
        time.sleep(0.3)


def test_a_process_that_keeps_exiting_stops_the_demo_after_its_restarts(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import demo_processes

    procs = demo_processes.Processes(tmp_path)
    procs.start("quitter", [sys.executable, "-c", "print('bye')"], dict(os.environ))
    try:
        for restart in range(1, demo_processes.RESTARTS + 1):
            procs.running["quitter"].wait(10)
            assert procs.revive() == [
                f"quitter exited with code 0: started it again ({restart} of {demo_processes.RESTARTS} in 5 "
                f"minutes); see {tmp_path / 'quitter.log'}"
            ]
        procs.running["quitter"].wait(10)
        with pytest.raises(demo_processes.DemoError, match="quitter exited with code 0, started again 3 times"):
            procs.revive()
        assert (tmp_path / "quitter.log").read_text().count("\nbye\n") == demo_processes.RESTARTS + 1  # one log, kept
    finally:
        procs.stop_all()


def test_a_process_started_again_leaves_nothing_of_its_first_run_behind(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import demo_processes

    procs = demo_processes.Processes(tmp_path)
    leftover = f"sleep 3000.{os.getpid()}"  # what a crashed process left in its group (no other test has it)
    procs.start("agent", ["sh", "-c", f"{leftover} & exec sleep 0.2"], dict(os.environ))
    try:
        first = procs.running["agent"]
        first.wait(10)
        left = [p for p in psutil.process_iter(["cmdline"]) if " ".join(p.info["cmdline"] or ()) == leftover]
        assert left
        assert procs.revive()[0].startswith("agent exited with code 0: started it again")  # which leaves one anew
        assert wait_for(lambda: not any(alive(p) for p in left), timeout=5), "the first run's leftover lives on"
    finally:
        procs.stop_all()
        for proc in psutil.process_iter(["cmdline"]):
            if " ".join(proc.info["cmdline"] or ()) == leftover:
                proc.kill()


def test_the_serving_demo_stops_on_a_refusal_and_waits_only_for_an_api_out_of_reach(http_server, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import demo_platform
    import demo_processes

    http_server.route("/api/v1/jobs", status=401, body=b'{"error": "invalid_token", "message": "it has expired"}')
    started = time.monotonic()
    with pytest.raises(requests.HTTPError, match="401"):  # an expired token: said at once, not waited for
        demo_platform.serve(demo_platform.Api(http_server.url, "token"), demo_processes.Processes(tmp_path), set())
    assert time.monotonic() - started < 5


def test_stopping_the_demo_never_waits_for_a_rate_limited_or_silent_api(http_server, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import demo_platform

    http_server.route("/api/v1/jobs", status=429, headers={"Retry-After": "60"}, body=b'{"error": "rate_limited"}')
    started = time.monotonic()
    with pytest.raises(requests.HTTPError):  # main() says it could not cancel, then stops the processes
        demo_platform.cancel_running(demo_platform.Api(http_server.url, "token"))
    assert time.monotonic() - started < 5 and len(http_server.requests) == 1
    http_server.route("/api/v1/jobs", delay=60, body=b"{}")  # one that never answers
    started = time.monotonic()
    with pytest.raises(requests.Timeout):
        demo_platform.cancel_running(demo_platform.Api(http_server.url, "token"))
    assert time.monotonic() - started < 5
