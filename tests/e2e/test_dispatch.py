"""A job submitted over REST runs on the right agent through Celery and Valkey, and nothing is lost."""

from __future__ import annotations

import textwrap

import pytest

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
