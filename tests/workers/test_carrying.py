"""A busy agent's final reports ride with its next claim; whatever the claim's answer does not settle is delivered
on its own."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from dispatch.logs import ContextFilter, log_context
from tests.workers.support import envelope, granting, line, pauses, running
from tests.workers.test_client import client_for
from workers.client import ControlPlaneError, Reply
from workers.jobs import CARRIED_BYTES, LOG_LINES_WITH_FINAL_STATE, Inflight, JobRunner
from workers.outbox import FinalReport

UNREAD = Reply(400, {"error": "invalid_request", "message": "body.finished.0.state: bad"})


class Carrier:
    """A control plane that answers each carried report as ``outcome`` says (None: the reply says nothing of it),
    and remembers every request; ``claim_replies`` replace the answers of the next claims that carry reports."""

    def __init__(self, outcome: dict[str, Any] | None = None) -> None:
        self.outcome = {"status": 200, "state": "completed"} if outcome is None else outcome
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.claim_replies: list[Reply | Exception] = []

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, **_: Any) -> Reply:
        body = body or {}
        self.calls.append((path, body))
        carried = body.get("finished", [])
        if path.endswith("/claim") and carried:
            if self.claim_replies:
                answer = self.claim_replies.pop(0)
                if isinstance(answer, Exception):
                    raise answer
                return answer
            outcomes = [{"job_id": r["job_id"], "attempt": r["attempt"], **self.outcome} for r in carried]
            return granting(Reply(200, {"finished": outcomes}), path, body)
        return granting(Reply(200, {}), path, body) if path.endswith("/claim") else Reply(200, {})

    def requests(self) -> list[tuple[str, list[str]]]:
        """Each request's path, with the jobs whose final states it carried."""
        return [(path, [r["job_id"] for r in body.get("finished", [])]) for path, body in self.calls]


@pytest.fixture(autouse=True)
def long_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job run after another counts as back to back however slow the machine, and its report waits for the next
    claim as long as a test needs (a flush still sends it at once)."""
    monkeypatch.setattr("workers.jobs.BACK_TO_BACK", 60.0)
    monkeypatch.setattr("workers.jobs.LINGER", 60.0)


def busy_runner(control_plane: Carrier, inflight: Inflight | None = None, concurrency: int = 1) -> JobRunner:
    """A runner that has just reported a job: the next one's report waits for a claim to carry it."""
    runner = JobRunner(control_plane, inflight or Inflight(), concurrency)  # type: ignore[arg-type]
    runner.run(envelope("j0"))
    runner.outbox.flush(5)
    control_plane.calls.clear()
    return runner


def test_a_busy_agent_s_final_report_rides_with_its_next_claim() -> None:
    carrier = Carrier()
    inflight = Inflight()
    runner = busy_runner(carrier, inflight)
    assert runner.run(envelope("j1")) == "completed"
    assert running(inflight) == [("j1", 1)]  # its report waits for the next claim; the lease is still renewed
    assert runner.run(envelope("j2")) == "completed"
    assert running(inflight) == [("j2", 1)]
    path, claim = carrier.calls[-1]
    assert path == "/jobs/j2/claim" and claim["attempt"] == 1 and claim["task"] == "noop"
    (report,) = claim["finished"]
    assert (report["job_id"], report["attempt"], report["state"]) == ("j1", 1, "completed")
    assert [task["name"] for task in report["tasks"]] == ["noop"] and report["logs"]
    assert runner.outbox.flush(5)  # the last one has no claim to ride with: it goes alone
    assert carrier.requests() == [("/jobs/j1/claim", []), ("/jobs/j2/claim", ["j1"]), ("/jobs/j2/status", [])]
    assert running(inflight) == []


def test_an_agent_that_was_idle_reports_at_once() -> None:
    carrier = Carrier()
    runner = JobRunner(carrier, Inflight())  # type: ignore[arg-type]
    runner.run(envelope("j1"))  # nothing reported before it: no next claim is expected
    waited = 0.0
    while len(carrier.calls) < 2 and waited < 30:  # without flush, which would hurry it; the linger is 60 s
        time.sleep(0.01)
        waited += 0.01
    assert carrier.requests() == [("/jobs/j1/claim", []), ("/jobs/j1/status", [])]


def test_a_carried_report_the_control_plane_refuses_is_logged_and_not_sent_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    carrier = Carrier({"status": 409, "error": "stale_attempt", "message": "attempt 1 of job j1 is lost"})
    inflight = Inflight()
    runner = busy_runner(carrier, inflight)
    runner.run(envelope("j1"))
    runner.run(envelope("j2"))
    assert running(inflight) == [("j2", 1)]
    assert "job j1: final state completed refused (stale_attempt)" in caplog.text
    runner.outbox.flush(5)
    assert [path for path, _ in carrier.requests()] == ["/jobs/j1/claim", "/jobs/j2/claim", "/jobs/j2/status"]


def test_a_carried_report_is_logged_under_its_own_job_not_the_job_whose_claim_carried_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.handler.addFilter(ContextFilter("agent"))  # what the agent's log handlers apply
    runner = busy_runner(Carrier())
    runner.run(envelope("j1"))
    with caplog.at_level("INFO", "workers.jobs"), log_context(job_id="j2"):  # as Celery's task hook binds it
        runner.run(envelope("j2"))
    [record] = [r for r in caplog.records if r.getMessage() == "job j1 attempt 1 completed"]
    assert record.job_id == "j1"  # type: ignore[attr-defined]
    caplog.clear()
    with caplog.at_level("INFO", "workers.jobs"):
        runner.outbox.flush(5)  # delivered alone, in the outbox's thread: no job in its context
    [record] = [r for r in caplog.records if r.getMessage() == "job j2 attempt 1 completed"]
    assert record.job_id == "j2"  # type: ignore[attr-defined]


def test_the_clients_retries_of_a_final_report_delivered_alone_are_logged_under_its_job(
    http_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    answers = iter([(503, {}, b"{}"), (200, {}, b'{"state": "completed"}')])
    granted = b'{"job_id": "j1", "attempt": 1}'
    http_server.route("/api/v1/jobs/j1/claim", method="POST", body=lambda request: (200, {}, granted))
    http_server.route("/api/v1/jobs/j1/status", method="POST", body=lambda request: next(answers))
    caplog.handler.addFilter(ContextFilter("agent"))
    runner = JobRunner(client_for(http_server.url), Inflight())
    with caplog.at_level("INFO"):
        runner.run(envelope("j1"))  # an idle agent: its report goes at once, from the outbox's thread
        runner.outbox.flush(10)  # False if the thread was done before it: the next line checks the delivery
    assert next(answers, None) is None  # the 503, then the 200: delivered
    [retry] = [r for r in caplog.records if r.getMessage().startswith("POST /jobs/j1/status failed (HTTP 503)")]
    assert retry.job_id == "j1"  # type: ignore[attr-defined]


def test_a_claim_that_fails_gives_its_reports_back_and_is_made_again(monkeypatch: pytest.MonkeyPatch) -> None:
    carrier = Carrier()
    inflight = Inflight()
    runner = busy_runner(carrier, inflight)
    slept = pauses(runner, monkeypatch)
    runner.run(envelope("j1"))
    carrier.claim_replies.append(ControlPlaneError("POST /jobs/j2/claim failed 9 times; last: HTTP 503"))
    assert runner.run(envelope("j2")) == "completed"  # claimed again once the control plane answers
    runner.outbox.flush(5)  # j1's report, given back, went alone or with the second claim
    later = carrier.requests()[2:]
    assert slept == [1.0] and running(inflight) == []
    assert ("/jobs/j1/status", []) in later or ("/jobs/j2/claim", ["j1"]) in later


@pytest.mark.parametrize(
    "answer",
    [
        UNREAD,
        Reply(413, {"error": "payload_too_large", "message": "the body is larger than 1048576 bytes"}),
        Reply(401, {"error": "invalid_token", "message": "expired"}),
    ],
)
def test_reports_a_claim_s_answer_does_not_account_for_are_delivered_alone(answer: Reply) -> None:
    carrier = Carrier()
    inflight = Inflight()
    runner = busy_runner(carrier, inflight)
    runner.run(envelope("j1"))
    carrier.claim_replies.append(answer)
    assert runner.run(envelope("j2")) == "completed"  # the claim was made again without them
    runner.outbox.flush(5)
    requests = carrier.requests()
    assert requests[1:3] == [("/jobs/j2/claim", ["j1"]), ("/jobs/j2/claim", [])]
    assert ("/jobs/j1/status", []) in requests and running(inflight) == []


def test_a_carried_report_the_control_plane_could_not_record_yet_is_sent_again_alone() -> None:
    carrier = Carrier({"status": 503, "error": "service_unavailable", "message": "the database is unavailable"})
    inflight = Inflight()
    runner = busy_runner(carrier, inflight)
    runner.run(envelope("j1"))
    runner.run(envelope("j2"))
    runner.outbox.flush(5)
    assert ("/jobs/j1/status", []) in carrier.requests() and running(inflight) == []


def test_a_claim_carries_no_log_backlog_and_no_more_than_its_share_of_bytes() -> None:
    carrier = Carrier()
    runner = busy_runner(carrier, concurrency=6)
    backlog = FinalReport("j6", 1, "completed", None, [], [line(n) for n in range(LOG_LINES_WITH_FINAL_STATE + 1)])
    escaped = FinalReport("j7", 1, "failed", "é" * 50_000)  # 50,000 characters, 300,000 bytes as JSON escapes
    big = [FinalReport(f"j{n}", 1, "failed", None, [{"name": "dump", "output": "x" * 100_000}]) for n in (8, 9, 10)]
    small = FinalReport("j11", 1, "completed", None)
    for report in (backlog, escaped, *big, small):
        runner.outbox.put(report, linger=60.0)
    runner.run(envelope("j1"))
    assert carrier.requests()[0] == ("/jobs/j1/claim", ["j8", "j9", "j11"])  # a third 100 KB would pass 256 KiB
    runner.outbox.flush(5)
    assert len(json.dumps(carrier.calls[0][1], separators=(",", ":"))) < CARRIED_BYTES + 1024
    paths = [path for path, _ in carrier.requests()]
    assert {"/jobs/j6/logs", "/jobs/j6/status", "/jobs/j7/status", "/jobs/j10/status"} <= set(paths)
    assert not {"/jobs/j8/status", "/jobs/j9/status", "/jobs/j11/status"} & set(paths)


def test_a_claim_carries_a_failed_run_with_its_skipped_tasks_but_not_more_results_than_one_report_takes() -> None:
    """A failed run's report holds the failed task and the skipped ones after it: small, it rides as a one-task
    report does. One with more results than a report may carry (16) goes alone, its first results before it."""
    carrier = Carrier()
    runner = busy_runner(carrier, concurrency=3)
    skipped = [{"name": f"s{n}", "status": "skipped", "position": n + 1, "output": ""} for n in range(16)]
    failed = {"name": "breaks", "status": "failed", "position": 0, "output": "boom\n"}
    short = FinalReport("j8", 1, "failed", "task 'breaks' failed", [failed, *skipped[:2]])
    long = FinalReport("j9", 1, "failed", "task 'breaks' failed", [failed, *skipped])
    for report in (short, long):
        runner.outbox.put(report, linger=60.0)
    runner.run(envelope("j1"))
    assert carrier.requests()[0] == ("/jobs/j1/claim", ["j8"])
    assert [t["name"] for t in carrier.calls[0][1]["finished"][0]["tasks"]] == ["breaks", "s0", "s1"]
    runner.outbox.flush(5)
    alone = [(body["state"], len(body["tasks"])) for path, body in carrier.calls if path == "/jobs/j9/status"]
    assert alone == [("running", 16), ("failed", 1)]
