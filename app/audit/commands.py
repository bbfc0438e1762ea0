"""``automation audit seal|verify``: chain pending audit rows; check the chain (exit 0 intact, 1 broken, 2 no db)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

if TYPE_CHECKING:
    from app.audit.verify import Verdict

INTACT = "audit log intact: {entries} entries; head: entry {seq}, hash {hash}"
SEALED = "sealed {count} pending audit entries into the chain"
STILL_PENDING = "{count} entries written since are not sealed yet (the dispatcher seals them)"
EMPTY = "audit log intact: no entries yet"
BROKEN = "audit log BROKEN: {problem}"
CHECKED = "entries before the break: {entries} intact"
UNREADABLE = (
    "automation audit verify: cannot read the audit log (is the schema up to date? automation db upgrade): {error}"
)


def audit_verify(args: argparse.Namespace) -> int:
    """Walk the chain from its first entry to its head and report the first broken link."""
    from app import create_app
    from app.audit.chain import seal
    from app.audit.verify import verify
    from app.extensions import db

    app = create_app()
    sealed = 0
    with app.app_context():
        try:
            with db.engine.connect() as connection:
                if args.seal:
                    sealed = seal(connection)
                verdict = verify(connection)
        except SQLAlchemyError as exc:
            print(UNREADABLE.format(error=str(exc).splitlines()[0]), file=sys.stderr)
            return 2
        finally:
            db.engine.dispose()
    if args.json:
        print(json.dumps({**verdict.as_dict(), "sealed": sealed}, indent=2))
    else:
        _print_verdict(verdict, sealed)
    return 0 if verdict.intact else 1


def _print_verdict(verdict: Verdict, sealed: int) -> None:
    if sealed:
        print(SEALED.format(count=sealed))
    if verdict.broken is not None:
        print(BROKEN.format(problem=verdict.broken.problem))
        print(CHECKED.format(entries=verdict.entries))
        return
    if verdict.entries == 0:
        print(EMPTY)
    else:
        print(INTACT.format(entries=verdict.entries, seq=verdict.head_seq, hash=verdict.head_hash))
    if verdict.pending:
        print(STILL_PENDING.format(count=verdict.pending))


def audit_seal(args: argparse.Namespace) -> int:
    """Chain the audit rows written since the last seal (the dispatcher does this every AUDIT_SEAL_INTERVAL)."""
    from app import create_app
    from app.audit.chain import seal
    from app.extensions import db

    app = create_app()
    with app.app_context():
        try:
            with db.engine.connect() as connection:
                sealed = seal(connection)
        except SQLAlchemyError as exc:
            print(UNREADABLE.format(error=str(exc).splitlines()[0]).replace("verify", "seal"), file=sys.stderr)
            return 2
        finally:
            db.engine.dispose()
    print(SEALED.format(count=sealed))
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit verify`` and ``audit seal`` to the ``automation`` command."""
    audit = commands.add_parser("audit", help="the audit log").add_subparsers(dest="action", required=True)
    check = audit.add_parser(
        "verify",
        help="check the audit log's hash chain (exit 0 intact, 1 broken, 2 unreadable)",
        description="Seal the entries written since the dispatcher last did, then walk the audit log's hash chain "
        "from its first entry to its head. Prints the first broken link (an edited, deleted or foreign row) and "
        "exits 1; exits 0 when the chain is intact, 2 when the database cannot be read.",
    )
    check.add_argument("--json", action="store_true", help="print the verdict as JSON")
    check.add_argument(
        "--no-seal", dest="seal", action="store_false", help="only read: do not seal pending entries first"
    )
    check.set_defaults(run=audit_verify)
    sealer = audit.add_parser(
        "seal",
        help="chain the audit entries written since the last seal (the dispatcher does this on its own)",
        description="Number and hash the audit entries written since the last seal, in the order they were "
        "written. The dispatcher runs this every AUDIT_SEAL_INTERVAL seconds; exit 2 when the database cannot "
        "be read.",
    )
    sealer.set_defaults(run=audit_seal)
