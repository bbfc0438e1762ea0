"""Which host keys the ssh task trusts: the keys of one known_hosts file, or (when asked) any key, unrecorded.

Fabric's Connection sets its paramiko client up to add unknown keys automatically. ``trust_only`` replaces
that: it empties both of the client's key maps, loads the one file given, and installs a policy that refuses
(or, insecurely, accepts) a key not found there. Nothing is ever written to a known_hosts file.
"""

from __future__ import annotations

from pathlib import Path

import paramiko

from probe.errors import TaskError


def known_hosts_name(host: str, port: int) -> str:
    """Return the host as known_hosts writes it: ``host`` on port 22, else ``[host]:port``."""
    return host if port == 22 else f"[{host}]:{port}"


class RejectUnknown(paramiko.RejectPolicy):
    """Refuse a server whose key is not in known_hosts with the task's message, and never add it anywhere."""

    def __init__(self, message: str) -> None:
        self.message = message

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        """Refuse the key."""
        raise TaskError(self.message)


class AcceptUnverified(paramiko.MissingHostKeyPolicy):
    """Accept any host key without recording it (insecure_ignore_host_key)."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        """Accept the key."""


def trust_only(client: paramiko.SSHClient, known_hosts: Path | None, unknown_message: str) -> None:
    """Make ``client`` trust only the keys in ``known_hosts``; with None, accept any key unverified.

    A missing file holds no keys. ``unknown_message`` is the error raised for a key that is not there.

    Raises:
        OSError: the known_hosts file exists but cannot be read.
    """
    # paramiko has no public way to empty the "system" map; Fabric 3.2 leaves it empty, this keeps it so.
    client._system_host_keys.clear()
    client.get_host_keys().clear()
    if known_hosts is None:
        client.set_missing_host_key_policy(AcceptUnverified())
        return
    if known_hosts.exists():
        client.get_host_keys().load(str(known_hosts))  # unlike client.load_host_keys, records no file to save to
    client.set_missing_host_key_policy(RejectUnknown(unknown_message))
