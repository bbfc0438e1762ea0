"""How fast is ``POST /api/v1/jobs`` next to a bare Flask + SQLAlchemy endpoint that inserts one row?

    .venv/bin/python bench/submit.py [--seconds 10] [--clients 16] [--workers 2] [--rounds 5]
                                     [--backends sqlite,mariadb] [--distinct]

For each database (an SQLite file; a throwaway MariaDB server started like the test fixture), the control
plane runs under gunicorn with 2 sync workers and receives a three-task workflow from 16 concurrent clients
for 10 s, with authentication, validation by probe, the audit record and the in-memory rate limit all on.
In the same run and on the same database server, a bare Flask + Flask-SQLAlchemy app under the same gunicorn
settings inserts one row per request: the ceiling of this machine. The two are loaded in alternating rounds
(5 by default, 10 s in all for each), so that other load on a shared machine falls on both alike.
Prints p50/p95 latency, requests per second and the ratio the targets are judged on (p95 under 100 ms, at
least 60% of the bare rate). By default every request submits the same workflow (as a pipeline does), which
the server validates once and remembers; ``--distinct`` makes each one different, so that probe validates
every request afresh.
Exits 0 whether or not the targets are met, non-zero only when something fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String, Text, event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

P95_TARGET_MS = 100.0
RATIO_TARGET = 0.60
SECRET = "bench-secret-" + "b" * 48
WORKFLOW = """\
name: bench
tasks:
  - name: kernel
    type: command
    config:
      command: uname -a
  - name: disk
    type: command
    config:
      command: df -h
  - name: uptime
    type: command
    config:
      command: uptime
"""


class BenchError(Exception):
    """Raised when a measured run fails, so its figures would mean nothing."""


def note(message: str) -> None:
    """Tell what the benchmark is doing, on stderr so the figures on stdout stay clean."""
    print(message, file=sys.stderr, flush=True)


class BareBase(DeclarativeBase):
    """The bare app's declarative base."""


class BareRow(BareBase):
    """The one row the bare endpoint inserts per request."""

    __tablename__ = "bare_rows"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)


def bare_app() -> Flask:
    """The ceiling: Flask + Flask-SQLAlchemy, one JSON endpoint that inserts one row (gunicorn entry point)."""
    db = SQLAlchemy(model_class=BareBase)
    app = Flask(__name__)
    url = os.environ["DATABASE_URL"]
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = (
        {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    )
    db.init_app(app)

    @app.post("/insert")
    def insert() -> tuple[Response, int]:
        data = request.get_json()
        row = BareRow(name="bench", body=data["workflow"])
        db.session.add(row)
        db.session.commit()
        return jsonify({"id": row.id}), 201

    with app.app_context():
        if url.startswith("sqlite"):  # the same pragmas as the control plane, for a fair ceiling

            @event.listens_for(db.engine, "connect")
            def _pragmas(connection: Any, _record: Any) -> None:
                cursor = connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.close()

        db.create_all()
    return app


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
def gunicorn(target: str, env: dict[str, str], workers: int, chdir: Path) -> Iterator[int]:
    """Run ``target`` under gunicorn with ``workers`` sync workers; yield its port."""
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}"]
    argv += ["--chdir", str(chdir), "--log-level", "warning", target]
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


def prepare_control_plane(env: dict[str, str]) -> str:
    """Migrate the database, create tenant bench and project web; return an operator token."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        from flask_migrate import upgrade

        from app import create_app
        from app.auth.tokens import issue_token
        from app.extensions import db
        from app.tenants import service

        app = create_app()
        with app.app_context():
            upgrade()
            service.create_tenant(caller=None, tenant_id="bench")
            service.create_project(caller=None, tenant_id="bench", project_id="web")
            db.engine.dispose()
        return issue_token(SECRET, tenant_id="bench", project_id="web", role="operator", ttl=3600)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def measure(backend: str, app_url: str, bare_url: str, args: argparse.Namespace) -> tuple[Figures, Figures]:
    """Load the control plane and the bare endpoint in alternating rounds (fair on a shared machine)."""
    env = {"DATABASE_URL": app_url, "JWT_SECRET": SECRET, "RATE_LIMIT": "1000000 per minute"}
    token = prepare_control_plane(env)
    body = json.dumps({"workflow": WORKFLOW}).encode()
    app_headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    bare_headers = {"Content-Type": "application/json"}
    each = args.seconds / args.rounds
    note(f"{backend}: gunicorn -w {args.workers} each, {args.clients} clients, {args.rounds} rounds of {each:.1f} s")
    os.environ["DATABASE_URL"] = bare_url
    try:
        bare_app()  # creates the bare table once, so that two booting workers never race to create it
    finally:
        del os.environ["DATABASE_URL"]
    samples: dict[str, list[Sample]] = {"app": [], "bare": []}
    with (
        gunicorn("app:create_app()", env, args.workers, ROOT) as app_port,
        gunicorn("submit:bare_app()", {"DATABASE_URL": bare_url}, args.workers, ROOT / "bench") as bare_port,
    ):
        targets = {
            "app": (app_port, "/api/v1/jobs", app_headers),
            "bare": (bare_port, "/insert", bare_headers),
        }
        for name, (port, path, headers) in targets.items():
            Figures.of(f"warm-up {name}", [load(name, port, path, body, headers, args.clients, 1.0, 201)])
        for _ in range(args.rounds):
            for name, (port, path, headers) in targets.items():
                samples[name].append(
                    load(name, port, path, body, headers, args.clients, args.seconds / args.rounds, 201, args.distinct)
                )
    label = "distinct " if args.distinct else ""
    return (
        Figures.of(f"POST /api/v1/jobs {label}({backend})", samples["app"]),
        Figures.of(f"bare insert ({backend})", samples["bare"]),
    )


@contextmanager
def databases(backend: str, directory: Path) -> Iterator[tuple[str, str]]:
    """Yield the URLs of two empty databases (the control plane's and the bare endpoint's)."""
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'app.db'}", f"sqlite:///{directory / 'bare.db'}"
        return
    from tests.servers.mariadb import MariaDBServer

    server = MariaDBServer(directory / "mariadb")
    server.directory.mkdir()
    note("mariadb: starting a throwaway server")
    server.start()
    try:
        yield server.url_for(server.fresh_database("bench_app")), server.url_for(server.fresh_database("bench_bare"))
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="alternate the two endpoints this many times")
    parser.add_argument("--backends", default="sqlite,mariadb")
    parser.add_argument(
        "--distinct",
        action="store_true",
        help="make every workflow different, so that the server validates each one afresh",
    )
    args = parser.parse_args(argv)
    rows: list[tuple[str, Figures, Figures]] = []
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-submit-{backend}-") as tmp:
            with databases(backend, Path(tmp)) as (app_url, bare_url):
                platform, bare = measure(backend, app_url, bare_url, args)
            rows.append((backend, platform, bare))
    print(f"{'endpoint':<34} {'requests':>9} {'errors':>7} {'rps':>8} {'p50 ms':>8} {'p95 ms':>8}")
    for _, platform, bare in rows:
        for figures in (platform, bare):
            print(
                f"{figures.name:<34} {figures.requests:>9} {figures.errors:>7} {figures.rps:>8.1f} "
                f"{figures.p50_ms:>8.1f} {figures.p95_ms:>8.1f}"
            )
    print()
    for backend, platform, bare in rows:
        ratio = platform.rps / bare.rps
        verdict = "met" if platform.p95_ms < P95_TARGET_MS and ratio >= RATIO_TARGET else "NOT met"
        print(
            f"{backend}: control plane at {ratio:.0%} of the bare endpoint's rate, p95 {platform.p95_ms:.1f} ms "
            f"(targets: p95 < {P95_TARGET_MS:.0f} ms, >= {RATIO_TARGET:.0%}): {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
