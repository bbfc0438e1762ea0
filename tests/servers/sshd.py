"""The `sshd_server` fixture: OpenSSH's sshd with its own config, host key and authorized key."""

from __future__ import annotations

import os
import pwd
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers._util import ServerProcess, ServerStartError, find_binary, free_port, run_checked

SERVER_PACKAGE = "openssh-server"
CLIENT_PACKAGE = "openssh-client"
PRIVSEP_DIR = Path("/run/sshd")


def openssh_version(sshd: str) -> tuple[int, int]:
    """Return sshd's (major, minor) version; old releases print it in their usage text."""
    result = subprocess.run([sshd, "-V"], capture_output=True, text=True, check=False)
    found = re.search(r"OpenSSH_(\d+)\.(\d+)", result.stdout + result.stderr)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


class SSHServer:
    """An sshd on 127.0.0.1 that lets the current user in with one ed25519 key and nothing else."""

    host = "127.0.0.1"
    password: str | None = None

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port if port is not None else free_port(self.host)
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.config_path = directory / "sshd_config"
        self.client_key = str(directory / "client_ed25519")
        self.known_hosts = str(directory / "known_hosts")
        self.host_public_key = ""
        self._host_key = directory / "ssh_host_ed25519_key"
        self._authorized_keys = directory / "authorized_keys"
        self._process = ServerProcess("sshd", directory / "sshd.log")

    @property
    def running(self) -> bool:
        """Tell whether the sshd process is alive."""
        return self._process.running

    def ssh_command(self, *remote: str, known_hosts: str | None = None) -> list[str]:
        """Return an `ssh` argv that logs in with the client key and checks the host key strictly."""
        return [
            find_binary("ssh", CLIENT_PACKAGE),
            "-F",
            "/dev/null",
            "-i",
            self.client_key,
            "-o",
            f"UserKnownHostsFile={known_hosts or self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-p",
            str(self.port),
            f"{self.user}@{self.host}",
            *remote,
        ]

    def start(self) -> None:
        """Start sshd (again) on the same port with the same keys; do nothing if it runs."""
        if self.running:
            return
        sshd = find_binary("sshd", SERVER_PACKAGE)
        if not self._host_key.exists():
            self._make_keys()
            self._write_config(sshd)
        self._ensure_privsep_dir()
        self._process.start([sshd, "-D", "-e", "-f", str(self.config_path)], ready=self._sends_banner)

    def stop(self) -> None:
        """Stop sshd and any session it still serves."""
        self._process.stop()

    def _make_keys(self) -> None:
        keygen = find_binary("ssh-keygen", CLIENT_PACKAGE)
        log = self._process.log_path
        for path, comment in ((self._host_key, "test-host"), (Path(self.client_key), "test-client")):
            argv = [keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]
            run_checked(argv, log, "ssh-keygen")
        self._authorized_keys.write_text(Path(f"{self.client_key}.pub").read_text())
        key_type, key_data = self._host_key.with_suffix(".pub").read_text().split()[:2]
        self.host_public_key = f"{key_type} {key_data}"
        Path(self.known_hosts).write_text(f"[{self.host}]:{self.port} {self.host_public_key}\n")

    def _write_config(self, sshd: str) -> None:
        lines = [
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            f"HostKey {self._host_key}",
            f"PidFile {self.directory / 'sshd.pid'}",
            f"AuthorizedKeysFile {self._authorized_keys}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "StrictModes no",
            "UsePAM no",
            "UseDNS no",
            "PrintMotd no",
            "X11Forwarding no",
            "MaxStartups 100",
            "MaxSessions 100",
            "Subsystem sftp internal-sftp",
        ]
        if openssh_version(sshd) >= (9, 8):
            # Otherwise refused handshakes from 127.0.0.1 would lock every later test out.
            lines.append("PerSourcePenalties no")
        self.config_path.write_text("\n".join(lines) + "\n")

    def _ensure_privsep_dir(self) -> None:
        if PRIVSEP_DIR.is_dir():
            return
        try:
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True)
        except PermissionError as exc:
            raise ServerStartError(f"sshd needs {PRIVSEP_DIR}: run `sudo mkdir -p {PRIVSEP_DIR}`") from exc

    def _sends_banner(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=1) as sock:
            return sock.recv(64).startswith(b"SSH-")


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """Yield an sshd shared by the session; tests using it are marked `sshd`."""
    server = SSHServer(tmp_path_factory.mktemp("sshd"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
