"""The whole platform as real processes on loopback: web (gunicorn), dispatcher, scheduler and agents.

Each process is configured only by environment variables, as the Procfile runs them.
"""

from __future__ import annotations

import base64
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from app.auth.tokens import issue_token
from dispatch.signing import generate_keypair
from tests.servers._util import ServerProcess, free_port, run_checked
from tests.servers.valkey import ValkeyServer

BIN = Path(sys.executable).parent
FINAL = {"completed", "failed", "timed_out", "cancelled", "dead_letter"}


class Platform:
    """A control plane (web, dispatcher, scheduler) and its agents, all subprocesses."""

    def __init__(self, root: Path, valkey: ValkeyServer, database_url: str | None = None, **overrides: str) -> None:
        self.root = root
        self.valkey = valkey
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.jwt_secret = uuid.uuid4().hex * 2
        self.signing_key, self.verify_key = generate_keypair()
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url or f"sqlite:///{root / 'platform.db'}",
            "VALKEY_URL": valkey.url,
            "JWT_SECRET": self.jwt_secret,
            "JOB_SIGNING_KEY": self.signing_key,
            "SECRETS_KEY": base64.b64encode(os.urandom(32)).decode(),
            "LEASE_SECONDS": "4",
            "HEARTBEAT_INTERVAL": "1",
            "AGENT_OFFLINE_AFTER": "5",
            "REAPER_INTERVAL": "1",
            "BEACON_INTERVAL": "0.5",  # a sixth of the lease at most, as in production (5 s against 90)
            "SWEEPER_INTERVAL": "1",
            "SWEEP_GRACE": "2",
            "RATE_LIMIT_ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
            **overrides,
        }
        self.processes: dict[str, ServerProcess] = {}
        self.session = requests.Session()

    def process(self, name: str) -> ServerProcess:
        """The named process (created on first use, with its log in the platform's folder)."""
        if name not in self.processes:
            self.processes[name] = ServerProcess(name, self.root / f"{name}.log")
        return self.processes[name]

    def log(self, name: str) -> str:
        """The log of one process."""
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        """Migrate the database, then start web, dispatcher and scheduler."""
        run_checked(
            [str(BIN / "automation"), "db", "upgrade"], self.root / "migrate.log", "automation db upgrade", env=self.env
        )
        self.start_web()
        self.start_dispatcher()
        self.start_scheduler()

    def start_web(self) -> None:
        """Start the web process: gunicorn serving the Flask app."""
        self.process("web").start(
            [
                str(BIN / "gunicorn"),
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                "1",
                "--threads",
                "8",
                "--access-logfile",
                "-",
                "app:create_app()",
            ],
            ready=lambda: (
                self.session.get(f"{self.url}/health", timeout=1, headers={"Connection": "close"}).status_code
                in (200, 503)
            ),
            env=self.env,
        )

    def start_dispatcher(self) -> None:
        """Start the dispatcher: the control plane's Celery worker on its own queue."""
        self.process("dispatcher").start(
            [
                str(BIN / "celery"),
                "-A",
                "app.celery_app:celery",
                "worker",
                "-Q",
                "control",
                "-P",
                "threads",
                "-c",
                "2",
                "-n",
                f"dispatcher-{self.port}@localhost",
                "--without-gossip",
                "--without-mingle",
                "-l",
                "INFO",
            ],
            ready=lambda: "ready" in self.log("dispatcher"),
            env=self.env,
        )

    def start_scheduler(self) -> None:
        """Start the scheduler: Celery beat running the reaper and the sweeper."""
        self.process("scheduler").start(
            [
                str(BIN / "celery"),
                "-A",
                "app.celery_app:celery",
                "beat",
                "-l",
                "INFO",
                "-s",
                str(self.root / "beat-schedule"),
            ],
            ready=lambda: "beat: Starting" in self.log("scheduler"),
            env=self.env,
        )

    def stop(self) -> None:
        """Stop every process."""
        for process in self.processes.values():
            process.stop(timeout=10)

    def token(self, role: str, tenant: str, project: str | None = None, agent_id: str | None = None) -> str:
        """A signed token for the given role."""
        return issue_token(self.jwt_secret, tenant_id=tenant, role=role, project_id=project, agent_id=agent_id)

    def api(self, method: str, path: str, token: str, body: Any = None, **kwargs: Any) -> requests.Response:
        """Call the REST API."""
        return self.session.request(
            method,
            f"{self.url}/api/v1{path}",
            json=body,
            timeout=10,
            # One connection per request: gunicorn closes an idle kept-alive one after 2 s, maybe as it is reused.
            headers={"Authorization": f"Bearer {token}", "Connection": "close"},
            **kwargs,
        )

    def tenant(self, name: str | None = None, project: str = "web") -> tuple[str, str]:
        """Create a fresh tenant with one project; returns (tenant, project)."""
        tenant = name or f"t{uuid.uuid4().hex[:8]}"
        admin = self.token("admin", "platform")
        assert self.api("POST", "/tenants", admin, {"tenant_id": tenant, "name": tenant}).status_code == 201
        reply = self.api("POST", f"/tenants/{tenant}/projects", admin, {"project_id": project, "name": project})
        assert reply.status_code == 201, reply.text
        return tenant, project

    def agent_env(self, tenant: str, project: str, agent_id: str, **overrides: str) -> dict[str, str]:
        """The environment of one agent process."""
        return {
            **os.environ,
            "CONTROL_PLANE_URL": self.url,
            "TENANT_ID": tenant,
            "PROJECT_ID": project,
            "AGENT_ID": agent_id,
            "JWT_TOKEN": self.token("agent", tenant, project, agent_id),
            "VALKEY_URL": self.valkey.url,
            "JOB_VERIFY_KEY": self.verify_key,
            "HEARTBEAT_INTERVAL": "1",
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            **overrides,
        }

    def start_agent(self, tenant: str, project: str, agent_id: str, **overrides: str) -> ServerProcess:
        """Start an agent (``automation agent``) and wait until it has registered and consumes its queues."""
        name = f"agent-{tenant}-{agent_id}"
        process = self.process(name)
        viewer = self.token("viewer", tenant)
        process.start(
            [str(BIN / "automation"), "agent"],
            ready=lambda: (
                "ready" in self.log(name) and self.api("GET", f"/agents/{agent_id}", viewer).status_code == 200
            ),
            env=self.agent_env(tenant, project, agent_id, **overrides),
        )
        return process

    def submit(self, token: str, workflow: str, **fields: Any) -> dict[str, Any]:
        """Submit a job and return the reply's body (asserting 201)."""
        reply = self.api("POST", "/jobs", token, {"workflow": workflow, **fields})
        assert reply.status_code == 201, reply.text
        return dict(reply.json())

    def wait_for(self, token: str, job_id: str, states: set[str] | None = None, timeout: float = 30) -> dict[str, Any]:
        """Poll a job until it reaches one of ``states`` (default: any final state); returns it."""
        wanted = states or FINAL
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.api("GET", f"/jobs/{job_id}", token).json()
            if job.get("state") in wanted:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} is {job.get('state')} after {timeout}s, not {sorted(wanted)}: {job}")


@pytest.fixture(scope="module")
def platform(valkey_server: ValkeyServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """A running control plane on SQLite and the session's Valkey; agents are started by the tests."""
    running = Platform(tmp_path_factory.mktemp("platform"), valkey_server)
    try:
        running.start()
        yield running
    finally:
        running.stop()
