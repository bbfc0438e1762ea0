"""Centrifugo gets every live event on the tenant's and the job's channel, in the background, whatever its state."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from flask import Flask

from app.system.health import Health
from dispatch.realtime import CentrifugoPublisher, Fanout, LiveEvent, counters, history_key
from dispatch.signing import generate_keypair
from tests.app.support import MakeApp, Tenant
from tests.app.test_realtime import sqlite_database_url, valkey_client  # noqa: F401  (fixtures)
from tests.servers.centrifugo import API_KEY, CentrifugoStandIn
from tests.servers.valkey import ValkeyServer


def wait_until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


def events(job_id: str, tenant: str = "acme") -> list[LiveEvent]:
    stamp = "2026-01-01T12:00:00Z"
    return [
        LiveEvent(job_id, tenant, "web", 1, "running", None, None, stamp),
        LiveEvent(job_id, tenant, "web", 1, "running", "kernel", "running", stamp),
    ]


@pytest.fixture
def fanout(valkey: redis.Redis, centrifugo_server: CentrifugoStandIn) -> Iterator[Callable[..., Fanout]]:
    """Make fan-outs to the stand-in; their publisher threads stop at the end of the test."""
    made: list[CentrifugoPublisher] = []

    def make(**options: Any) -> Fanout:
        key = options.pop("api_key", API_KEY)
        made.append(CentrifugoPublisher(centrifugo_server.api_url, key, **options))
        return Fanout(valkey, centrifugo=made[-1])

    yield make
    for publisher in made:
        publisher.close()


def value(target: str, reason: str | None = None) -> float:
    metrics = counters()
    counter = metrics.failures.labels(target) if reason is None else metrics.dropped.labels(target, reason)
    return float(counter._value.get())


def test_each_event_goes_to_the_tenant_project_and_job_channels_with_an_idempotency_key(
    valkey: redis.Redis, centrifugo_server: CentrifugoStandIn, fanout: Callable[..., Fanout]
) -> None:
    job_id = str(uuid.uuid4())
    ids = fanout().publish_events(events(job_id))
    assert ids == [1, 2]
    job_channel = f"jobs:acme.{job_id}"
    centrifugo_server.wait_until(lambda: len(centrifugo_server.on(job_channel)) == 2)
    kept = [json.loads(raw) for raw in valkey.lrange(history_key("acme", job_id), 0, -1)]
    for channel in (job_channel, "jobs:acme", "jobs:acme.project.web"):
        sent = [p for p in centrifugo_server.on(channel) if p.data["job_id"] == job_id]
        assert [p.data for p in sent] == kept
        assert [p.idempotency_key for p in sent] == [f"{job_id}:1", f"{job_id}:2"]
    assert centrifugo_server.refusals == []


def test_a_wrong_api_key_is_refused_and_the_publications_dropped(
    valkey: redis.Redis, centrifugo_server: CentrifugoStandIn, fanout: Callable[..., Fanout]
) -> None:
    before = value("centrifugo", "refused")
    fanout(api_key="not-the-key").publish_events(events(str(uuid.uuid4())))
    wait_until(lambda: value("centrifugo", "refused") == before + 6, "six refused publications (2 events x 3 channels)")
    assert {code for code, _ in centrifugo_server.refusals} == {401}
    assert centrifugo_server.publications == []


def test_publications_are_retried_while_centrifugo_fails_and_delivered_once_it_recovers(
    valkey: redis.Redis, centrifugo_server: CentrifugoStandIn, fanout: Callable[..., Fanout]
) -> None:
    job_id = str(uuid.uuid4())
    failures = value("centrifugo")
    centrifugo_server.failing_with = 503
    fanout().publish_events(events(job_id))
    wait_until(lambda: value("centrifugo") > failures, "a failed publish")
    centrifugo_server.failing_with = None
    centrifugo_server.wait_until(lambda: len(centrifugo_server.on(f"jobs:acme.{job_id}")) == 2)
    assert [p.data["id"] for p in centrifugo_server.on(f"jobs:acme.{job_id}")] == [1, 2]
    assert {code for code, _ in centrifugo_server.refusals} == {503}


def test_a_stopped_centrifugo_costs_the_publisher_nothing_and_old_publications_are_dropped(
    valkey: redis.Redis, centrifugo_server: CentrifugoStandIn, fanout: Callable[..., Fanout]
) -> None:
    centrifugo_server.stop()
    before = value("centrifugo", "retries_exhausted")
    job_id = str(uuid.uuid4())
    assert fanout(retry_for=0.3).publish_events(events(job_id)) == [1, 2]
    assert len(valkey.lrange(history_key("acme", job_id), 0, -1)) == 2  # Valkey has them all the same
    wait_until(lambda: value("centrifugo", "retries_exhausted") == before + 6, "six publications given up")


def test_a_full_queue_drops_and_counts(centrifugo_server: CentrifugoStandIn, fanout: Callable[..., Fanout]) -> None:
    centrifugo_server.stop()
    before = value("centrifugo", "queue_full")
    fanout(queue_size=1).publish_events(events(str(uuid.uuid4())))
    assert value("centrifugo", "queue_full") >= before + 4  # six publications: one sending, one waiting at most


def test_health_checks_centrifugos_api_with_the_key(make_app: MakeApp, centrifugo_server: CentrifugoStandIn) -> None:
    def centrifugo(key: str) -> Any:
        app: Flask = make_app(CENTRIFUGO_API_URL=centrifugo_server.api_url, CENTRIFUGO_API_KEY=key)
        return Health.model_validate(app.test_client().get("/health").json).components["centrifugo"]

    good = centrifugo(API_KEY)
    assert good.status == "ok" and good.backend == "api"
    bad = centrifugo("wrong-key")
    assert bad.status == "error" and "Unauthorized" in (bad.detail or "")


def test_a_real_job_reaches_centrifugo_through_the_app(
    make_app: MakeApp, valkey_server: ValkeyServer, centrifugo_server: CentrifugoStandIn, world: dict[str, Tenant]
) -> None:
    app: Flask = make_app(
        VALKEY_URL=valkey_server.url,
        JOB_SIGNING_KEY=generate_keypair()[0],
        CENTRIFUGO_API_URL=centrifugo_server.api_url,
        CENTRIFUGO_API_KEY=API_KEY,
    )
    acme = world["acme"]
    client = app.test_client()
    headers = {"Authorization": f"Bearer {acme.tokens['operator']}"}
    assert client.post(f"/api/v1/jobs/{acme.queued}/cancel", headers=headers).status_code == 200
    centrifugo_server.wait_until(lambda: len(centrifugo_server.on(f"jobs:acme.{acme.queued}")) == 1)
    (publication,) = centrifugo_server.on(f"jobs:acme.{acme.queued}")
    assert publication.data["state"] == "cancelled" and publication.data["id"] == 1
