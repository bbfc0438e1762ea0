"""The `centrifugo_server` fixture: a loopback STAND-IN for Centrifugo's server HTTP API (v5/v6), not Centrifugo.

Centrifugo cannot be installed on these machines. The stand-in answers ``POST /api/publish`` and
``POST /api/info`` and checks what the real server checks: the ``X-API-Key`` header (401 without the right
key), a JSON object body (400 otherwise), the publish request's fields (error 107 "bad request" for a missing
channel or data, or a wrong type), the channel's namespace (error 102 "unknown channel"), and it drops a
publication whose idempotency key it has already seen on that channel (as Centrifugo does for 5 minutes).
API errors come as HTTP 200 with ``{"error": {"code", "message"}}``, Centrifugo's default error mode.

A test can stop it (connections refused) and start it again on the same port, or make it answer 503.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.servers._util import free_port

API_KEY = "standin-api-key-" + "k" * 16
MAX_CHANNEL_LENGTH = 255
PUBLISH_FIELDS = {"channel": str, "data": object, "skip_history": bool, "tags": dict, "b64data": str}
PUBLISH_FIELDS |= {"idempotency_key": str, "delta": bool}


@dataclass(frozen=True)
class Publication:
    """One publication the stand-in accepted."""

    channel: str
    data: Any
    idempotency_key: str | None
    offset: int


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        owner = self.server.owner
        status, payload = owner.handle(self.path, self.headers.get("X-API-Key"), raw)
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.send_response(405)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, owner: CentrifugoStandIn, port: int) -> None:
        self.owner = owner
        self.connections: set[socket.socket] = set()
        super().__init__(("127.0.0.1", port), _Handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        self.connections.add(sock)
        return sock, address

    def shutdown_request(self, request: Any) -> None:
        self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Close every open connection, kept-alive ones included, as a stopped server's would be."""
        for sock in list(self.connections):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class CentrifugoStandIn:
    """A stand-in of Centrifugo's HTTP API on 127.0.0.1 that records what was published."""

    def __init__(self, api_key: str = API_KEY, namespaces: tuple[str, ...] = ("jobs",)) -> None:
        self.api_key = api_key
        self.namespaces = set(namespaces)
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.publications: list[Publication] = []
        self.duplicates: list[Publication] = []
        self.refusals: list[tuple[int, str]] = []  # (HTTP status or API error code, why)
        self.failing_with: int | None = None  # answer every request with this HTTP status
        self._seen: dict[tuple[str, str], Publication] = {}
        self._offsets: dict[str, int] = {}
        self._changed = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Tell whether it accepts connections."""
        return self._server is not None

    def start(self) -> None:
        """Listen on its port (the same one after a stop)."""
        if self._server is not None:
            return
        self._server = _Server(self, self.port)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening: clients get connection refused until ``start``."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server.drop_connections()
        assert self._thread is not None
        self._thread.join(5)
        self._server = None

    def on(self, channel: str) -> list[Publication]:
        """The publications accepted on one channel, in order."""
        with self._changed:
            return [p for p in self.publications if p.channel == channel]

    def wait_until(self, check: Callable[[], bool], timeout: float = 20.0) -> None:
        """Wait until ``check()`` holds after a publication (or fail after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not check():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the Centrifugo stand-in never saw it; it has {self.publications}")
                self._changed.wait(min(left, 0.5))

    def handle(self, path: str, api_key: str | None, raw: bytes) -> tuple[int, dict[str, Any] | None]:
        """Answer one API request as Centrifugo would: (HTTP status, JSON body)."""
        if self.failing_with is not None:
            return self._refuse(self.failing_with, "told to fail", http=True)
        if api_key != self.api_key:
            return self._refuse(401, f"X-API-Key {'missing' if api_key is None else 'wrong'}", http=True)
        try:
            request = json.loads(raw or b"{}")
        except ValueError:
            return self._refuse(400, "body is not JSON", http=True)
        if not isinstance(request, dict):
            return self._refuse(400, "body is not a JSON object", http=True)
        if path == "/api/info":
            return 200, {"result": {"nodes": [{"uid": "standin", "name": "centrifugo-standin", "version": "5.4.0"}]}}
        if path == "/api/publish":
            return self._publish(request)
        return self._refuse(404, f"no method {path}", http=True)

    def _publish(self, request: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        for name, value in request.items():
            kind = PUBLISH_FIELDS.get(name)
            if kind is None or not isinstance(value, kind):
                return self._refuse(107, f"unexpected field {name}={value!r}")
        channel = request.get("channel")
        if not channel or "data" not in request:
            return self._refuse(107, "channel and data are required")
        if len(channel) > MAX_CHANNEL_LENGTH:
            return self._refuse(107, "channel too long")
        if ":" in channel and channel.split(":", 1)[0] not in self.namespaces:
            return self._refuse(102, f"unknown namespace of {channel}")
        key = request.get("idempotency_key")
        with self._changed:
            if key is not None and (channel, key) in self._seen:
                earlier = self._seen[(channel, key)]
                self.duplicates.append(earlier)
                return 200, {"result": {"offset": earlier.offset, "epoch": "standin"}}
            offset = self._offsets.get(channel, 0) + 1
            self._offsets[channel] = offset
            publication = Publication(channel, request["data"], key, offset)
            self.publications.append(publication)
            if key is not None:
                self._seen[(channel, key)] = publication
            self._changed.notify_all()
        return 200, {"result": {"offset": offset, "epoch": "standin"}}

    def _refuse(self, code: int, why: str, *, http: bool = False) -> tuple[int, dict[str, Any] | None]:
        with self._changed:
            self.refusals.append((code, why))
        if http:
            return code, None
        messages = {102: "unknown channel", 107: "bad request"}
        return 200, {"error": {"code": code, "message": messages.get(code, "error")}}


@pytest.fixture
def centrifugo_server() -> Iterator[CentrifugoStandIn]:
    """A running Centrifugo stand-in with namespace ``jobs`` and the key ``API_KEY``."""
    server = CentrifugoStandIn()
    server.start()
    try:
        yield server
    finally:
        server.stop()
