"""The ``automation`` command: set up tenants and projects, mint tokens, migrate the database."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path

from probe.durations import parse_duration

HELP = "Administer the automation platform (configured by the environment: see docs/CONFIGURATION.md)."


def _version() -> str:
    try:
        return version("automation-platform")
    except PackageNotFoundError:
        return "unknown"


class CommandError(Exception):
    """Raised when a command cannot do what it was asked; the message is printed and the exit code is 1."""


def _in_app(work: Callable[[], int]) -> int:
    from app import create_app

    app = create_app()
    with app.app_context():
        return work()


def token_create(args: argparse.Namespace) -> int:
    """Print a signed token for a tenant, project and role (the design document's gen-token tool)."""
    from flask import current_app

    from app.auth.tokens import TokenError, issue_token
    from app.extensions import db
    from app.tenants.models import Project, Tenant

    try:
        ttl = int(parse_duration(args.ttl)) if args.ttl is not None else None
    except ValueError as exc:
        raise CommandError(f"--ttl: {exc}") from None

    def work() -> int:
        lifetime = ttl if ttl is not None else int(current_app.config["JWT_DEFAULT_TTL"])
        try:  # first: it refuses what no query may carry, such as a byte of argv that is not UTF-8
            token = issue_token(
                current_app.config["JWT_SECRET"],
                tenant_id=args.tenant,
                role=args.role,
                project_id=args.project,
                agent_id=args.agent_id,
                subject=args.subject,
                ttl=lifetime,
            )
        except TokenError as exc:
            raise CommandError(str(exc)) from None
        if db.session.get(Tenant, args.tenant) is None:
            raise CommandError(f"tenant '{args.tenant}' does not exist: create it with 'automation tenant create'")
        if args.project and db.session.get(Project, (args.tenant, args.project)) is None:
            raise CommandError(f"project '{args.project}' does not exist in tenant '{args.tenant}'")
        print(token)
        return 0

    return _in_app(work)


def tenant_create(args: argparse.Namespace) -> int:
    """Create a tenant."""
    from app.errors import AppError
    from app.tenants import service

    def work() -> int:
        try:
            tenant = service.create_tenant(caller=None, tenant_id=args.tenant_id, name=args.name)
        except AppError as exc:
            raise CommandError(exc.message) from None
        print(f"created tenant {tenant.id}")
        return 0

    return _in_app(work)


def project_create(args: argparse.Namespace) -> int:
    """Create a project in a tenant."""
    from app.errors import AppError
    from app.tenants import service

    def work() -> int:
        try:
            project = service.create_project(
                caller=None, tenant_id=args.tenant, project_id=args.project_id, name=args.name
            )
        except AppError as exc:
            raise CommandError(exc.message) from None
        print(f"created project {project.tenant_id}/{project.id}")
        return 0

    return _in_app(work)


def db_upgrade(args: argparse.Namespace) -> int:
    """Bring the database schema up to date."""
    from flask_migrate import upgrade

    def work() -> int:
        upgrade(revision=args.revision)
        return 0

    return _in_app(work)


COMMANDS_GROUP = "automation.commands"


def keys_generate(args: argparse.Namespace) -> int:
    """Print a new Ed25519 key pair for signing job envelopes."""
    from dispatch.signing import generate_keypair

    private, public = generate_keypair()
    if args.json:
        print(json.dumps({"JOB_SIGNING_KEY": private, "JOB_VERIFY_KEY": public}))
    else:
        print(f"JOB_SIGNING_KEY={private}   # the control plane only; keep it secret")
        print(f"JOB_VERIFY_KEY={public}   # every agent")
    return 0


def keys_secrets(args: argparse.Namespace) -> int:
    """Print a new SECRETS_KEY, the key that seals project secrets."""
    from app.config import new_secrets_key

    print(f"SECRETS_KEY={new_secrets_key()}   # every web process of the control plane alike; keep it secret")
    return 0


def keys_reseal(args: argparse.Namespace) -> int:
    """Seal every project secret again under the configured SECRETS_KEY, after a change of key."""
    import os

    from app.config import ConfigError
    from app.errors import AppError

    old = os.environ.get(args.old_key_from_env)
    if not old:
        raise CommandError(f"--old-key-from-env {args.old_key_from_env}: that variable is not set")

    def work() -> int:
        from app.secretstore.service import reseal

        try:
            resealed, current, neither = reseal(old)
        except ConfigError as exc:  # the old key is malformed (today's was checked when the app was made)
            raise CommandError(f"{args.old_key_from_env}: {exc.message}") from None
        except AppError as exc:  # no key of our own: a read-only instance folder
            raise CommandError(exc.message) from None
        print(f"resealed {resealed} secret(s) under SECRETS_KEY; {current} already were")
        for name in neither:
            print(f"opens with neither key, left as it is: {name}", file=sys.stderr)
        return 1 if neither else 0

    return _in_app(work)


def keys_public(args: argparse.Namespace) -> int:
    """Print the public key that agents need, for the control plane's configured (or instance) signing key."""
    from dispatch.signing import load_signing_key, public_key

    def work() -> int:
        from flask import current_app

        from app.config import job_signing_key

        private = job_signing_key(current_app.config["JOB_SIGNING_KEY"], current_app.instance_path)
        print(public_key(load_signing_key(private)))
        return 0

    return _in_app(work)


def acl_agent(args: argparse.Namespace) -> int:
    """Print the Valkey ACL user of an isolated agent (``AGENT_BROKER_ISOLATION``), as one ``valkey-cli`` command."""
    import secrets
    import shlex

    from dispatch.contract import PLATFORMS, agent_acl

    if args.platform not in PLATFORMS:
        raise CommandError(f"--platform must be one of {', '.join(PLATFORMS)}")
    password = args.password or secrets.token_urlsafe(32)
    try:
        rules = agent_acl(args.tenant, args.project, args.agent_id, args.platform, password, db=args.db)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    print(shlex.join(["ACL", "SETUSER", *rules]))
    if not args.password:
        url = f"redis://{rules[0]}:{password}@<valkey host>:<port>/{args.db}"
        print(f"# the agent's VALKEY_URL: {url}", file=sys.stderr)
    return 0


FLOWER_LOGIN = (
    "set FLOWER_BASIC_AUTH to user:password (several: user:password,user2:password2); Flower never runs without a login"
)


def flower(args: argparse.Namespace) -> int:
    """Run Flower on the control plane's Celery app, behind basic auth (the Procfile's ``flower``).

    Flower reads ``FLOWER_BASIC_AUTH``, ``FLOWER_ADDRESS`` and ``FLOWER_PORT`` from the environment itself, so the
    login is never on a command line, where ``ps`` shows it to every user of the host.
    """
    login = os.environ.get("FLOWER_BASIC_AUTH", "")
    if not login or not all(re.fullmatch(r"[^:]+:.+", entry) for entry in login.split(",")):
        raise CommandError(FLOWER_LOGIN)
    env = {**os.environ}
    for name, default in (("FLOWER_ADDRESS", "127.0.0.1"), ("FLOWER_PORT", "5555")):
        if not env.get(name, "").strip():  # unset or empty: Flower would listen on every interface, or fail
            env[name] = default
    beside = Path(sys.executable).parent / "celery"  # this environment's Celery, before any other on PATH
    celery = str(beside) if beside.exists() else shutil.which("celery") or "celery"
    os.execve(celery, [celery, "-A", "app.celery_app:celery", "flower"], env)  # noqa: S606 - a fixed argv
    return 0  # not reached: the process is Flower now


def _plugin_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the commands of other packages (the agent's ``automation agent``) from their entry points."""
    for entry in entry_points(group=COMMANDS_GROUP):
        try:
            entry.load()(commands)
        except Exception as exc:  # a broken plugin must not break the other commands
            print(f"automation: the {entry.name!r} commands could not be loaded: {exc}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    from app.audit.commands import add_commands as add_audit_commands
    from app.auth.tokens import ROLES
    from app.client.commands import add_commands as add_client_commands
    from app.columns import SLUG_PATTERN

    slug = f"an id matching {SLUG_PATTERN}"
    parser = argparse.ArgumentParser(prog="automation", description=HELP)
    parser.add_argument("--version", action="version", version=f"automation {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    token = commands.add_parser("token", help="mint API tokens").add_subparsers(dest="action", required=True)
    create = token.add_parser("create", help="print a signed token")
    create.add_argument("--tenant", required=True, help="the tenant the token belongs to")
    create.add_argument("--project", help="limit the token to one project")
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--agent-id", help="the agent (role agent only)")
    create.add_argument("--subject", help="who the token names (default: derived from the role)")
    create.add_argument("--ttl", help="lifetime, such as 30m, 24h or 30d (default: JWT_DEFAULT_TTL, 24h)")
    create.set_defaults(run=token_create)

    tenant = commands.add_parser("tenant", help="manage tenants").add_subparsers(dest="action", required=True)
    create = tenant.add_parser("create", help="create a tenant")
    create.add_argument("tenant_id", help=slug)
    create.add_argument("--name", help="a display name (default: the id)")
    create.set_defaults(run=tenant_create)

    project = commands.add_parser("project", help="manage projects").add_subparsers(dest="action", required=True)
    create = project.add_parser("create", help="create a project in a tenant")
    create.add_argument("project_id", help=slug)
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", help="a display name (default: the id)")
    create.set_defaults(run=project_create)

    database = commands.add_parser("db", help="the database schema").add_subparsers(dest="action", required=True)
    upgrade = database.add_parser("upgrade", help="apply the migrations")
    upgrade.add_argument("--revision", default="head")
    upgrade.set_defaults(run=db_upgrade)

    keys = commands.add_parser("keys", help="job signing keys, the secrets key").add_subparsers(
        dest="action", required=True
    )
    generate = keys.add_parser("generate", help="print a new key pair (JOB_SIGNING_KEY and JOB_VERIFY_KEY)")
    generate.add_argument("--json", action="store_true")
    generate.set_defaults(run=keys_generate)
    public = keys.add_parser("public", help="print JOB_VERIFY_KEY for this control plane's signing key")
    public.set_defaults(run=keys_public)
    sealing = keys.add_parser("secrets-key", help="print a new SECRETS_KEY (seals project secrets)")
    sealing.set_defaults(run=keys_secrets)
    reseal = keys.add_parser(
        "reseal-secrets", help="seal every project secret again under SECRETS_KEY, after a change of key"
    )
    reseal.add_argument(
        "--old-key-from-env", required=True, metavar="VARIABLE", help="the variable holding the previous SECRETS_KEY"
    )
    reseal.set_defaults(run=keys_reseal)
    acl = commands.add_parser("acl", help="Valkey ACL users").add_subparsers(dest="action", required=True)
    agent = acl.add_parser("agent", help="print the ACL SETUSER command of an isolated agent")
    agent.add_argument("--tenant", required=True)
    agent.add_argument("--project", required=True)
    agent.add_argument("--agent-id", required=True)
    agent.add_argument("--platform", default="linux", help="the agent's platform (default: linux)")
    agent.add_argument("--password", help="its password (default: a new random one, printed with its URL)")
    agent.add_argument("--db", type=int, default=0, help="the Valkey database of the broker (default: 0)")
    agent.set_defaults(run=acl_agent)
    dashboard = commands.add_parser(
        "flower", help="run Flower, the Celery dashboard, behind FLOWER_BASIC_AUTH (FLOWER_ADDRESS, FLOWER_PORT)"
    )
    dashboard.set_defaults(run=flower)
    add_audit_commands(commands)
    add_client_commands(commands)
    _plugin_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``automation`` command line; returns the exit code."""
    args_given = sys.argv[1:] if argv is None else argv
    if args_given[:1] in (["jobs"], ["agents"], ["secrets"]):  # the REST client: no Flask, no database, fast
        from app.client.commands import main as client_main

        return client_main(args_given)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args))
    except CommandError as exc:
        print(f"automation: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
