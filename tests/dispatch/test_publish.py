"""Publishing job attempts onto Valkey: routing, priorities, task ids, JSON only, signed, no secrets."""

from __future__ import annotations

import base64
import json
from unittest.mock import patch

import pytest
import redis
from kombu.transport import redis as kombu_redis

from dispatch.celery import REAP_TASK, SWEEP_TASK, make_celery
from dispatch.contract import CONTROL_QUEUE, RUN_JOB_TASK, agent_queue, celery_priority, shared_queue
from dispatch.publish import JobMessage, Publisher, PublishError
from dispatch.signing import Signer, generate_keypair, load_signing_key
from dispatch.transport import Transport
from workers.envelope import Verifier

PRIVATE, PUBLIC = generate_keypair()


@pytest.fixture
def publisher(valkey_server):
    client = valkey_server.client()
    client.flushdb()
    celery = make_celery(valkey_server.url)
    yield Publisher(celery, Signer(load_signing_key(PRIVATE)))
    celery.close()
    client.flushdb()


@pytest.fixture
def pipelines():
    """The commands of each Valkey pipeline executed meanwhile, by name."""
    executed: list[list[str]] = []
    original = redis.client.Pipeline.execute

    def spying(self, raise_on_error=True):
        executed.append([str(args[0]) for args, _ in self.command_stack])
        return original(self, raise_on_error)

    with patch.object(redis.client.Pipeline, "execute", spying):
        yield executed


def message(**overrides) -> JobMessage:
    fields = {
        "job_id": "job-1",
        "attempt": 1,
        "tenant": "acme",
        "project": "web",
        "platform": "linux",
        "name": "deploy",
        "workflow": "name: deploy\ntasks: []\n",
        "variables": {"HOST": "web1"},
        **overrides,
    }
    return JobMessage(**fields)


def queued(valkey_server, queue: str) -> list[dict]:
    client = valkey_server.client()
    keys = [queue] + [f"{queue}:{p}" for p in range(1, 10)]
    return [json.loads(raw) for key in keys for raw in client.lrange(key, 0, -1)]


def test_a_job_without_an_agent_goes_to_its_projects_platform_queue(publisher, valkey_server, caplog):
    with caplog.at_level("INFO", logger="dispatch.publish"):
        assert publisher.publish(message()) == "tenant.acme.web.linux"
    [logged] = [r for r in caplog.records if r.name == "dispatch.publish"]
    assert (logged.job_id, logged.tenant_id) == ("job-1", "acme")  # type: ignore[attr-defined]
    [raw] = queued(valkey_server, shared_queue("acme", "web", "linux"))
    assert raw["headers"]["task"] == RUN_JOB_TASK
    assert raw["headers"]["id"] == "job-1:1"
    assert raw["content-type"] == "application/json"


def test_a_pinned_job_goes_to_its_agents_queue(publisher, valkey_server):
    assert publisher.publish(message(agent_id="a1", attempt=2)) == "agent.acme.a1"
    [raw] = queued(valkey_server, agent_queue("acme", "a1"))
    assert raw["headers"]["id"] == "job-1:2"


def test_the_message_body_is_a_signed_envelope_the_agent_verifies(publisher, valkey_server):
    publisher.publish(message(agent_id="a1"))
    [raw] = queued(valkey_server, agent_queue("acme", "a1"))
    args, kwargs, _ = json.loads(base64.b64decode(raw["body"]))
    assert args == []
    envelope = Verifier(PUBLIC, tenant="acme", project="web", agent_id="a1", platform="linux").verify(kwargs)
    assert (envelope.job_id, envelope.attempt, envelope.variables) == ("job-1", 1, {"HOST": "web1"})


def test_urgent_jobs_land_in_the_bucket_served_first(publisher, valkey_server):
    publisher.publish(message(job_id="urgent", priority=9))
    publisher.publish(message(job_id="lazy", priority=0))
    client = valkey_server.client()
    queue = shared_queue("acme", "web", "linux")
    assert celery_priority(9) == 0 and celery_priority(0) == 9
    assert [json.loads(r)["headers"]["id"] for r in client.lrange(queue, 0, -1)] == ["urgent:1"]
    assert [json.loads(r)["headers"]["id"] for r in client.lrange(f"{queue}:9", 0, -1)] == ["lazy:1"]


def test_a_broker_that_cannot_be_reached_is_a_publish_error():
    celery = make_celery("redis://127.0.0.1:1/0")
    publisher = Publisher(celery, Signer(load_signing_key(PRIVATE)))
    with pytest.raises(PublishError, match="could not publish job job-1"):
        publisher.publish(message())


def test_every_process_shares_the_same_json_only_settings():
    conf = make_celery("redis://127.0.0.1:6379/0").conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.worker_cancel_long_running_tasks_on_connection_loss
    assert conf.broker_transport_options["visibility_timeout"] >= 12 * 3600


def test_publishes_share_one_redis_client_per_connection_pool(publisher, valkey_server):
    created: list[object] = []
    original = kombu_redis.Channel._create_client

    def counting(self, asynchronous=False):
        client = original(self, asynchronous)
        created.append(client)
        return client

    with patch.object(kombu_redis.Channel, "_create_client", counting):
        for number in range(5):
            publisher.publish(message(job_id=f"job-{number}"))
    assert len(queued(valkey_server, shared_queue("acme", "web", "linux"))) == 5
    assert len(created) <= 2  # kombu's own channel makes one per publish and one per task-sent event: 10
    connection = publisher.celery.connection_for_write()
    assert isinstance(connection.transport, Transport)
    connection.release()


def test_periodic_work_left_queued_for_five_of_its_intervals_is_dropped_not_piled_up():
    entries = make_celery("redis://127.0.0.1:1/0", reaper_interval=10.0, sweeper_interval=5.0).conf.beat_schedule
    expiry = {entry["task"]: (entry["schedule"], entry["options"]["expires"]) for entry in entries.values()}
    assert expiry[REAP_TASK] == (10.0, 50.0) and expiry[SWEEP_TASK] == (5.0, 25.0)
    assert all(entry["options"]["queue"] == CONTROL_QUEUE for entry in entries.values())
    assert all(0 < expires <= schedule * 5 for schedule, expires in expiry.values())


def test_another_broker_scheme_keeps_kombus_own_transport():
    assert make_celery("redis://127.0.0.1:1/0").conf.broker_transport == "dispatch.transport:Transport"
    assert make_celery("sentinel://127.0.0.1:26379").conf.broker_transport != "dispatch.transport:Transport"


def test_a_batch_of_messages_is_written_in_one_pipeline_with_their_sent_events(publisher, valkey_server, pipelines):
    batch = [message(job_id=f"job-{n}", agent_id="a1" if n % 2 else None) for n in range(6)]
    publisher.publish_many(batch)
    assert pipelines == [["LPUSH", "PUBLISH"] * 6]  # each message, then its task-sent event: one round trip
    pinned = [raw["headers"]["id"] for raw in queued(valkey_server, agent_queue("acme", "a1"))]
    shared = [raw["headers"]["id"] for raw in queued(valkey_server, shared_queue("acme", "web", "linux"))]
    assert sorted(pinned) == ["job-1:1", "job-3:1", "job-5:1"]
    assert sorted(shared) == ["job-0:1", "job-2:1", "job-4:1"]
    [raw] = [r for r in queued(valkey_server, agent_queue("acme", "a1")) if r["headers"]["id"] == "job-3:1"]
    _, kwargs, _ = json.loads(base64.b64decode(raw["body"]))
    envelope = Verifier(PUBLIC, tenant="acme", project="web", agent_id="a1", platform="linux").verify(kwargs)
    assert (envelope.job_id, envelope.attempt) == ("job-3", 1)


def test_one_publish_is_one_round_trip_with_its_sent_event_and_declares_no_binding(publisher, valkey_server, pipelines):
    publisher.publish(message())
    publisher.publish(message(job_id="job-2", agent_id="a1"))
    assert pipelines == [["LPUSH", "PUBLISH"], ["LPUSH", "PUBLISH"]]  # the message, then its task-sent event
    assert [raw["headers"]["id"] for raw in queued(valkey_server, shared_queue("acme", "web", "linux"))] == ["job-1:1"]
    assert [raw["headers"]["id"] for raw in queued(valkey_server, agent_queue("acme", "a1"))] == ["job-2:1"]
    assert valkey_server.client().keys("_kombu.binding*") == []  # routed by queue name: nothing declared


def test_a_publish_whose_pipeline_fails_is_sent_again_on_celerys_retrying_path(publisher, valkey_server, caplog):
    original = redis.client.Pipeline.execute
    failures: list[int] = []

    def failing_once(self, raise_on_error=True):
        if not failures:
            failures.append(1)
            self.reset()
            raise redis.ConnectionError("connection reset by peer")
        return original(self, raise_on_error)

    with patch.object(redis.client.Pipeline, "execute", failing_once), caplog.at_level("INFO", "dispatch.publish"):
        assert publisher.publish(message()) == "tenant.acme.web.linux"
    assert failures == [1]
    [raw] = queued(valkey_server, shared_queue("acme", "web", "linux"))
    assert raw["headers"]["id"] == "job-1:1"
    [again] = [r for r in caplog.records if r.getMessage().startswith("publishing job job-1 attempt 1 again")]
    assert (again.levelname, again.job_id, again.tenant_id) == ("WARNING", "job-1", "acme")  # type: ignore[attr-defined]


def test_a_batch_the_broker_cannot_take_is_one_publish_error():
    celery = make_celery("redis://127.0.0.1:1/0")
    publisher = Publisher(celery, Signer(load_signing_key(PRIVATE)))
    with pytest.raises(PublishError, match="could not publish 3 jobs"):
        publisher.publish_many([message(job_id=f"job-{n}") for n in range(3)])
