"""An agent that was offline for a while runs its pinned queued jobs when it is back, unless their deadline passed."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.e2e.test_dispatch import marker_workflow, runs
from tests.servers.platform import Platform

pytestmark = [pytest.mark.faults, pytest.mark.e2e]


def test_an_agent_back_from_offline_runs_its_queued_jobs_unless_their_deadline_passed(platform: Platform, tmp_path):
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "z1").stop()
    operator = platform.token("operator", tenant, project)
    late, patient = tmp_path / "late", tmp_path / "patient"
    deadline = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    late_id = platform.submit(operator, marker_workflow(str(late)), agent_id="z1", deliver_by=deadline)["job_id"]
    patient_id = platform.submit(operator, marker_workflow(str(patient)), agent_id="z1")["job_id"]
    expired = platform.wait_for(operator, late_id, {"dead_letter"}, timeout=15)
    assert expired["dead_letter_reason"] == "expired"
    platform.start_agent(tenant, project, "z1")
    assert platform.wait_for(operator, patient_id)["state"] == "completed"
    time.sleep(1)
    assert runs(patient) == 1 and not late.exists()
