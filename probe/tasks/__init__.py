"""The built-in task types, one module each; importing this package registers them."""

from __future__ import annotations

from probe.tasks import command, db, downloadexec, http, powershell, ssh

__all__ = ["command", "db", "downloadexec", "http", "powershell", "ssh"]
