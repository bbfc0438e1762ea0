"""``python -m probe`` runs the probe command line."""

from __future__ import annotations

import sys

from probe.cli import main

sys.exit(main())
