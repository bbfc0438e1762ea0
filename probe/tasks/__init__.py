"""The built-in task types, one module each; importing this package registers them."""

from __future__ import annotations

from probe.tasks import command, db, powershell

__all__ = ["command", "db", "powershell"]
