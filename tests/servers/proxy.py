"""The `tunnel_proxy` fixture: an HTTP proxy on 127.0.0.1 that only tunnels (CONNECT), as the proxies in front of
an HTTPS control plane do, and asks for credentials as an authenticating proxy does.

It answers 407 with ``Proxy-Authenticate: Basic`` to a CONNECT without the expected ``Proxy-Authorization``, and
to anything but CONNECT 405; otherwise it opens the TCP connection the client asked for and relays bytes both
ways until either side closes. It records each CONNECT (its target and headers) in ``tunnels``.
"""

from __future__ import annotations

import base64
import select
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

USER, PASSWORD = "agent@acme", "p:ss w/rd"  # characters a proxy URL must percent-encode


@dataclass
class Tunnel:
    """One CONNECT the proxy received: its target and its headers (names lower-cased)."""

    target: str
    headers: dict[str, str]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_CONNECT(self) -> None:
        self.server.tunnels.append(Tunnel(self.path, {k.lower(): v for k, v in self.headers.items()}))
        if self.headers.get("Proxy-Authorization") != self.server.expected:
            self.send_response(407)
            self.send_header("Proxy-Authenticate", 'Basic realm="proxy"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        host, _, port = self.path.rpartition(":")
        try:
            upstream = socket.create_connection((host, int(port)), timeout=5)
        except OSError:
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.close_connection = True
        with upstream:
            _relay(self.connection, upstream)

    def _refuse(self) -> None:
        self.send_response(405)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = _refuse  # a tunnelling proxy forwards nothing itself


def _relay(one: socket.socket, other: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    sockets = [one, other]
    while True:
        ready, _, _ = select.select(sockets, [], [], 5)
        if not ready:
            return
        for source in ready:
            data = source.recv(65536)
            if not data:
                return
            (other if source is one else one).sendall(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, expected: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.expected = expected
        self.tunnels: list[Tunnel] = []


class TunnelProxy:
    """A CONNECT-only proxy that wants ``USER`` and ``PASSWORD``; ``url(with_credentials)`` names it."""

    def __init__(self) -> None:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        self._server = _Server(f"Basic {token}")
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def tunnels(self) -> list[Tunnel]:
        """The CONNECT requests received, in order."""
        return self._server.tunnels

    def url(self, *, user: str | None = USER, password: str = PASSWORD) -> str:
        """The proxy's URL, with ``user`` and ``password`` percent-encoded into it (none when ``user`` is None)."""
        if user is None:
            return f"http://127.0.0.1:{self.port}"
        quoted = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
        return f"http://{quoted}@127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def tunnel_proxy() -> Iterator[TunnelProxy]:
    """A CONNECT proxy on loopback that asks for Basic credentials."""
    proxy = TunnelProxy()
    yield proxy
    proxy.close()
