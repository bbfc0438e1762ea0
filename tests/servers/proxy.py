"""Stand-ins for what stands between an agent and its control plane, on 127.0.0.1.

The `tunnel_proxy` fixture: an HTTP proxy that only tunnels (CONNECT), as the proxies in front of an HTTPS control
plane do, and asks for credentials as an authenticating proxy does. It answers 407 with ``Proxy-Authenticate:
Basic`` to a CONNECT without the expected ``Proxy-Authorization``, and to anything but CONNECT 405; otherwise it
opens the TCP connection the client asked for and relays bytes both ways until either side closes. It records each
CONNECT (its target and headers) in ``tunnels``.

`Gateway`: a reverse proxy (a load balancer, an ingress) that forwards each request to the control plane and relays
its answer, except that it can be told to lose the answers to some requests: it forwards them, so the control plane
does the work, then answers ``502 Bad Gateway`` instead, as a gateway does whose upstream connection broke before
the answer came through.
"""

from __future__ import annotations

import base64
import http.client
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


HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "host"})
NOT_RELAYED = HOP_BY_HOP | {"content-length"}  # of an answer, whose body the gateway has read whole


class _GatewayHandler(BaseHTTPRequestHandler):
    server: _GatewayServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=30)
        try:
            upstream.request(self.command, self.path, body, headers)
            answer = upstream.getresponse()
            status, payload = answer.status, answer.read()
            replied = [(k, v) for k, v in answer.getheaders() if k.lower() not in NOT_RELAYED]
        except (OSError, http.client.HTTPException):
            status, payload, replied = 502, b"", []
        finally:
            upstream.close()
        if self.server.loses(self.command, self.path):  # the work is done upstream; its answer never gets through
            status, payload, replied = (
                502,
                b"<html><body>502 Bad Gateway</body></html>",
                [("Content-Type", "text/html")],
            )
        self.send_response(status)
        for name, value in replied:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


class _GatewayServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(("127.0.0.1", 0), _GatewayHandler)
        self.upstream = upstream
        self.lock = threading.Lock()
        self.losing: dict[tuple[str, str], int] = {}  # (method, end of path): answers still to lose
        self.lost: list[str] = []

    def loses(self, method: str, path: str) -> bool:
        with self.lock:
            for (lost_method, ending), left in self.losing.items():
                if left and method == lost_method and path.split("?", 1)[0].endswith(ending):
                    self.losing[(lost_method, ending)] = left - 1
                    self.lost.append(f"{method} {path}")
                    return True
        return False


class Gateway:
    """A reverse proxy in front of ``upstream`` (an http:// URL); ``url`` is where clients reach it."""

    def __init__(self, upstream: str) -> None:
        parts = urllib.parse.urlsplit(upstream)
        assert parts.hostname is not None and parts.port is not None
        self._server = _GatewayServer((parts.hostname, parts.port))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def lose_answers(self, method: str, ending: str, times: int = 1) -> None:
        """Forward the next ``times`` requests ``method`` whose path ends with ``ending``, then answer each 502."""
        with self._server.lock:
            self._server.losing[(method, ending)] = times

    @property
    def lost(self) -> list[str]:
        """The requests (method and path) whose answers were lost, in order."""
        return list(self._server.lost)

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
