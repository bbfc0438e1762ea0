"""The agent's REST client: its own JWT, retries with backoff on transient errors, never silently drops a result.

It speaks HTTP/1.1 with the standard library on one kept-alive connection per thread: an agent makes a few
small JSON requests per job, and a general-purpose client (requests) spent more CPU per request than the
control plane took to answer it. TLS is verified (the system's CAs, or ``CONTROL_PLANE_CA_FILE``); a proxy
named by ``HTTPS_PROXY``/``HTTP_PROXY`` (and not excluded by ``NO_PROXY``) is used as requests would, with the
user and password of its URL (``http://user:password@proxy:3128``) sent as ``Proxy-Authorization: Basic``.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import random
import ssl
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from workers.settings import AgentSettings

log = logging.getLogger(__name__)


def transient(status: int) -> bool:
    """Whether an HTTP status asks to try again later: 408, 429 and every 5xx (a proxy's 520-524 as well); and 407,
    a proxy that wants other credentials, which the control plane never answers (as through a CONNECT tunnel)."""
    return status in (407, 408, 429) or 500 <= status <= 599


MAX_BACKOFF = 15.0


class ControlPlaneError(Exception):
    """Raised when the control plane could not be reached, or kept failing, until the deadline."""


@dataclass(frozen=True)
class Reply:
    """A definite answer of the control plane (2xx or a 4xx other than 429)."""

    status: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        """True for a 2xx answer."""
        return 200 <= self.status < 300

    @property
    def error(self) -> str:
        """The error code of a refusal (``job_cancelled``, ``stale_attempt``…), or an empty string."""
        return str(self.body.get("error", "")) if not self.ok else ""


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: http.client.HTTPMessage
    payload: bytes


class _Connections:
    """One kept-alive connection per thread to the control plane (or through its proxy)."""

    def __init__(self, base_url: str, timeout: float, ca_file: str | None) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"CONTROL_PLANE_URL must be an http:// or https:// URL, not {base_url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.context = ssl.create_default_context(cafile=ca_file) if self.tls else None
        proxy: str | None = urllib.request.getproxies().get(parts.scheme)
        self.proxy: urllib.parse.SplitResult | None = None
        self.proxy_headers: dict[str, str] = {}  # Proxy-Authorization, when the proxy's URL has credentials
        if proxy and not urllib.request.proxy_bypass(parts.netloc):
            self.proxy = _proxy_url(proxy, parts.scheme)
            self.proxy_headers = _proxy_authorization(self.proxy)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self._local = threading.local()

    def _open(self) -> http.client.HTTPConnection:
        if self.proxy is None:
            if self.context is not None:
                return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.context)
            return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        proxy_host, proxy_port = str(self.proxy.hostname or ""), self.proxy.port or 8080
        if self.context is not None:  # CONNECT through the proxy, then TLS to the control plane itself
            connection = http.client.HTTPSConnection(proxy_host, proxy_port, timeout=self.timeout, context=self.context)
            connection.set_tunnel(self.host, self.port, headers=self.proxy_headers)
            return connection
        return http.client.HTTPConnection(proxy_host, proxy_port, timeout=self.timeout)

    @property
    def forwarded(self) -> bool:
        """Whether requests go to a plain-HTTP proxy that forwards them (not through a CONNECT tunnel)."""
        return self.proxy is not None and self.context is None

    def target(self, path: str) -> str:
        """The request target for ``path``: absolute when a plain-HTTP proxy forwards it."""
        full = self.prefix + path
        return self.origin + full if self.forwarded else full

    def send(self, method: str, path: str, payload: bytes | None, headers: dict[str, str]) -> _Answer:
        """Send one request on this thread's connection; a connection the server closed is reopened once."""
        for fresh in (False, True):
            connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
            reused = connection is not None and not fresh
            if connection is None or fresh:
                self.close()
                connection = self._local.connection = self._open()
            try:
                sent = {**headers, **self.proxy_headers} if self.forwarded and self.proxy_headers else headers
                connection.request(method, self.target(path), body=payload, headers=sent)
                response = connection.getresponse()
                answer = _Answer(response.status, response.headers, response.read())
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if reused:
                    continue  # the server dropped an idle kept-alive connection: once more on a new one
                raise
            except (OSError, http.client.HTTPException):
                self.close()
                raise
            if response.will_close:
                self.close()
            return answer
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close this thread's connection, if any."""
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            connection.close()


class ControlPlane:
    """Calls the control plane's API as this agent."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.connections = _Connections(settings.api, settings.request_timeout, settings.ca_file)
        self.headers = {
            "Authorization": f"Bearer {settings.jwt_token}",
            "User-Agent": f"automation-agent/{settings.agent_id}",
            "Accept": "application/json",
        }

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, deadline: float | None = None
    ) -> Reply:
        """Send one request, retrying connection errors, 408, 429 and 5xx with jittered backoff until ``deadline``.

        Raises:
            ControlPlaneError: no definite answer before the deadline (default: the settings' report deadline).
        """
        give_up = time.monotonic() + (self.settings.report_deadline if deadline is None else deadline)
        payload = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = dict(self.headers)
        if payload is not None:
            headers["Content-Type"] = "application/json"
        delay = 0.2
        attempt = 0
        while True:
            attempt += 1
            problem: str
            wait = delay
            try:
                answer = self.connections.send(method, path, payload, headers)
            except (OSError, http.client.HTTPException) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if not transient(answer.status):
                    return Reply(answer.status, _json_object(answer.payload))
                problem = f"HTTP {answer.status}"
                retry_after = answer.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    wait = max(wait, float(retry_after))
            left = give_up - time.monotonic()
            if left <= 0:
                raise ControlPlaneError(f"{method} {path} failed {attempt} times; last: {problem}")
            log.warning("%s %s failed (%s); retrying in %.1fs", method, path, problem, min(wait, left))
            time.sleep(min(wait * (0.5 + random.random()), left))
            delay = min(delay * 2, MAX_BACKOFF)


BAD_PROXY = (
    "the proxy of {scheme} requests ({scheme}_proxy or {upper}_PROXY) must be an http:// URL with a host, an optional "
    "port and an optional user and password, each percent-encoded: http://user:password@proxy:3128"
)


def _proxy_url(proxy: str, scheme: str) -> urllib.parse.SplitResult:
    """The proxy's URL, split; ValueError (not naming the URL: it may hold a password) unless it is an http:// URL
    with a host, a valid port and nothing after them. A proxy reached over TLS (https://) is not supported: its
    credentials and the CONNECT would otherwise cross the network in clear."""
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    try:
        valid = (
            parts.scheme == "http"
            and bool(parts.hostname)
            and (parts.port is None or parts.port > 0)
            and parts.path in ("", "/")  # a "/", "?" or "#" left unencoded in a password starts one of these
            and not parts.query
            and not parts.fragment
        )
    except ValueError:  # a port that is not a number, or out of range
        valid = False
    if not valid:
        raise ValueError(BAD_PROXY.format(scheme=scheme, upper=scheme.upper()))
    return parts


def _proxy_authorization(proxy: urllib.parse.SplitResult) -> dict[str, str]:
    """The ``Proxy-Authorization`` header for the user and password in a proxy's URL (percent-decoded); none
    without a user."""
    if proxy.username is None:
        return {}
    user = urllib.parse.unquote(proxy.username)
    password = urllib.parse.unquote(proxy.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return {"Proxy-Authorization": f"Basic {token}"}


def _json_object(payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload) if payload else {}
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return {}
    return data if isinstance(data, dict) else {"data": data}
