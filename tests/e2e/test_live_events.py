"""A real job's live events, in order, through the SSE stream and the Centrifugo stand-in; an outage costs nothing."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.servers.centrifugo import API_KEY, CentrifugoStandIn
from tests.servers.platform import Platform
from tests.servers.valkey import ValkeyServer

pytestmark = pytest.mark.e2e

WORKFLOW = textwrap.dedent(
    """\
    name: two-steps
    tasks:
      - {name: hello, type: command, config: {command: echo, args: [hello]}}
      - {name: bye, type: command, config: {command: echo, args: [bye]}}
    """
)


@pytest.fixture(scope="module")
def centrifugo() -> Iterator[CentrifugoStandIn]:
    server = CentrifugoStandIn()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def platform(
    valkey_server: ValkeyServer, centrifugo: CentrifugoStandIn, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """The platform publishing to the Centrifugo stand-in; a publication is given up after 1 s of failures."""
    running = Platform(
        tmp_path_factory.mktemp("live"),
        valkey_server,
        CENTRIFUGO_API_URL=centrifugo.api_url,
        CENTRIFUGO_API_KEY=API_KEY,
        CENTRIFUGO_TOKEN_SECRET="live-events-" + "t" * 32,
        CENTRIFUGO_RETRY_FOR="1",
    )
    try:
        running.start()
        yield running
    finally:
        running.stop()


def read_stream(platform: Platform, token: str, job_id: str, after: int | None = None) -> list[dict[str, Any]]:
    """Read a job's whole SSE stream (it ends after the final state) and return its events' data."""
    headers = {"Authorization": f"Bearer {token}", "Connection": "close"}
    if after is not None:
        headers["Last-Event-ID"] = str(after)
    reply = requests.get(
        f"{platform.url}/api/v1/jobs/{job_id}/events",
        headers=headers,
        stream=True,
        timeout=(5, 60),
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    events = []
    for block in reply.text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        assert fields["event"] == "job"
        data = json.loads(fields["data"])
        assert int(fields["id"]) == data["id"]
        events.append(data)
    return events


def metric(platform: Platform, name: str, **labels: str) -> float:
    reply = requests.get(f"{platform.url}/metrics", headers={"Connection": "close"}, timeout=10)
    assert reply.status_code == 200
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.2)


def test_a_jobs_events_arrive_in_order_through_sse_and_centrifugo(
    platform: Platform, centrifugo: CentrifugoStandIn
) -> None:
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "l1")
    operator = platform.token("operator", tenant, project)
    job_id = platform.submit(operator, WORKFLOW)["job_id"]

    events = read_stream(platform, platform.token("viewer", tenant), job_id)
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert {(e["job_id"], e["tenant_id"], e["project_id"]) for e in events} == {(job_id, tenant, project)}
    assert [(e["state"], e["task"], e["status"]) for e in events] == [
        ("queued", None, None),
        ("running", None, None),
        ("running", "hello", "running"),
        ("running", "hello", "succeeded"),
        ("running", "bye", "running"),
        ("running", "bye", "succeeded"),
        ("completed", None, None),
    ]
    assert all(e["ts"].endswith("Z") and e["attempt"] == 1 for e in events)

    job_channel = f"jobs:{tenant}.{job_id}"
    centrifugo.wait_until(lambda: len(centrifugo.on(job_channel)) == len(events))
    assert [p.data for p in centrifugo.on(job_channel)] == events
    assert [p.idempotency_key for p in centrifugo.on(job_channel)] == [f"{job_id}:{e['id']}" for e in events]
    assert [p.data for p in centrifugo.on(f"jobs:{tenant}") if p.data["job_id"] == job_id] == events
    project_channel = f"jobs:{tenant}.project.{project}"
    centrifugo.wait_until(
        lambda: len([p for p in centrifugo.on(project_channel) if p.data["job_id"] == job_id]) == len(events)
    )
    assert [p.data for p in centrifugo.on(project_channel) if p.data["job_id"] == job_id] == events
    assert centrifugo.refusals == []

    resumed = read_stream(platform, platform.token("viewer", tenant), job_id, after=2)
    assert resumed == events[2:]


def test_the_tasks_a_failed_run_never_reached_are_stored_skipped_each_with_its_live_event(platform: Platform) -> None:
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "l3")
    operator = platform.token("operator", tenant, project)
    workflow = textwrap.dedent(
        """\
        name: fails-third
        tasks:
          - {name: one, type: command, config: {command: "true"}}
          - {name: two, type: command, config: {command: "true"}}
          - {name: breaks, type: command, config: {command: "false"}}
          - {name: never, type: command, config: {command: "true"}}
          - {name: never2, type: command, config: {command: "true"}}
        """
    )
    job_id = platform.submit(operator, workflow)["job_id"]
    events = read_stream(platform, operator, job_id)
    assert [(e["task"], e["status"]) for e in events if e["task"] is not None] == [
        ("one", "running"),
        ("one", "succeeded"),
        ("two", "running"),
        ("two", "succeeded"),
        ("breaks", "running"),
        ("breaks", "failed"),
        ("never", "skipped"),
        ("never2", "skipped"),
    ]
    assert events[-1]["state"] == "failed"
    job = platform.wait_for(operator, job_id)
    assert [(t["name"], t["status"], t["position"]) for t in job["tasks"]] == [
        ("one", "succeeded", 0),
        ("two", "succeeded", 1),
        ("breaks", "failed", 2),
        ("never", "skipped", 3),
        ("never2", "skipped", 4),
    ]


def test_a_stopped_centrifugo_neither_fails_nor_holds_up_a_job_and_is_counted(
    platform: Platform, centrifugo: CentrifugoStandIn
) -> None:
    tenant, project = platform.tenant()
    platform.start_agent(tenant, project, "l2")
    operator = platform.token("operator", tenant, project)
    failures = metric(platform, "automation_realtime_publish_failures_total", target="centrifugo")
    dropped = metric(platform, "automation_realtime_dropped_total", target="centrifugo", reason="retries_exhausted")
    centrifugo.stop()
    try:
        job_id = platform.submit(operator, WORKFLOW)["job_id"]
        assert platform.wait_for(operator, job_id)["state"] == "completed"
        assert [e["state"] for e in read_stream(platform, operator, job_id) if e["task"] is None][-1] == "completed"
        wait_until(
            lambda: metric(platform, "automation_realtime_publish_failures_total", target="centrifugo") > failures,
            "a failed publication counted",
        )
        wait_until(
            lambda: (
                metric(platform, "automation_realtime_dropped_total", target="centrifugo", reason="retries_exhausted")
                > dropped
            ),
            "a publication given up and counted",
        )
    finally:
        centrifugo.start()
