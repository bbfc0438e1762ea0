"""A requests Session that a task can really stop: every socket it opens is shut down on abort.

requests has no way to cancel a request in progress. This session's connection classes register each socket
when it is created (before it connects), so an abort from another thread can ``shutdown()`` it; that ends a
blocked connect, TLS handshake, wait for headers or body read at once. Name resolution runs on a helper
thread so that an abort does not wait for a slow resolver either. Request timeouts derived from the deadline
are passed to requests as a backstop. The engine turns a task's ``timeout`` option into its deadline.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import socket
import ssl
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, LocationValueError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family
from urllib3.util.timeout import _DEFAULT_TIMEOUT

from probe.errors import ProbeError, TaskError, TaskStopped
from probe.tasktype import TaskContext

log = logging.getLogger(__name__)

CONNECTION_REFUSED = "cannot connect to {where}: connection refused"
NAME_NOT_RESOLVED = "cannot resolve host '{host}': {reason}"
TLS_VERIFY_FAILED = "TLS certificate verification failed for {where}: {reason}{hint}"
TLS_FAILED = "TLS connection to {where} failed: {reason}"
CONNECT_FAILED = "cannot connect to {where}: {reason}"
TIMED_OUT = "no response from {where} in time"
REQUEST_FAILED = "request to {where} failed: {reason}"
BAD_LOCATION = "request to {where} failed: the URL's host or port is not valid"
CA_FILE_UNREADABLE = "cannot load ca_file {path}: {reason}"
ABORTED = "the task was stopped"

# Extra seconds given to requests' own timeouts past the deadline: the abort normally ends the work first.
BACKSTOP_GRACE = 5.0
_RESOLVE_POLL = 0.05


class SocketGuard:
    """Keeps a duplicate of every socket a session opens so that ``abort`` can shut them all down.

    A duplicate (``socket.dup``) shares the connection with the original, so shutting it down ends any
    blocking call on the original, even after TLS wrapping has taken the original's file descriptor over.
    """

    def __init__(self) -> None:
        self.aborted = threading.Event()
        self._lock = threading.Lock()
        self._dups: dict[int, socket.socket] = {}

    def track(self, sock: socket.socket) -> None:
        """Remember ``sock``; raises ConnectionAbortedError when the guard was already aborted."""
        dup = sock.dup()
        with self._lock:
            if not self.aborted.is_set():
                self._dups[id(sock)] = dup
                return
        dup.close()
        raise ConnectionAbortedError(ABORTED)

    def forget(self, sock: socket.socket) -> None:
        """Stop tracking ``sock`` (it never connected)."""
        with self._lock:
            dup = self._dups.pop(id(sock), None)
        if dup is not None:
            dup.close()

    def abort(self) -> None:
        """Shut down every tracked socket, now and for any socket tracked later."""
        with self._lock:
            self.aborted.set()
            dups = list(self._dups.values())
        for dup in dups:
            with contextlib.suppress(OSError):  # not connected (yet, or any more): nothing to unblock
                dup.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close every duplicate still held."""
        with self._lock:
            dups, self._dups = list(self._dups.values()), {}
        for dup in dups:
            dup.close()

    def resolve(self, host: str, port: int) -> list[Any]:
        """Return ``getaddrinfo`` results for ``host``, giving up as soon as the guard is aborted."""
        family = allowed_gai_family()
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        found: list[Any] = []
        failed: list[OSError] = []
        done = threading.Event()

        def work() -> None:
            try:
                found.extend(socket.getaddrinfo(host, port, family, socket.SOCK_STREAM))
            except OSError as exc:
                failed.append(exc)
            finally:
                done.set()

        threading.Thread(target=work, name=f"resolve {host}", daemon=True).start()
        while not done.wait(_RESOLVE_POLL):
            if self.aborted.is_set():
                raise ConnectionAbortedError(ABORTED)
        if failed:
            raise failed[0]
        return found

    def connect(
        self,
        address: tuple[str, int],
        timeout: Any,
        source_address: tuple[str, int] | None,
        options: Sequence[tuple[int, int, int | bytes]] | None,
    ) -> socket.socket:
        """Open a connected TCP socket like urllib3's create_connection, tracked before it connects."""
        host, port = address
        error: OSError | None = None
        for family, kind, proto, _, target in self.resolve(host.strip("[]"), port):
            sock = socket.socket(family, kind, proto)
            try:
                self.track(sock)
                for option in options or ():
                    sock.setsockopt(*option)
                if timeout is not _DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(target)
                return sock
            except OSError as exc:
                error = exc
                self.forget(sock)
                sock.close()
                if self.aborted.is_set():
                    break
        raise error or OSError(f"no address found for {host}")


class _GuardedHTTPConnection(HTTPConnection):
    """An urllib3 connection whose sockets its session's guard can shut down.

    The guard keeps each socket until the session closes, even after urllib3 closes the connection: a
    response that ends with the connection (``Connection: close``) is still read from that socket.
    """

    guard: SocketGuard

    def _new_conn(self) -> socket.socket:
        try:
            sock = self.guard.connect(
                (self._dns_host, self.port), self.timeout, self.source_address, self.socket_options
            )
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"connection to {self.host} timed out") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc
        sys.audit("http.client.connect", self, self.host, self.port)
        return sock


class _GuardedHTTPSConnection(_GuardedHTTPConnection, HTTPSConnection):
    """The TLS variant of _GuardedHTTPConnection."""


def _pool_classes(guard: SocketGuard) -> dict[str, type[HTTPConnectionPool]]:
    """Return connection pool classes, by scheme, whose connections report to ``guard``."""
    plain = type("GuardedHTTPConnection", (_GuardedHTTPConnection,), {"guard": guard})
    tls = type("GuardedHTTPSConnection", (_GuardedHTTPSConnection,), {"guard": guard})
    return {
        "http": type("GuardedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": plain}),
        "https": type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": tls}),
    }


class _GuardedAdapter(HTTPAdapter):
    """An HTTPAdapter whose pools (direct or through an HTTP proxy) use guarded connections."""

    def __init__(self, guard: SocketGuard, ssl_context: ssl.SSLContext | None) -> None:
        self._pools = _pool_classes(guard)
        self._ssl_context = ssl_context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        """Create the pool manager with guarded pool classes."""
        if self._ssl_context is not None:
            kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pools

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        """Return the proxy manager for ``proxy``, with guarded pool classes."""
        if self._ssl_context is not None:
            kwargs.setdefault("ssl_context", self._ssl_context)
        manager = super().proxy_manager_for(proxy, **kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS pools are not guarded: the timeouts still apply
            manager.pool_classes_by_scheme = self._pools
        return manager


class AbortableSession(requests.Session):
    """A requests Session that the task's abort (timeout or cancel) stops at once, whatever it is doing.

    Use it as a context manager. Turn any OSError (requests' errors are OSErrors) into the error to raise
    with ``failure``, and call ``ctx.check()`` after reading a body: a shut-down socket can look like a body
    that simply ended.
    """

    def __init__(self, ctx: TaskContext, *, ca_file: str | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.guard = SocketGuard()
        adapter = _GuardedAdapter(self.guard, _context_with(ca_file) if ca_file else None)
        self.mount("http://", adapter)
        self.mount("https://", adapter)
        self._unregister = ctx.on_abort(self.guard.abort)

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        """Send a request whose timeouts end a little after the task's deadline (a backstop to the abort)."""
        if kwargs.get("timeout") is None:
            left = self.ctx.remaining()
            kwargs["timeout"] = None if math.isinf(left) else left + BACKSTOP_GRACE
        return super().request(method, url, *args, **kwargs)

    def close(self) -> None:
        """Close every connection and unregister from the task's abort."""
        self._unregister()
        try:
            super().close()
        finally:
            self.guard.close()

    def failure(self, exc: BaseException, url: str, *, tls_hint: str = "") -> ProbeError:
        """Return what to raise for ``exc`` from a request to ``url``: TaskStopped, or a clear TaskError."""
        if self.ctx.stop.is_set():
            return TaskStopped(self.ctx.stop_reason or "stopped")
        return TaskError(describe(exc, url, tls_hint=tls_hint))


def describe(exc: BaseException, url: str, *, tls_hint: str = "") -> str:
    """Return a one-line, operator-facing explanation of a failed request."""
    where = _where(url)
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or cause.reason or str(cause)
            return TLS_VERIFY_FAILED.format(where=where, reason=reason, hint=tls_hint)
    for cause in causes:
        if isinstance(cause, socket.gaierror):
            host = urlsplit(url).hostname or where
            return NAME_NOT_RESOLVED.format(host=host, reason=cause.strerror or cause)
        if isinstance(cause, ConnectionRefusedError):
            return CONNECTION_REFUSED.format(where=where)
        if isinstance(cause, TimeoutError | requests.Timeout):
            return TIMED_OUT.format(where=where)
        if isinstance(cause, ssl.SSLError):
            return TLS_FAILED.format(where=where, reason=cause.reason or cause)
    for cause in causes:
        if isinstance(cause, NewConnectionError):
            return CONNECT_FAILED.format(where=where, reason=_innermost(cause))
        if isinstance(cause, requests.exceptions.InvalidURL | LocationValueError):
            # not echoed: a password holding a '/' ends the URL's host early, and the rest would show part of it
            return BAD_LOCATION.format(where=where)
    return REQUEST_FAILED.format(where=where, reason=_innermost(exc))


def _where(url: str) -> str:
    """Return ``host:port`` of ``url`` (never its credentials, path or query)."""
    parts = urlsplit(url)
    try:
        port: int | str = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # not a number: never shown, it may be part of a password with a '/' in it
        port = "?"
    host = parts.hostname or "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc`` and every exception it wraps (causes, contexts, urllib3 reasons, arguments)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        todo.extend(e for e in linked if isinstance(e, BaseException))


def _innermost(exc: BaseException) -> str:
    """Return the message of the deepest wrapped exception, which is usually the informative one."""
    last = exc
    for last in _causes(exc):  # noqa: B007 - the loop finds the last one
        pass
    return str(last) or type(last).__name__


def _context_with(ca_file: str) -> ssl.SSLContext:
    """Return an SSL context that trusts ``ca_file`` (requests adds its default CA bundle to it)."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TaskError(CA_FILE_UNREADABLE.format(path=ca_file, reason=exc.strerror or exc)) from exc
