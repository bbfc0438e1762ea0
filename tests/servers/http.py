"""The `http_server` and `https_server` fixtures: scriptable HTTP(S) servers on 127.0.0.1 in a thread.

Routes answer with fixed bytes or text, with a function of the request, or with an iterable of chunks that
is streamed (then the connection closes at the end). A route's ``delay`` and ``server.sleep`` wait on the
server's closing flag, so a slow route never holds the fixture's teardown.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Headers = dict[str, str]


@dataclass
class ReceivedRequest:
    """One request the server received: method, path (with its query), headers and body."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        """Return a header's value, whatever the case of its name."""
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


Reply = tuple[int, Headers, bytes | str | Iterable[bytes]]
Body = bytes | str | Callable[[ReceivedRequest], Reply] | Iterable[bytes]


@dataclass
class Route:
    """How the server answers one method and path."""

    status: int = 200
    body: Body = b""
    headers: Headers = field(default_factory=dict)
    delay: float = 0.0


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = ReceivedRequest(self.command, self.path, dict(self.headers.items()), body)
        owner = self.server.owner
        owner.requests.append(request)
        route = owner.routes.get((self.command, self.path.split("?", 1)[0]))
        if route is None:
            self._reply(404, {}, b"no such route\n")
            return
        if route.delay and owner.sleep(route.delay):
            self.close_connection = True
            return
        if callable(route.body):
            status, headers, payload = route.body(request)
        else:
            status, headers, payload = route.status, {}, route.body
        self._reply(status, {**route.headers, **headers}, payload)

    def _reply(self, status: int, headers: Headers, payload: bytes | str | Iterable[bytes]) -> None:
        if isinstance(payload, str):
            payload = payload.encode()
        streamed = not isinstance(payload, bytes)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if streamed:
            self.send_header("Connection", "close")
            self.close_connection = True
        elif not any(k.lower() == "content-length" for k in headers):
            self.send_header("Content-Length", str(len(payload)))  # type: ignore[arg-type]
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            for chunk in [payload] if isinstance(payload, bytes) else payload:
                self.wfile.write(chunk)
                self.wfile.flush()
        except OSError:  # the client went away
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, owner: HTTPTestServer, tls: ssl.SSLContext | None) -> None:
        self.owner = owner
        self.tls = tls
        super().__init__(("127.0.0.1", 0), _Handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        if self.tls is not None:  # the handshake happens on the handler's thread, not the accept loop
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is not None:
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError):
                return  # a client that refuses our certificate
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up mid-request are part of the tests


class HTTPTestServer:
    """An HTTP (or, with a TLS context, HTTPS) server on 127.0.0.1 with routes set by the test."""

    def __init__(self, tls: ssl.SSLContext | None = None, ca_file: Path | None = None) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.requests: list[ReceivedRequest] = []
        self.ca_file = str(ca_file) if ca_file else None
        self._closing = threading.Event()
        self._server = _Server(self, tls)
        self.port = self._server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def route(
        self,
        path: str,
        *,
        method: str = "GET",
        status: int = 200,
        body: Body = b"",
        headers: Headers | None = None,
        delay: float = 0.0,
    ) -> str:
        """Answer ``method path`` (the path without its query) as given; returns the route's full URL."""
        self.routes[(method.upper(), path)] = Route(status, body, dict(headers or {}), delay)
        return self.url + path

    def sleep(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a route; True when the server is closing and the route should give up."""
        return self._closing.wait(seconds)

    def close(self) -> None:
        """Stop serving, release waiting routes and close the socket."""
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def make_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """Write a CA certificate and a server certificate for 127.0.0.1/localhost; return (ca, cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "probe test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


@pytest.fixture
def http_server() -> Iterator[HTTPTestServer]:
    """A plain HTTP server on 127.0.0.1 with no routes yet."""
    server = HTTPTestServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HTTPTestServer]:
    """An HTTPS server on 127.0.0.1 whose certificate verifies with ``.ca_file`` (and nothing else)."""
    directory = tmp_path_factory.mktemp("https")
    ca_path, cert_path, key_path = make_certificate(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server = HTTPTestServer(context, ca_path)
    try:
        yield server
    finally:
        server.close()
