"""How ``bench/submit.py`` loads an endpoint: gunicorn serving the app, client threads posting to it, and the
figures of its rounds.
"""

from __future__ import annotations

import http.client
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class BenchError(Exception):
    """Raised when a measured run fails, so its figures would mean nothing."""


@dataclass
class Sample:
    """One load round: the latency of every success, the failures, and how long it took."""

    latencies: list[float]
    errors: int
    seconds: float


@dataclass
class Figures:
    """What one endpoint did under load, over all its rounds."""

    name: str
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p95_ms: float

    @property
    def rps(self) -> float:
        """Successful requests per second."""
        return self.requests / self.seconds

    @classmethod
    def of(cls, name: str, samples: list[Sample]) -> Figures:
        """Pool the rounds of one endpoint."""
        everything = sorted(x for sample in samples for x in sample.latencies)
        errors = sum(sample.errors for sample in samples)
        if not everything:
            raise BenchError(f"{name}: no request succeeded ({errors} failed)")
        q = statistics.quantiles(everything, n=100)
        return cls(name, len(everything), errors, sum(x.seconds for x in samples), q[49] * 1000, q[94] * 1000)


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def gunicorn(target: str, env: dict[str, str], workers: int, chdir: Path, threads: int = 1) -> Iterator[int]:
    """Run ``target`` under gunicorn with ``workers`` workers of ``threads`` threads (1: sync); yield its port."""
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}"]
    argv += ["--threads", str(threads), "--chdir", str(chdir), "--log-level", "warning", target]
    process = subprocess.Popen(argv, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"gunicorn {target} did not start") from None
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def load(
    name: str,
    port: int,
    path: str,
    body: bytes,
    headers: dict[str, str],
    clients: int,
    seconds: float,
    expect: int,
    distinct: bool = False,
) -> Sample:
    """POST ``body`` from ``clients`` threads for ``seconds``; return the latencies of the successes.

    With ``distinct``, every request's workflow differs (a numbered comment), so no cache can help.
    """
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(index: int) -> None:
        start.wait()
        while time.perf_counter() < stop_at[0]:
            payload = body.replace(b'"}', f'# {uuid.uuid4().hex}\\n"}}'.encode()) if distinct else body
            began = time.perf_counter()
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                connection.request("POST", path, body=payload, headers=headers)
                response = connection.getresponse()
                response.read()
                connection.close()
                ok = response.status == expect
            except OSError:
                ok = False
            if ok:
                latencies[index].append(time.perf_counter() - began)
            else:
                errors[index] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    stop_at[0] = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    return Sample([x for per in latencies for x in per], sum(errors), elapsed)
