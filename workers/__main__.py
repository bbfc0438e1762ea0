"""``python -m workers`` runs the agent."""

from __future__ import annotations

import sys

from workers.cli import main

sys.exit(main(sys.argv[1:]))
