"""Helpers of the control-plane tests: workflows, tokens, and a small world of two tenants."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from app.agents import service as agents
from app.agents.schemas import AgentRegister
from app.auth.tokens import Principal, issue_token
from app.jobs import fencing, submission
from app.jobs import service as jobs
from app.jobs.schemas import JobSubmit, StatusReport
from app.tenants import service as tenants

MakeApp = Callable[..., Flask]
SECRET = "test-secret-" + "x" * 60
SECRETS_KEY = "dGhpcnR5LXR3by1ieXRlcy1vZi10ZXN0LXNlYWxpbmc="  # base64 of 32 bytes: seals project secrets
ROLES = ("admin", "tenant_admin", "operator", "viewer", "agent")

WORKFLOW = """\
name: three-steps
tasks:
  - name: kernel
    type: command
    config:
      command: uname -a
  - name: disk
    type: command
    config:
      command: df -h
  - name: uptime
    type: command
    config:
      command: uptime
"""

POWERSHELL = """\
name: windows-only
tasks:
  - name: version
    type: powershell
    config:
      script: $PSVersionTable
"""

BAD_WORKFLOW = """\
name: broken
tasks:
  - name: first
    type: command
    config:
      command: uptime
  - name: second
    type: comand
"""


def token(tenant: str, role: str, *, project: str | None = "web", agent: str | None = None, **kw: Any) -> str:
    """Return a token signed with the test secret."""
    if role in ("admin", "tenant_admin"):
        project = kw.pop("project_override", None)
    if role == "agent":
        agent = agent or ("a1" if tenant == "acme" else "g1")
    return issue_token(SECRET, tenant_id=tenant, role=role, project_id=project, agent_id=agent, **kw)


def auth(bearer: str) -> dict[str, str]:
    """Return the Authorization header of a token."""
    return {"Authorization": f"Bearer {bearer}"}


class Api:
    """A test client that sends a token."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client

    def call(self, method: str, path: str, bearer: str | None = None, **kwargs: Any) -> TestResponse:
        """Send a request, with the token when one is given."""
        headers = dict(kwargs.pop("headers", {}) or {})
        if bearer is not None:
            headers.update(auth(bearer))
        return self.client.open(path, method=method, headers=headers, **kwargs)

    def get(self, path: str, bearer: str | None = None, **kwargs: Any) -> TestResponse:
        """GET."""
        return self.call("GET", path, bearer, **kwargs)

    def post(self, path: str, bearer: str | None = None, **kwargs: Any) -> TestResponse:
        """POST."""
        return self.call("POST", path, bearer, **kwargs)

    def put(self, path: str, bearer: str | None = None, **kwargs: Any) -> TestResponse:
        """PUT."""
        return self.call("PUT", path, bearer, **kwargs)

    def delete(self, path: str, bearer: str | None = None, **kwargs: Any) -> TestResponse:
        """DELETE."""
        return self.call("DELETE", path, bearer, **kwargs)


@dataclass
class Tenant:
    """The ids of one tenant's objects in the world."""

    id: str
    agent: str
    pending: str = ""
    queued: str = ""
    running: str = ""
    completed: str = ""
    tokens: dict[str, str] = field(default_factory=dict)


def agent_principal(tenant: str, agent_id: str) -> Principal:
    """Return the principal of an agent token."""
    return Principal(subject=f"agent:{agent_id}", tenant_id=tenant, role="agent", project_id="web", agent_id=agent_id)


def build_world(app: Flask) -> dict[str, Tenant]:
    """Make tenants acme and globex, each with projects, an agent, and a job in each of four states."""
    world = {"acme": Tenant("acme", "a1"), "globex": Tenant("globex", "g1")}
    with app.test_request_context():
        for t in world.values():
            tenants.create_tenant(caller=None, tenant_id=t.id)
            tenants.create_project(caller=None, tenant_id=t.id, project_id="web")
            tenants.create_project(caller=None, tenant_id=t.id, project_id="db")
            agent = agent_principal(t.id, t.agent)
            agents.register_agent(
                caller=agent, data=AgentRegister(agent_id=t.agent, hostname=f"{t.agent}.local", platform="linux")
            )
            operator = Principal(subject=f"operator@{t.id}", tenant_id=t.id, role="operator", project_id="web")
            ids = [submission.submit_job(caller=operator, data=JobSubmit(workflow=WORKFLOW))[0].id for _ in range(4)]
            t.pending, t.queued, t.running, t.completed = ids
            for job_id in ids[1:]:
                jobs.publish_job(job_id=job_id)
            for job_id in ids[2:]:
                fencing.claim_job(caller=agent, job_id=job_id, attempt=1)
            fencing.report_status(caller=agent, job_id=t.completed, report=StatusReport(attempt=1, state="completed"))
            t.tokens = {role: token(t.id, role) for role in ROLES}
    return world
