"""``automation audit verify``: check the audit log's hash chain; exit 0 intact, 1 broken, 2 unreadable."""

from __future__ import annotations

import argparse
import json
import sys

from sqlalchemy.exc import SQLAlchemyError

INTACT = "audit log intact: {entries} entries; head: entry {seq}, hash {hash}"
EMPTY = "audit log intact: no entries yet"
BROKEN = "audit log BROKEN: {problem}"
CHECKED = "entries before the break: {entries} intact"
UNREADABLE = (
    "automation audit verify: cannot read the audit log (is the schema up to date? automation db upgrade): {error}"
)


def audit_verify(args: argparse.Namespace) -> int:
    """Walk the chain from its first entry to its head and report the first broken link."""
    from app import create_app
    from app.audit.verify import verify
    from app.extensions import db

    app = create_app()
    with app.app_context():
        try:
            with db.engine.connect() as connection:
                verdict = verify(connection)
        except SQLAlchemyError as exc:
            print(UNREADABLE.format(error=str(exc).splitlines()[0]), file=sys.stderr)
            return 2
        finally:
            db.engine.dispose()
    if args.json:
        print(json.dumps(verdict.as_dict(), indent=2))
    elif verdict.broken is not None:
        print(BROKEN.format(problem=verdict.broken.problem))
        print(CHECKED.format(entries=verdict.entries))
    elif verdict.entries == 0:
        print(EMPTY)
    else:
        print(INTACT.format(entries=verdict.entries, seq=verdict.head_seq, hash=verdict.head_hash))
    return 0 if verdict.intact else 1


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit verify`` to the ``automation`` command."""
    audit = commands.add_parser("audit", help="the audit log").add_subparsers(dest="action", required=True)
    check = audit.add_parser(
        "verify",
        help="check the audit log's hash chain (exit 0 intact, 1 broken, 2 unreadable)",
        description="Walk the audit log's hash chain from its first entry to its head. Prints the first broken "
        "link (an edited, deleted or foreign row) and exits 1; exits 0 when the chain is intact, 2 when the "
        "database cannot be read.",
    )
    check.add_argument("--json", action="store_true", help="print the verdict as JSON")
    check.set_defaults(run=audit_verify)
