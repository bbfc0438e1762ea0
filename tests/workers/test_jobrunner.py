"""The job runner: claim, run, then the final state through the outbox; a long log goes in batches before it."""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
import time
from typing import Any

import pytest

from tests.workers.support import WORKFLOW, envelope, granting, line, no_threads_named, pauses, running
from workers import jobs, logship
from workers.client import ControlPlaneError, Reply
from workers.envelope import Envelope
from workers.jobs import LOG_LINES_WITH_FINAL_STATE, MALFORMED_SECRETS, Inflight, JobRunner, Stopping, _load
from workers.outbox import FinalReport

NOT_A_CLAIM = Reply(200, {"data": "<html>maintenance</html>"})  # a proxy's page, answered 200
UNREACHABLE = ControlPlaneError("POST /jobs/j1/claim failed 9 times; last: HTTP 503")
AT_CAPACITY = Reply(409, {"error": "project_at_capacity", "message": "project 'web' already runs 1 jobs"})


class Recorder:
    """A control plane that accepts everything and remembers each request; final states wait for ``opened``."""

    def __init__(self, claims: list[Reply | Exception] | None = None) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.claims = claims or []
        self.opened = threading.Event()
        self.opened.set()
        self.delivering = threading.Event()  # a final state's request has begun (and waits for ``opened``)
        self.fail_status = False
        self.fail_tasks = 0  # how many task results to fail (as if the control plane were down for them)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, **_: Any) -> Reply:
        if path.endswith("/status"):
            self.delivering.set()
            assert self.opened.wait(10)
            if self.fail_status:
                raise ControlPlaneError("POST /status failed 9 times; last: HTTP 503")
        if path.endswith("/tasks") and self.fail_tasks:
            self.fail_tasks -= 1
            raise ControlPlaneError("POST /tasks failed 9 times; last: HTTP 503")
        self.calls.append((method, path, body or {}))
        if path.endswith("/claim"):
            reply = self.claims.pop(0) if self.claims else Reply(200, {})
            if isinstance(reply, Exception):
                raise reply
            return reply if reply is NOT_A_CLAIM else granting(reply, path, body or {})
        return Reply(200, {})

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.calls]


def test_a_backlog_is_sent_in_numbered_batches_and_the_rest_rides_with_the_final_state() -> None:
    recorder = Recorder()
    runner = JobRunner(recorder, Inflight())  # type: ignore[arg-type]
    size = LOG_LINES_WITH_FINAL_STATE
    lines = [line(n) for n in range(41, 41 + 2 * size + 7)]  # lines 1-40 went out in batches already
    assert runner._finish(FinalReport("j1", 2, "completed", None, [], lines, 41)) == "completed"
    logs = [(path, body.get("first_line"), len(body["lines"])) for _, path, body in recorder.calls[:-1]]
    assert logs == [("/jobs/j1/logs", 41, size), ("/jobs/j1/logs", 41 + size, 7)]
    method, path, final = recorder.calls[-1]
    assert (method, path, final["state"], final["attempt"]) == ("POST", "/jobs/j1/status", "completed", 2)
    assert final["logs_first_line"] == 41 + size + 7 and final["logs"] == lines[size + 7 :]


def test_a_run_ends_before_its_final_state_is_delivered_and_its_lease_is_kept_until_then() -> None:
    recorder = Recorder()
    recorder.opened.clear()
    inflight = Inflight()
    runner = JobRunner(recorder, inflight)  # type: ignore[arg-type]
    assert runner.run(envelope()) == "completed"  # the message can be acknowledged: the report is on its way
    assert running(inflight) == [("j1", 1)]  # still sent with each heartbeat, which renews the lease
    recorder.opened.set()
    runner.outbox.flush(5)  # False if the delivery thread, woken by the line above, was done before this call
    assert running(inflight) == []
    method, path, final = recorder.calls[-1]
    assert (method, path, final["state"], final["attempt"]) == ("POST", "/jobs/j1/status", "completed", 1)
    assert [task["name"] for task in final["tasks"]] == ["noop"] and final["logs"]


def test_a_final_state_that_cannot_be_delivered_is_logged_and_its_lease_left_to_expire(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    recorder.fail_status = True
    inflight = Inflight()
    runner = JobRunner(recorder, inflight)  # type: ignore[arg-type]
    assert runner.run(envelope()) == "completed"
    runner.outbox.flush(5)
    assert running(inflight) == []  # no more heartbeats for it: the reaper retries the job
    assert "job j1 attempt 1: the final state completed could not be delivered" in caplog.text


def test_a_final_state_waits_for_the_control_plane_while_its_beacon_says_it_is_down(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each try gives up after REPORT_DEADLINE (here at once); while the beacon says that the control plane is down
    (and the reaper waits too), the final state is tried again instead of dropped, its lease kept."""
    monkeypatch.setattr(jobs, "WAIT_WHILE_DOWN", 0.05)
    recorder = Recorder()
    recorder.fail_status = True
    inflight = Inflight()
    down = threading.Event()
    down.set()
    runner = JobRunner(recorder, inflight, reaper_waits=down.is_set)  # type: ignore[arg-type]
    assert runner.run(envelope()) == "completed"
    time.sleep(0.3)
    assert running(inflight) == [("j1", 1)]  # still named in heartbeats: renewed once they get through
    assert "the control plane cannot take it yet (its beacon says it is down or just back)" in caplog.text
    recorder.fail_status = False  # the control plane is back
    runner.outbox.flush(5)
    assert running(inflight) == [] and recorder.paths()[-1] == "/jobs/j1/status"
    assert "could not be delivered" not in caplog.text


def test_a_final_state_is_given_up_when_the_beacon_says_the_reaper_does_not_wait_or_cannot_be_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Up for others, the control plane does not answer this agent: the reaper runs the job again after its lease."""

    def unreadable() -> bool:
        raise ConnectionError("Valkey is out of reach")

    for down in (lambda: False, unreadable):
        recorder = Recorder()
        recorder.fail_status = True
        inflight = Inflight()
        runner = JobRunner(recorder, inflight, reaper_waits=down)  # type: ignore[arg-type]
        assert runner.run(envelope()) == "completed"
        runner.outbox.flush(5)
        assert running(inflight) == []
        assert "job j1 attempt 1: the final state completed could not be delivered" in caplog.text
        caplog.clear()


def test_a_final_state_waiting_for_the_control_plane_is_given_up_at_once_when_the_agent_stops(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "WAIT_WHILE_DOWN", 30.0)
    recorder = Recorder()
    recorder.fail_status = True
    inflight = Inflight()
    runner = JobRunner(recorder, inflight, reaper_waits=lambda: True)  # type: ignore[arg-type]
    assert runner.run(envelope()) == "completed"
    deadline = time.monotonic() + 5
    while "waits for it" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    runner.stopping.set()
    runner.outbox.flush(5)
    assert time.monotonic() - started < 2 and running(inflight) == []
    assert "the final state completed could not be delivered (the agent stops)" in caplog.text


def test_a_claim_refused_at_capacity_waits_for_our_own_pending_final_state_then_is_made_again_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder(claims=[Reply(200, {}), AT_CAPACITY, Reply(200, {})])
    runner = JobRunner(recorder, Inflight())  # type: ignore[arg-type]
    slept = pauses(runner, monkeypatch)
    recorder.opened.clear()
    assert runner.run(envelope("j1")) == "completed"  # its final state waits: j1 still counts as running
    # The outbox's thread has taken j1's final state: j2's claim cannot carry it (a claim carrying it would be
    # answered with its outcome, and the project would have room).
    assert recorder.delivering.wait(5)
    threading.Timer(0.2, recorder.opened.set).start()
    assert runner.run(envelope("j2")) == "completed"
    assert slept == []  # claimed again as soon as j1 was reported, without the wait of a project at capacity
    runner.outbox.flush(5)
    assert recorder.paths() == [
        "/jobs/j1/claim",
        "/jobs/j2/claim",
        "/jobs/j1/status",
        "/jobs/j2/claim",
        "/jobs/j2/status",
    ]


def test_a_claim_still_refused_at_capacity_waits_before_asking_again(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(claims=[AT_CAPACITY, Reply(200, {})])
    runner = JobRunner(recorder, Inflight())  # type: ignore[arg-type]
    slept = pauses(runner, monkeypatch)
    assert runner.run(envelope("j1")) == "completed"  # nothing of ours pending: the capacity is others'
    assert slept == [1.0]
    runner.outbox.flush(5)


def test_a_workflow_the_agent_cannot_load_is_claimed_and_reported_failed() -> None:
    recorder = Recorder()
    inflight = Inflight()
    runner = JobRunner(recorder, inflight)  # type: ignore[arg-type]
    broken = envelope()
    broken = Envelope(**{**broken.__dict__, "workflow": "name: w\ntasks: []\nbogus: 1\n"})
    assert runner.run(broken) == "failed"
    runner.outbox.flush(5)
    _, path, final = recorder.calls[-1]
    assert path == "/jobs/j1/status" and final["state"] == "failed"
    assert final["error"].startswith("the workflow cannot run here")
    assert running(inflight) == []


def test_a_cancel_reaches_every_attempt_of_the_job_this_agent_holds() -> None:
    inflight = Inflight()
    old, new, other = inflight.add("j1", 1), inflight.add("j1", 2), inflight.add("j2", 1)
    inflight.cancel(["j1"])
    assert (old.cancel.is_set(), new.cancel.is_set(), other.cancel.is_set()) == (True, True, False)
    inflight.discard("j1", 1)
    assert running(inflight) == [("j1", 2), ("j2", 1)]


def test_an_agent_parses_a_workflow_it_has_run_before_only_once() -> None:
    runner = JobRunner(Recorder(), Inflight())  # type: ignore[arg-type]
    text = WORKFLOW.replace("noop", "cached-once")
    runs = [Envelope(**{**envelope(f"j{n}").__dict__, "workflow": text}) for n in range(3)]
    before = _load.cache_info()
    assert [runner.run(run) for run in runs] == ["completed"] * 3
    after = _load.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 2)
    runner.outbox.flush(5)


@pytest.mark.parametrize("trouble", [UNREACHABLE, NOT_A_CLAIM])
def test_a_claim_the_control_plane_could_not_answer_is_made_again_until_it_does(
    trouble: Reply | Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(claims=[trouble, trouble, Reply(200, {})])
    runner = JobRunner(recorder, Inflight())  # type: ignore[arg-type]
    slept = pauses(runner, monkeypatch)
    assert runner.run(envelope("j1")) == "completed"  # held, not dropped: nothing else could ever claim it
    assert slept == [1.0, 1.5]
    runner.outbox.flush(5)
    assert recorder.paths() == ["/jobs/j1/claim", "/jobs/j1/claim", "/jobs/j1/claim", "/jobs/j1/status"]


def test_every_try_of_a_claim_carries_the_same_claim_id_and_each_message_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """So that a try made after a granted claim's answer was lost is granted again (the control plane matches the
    id), while a second delivery of the message, claimed under a new id, is refused."""
    recorder = Recorder(claims=[UNREACHABLE, NOT_A_CLAIM, Reply(200, {})])
    runner = JobRunner(recorder, Inflight())  # type: ignore[arg-type]
    pauses(runner, monkeypatch)
    assert runner.run(envelope("j1")) == "completed"
    assert runner.run(envelope("j1")) == "completed"  # the same message again (the recorder grants anything)
    runner.outbox.flush(5)
    ids = [body.get("claim_id") for _, path, body in recorder.calls if path.endswith("/claim")]
    assert len(ids) == 4 and ids[0] == ids[1] == ids[2] != ids[3]
    assert all(isinstance(i, str) and 16 <= len(i) <= 64 and i.isalnum() for i in ids)


def test_a_claim_still_unanswered_when_its_message_expires_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(claims=[UNREACHABLE] * 10)
    runner = JobRunner(recorder, Inflight())  # type: ignore[arg-type]
    slept = pauses(runner, monkeypatch)
    monkeypatch.setattr("workers.jobs.time.time", lambda: 1000.0)
    soon = dataclasses.replace(envelope("j1"), expires_at=1002)  # waits of 1 and 1.5 s fit; the next would not
    assert runner.run(soon) == "dropped: unreachable"
    assert slept == [1.0, 1.5] and recorder.paths() == ["/jobs/j1/claim"] * 3


def test_an_agent_that_stops_while_a_job_waits_to_be_claimed_gives_the_message_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder(claims=[UNREACHABLE, Reply(200, {})])
    runner = JobRunner(recorder, Inflight())  # type: ignore[arg-type]

    def stopped(seconds: float) -> bool:  # the worker's shutdown, during the wait
        runner.stopping.set()
        return True

    monkeypatch.setattr(runner.stopping, "wait", stopped)
    with pytest.raises(Stopping):
        runner.run(envelope("j1"))
    assert recorder.paths() == ["/jobs/j1/claim"]  # not claimed again
    with pytest.raises(Stopping):  # a message taken as the agent stops is not even claimed
        runner.run(envelope("j2"))
    assert recorder.paths() == ["/jobs/j1/claim"]


def test_a_claim_whose_secrets_are_malformed_runs_nothing_and_reports_failed() -> None:
    recorder = Recorder(claims=[Reply(200, {"secrets": ["not", "a", "mapping"]})])
    runner = JobRunner(recorder, Inflight())  # type: ignore[arg-type]
    assert runner.run(envelope("j1")) == "failed"
    runner.outbox.flush(5)
    assert recorder.paths() == ["/jobs/j1/claim", "/jobs/j1/status"]  # no task ran, so no task result
    assert recorder.calls[-1][2]["error"] == MALFORMED_SECRETS


def test_task_results_the_control_plane_could_not_take_go_with_the_final_state() -> None:
    recorder = Recorder()
    recorder.fail_tasks = 2  # down while the tasks run, back for the final state
    runner = JobRunner(recorder, Inflight())  # type: ignore[arg-type]
    three = "name: w\ntasks:\n" + "".join(
        f"  - {{name: t{n}, type: command, config: {{command: 'true'}}}}\n" for n in (1, 2, 3)
    )
    assert runner.run(dataclasses.replace(envelope("j1"), workflow=three)) == "completed"
    runner.outbox.flush(5)
    # the two refused while the run went on, and the last, all small: one final report carries them
    assert recorder.paths() == ["/jobs/j1/claim", "/jobs/j1/status"]
    assert [task["name"] for task in recorder.calls[-1][2]["tasks"]] == ["t1", "t2", "t3"]


FAILS_THIRD = "name: w\ntasks:\n" + "".join(
    f"  - {{name: {name}, type: command, config: {{command: '{command}'}}}}\n"
    for name, command in (("one", "true"), ("two", "true"), ("breaks", "false"), ("never", "true"), ("never2", "true"))
)


def test_the_final_state_carries_the_tasks_a_failed_run_never_reached_as_skipped_in_order() -> None:
    """probe lists the tasks after a failure as skipped, without an event: the agent reported only the tasks
    that sent one, and the control plane never learnt of the others."""
    recorder = Recorder()
    runner = JobRunner(recorder, Inflight())  # type: ignore[arg-type]
    assert runner.run(dataclasses.replace(envelope("j1"), workflow=FAILS_THIRD)) == "failed"
    runner.outbox.flush(5)
    sent = [body.get("name") for _, path, body in recorder.calls if path == "/jobs/j1/tasks"]
    assert sent == ["one", "two"]  # each as the next task started
    _, path, final = recorder.calls[-1]
    assert path == "/jobs/j1/status" and final["state"] == "failed"
    assert [(t["name"], t["status"], t["position"]) for t in final["tasks"]] == [
        ("breaks", "failed", 2),
        ("never", "skipped", 3),
        ("never2", "skipped", 4),
    ]
    assert final["tasks"][1]["output"] == "" and final["tasks"][1]["started_at"] is None


def test_the_final_state_carries_the_tasks_after_a_cancelled_one_as_cancelled() -> None:
    recorder = Recorder()
    inflight = Inflight()
    runner = JobRunner(recorder, inflight)  # type: ignore[arg-type]
    three = "name: w\ntasks:\n" + "".join(
        f"  - {{name: {name}, type: command, config: {{command: sleep, args: ['{pause}']}}}}\n"
        for name, pause in (("quick", "0"), ("slow", "60"), ("never", "0"))
    )
    outcome: list[str] = []
    thread = threading.Thread(
        target=lambda: outcome.append(runner.run(dataclasses.replace(envelope(), workflow=three)))
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not any(body.get("next_task") == "slow" for _, _, body in recorder.calls) and time.monotonic() < deadline:
        time.sleep(0.01)
    inflight.cancel(["j1"])
    thread.join(10)
    runner.outbox.flush(5)
    assert outcome == ["cancelled"]
    final = recorder.calls[-1][2]
    assert [(t["name"], t["status"]) for t in final["tasks"]] == [("slow", "cancelled"), ("never", "cancelled")]


def test_a_run_with_no_thread_for_its_logs_or_its_report_still_delivers_its_final_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder()
    inflight = Inflight()
    runner = JobRunner(recorder, inflight)  # type: ignore[arg-type]
    no_threads_named(monkeypatch, "agent-reports", "logship")
    monkeypatch.setattr(logship, "LogBuffer", functools.partial(logship.LogBuffer, batch_lines=1))  # a batch a line
    monkeypatch.setattr(jobs, "LogBuffer", logship.LogBuffer)
    assert runner.run(envelope()) == "completed"
    method, path, final = recorder.calls[-1]  # delivered before run returned, on the task's own thread
    assert (method, path, final["state"]) == ("POST", "/jobs/j1/status", "completed")
    assert final["logs_first_line"] == 1 and len(final["logs"]) >= 4  # every line, none shipped on its own
    assert running(inflight) == []


@pytest.mark.parametrize(
    "refusal",
    [
        Reply(401, {"error": "invalid_token", "message": "the token expired"}),
        Reply(409, {"error": "agent_not_registered", "message": "agent 'a1' is not registered"}),
        Reply(409, {"error": "wrong_agent", "message": "job j1 runs on windows; this agent runs linux"}),
    ],
)
def test_a_claim_refused_because_of_the_agent_gives_the_message_back_and_runs_nothing(refusal: Reply) -> None:
    """No claim of this agent can succeed any more (its token, its registration): dropping the message would leave
    the job queued with no message until it expires; another agent should take it."""
    recorder = Recorder(claims=[refusal])
    inflight = Inflight()
    runner = JobRunner(recorder, inflight)  # type: ignore[arg-type]
    with pytest.raises(jobs.NotAccepted, match=f"HTTP {refusal.status} {refusal.error}"):
        runner.run(envelope("j1"))
    assert recorder.paths() == ["/jobs/j1/claim"] and running(inflight) == []


@pytest.mark.parametrize(
    ("refusal", "audience"),
    [
        ("invalid_transition", "tenant.t.p.linux"),
        ("job_cancelled", "tenant.t.p.linux"),
        # pinned to this agent, then its platform changed: the job's problem (the sweeper dead-letters it)
        ("wrong_agent", "agent.t.a1"),
    ],
)
def test_a_claim_refused_because_of_the_job_still_drops_the_message(refusal: str, audience: str) -> None:
    recorder = Recorder(claims=[Reply(409, {"error": refusal, "message": "no"})])
    runner = JobRunner(recorder, Inflight())  # type: ignore[arg-type]
    assert runner.run(dataclasses.replace(envelope("j1"), audience=audience)) == f"dropped: {refusal}"


def test_a_run_abandoned_for_want_of_a_renewed_lease_is_stopped_and_its_final_state_not_reported() -> None:
    """The control plane could not renew the lease for a lease's length: its reaper runs the job again, so this copy
    stops, and reports nothing (a `cancelled` report recorded late would end a job nobody cancelled)."""
    slow = WORKFLOW.replace('command: "true"', 'command: "sleep"\n      args: ["5"]')
    recorder = Recorder(claims=[Reply(200, {"lease_seconds": 0.5})])
    inflight = Inflight()
    runner = JobRunner(recorder, inflight)  # type: ignore[arg-type]
    done: list[str] = []
    thread = threading.Thread(
        target=lambda: done.append(runner.run(dataclasses.replace(envelope("j1"), workflow=slow)))
    )
    thread.start()
    try:
        for _ in range(500):  # until the run has been claimed
            if inflight.snapshot():
                break
            time.sleep(0.02)
        assert inflight.snapshot(), "the run was not claimed within 10 s"
        assert inflight.lease == 0.5
        started = inflight.snapshot()[0]
        assert inflight.until_expiry(started.renewed) == 0.5
        inflight.abandon_expired(started.renewed + 0.4)  # not yet
        assert not started.cancel.is_set()
        inflight.renewed([("j1", 1)], started.renewed + 0.3)  # a heartbeat renewed it
        inflight.abandon_expired(started.renewed + 0.4)
        assert not started.cancel.is_set()
        inflight.abandon_expired(started.renewed + 0.6)
        assert started.abandoned and started.cancel.is_set()
        assert inflight.until_expiry(started.renewed + 0.6) is None  # nothing else to watch
    finally:
        thread.join(10)
    assert done == ["abandoned"]
    runner.outbox.flush(5)
    assert "/jobs/j1/status" not in recorder.paths() and running(inflight) == []


def test_a_run_that_has_ended_keeps_its_final_state_however_late_its_delivery() -> None:
    recorder = Recorder(claims=[Reply(200, {"lease_seconds": 0.5})])
    recorder.opened.clear()  # the control plane does not answer the final state yet
    inflight = Inflight()
    runner = JobRunner(recorder, inflight)  # type: ignore[arg-type]
    assert runner.run(envelope("j1")) == "completed"
    ended = inflight.snapshot()[0]
    inflight.abandon_expired(ended.renewed + 60)
    assert not ended.abandoned and not ended.cancel.is_set()
    recorder.opened.set()
    runner.outbox.flush(5)
    assert recorder.calls[-1][1] == "/jobs/j1/status" and recorder.calls[-1][2]["state"] == "completed"


class Limited:
    """A control plane that refuses (413) any request over ``limit`` bytes or with more than ``max_lines`` log lines,
    and records what it took."""

    def __init__(self, limit: int = 1024 * 1024, max_lines: int = 1000) -> None:
        self.limit, self.max_lines = limit, max_lines
        self.taken: list[tuple[str, dict[str, Any]]] = []
        self.refused = 0

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, **_: Any) -> Reply:
        size = len(json.dumps(body, separators=(",", ":")))
        if size > self.limit or len(body.get("lines") or body.get("logs") or []) > self.max_lines:  # type: ignore[union-attr]
            self.refused += 1
            return Reply(413, {"error": "too_large", "message": "request body too large"})
        self.taken.append((path, body or {}))
        return Reply(200, {"state": (body or {}).get("state")})

    def lines(self) -> list[tuple[int, str]]:
        """Every log line taken, numbered as sent."""
        numbered = []
        for _, body in self.taken:
            first = body.get("first_line", body.get("logs_first_line"))
            numbered += [
                (first + i, line["message"]) for i, line in enumerate(body.get("lines") or body.get("logs") or [])
            ]
        return numbered


def wide(n: int, size: int = 7000) -> dict[str, Any]:
    return {**line(n), "message": f"{n:05d} " + "é" * size}  # escaped in JSON: six bytes a character


def test_a_long_log_goes_in_requests_the_control_plane_takes_and_the_final_state_stays_under_its_limit() -> None:
    """500 lines of 7000 characters each, escaped to about 40 KB a line: the final state took them all and was
    refused for its size (413), and the run was lost. Each request now stays under the control plane's 1 MiB."""
    control = Limited()
    runner = JobRunner(control, Inflight())  # type: ignore[arg-type]
    lines = [wide(n) for n in range(1, 601)]
    assert runner._finish(FinalReport("j1", 1, "completed", None, [], lines, 1)) == "completed"
    assert control.refused == 0
    assert control.lines() == [(n, lines[n - 1]["message"]) for n in range(1, 601)]  # each once, in order
    assert control.taken[-1][0] == "/jobs/j1/status" and control.taken[-1][1]["state"] == "completed"
    assert all(len(json.dumps(body)) < 1024 * 1024 for _, body in control.taken)


def test_log_batches_and_a_final_state_refused_for_their_size_are_cut_and_sent_again() -> None:
    """A control plane that takes fewer lines a request (`LOG_BATCH_MAX_LINES` lowered, a smaller body limit):
    a batch it refuses with 413 is halved until it takes them; a final state it refuses so goes without its lines,
    which are sent first."""
    control = Limited(max_lines=30)
    runner = JobRunner(control, Inflight())  # type: ignore[arg-type]
    lines = [line(n) for n in range(1, 201)]
    runner._log_sender("j1", 1)(lines[:100], 1)
    assert runner._finish(FinalReport("j1", 1, "failed", "boom", [], lines[100:], 101)) == "failed"
    assert control.refused > 0
    assert control.lines() == [(n, f"line {n}") for n in range(1, 201)]
    path, final = control.taken[-1]
    assert path == "/jobs/j1/status" and final["state"] == "failed" and "logs" not in final


def test_results_one_report_cannot_carry_go_first_in_running_reports_in_order() -> None:
    """A long workflow that failed early: three outputs of 100 KB and 40 skipped tasks pass the bytes (256 KiB) and
    the number of results (16) one report may carry. They go in as few reports as hold them, in order, the last
    with the final state."""
    control = Limited()
    runner = JobRunner(control, Inflight())  # type: ignore[arg-type]
    big = [{"name": f"big{n}", "status": "failed", "position": n, "output": "x" * 100_000} for n in range(3)]
    skipped = [{"name": f"s{n}", "status": "skipped", "position": 3 + n, "output": ""} for n in range(40)]
    assert runner._finish(FinalReport("j1", 1, "failed", "task 'big2' failed", [*big, *skipped])) == "failed"
    reports = [(path, body["state"], [t["name"] for t in body["tasks"]]) for path, body in control.taken]
    assert reports == [
        ("/jobs/j1/status", "running", ["big0", "big1"]),
        ("/jobs/j1/status", "running", ["big2", *[f"s{n}" for n in range(15)]]),
        ("/jobs/j1/status", "running", [f"s{n}" for n in range(15, 31)]),
        ("/jobs/j1/status", "failed", [f"s{n}" for n in range(31, 40)]),
    ]
    assert all(body["attempt"] == 1 for _, body in control.taken) and control.refused == 0
