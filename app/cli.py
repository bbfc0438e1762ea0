"""The ``automation`` command: administration of the platform (its commands arrive with the control plane)."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version


def _version() -> str:
    try:
        return version("automation-platform")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Run the ``automation`` command line; returns the exit code."""
    parser = argparse.ArgumentParser(prog="automation", description="Administer the automation platform.")
    parser.add_argument("--version", action="version", version=f"automation {_version()}")
    parser.parse_args(argv)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
