"""The agent's heartbeat against a loopback stand-in of the control plane: what it sends, what it does on reply."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest

from tests.workers.test_client import client_for
from workers.heartbeat import Heartbeat
from workers.jobs import Inflight


@contextlib.contextmanager
def beating(heartbeat: Heartbeat) -> Iterator[Heartbeat]:
    """Run the heartbeat's thread for the block, then stop it."""
    heartbeat.start()
    try:
        yield heartbeat
    finally:
        heartbeat.stop()
        heartbeat.join(5)


def test_the_attempts_the_control_plane_no_longer_counts_are_stopped_and_only_they(http_server):
    inflight = Inflight()
    kept, lost, retried = inflight.add("j1", 1), inflight.add("j2", 1), inflight.add("j2", 2)
    reply = {
        "leases": [{"job_id": "j1", "attempt": 1}, {"job_id": "j2", "attempt": 2}],
        "cancel": [],
        "stop": [{"job_id": "j2", "attempt": 1}, {"job_id": "j9", "attempt": 1}, {"job_id": 5}, "x"],
    }
    http_server.route("/api/v1/agents/a1/heartbeat", method="POST", body=lambda request: (200, {}, json.dumps(reply)))
    client = client_for(http_server.url)
    Heartbeat(client, client.settings, inflight).beat()
    sent = json.loads(http_server.requests[-1].body)["running"]
    assert sorted((item["job_id"], item["attempt"]) for item in sent) == [("j1", 1), ("j2", 1), ("j2", 2)]
    # the lost attempt of j2 stops; its next attempt on this agent, and the other job, run on
    assert lost.cancel.is_set() and not retried.cancel.is_set() and not kept.cancel.is_set()


def test_a_reply_without_a_stop_list_stops_nothing(http_server):
    inflight = Inflight()
    running = inflight.add("j1", 1)
    reply = {"leases": [{"job_id": "j1", "attempt": 1}], "cancel": []}  # an older control plane
    http_server.route("/api/v1/agents/a1/heartbeat", method="POST", body=lambda request: (200, {}, json.dumps(reply)))
    client = client_for(http_server.url)
    Heartbeat(client, client.settings, inflight).beat()
    assert not running.cancel.is_set()


def test_an_answered_heartbeat_renews_the_leases_it_names_and_a_refused_one_renews_none(http_server):
    inflight = Inflight()
    renewed, forgotten = inflight.add("j1", 1), inflight.add("j2", 1)
    before, also = renewed.renewed, forgotten.renewed
    reply = {"leases": [{"job_id": "j1", "attempt": 1}], "cancel": [], "lease_seconds": 90}
    answers = iter([(200, {}, json.dumps(reply)), (404, {}, json.dumps({"error": "not_found", "message": "gone"}))])
    http_server.route("/api/v1/agents/a1/heartbeat", method="POST", body=lambda request: next(answers))
    client = client_for(http_server.url)
    heartbeat = Heartbeat(client, client.settings, inflight)
    heartbeat.beat()
    assert inflight.lease == 90 and renewed.renewed > before and forgotten.renewed == also
    was = renewed.renewed
    heartbeat.beat()  # refused: the agent was deleted, say
    assert renewed.renewed == was


def test_runs_whose_leases_go_unrenewed_are_stopped_within_a_beat_of_their_expiry(http_server):
    """The heartbeat thread checks between beats, as soon as a lease's length has passed without renewal."""
    inflight = Inflight()
    inflight.lease = 0.3
    running = inflight.add("j1", 1)
    http_server.route(
        "/api/v1/agents/a1/heartbeat", method="POST", body=lambda request: (404, {}, '{"error": "not_found"}')
    )
    client = client_for(http_server.url)
    heartbeat = Heartbeat(client, client.settings, inflight)  # beats every 30 s: far slower than the lease
    with beating(heartbeat):
        assert running.cancel.wait(5) and running.abandoned


def test_a_run_being_abandoned_is_not_named_in_heartbeats(http_server):
    """Renewed now, its lease would keep the job running on the control plane for a lease more, while it stops."""
    inflight = Inflight()
    inflight.lease = 1.0
    kept, dropped = inflight.add("j1", 1), inflight.add("j2", 1, claimed=0.0)  # j2: claimed long ago, never renewed
    inflight.abandon_expired(dropped.renewed + 5)
    assert dropped.abandoned and not kept.abandoned
    reply = {"leases": [], "cancel": [], "lease_seconds": 1}
    http_server.route("/api/v1/agents/a1/heartbeat", method="POST", body=lambda request: (200, {}, json.dumps(reply)))
    client = client_for(http_server.url)
    Heartbeat(client, client.settings, inflight).beat()
    assert json.loads(http_server.requests[-1].body)["running"] == [{"job_id": "j1", "attempt": 1}]


def test_a_lease_runs_out_only_while_the_beacon_says_the_control_plane_could_renew_it():
    inflight = Inflight()
    inflight.lease = 10.0
    running = inflight.add("j1", 1, claimed=100.0)  # its lease last renewed at 100 (time.monotonic())
    inflight.abandon_expired(200.0, up_for=0.0)  # the control plane is down: no lease runs out
    inflight.abandon_expired(200.0, up_for=9.0)  # back 9 s ago: agents have not had a whole lease to renew it
    assert not running.abandoned and inflight.until_expiry(200.0, up_for=9.0) == pytest.approx(1.0)
    inflight.abandon_expired(200.0, up_for=11.0)  # back for more than a lease, and still not renewed: cut off
    assert running.abandoned and running.cancel.is_set()
    other = inflight.add("j2", 1, claimed=100.0)
    inflight.abandon_expired(200.0, up_for=None)  # no beacon to read: a lease's length without renewal, as before
    assert other.abandoned


def test_the_heartbeat_keeps_runs_going_through_a_control_plane_outage_and_stops_them_if_cut_off_alone(http_server):
    """The heartbeats get nowhere all along (refused here, at once: failing ones are retried within the beat); the
    beacon says first that the whole control plane is down (every agent is in
    the same place, and the reaper waits too), then that it is up: this agent alone is cut off."""
    inflight = Inflight()
    inflight.lease = 0.3
    running = inflight.add("j1", 1)
    http_server.route("/api/v1/agents/a1/heartbeat", method="POST", body=lambda request: (404, {}, "{}"))
    client = client_for(http_server.url)
    up_for: list[float] = [0.0]
    asked: list[float] = []

    def lease_time() -> float:
        asked.append(up_for[0])
        return up_for[0]

    heartbeat = Heartbeat(client, client.settings, inflight, lease_time)
    with beating(heartbeat):
        assert not running.cancel.wait(1.0) and not running.abandoned  # three leases without renewal
        assert asked, "the beacon is read once a run has gone a lease without renewal"
        up_for[0] = 1.0  # up for more than a lease, and this agent's heartbeats still fail
        heartbeat.beat_now()
        assert running.cancel.wait(5) and running.abandoned


def test_a_beacon_that_cannot_be_read_leaves_runs_to_be_stopped_after_a_lease_as_before(http_server):
    inflight = Inflight()
    inflight.lease = 0.3
    running = inflight.add("j1", 1)
    http_server.route("/api/v1/agents/a1/heartbeat", method="POST", body=lambda request: (404, {}, "{}"))
    client = client_for(http_server.url)

    def unreadable() -> float:
        raise ConnectionError("Valkey is out of reach")

    heartbeat = Heartbeat(client, client.settings, inflight, unreadable)
    with beating(heartbeat):
        assert running.cancel.wait(5) and running.abandoned
