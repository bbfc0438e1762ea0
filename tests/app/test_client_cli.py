"""The operator CLI (``automation jobs``, ``automation agents``) against a loopback HTTP server with canned answers.

The real platform is in tests/e2e/test_cli.py; here the server plays the API so that event streams can be
dropped, routes can be missing and errors can be of every kind.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.cli import main
from app.client import commands, render, sse, watch
from app.client.http import Client
from tests.servers.http import HTTPTestServer, ReceivedRequest

JOB = "3f2a1b2c-0000-4000-8000-000000000001"
API = f"/api/v1/jobs/{JOB}"
BIN = Path(sys.executable).parent
CLIENT = Path(__file__).resolve().parents[2] / "app" / "client"


def event(seq: int, state: str, task: str | None = None, status: str | None = None, attempt: int = 1) -> dict:
    """One live event of shared contract 1."""
    return {
        "id": seq,
        "job_id": JOB,
        "tenant_id": "acme",
        "project_id": "web",
        "attempt": attempt,
        "state": state,
        "task": task,
        "status": status,
        "ts": f"2026-01-01T12:00:{seq:02d}Z",
    }


def frame(e: dict) -> bytes:
    """An event as the SSE endpoint writes it."""
    return f"id: {e['id']}\nevent: job\ndata: {json.dumps(e)}\n\n".encode()


def history(final: str = "completed") -> list[dict]:
    """A job's whole life: queued, running, two tasks, then ``final``."""
    second = "succeeded" if final == "completed" else "failed"
    return [
        event(1, "queued"),
        event(2, "running"),
        event(3, "running", "greet", "running"),
        event(4, "running", "greet", "succeeded"),
        event(5, "running", "check", "running"),
        event(6, "running", "check", second),
        event(7, final),
    ]


def job(state: str = "completed", tasks: list[dict] | None = None, **fields: Any) -> dict:
    """A job as GET /api/v1/jobs/{id} answers."""
    return {
        "job_id": JOB,
        "tenant_id": "acme",
        "project_id": "web",
        "name": "hello",
        "state": state,
        "attempt": 1,
        "max_attempts": 1,
        "priority": 5,
        "platform": "linux",
        "agent_id": None,
        "variables": {},
        "cancel_requested": False,
        "created_at": "2026-01-01T12:00:00Z",
        "updated_at": "2026-01-01T12:00:05Z",
        "started_at": "2026-01-01T12:00:01Z",
        "finished_at": "2026-01-01T12:00:05Z" if state in render.FINAL else None,
        "error": None if state == "completed" else ("task 'check' failed" if state in render.FINAL else None),
        "created_by": "operator",
        "workflow": "name: hello\ntasks:\n  - {name: greet, type: command}\n  - {name: check, type: command}\n",
        "tasks": tasks or [],
        "attempts": [],
        "events": [],
        **fields,
    }


def result(name: str, status: str, position: int, output: str = "") -> dict:
    """A task result of the job's current attempt."""
    return {
        "attempt": 1,
        "position": position,
        "name": name,
        "type": "command",
        "status": status,
        "output": output,
        "error": None if status == "succeeded" else "exit status 3",
        "metrics": {"duration_ms": 1500},
        "started_at": "2026-01-01T12:00:02Z",
        "finished_at": "2026-01-01T12:00:03.5Z",
    }


def reply(body: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


def fixed(body: Any, status: int = 200) -> Any:
    """A route's answer: always this JSON body."""
    return lambda request: reply(body, status)


def stream(*chunks: bytes) -> tuple[int, dict[str, str], Iterator[bytes]]:
    return 200, {"Content-Type": "text/event-stream"}, iter(chunks)


@pytest.fixture
def cli(
    http_server: HTTPTestServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Any]:
    """Run ``automation ARGS`` in this process against the loopback server; returns (exit code, out, err)."""
    monkeypatch.setenv("CONTROL_PLANE_URL", http_server.url)
    monkeypatch.setenv("JWT_TOKEN", "token-of-the-test")
    monkeypatch.setattr(watch, "POLL_INTERVAL", 0.0)
    monkeypatch.setattr(sse, "RECONNECT_DELAY", 0.0)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    yield run


def test_the_parser_reads_events_split_anywhere_with_any_line_ending() -> None:
    raw = '\ufeff: keep-alive\r\nid: 7\revent: job\ndata: {"a":\r\ndata:  1}\n\nretry: 2500\ndata: é\n\n'.encode()
    parser = sse.Parser()
    events = [e for i in range(len(raw)) for e in parser.feed(raw[i : i + 1])]  # byte by byte: é is split too
    assert events == [sse.Event("job", '{"a":\n 1}', "7"), sse.Event("message", "é", "7")]
    assert parser.retry == 2.5


def test_comments_ids_alone_and_unfinished_events_dispatch_nothing() -> None:
    parser = sse.Parser("3")
    assert parser.feed(b": keep-alive\n\nid: 4\n\nevent: job\n\ndata: half") == []
    assert parser.last_id == "4"
    assert parser.feed(b"\n\n") == [sse.Event("message", "half", "4")]  # the event type was reset by the blank line


@pytest.mark.parametrize(("final", "code"), [("completed", 0), ("failed", 1), ("timed_out", 1)])
def test_watch_prints_a_line_per_task_start_and_end_and_exits_by_the_final_state(
    cli: Any, http_server: HTTPTestServer, final: str, code: int
) -> None:
    http_server.route(f"{API}/events", body=lambda r: stream(b": keep-alive\n\n", *map(frame, history(final))))
    http_server.route(API, body=fixed(job(final)))
    status, out, err = cli("jobs", "watch", JOB)
    assert status == code, err
    lines = out.splitlines()
    assert lines[:2] == [f"job {JOB[:8]} queued", f"job {JOB[:8]} running (attempt 1)"]
    assert [line.split()[1:] for line in lines[2:6]] == [
        ["greet"],
        ["greet", "succeeded", "in", "1.0s"],
        ["check"],
        ["check", "succeeded" if final == "completed" else "failed", "in", "1.0s"],
    ]
    assert lines[-1].split()[1:5] == ["job", JOB, "(hello)", final]
    assert len(lines) == 7 and "\r" not in out  # plain lines: stdout is not a terminal
    assert http_server.requests[0].header("Accept") == "text/event-stream"
    assert http_server.requests[0].header("Authorization") == "Bearer token-of-the-test"


def test_task_ends_that_no_event_told_of_are_shown_from_the_finished_job(cli: Any, http_server: HTTPTestServer) -> None:
    only_states = [e for e in history() if e["task"] is None]
    http_server.route(f"{API}/events", body=lambda r: stream(*map(frame, only_states)))
    tasks = [result("greet", "succeeded", 0), result("check", "succeeded", 1)]
    http_server.route(API, body=fixed(job("completed", tasks)))
    status, out, _ = cli("jobs", "watch", JOB)
    assert status == 0
    assert [line.split()[1:] for line in out.splitlines()[2:4]] == [
        ["greet", "succeeded", "in", "1.5s"],
        ["check", "succeeded", "in", "1.5s"],
    ]
    assert len(out.splitlines()) == 5


def test_a_dropped_stream_is_resumed_after_the_last_event_id(cli: Any, http_server: HTTPTestServer) -> None:
    events = history("failed")

    def answer(request: ReceivedRequest) -> tuple[int, dict[str, str], Iterator[bytes]]:
        resumed = request.header("Last-Event-ID")
        if resumed is None:  # events 1-3, half of 4, then the connection drops
            return stream(*map(frame, events[:3]), frame(events[3])[:30])
        return stream(*(frame(e) for e in events if e["id"] > int(resumed)))

    http_server.route(f"{API}/events", body=answer)
    http_server.route(API, body=fixed(job("failed")))
    status, out, err = cli("jobs", "watch", JOB)
    assert status == 1, err
    streams = [r for r in http_server.requests if r.path.endswith("/events")]
    assert [r.header("Last-Event-ID") for r in streams] == [None, "3"]
    assert [line.split()[1:3] for line in out.splitlines()[2:6]] == [
        ["greet"],
        ["greet", "succeeded"],
        ["check"],
        ["check", "failed"],
    ]
    assert "task 'check' failed" in out.splitlines()[-1]


def test_events_seen_before_a_reconnection_are_not_shown_twice(cli: Any, http_server: HTTPTestServer) -> None:
    events = history()
    answers = iter([stream(*map(frame, events[:4])), stream(*map(frame, events))])  # the server replays it all
    http_server.route(f"{API}/events", body=lambda r: next(answers))
    http_server.route(API, body=fixed(job()))
    status, out, _ = cli("jobs", "watch", JOB, "--json")
    assert status == 0
    assert [json.loads(line) for line in out.splitlines()] == events  # one JSON event per line, each once


def test_a_stream_that_closes_after_a_task_event_with_the_final_state_ends_the_watch(
    cli: Any, http_server: HTTPTestServer
) -> None:
    events = history("failed")[:6]
    events[-1]["state"] = "failed"  # the last task's end, published with the job's final state
    http_server.route(f"{API}/events", body=lambda r: stream(*map(frame, events)))
    http_server.route(API, body=fixed(job("failed")))
    status, out, _ = cli("jobs", "watch", JOB)
    assert status == 1 and out.splitlines()[-1].split()[4] == "failed"
    assert len([r for r in http_server.requests if r.path.endswith("/events")]) == 1  # not resumed


def test_a_stream_that_keeps_dropping_is_given_up_with_exit_4(cli: Any, http_server: HTTPTestServer) -> None:
    http_server.route(f"{API}/events", body=lambda r: stream(b": keep-alive\n\n"))
    status, _, err = cli("jobs", "watch", JOB)
    assert status == 4 and "lost the event stream" in err
    assert len(http_server.requests) == sse.MAX_FAILURES


def test_streams_that_the_server_ends_after_a_while_are_resumed_for_as_long_as_the_job_runs(
    cli: Any, http_server: HTTPTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse, "HEALTHY_AFTER", 0.0)  # every connection "lasted": a quiet job, streams ended in time
    quiet = [stream(b": keep-alive\n\n") for _ in range(sse.MAX_FAILURES + 2)]
    answers = iter([*quiet, stream(*map(frame, history()))])
    http_server.route(f"{API}/events", body=lambda r: next(answers))
    http_server.route(API, body=fixed(job()))
    status, _, err = cli("jobs", "watch", JOB)
    assert status == 0, err
    assert len([r for r in http_server.requests if r.path.endswith("/events")]) == sse.MAX_FAILURES + 3


def test_without_the_events_route_watch_polls_the_job(cli: Any, http_server: HTTPTestServer) -> None:
    snapshots = [
        job("queued"),
        job("queued"),
        job("running"),
        job("running", [result("greet", "succeeded", 0)]),
        job("completed", [result("greet", "succeeded", 0), result("check", "succeeded", 1)]),
    ]
    not_found = {"error": "not_found", "message": "The requested URL was not found on the server."}
    http_server.route(f"{API}/events", body=fixed(not_found, 404))
    http_server.route(API, body=lambda r: reply(snapshots.pop(0) if len(snapshots) > 1 else snapshots[0]))
    status, out, err = cli("jobs", "watch", JOB)
    assert status == 0, err
    assert "polling" in err
    assert [line.split()[1:4] for line in out.splitlines()] == [
        [JOB[:8], "queued"],
        [JOB[:8], "running", "(attempt"],
        ["greet"],  # the first task, from the workflow, as soon as the job runs
        ["greet", "succeeded", "in"],
        ["check"],
        ["check", "succeeded", "in"],
        ["job", JOB, "(hello)"],
    ]


def test_polling_snapshots_become_the_events_of_the_contract() -> None:
    tracker = watch.Snapshots()
    first = tracker.update(job("running"))
    assert [(e["state"], e["task"], e["status"]) for e in first] == [
        ("running", None, None),
        ("running", "greet", "running"),
    ]
    done = tracker.update(job("failed", [result("greet", "succeeded", 0), result("check", "failed", 1)]))
    assert [(e["state"], e["task"], e["status"]) for e in done] == [
        ("failed", "greet", "succeeded"),
        ("failed", "check", "running"),
        ("failed", "check", "failed"),
        ("failed", None, None),
    ]
    assert [e["id"] for e in first + done] == [1, 2, 3, 4, 5, 6]
    assert set(first[0]) >= {"job_id", "tenant_id", "project_id", "attempt", "state", "task", "status", "ts"}


def test_watching_another_tenants_or_an_unknown_job_exits_3_with_the_apis_message(
    cli: Any, http_server: HTTPTestServer
) -> None:
    missing = {"error": "not_found", "message": f"job '{JOB}' does not exist"}
    http_server.route(f"{API}/events", body=fixed(missing, 404))
    http_server.route(API, body=fixed(missing, 404))
    status, out, err = cli("jobs", "watch", JOB)
    assert (status, out) == (3, "")
    assert err.strip() == f"automation: job '{JOB}' does not exist"


def test_on_a_terminal_the_running_task_has_a_spinner_and_elsewhere_plain_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)

    class Terminal(io.StringIO):
        encoding = "utf-8"

        def isatty(self) -> bool:
            return True

    terminal, plain = Terminal(), io.StringIO()
    for stream_ in (terminal, plain):
        progress = render.Progress(stream_, JOB)
        for e in history()[:3]:
            progress(e)
        shown = stream_.getvalue()
        progress(history()[3])
        progress.close()
        assert "greet succeeded in 1.0s" in stream_.getvalue()
        if stream_ is terminal:  # the line under the running task: a spinner frame, its name and its time so far
            assert re.search(r"\n  \S+ greet \d+\.\d\ds$", shown), repr(shown)
            assert stream_.getvalue().endswith("s\r\033[K  \033[32m✓\033[0m greet succeeded in 1.0s\n")  # replaced
        else:
            assert shown.endswith("greet\n") and "\r" not in stream_.getvalue() and "\033" not in stream_.getvalue()


def test_ctrl_c_exits_130_without_a_traceback(http_server: HTTPTestServer) -> None:
    def endless(request: ReceivedRequest) -> tuple[int, dict[str, str], Iterator[bytes]]:
        def chunks() -> Iterator[bytes]:
            yield frame(event(1, "running"))
            while not http_server.sleep(0.2):
                yield b": keep-alive\n\n"

        return 200, {"Content-Type": "text/event-stream"}, chunks()

    http_server.route(f"{API}/events", body=endless)
    env = {**os.environ, "CONTROL_PLANE_URL": http_server.url, "JWT_TOKEN": "t"}
    process = subprocess.Popen(
        [str(BIN / "automation"), "jobs", "watch", JOB],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Ctrl-C as in a terminal: a suite started in the background by a script inherits SIGINT ignored, and
        # so would the CLI (Python leaves an ignored SIGINT ignored).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 30
        while not http_server.requests and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http_server.requests, "the CLI never connected"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130
    assert b"Traceback" not in err and b"interrupted" in err


def test_logs_are_paged_with_the_cursor_and_followed_until_the_job_has_finished(
    cli: Any, http_server: HTTPTestServer
) -> None:
    lines: list[dict[str, Any]] = [
        {"seq": n, "ts": "2026-01-01T12:00:00Z", "attempt": 1, "task": "greet", "level": "info", "message": f"l{n}"}
        for n in range(1, 6)
    ]

    def page(request: ReceivedRequest) -> tuple[int, dict[str, str], bytes]:
        query = dict(part.split("=") for part in request.path.split("?", 1)[1].split("&"))
        after, follow = int(query["after"]), query.get("follow") == "true"
        chunk = [line for line in lines if line["seq"] > after][:2]
        last = chunk[-1]["seq"] if chunk else after
        return reply(
            {"job_id": JOB, "lines": chunk, "next": last, "finished": follow and last == 5, "truncated": last == 5}
        )

    http_server.route(f"{API}/logs", body=page)
    status, out, err = cli("jobs", "logs", JOB)
    assert status == 0, err
    assert [line.split()[-1] for line in out.splitlines()] == ["l1", "l2", "l3", "l4", "l5"]
    assert out.splitlines()[0] == "2026-01-01 12:00:00Z info    greet: l1"
    assert "truncated" in err
    cursors = [r.path.split("after=")[1].split("&")[0] for r in http_server.requests]
    assert cursors == ["0", "2", "4", "5"]  # paged until a page brings nothing new

    http_server.requests.clear()
    status, out, _ = cli("jobs", "logs", JOB, "--follow", "--json", "--after", "2")
    assert status == 0
    assert [json.loads(line)["message"] for line in out.splitlines()] == ["l3", "l4", "l5"]
    assert all("follow=true" in r.path and "wait=" in r.path for r in http_server.requests)
    assert len(http_server.requests) == 2  # ended by "finished", not by an empty page


def test_without_the_logs_route_the_tasks_output_is_shown(cli: Any, http_server: HTTPTestServer) -> None:
    http_server.route(
        f"{API}/logs", body=fixed({"error": "not_found", "message": "The requested URL was not found"}, 404)
    )
    tasks = [result("greet", "succeeded", 0, "hello\nworld\n"), result("check", "failed", 1, "")]
    http_server.route(API, body=fixed(job("failed", tasks)))
    status, out, err = cli("jobs", "logs", JOB)
    assert status == 0 and "does not serve job logs" in err
    assert [line.split(None, 3)[2:] for line in out.splitlines()] == [
        ["info", "greet: hello"],
        ["info", "greet: world"],
        ["error", "check: exit status 3"],
    ]


@pytest.mark.parametrize(
    ("status", "body", "code", "message"),
    [
        (403, {"error": "access_denied", "message": "role 'viewer' may not list jobs"}, 3, "role 'viewer' may not"),
        (401, {"error": "invalid_token", "message": "the token is invalid: Signature verification failed"}, 3, "token"),
        (500, {"error": "internal_error", "message": "the server failed"}, 4, "the server failed"),
        (502, "<html>Bad Gateway</html>", 4, "502 from http://"),
        # --url pointing at another server: not a refusal of the API, whatever its status
        (404, "<html>Not Found</html>", 4, "not an answer of the automation API"),
        (400, '{"detail": "bad"}', 4, "not an answer of the automation API"),
    ],
)
def test_refusals_exit_3_server_errors_exit_4_with_the_message_on_stderr(
    cli: Any, http_server: HTTPTestServer, status: int, body: Any, code: int, message: str
) -> None:
    payload = json.dumps(body) if isinstance(body, dict) else body
    http_server.route("/api/v1/jobs", status=status, body=payload)
    exit_code, out, err = cli("jobs", "list")
    assert (exit_code, out) == (code, "")
    assert err.startswith("automation: ") and message in err


def test_a_control_plane_that_does_not_answer_exits_4(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.servers._util import free_port

    monkeypatch.setenv("CONTROL_PLANE_URL", f"http://127.0.0.1:{free_port()}")
    status, _, err = cli("agents", "list")
    assert status == 4 and "connection refused" in err


def test_a_rate_limited_request_is_sent_again_after_retry_after(cli: Any, http_server: HTTPTestServer) -> None:
    answers = iter(
        [(429, {"Retry-After": "0.1"}, b'{"error": "rate_limited", "message": "slow down"}'), reply({"agents": []})]
    )
    http_server.route("/api/v1/agents", body=lambda r: next(answers))
    assert cli("agents", "list") == (0, "no agents\n", "")


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["jobs", "list"], {"CONTROL_PLANE_URL": ""}, "set CONTROL_PLANE_URL"),
        (["jobs", "list"], {"JWT_TOKEN": ""}, "set JWT_TOKEN"),
        (["jobs", "list", "--url", "automation.example.com"], {}, "must start with http"),
        (["jobs", "submit", "nowhere.yaml"], {}, "cannot read the workflow file nowhere.yaml"),
        (["jobs", "submit", "-", "--var", "NOVALUE"], {}, "expected NAME=VALUE"),
    ],
)
def test_usage_errors_exit_2(
    cli: Any, monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "stdin", io.StringIO("name: x\n"))
    status, _, err = cli(*args)
    assert status == 2 and message in err


def test_argument_errors_exit_2(cli: Any) -> None:
    with pytest.raises(SystemExit) as exited:
        cli("jobs", "submit", "w.yaml", "--priority", "12")
    assert exited.value.code == 2


def test_submit_prints_the_control_planes_warnings_on_stderr(
    cli: Any, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    warned = {**job("queued"), "warnings": ["no windows agent of project 'web' is online: the job waits"]}
    http_server.route("/api/v1/jobs", method="POST", body=lambda r: reply(warned, 201))
    workflow = tmp_path / "w.yaml"
    workflow.write_text("name: hello\ntasks: []\n")
    status, out, err = cli("jobs", "submit", str(workflow))
    assert status == 0 and out == f"submitted job {JOB} (hello): queued\n"  # stdout stays one line for scripts
    assert err == f"warning: job {JOB}: no windows agent of project 'web' is online: the job waits\n"


def test_submit_posts_the_workflow_with_its_variables_target_and_priority(
    cli: Any, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    http_server.route("/api/v1/jobs", method="POST", body=lambda r: reply(job("queued"), 201))
    workflow = tmp_path / "w.yaml"
    workflow.write_text("name: hello\ntasks: []\n")
    args = ["--var", "WHO=you", "--var", "EQ=a=b", "--agent", "a1", "--priority", "7", "--idempotency-key", "k1"]
    status, out, _ = cli("jobs", "submit", str(workflow), *args)
    assert status == 0 and out == f"submitted job {JOB} (hello): queued\n"
    [sent] = http_server.requests
    assert json.loads(sent.body) == {
        "workflow": "name: hello\ntasks: []\n",
        "variables": {"WHO": "you", "EQ": "a=b"},
        "agent_id": "a1",
        "priority": 7,
    }
    assert sent.header("Idempotency-Key") == "k1" and sent.header("Content-Type") == "application/json"


JOB2 = "3f2a1b2c-0000-4000-8000-000000000002"


def test_submit_to_several_agents_posts_one_batch_with_a_job_per_agent(
    cli: Any, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    answer = {"jobs": [job("queued", agent_id="a1"), job("queued", job_id=JOB2, agent_id="a2")]}
    http_server.route("/api/v1/jobs/batch", method="POST", body=lambda r: reply(answer, 201))
    workflow = tmp_path / "w.yaml"
    workflow.write_text("name: hello\ntasks: []\n")
    args = ["--agent", "a1", "--agent", "a2", "--agent", "a1", "--var", "WHO=you", "--idempotency-key", "k2"]
    status, out, _ = cli("jobs", "submit", str(workflow), *args)
    assert status == 0
    assert out.splitlines() == [
        f"submitted job {JOB} (hello) to a1: queued",
        f"submitted job {JOB2} (hello) to a2: queued",
    ]
    [sent] = http_server.requests
    entry = {"workflow": "name: hello\ntasks: []\n", "variables": {"WHO": "you"}}
    assert json.loads(sent.body) == {"jobs": [{**entry, "agent_id": "a1"}, {**entry, "agent_id": "a2"}]}
    assert sent.header("Idempotency-Key") == "k2"


def test_waiting_for_several_agents_follows_each_job_and_fails_unless_all_completed(
    cli: Any, http_server: HTTPTestServer, tmp_path: Path
) -> None:
    answer = {"jobs": [job("queued", agent_id="a1"), job("queued", job_id=JOB2, agent_id="a2")]}
    http_server.route("/api/v1/jobs/batch", method="POST", body=lambda r: reply(answer, 201))
    for job_id, final in ((JOB, "completed"), (JOB2, "failed")):
        events = [{**e, "job_id": job_id} for e in history(final)]
        http_server.route(f"/api/v1/jobs/{job_id}/events", body=lambda r, ev=events: stream(*map(frame, ev)))
        http_server.route(f"/api/v1/jobs/{job_id}", body=fixed(job(final, job_id=job_id)))
    workflow = tmp_path / "w.yaml"
    workflow.write_text("name: hello\ntasks: []\n")
    status, out, err = cli("jobs", "submit", str(workflow), "--agent", "a1", "--agent", "a2", "--wait")
    assert status == 1, err
    lines = out.splitlines()
    assert lines[2] == "a1:" and "a2:" in lines
    assert lines[lines.index("a2:") - 1].split()[1:5] == ["job", JOB, "(hello)", "completed"]
    assert lines[-1].split()[1:5] == ["job", JOB2, "(hello)", "failed"]
    status, out, err = cli("jobs", "submit", str(workflow), "--agent", "a1", "--agent", "a2", "--wait", "--json")
    assert status == 1, err
    assert [j["state"] for j in json.loads(out)["jobs"]] == ["completed", "failed"]
    assert f"submitted job {JOB2} (hello) to a2" in err  # the ids, before following them


def test_more_agents_than_a_batch_takes_is_a_usage_error(cli: Any, tmp_path: Path) -> None:
    from app.jobs.schemas import MAX_BATCH_JOBS

    assert commands.MAX_AGENTS == MAX_BATCH_JOBS
    workflow = tmp_path / "w.yaml"
    workflow.write_text("name: hello\ntasks: []\n")
    agents = [arg for n in range(MAX_BATCH_JOBS + 1) for arg in ("--agent", f"a{n}")]
    status, _, err = cli("jobs", "submit", str(workflow), *agents)
    assert status == 2 and "at most 100 agents" in err


def test_a_job_and_lists_are_readable_tables(cli: Any, http_server: HTTPTestServer) -> None:
    tasks = [result("greet", "succeeded", 0, "hello\n"), result("check", "failed", 1)]
    http_server.route(API, body=fixed(job("failed", tasks, agent_id="a1", variables={"WHO": "you"})))
    status, out, _ = cli("jobs", "get", JOB)
    assert status == 0
    assert f"job {JOB}  hello" in out and "state      failed" in out and "error      task 'check' failed" in out
    assert "pinned to a1" in out and "WHO=you" in out and "(4.0s)" in out
    assert "attempt    1  max_attempts 1  priority 5" in out  # not "1 of 1": lost attempts do not count
    assert [line.split()[1:5] for line in out.splitlines()[-2:]] == [
        ["greet", "succeeded", "1.5s", "hello"],
        ["check", "failed", "1.5s", "exit"],
    ]
    agents = [
        {"agent_id": "a1", "hostname": "web1", "platform": "linux", "status": "online", "last_heartbeat_at": None},
        {"agent_id": "a22", "hostname": "w2", "platform": "windows", "status": "offline", "last_heartbeat_at": "x"},
    ]
    http_server.route("/api/v1/agents", body=fixed({"agents": agents, "total": 3, "limit": 2, "offset": 0}))
    status, out, _ = cli("agents", "list")
    assert out.splitlines() == [
        "AGENT ID  HOSTNAME  PLATFORM  STATUS   LAST HEARTBEAT",
        "a1        web1      linux     online   -",
        "a22       w2        windows   offline  -",
        "(2 of 3; --limit shows more)",
    ]


def test_the_jobs_list_shows_where_each_job_runs_or_ran(cli: Any, http_server: HTTPTestServer) -> None:
    jobs = [
        {**job("completed"), "job_id": "aaaa", "agent_id": None, "ran_on": "web7"},
        {**job("running"), "job_id": "bbbb", "agent_id": "a1", "ran_on": "a1"},
        {**job("queued"), "job_id": "cccc", "agent_id": "a1", "ran_on": None},
        {**job("pending"), "job_id": "dddd", "agent_id": None, "ran_on": None},
    ]
    http_server.route("/api/v1/jobs", body=fixed({"jobs": jobs, "total": 4, "limit": 50, "offset": 0}))
    status, out, _ = cli("jobs", "list")
    assert status == 0
    assert [line.split()[4:-2] for line in out.splitlines()[1:]] == [["web7"], ["a1"], ["a1", "(pinned)"], ["-"]]
    status, _, _ = cli("jobs", "list", "--ran-on", "web7", "--agent", "a1")
    assert status == 0 and "ran_on=web7" in http_server.requests[-1].path
    assert "agent_id=a1" in http_server.requests[-1].path


def lookup(http_server: HTTPTestServer, *ids: str, status: int = 200) -> list[ReceivedRequest]:
    """Answer GET /api/v1/jobs with the jobs ``ids`` (or an error ``status``); returns the requests it gets."""
    found = [{**job(), "job_id": i, "ran_on": None} for i in ids]
    body = (
        {"jobs": found, "total": len(ids), "limit": 2, "offset": 0} if status == 200 else {"error": "invalid_request"}
    )
    http_server.route("/api/v1/jobs", body=fixed(body, status))
    return http_server.requests


def test_a_job_is_named_by_the_start_of_its_id_as_watch_prints_it(cli: Any, http_server: HTTPTestServer) -> None:
    requests = lookup(http_server, JOB)
    http_server.route(API, body=fixed(job("completed")))
    status, out, err = cli("jobs", "get", JOB[:8].upper())
    assert status == 0, err
    assert f"job {JOB}  hello" in out
    assert [r.path for r in requests] == [f"/api/v1/jobs?id_prefix={JOB[:8]}&limit=2", API]
    requests.clear()
    assert cli("jobs", "get", JOB.upper())[0] == 0 and [r.path for r in requests] == [API]  # a whole id: no lookup


def test_a_start_of_an_id_that_names_no_job_or_several_is_refused(cli: Any, http_server: HTTPTestServer) -> None:
    lookup(http_server)
    status, out, err = cli("jobs", "cancel", "3f2a1b2c")
    assert (status, out) == (
        3,
        "",
    ) and err.strip() == "automation: no job of yours has an id that starts with '3f2a1b2c'"
    other = JOB[:-1] + "2"
    lookup(http_server, JOB, other)
    status, out, err = cli("jobs", "watch", "3f2a")
    assert (status, out) == (2, "")
    assert (
        err.strip() == f"automation: '3f2a' starts the ids of several jobs ({JOB}, {other}, ...): give more of the id"
    )


@pytest.mark.parametrize("refusal", [400, 403])  # an older control plane; a token that may not list jobs
def test_when_ids_cannot_be_looked_up_the_id_goes_as_given(cli: Any, http_server: HTTPTestServer, refusal: int) -> None:
    requests = lookup(http_server, status=refusal)
    missing = {"error": "not_found", "message": "job '3f2a1b2c' does not exist"}
    http_server.route("/api/v1/jobs/3f2a1b2c", body=fixed(missing, 404))
    status, _, err = cli("jobs", "get", "3f2a1b2c")
    assert status == 3 and "job '3f2a1b2c' does not exist" in err
    assert [r.path.split("?")[0] for r in requests] == ["/api/v1/jobs", "/api/v1/jobs/3f2a1b2c"]


def test_the_client_loads_neither_flask_nor_the_database_nor_the_rest_of_the_app() -> None:
    probe = textwrap.dedent(
        """\
        import sys, types
        package = types.ModuleType("app")  # the control plane's __init__ is not the client's to load
        package.__path__ = [sys.argv[1]]
        sys.modules["app"] = package
        import app.client.commands
        print(" ".join(sorted(sys.modules)))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(CLIENT.parent)], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(done.stdout.split())
    assert "requests" in loaded and "app.client.sse" in loaded
    assert not loaded & {"flask", "sqlalchemy", "celery", "pydantic", "redis", "kombu", "yaml", "probe", "dispatch"}
    assert {name for name in loaded if name.startswith("app.")} <= {"app.client"} | {
        f"app.client.{p.stem}" for p in CLIENT.glob("*.py")
    }


def test_the_client_commands_run_on_their_own(cli: Any, http_server: HTTPTestServer, capsys: Any) -> None:
    http_server.route("/api/v1/agents", body=fixed({"agents": [], "total": 0, "limit": 50, "offset": 0}))
    assert commands.main(["agents", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["agents"] == []


def test_the_client_strips_the_api_prefix_and_keeps_the_ca_file() -> None:
    client = Client.from_environment(
        env={"CONTROL_PLANE_URL": "https://h/api/v1/", "JWT_TOKEN": "t", "CONTROL_PLANE_CA_FILE": "/ca.pem"}
    )
    assert (client.api, client.session.verify) == ("https://h/api/v1", "/ca.pem")
