"""The ``http`` task type: send one HTTP request and check the response's status and body."""

from __future__ import annotations

import codecs
import logging
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from probe.errors import TaskError
from probe.process import Sink
from probe.tasks._web import AbortableSession, _where
from probe.tasktype import Option, Outcome, TaskContext, TaskType, register

log = logging.getLogger(__name__)

BODY_AND_JSON = "set either body or json, not both"
BAD_URL = "url must be an http:// or https:// URL with a host, got {url!r}"
BAD_METHOD = "method must be an HTTP method name such as GET or POST, got {method!r}"
BAD_STATUS = "expected_status holds {status}, which is not an HTTP status code (100-599)"
CA_FILE_UNUSED = "ca_file has no effect with verify_tls: false"
STATUS_MISMATCH = "expected {expected}, got {status}"
BODY_MISSING = "the response body does not contain {text!r}"
TLS_HINT = "; trust its CA with ca_file, or set verify_tls: false to skip the check"

CHUNK = 64 * 1024
_METHOD = re.compile(r"[A-Za-z]+")


@register
class HttpTask(TaskType):
    """Send an HTTP(S) request; succeed when the status (and optionally the body) is as expected."""

    name = "http"
    summary = "send an HTTP request and check the response's status and body"
    options = {
        "url": Option("string", required=True, help="the URL to request (http:// or https://)"),
        "method": Option("string", default="GET", help="the HTTP method"),
        "headers": Option("mapping", help="request headers, name: value"),
        "body": Option("string", help="the request body, sent as it is (UTF-8)"),
        "json": Option("any", help="a value sent as a JSON body, with Content-Type: application/json"),
        "expected_status": Option("list|integer", items="integer", help="status codes that succeed (default: any 2xx)"),
        "expected_body_contains": Option("string", help="text the response body must contain"),
        "timeout": Option("duration", help="time allowed for the whole request (the task times out)"),
        "verify_tls": Option("boolean", default=True, help="verify the server's TLS certificate and name"),
        "ca_file": Option("string", help="a PEM file of CA certificates to trust besides the default ones"),
        "follow_redirects": Option("boolean", default=True, help="follow 3xx redirects"),
    }

    def check(self, config: Mapping[str, Any]) -> list[str]:
        """Refuse a body with json, a URL that is not HTTP, odd methods and impossible status codes."""
        problems = []
        if config.get("body") is not None and config.get("json") is not None:
            problems.append(BODY_AND_JSON)
        url = config.get("url")
        if url is not None:
            try:
                parts = urlsplit(url)
            except ValueError:  # such as "Invalid IPv6 URL": a URL all the same, not a crash of the check
                problems.append(BAD_URL.format(url=url))
            else:
                if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
                    problems.append(BAD_URL.format(url=url))
        method = config.get("method")
        if method is not None and not _METHOD.fullmatch(method):
            problems.append(BAD_METHOD.format(method=method))
        for status in _statuses(config.get("expected_status")) or []:
            if not 100 <= status <= 599:
                problems.append(BAD_STATUS.format(status=status))
        if config.get("ca_file") and config.get("verify_tls") is False:
            problems.append(CA_FILE_UNUSED)
        return problems

    def run(self, config: dict[str, Any], ctx: TaskContext) -> Outcome:
        """Send the request, stream the body (keeping at most the output limit) and check the response."""
        url = config["url"]
        method = config.get("method", "GET").upper()
        headers = {str(k): str(v) for k, v in (config.get("headers") or {}).items()}
        expected = _statuses(config.get("expected_status"))
        needle = config.get("expected_body_contains")
        send: dict[str, Any] = {}
        if config.get("json") is not None:
            send["json"] = config["json"]
        elif config.get("body") is not None:
            send["data"] = config["body"].encode("utf-8")
        metrics: dict[str, Any] = {}
        started = time.monotonic()
        with AbortableSession(ctx, ca_file=config.get("ca_file")) as session:
            try:
                response = session.request(
                    method,
                    url,
                    headers=headers,
                    stream=True,
                    verify=config.get("verify_tls", True),
                    allow_redirects=config.get("follow_redirects", True),
                    **send,
                )
                with response:
                    metrics["status_code"] = response.status_code
                    charset = _charset(response.headers.get("content-type", ""))
                    body = _Body(ctx.output_limit, _encode(needle, charset))
                    for chunk in response.iter_content(CHUNK):
                        body.feed(chunk)
                        ctx.check()
            except OSError as exc:  # every requests error is an OSError
                error = session.failure(exc, url, tls_hint=TLS_HINT)
                if isinstance(error, TaskError):
                    error.metrics.update(metrics)
                raise error from exc
        ctx.check()  # a socket shut down by the abort can end the body early without an error
        metrics["elapsed_ms"] = int((time.monotonic() - started) * 1000)
        metrics["bytes"] = body.size
        log.debug("%s %s: %s, %d bytes", method, _where(url), response.status_code, body.size)  # no path or query
        outcome = Outcome(True, body.text(charset), None, metrics, body.sink.dropped)
        if not _status_ok(response.status_code, expected):
            outcome.ok = False
            outcome.error = STATUS_MISMATCH.format(expected=_describe(expected), status=response.status_code)
        elif needle is not None and not body.found:
            outcome.ok = False
            outcome.error = BODY_MISSING.format(text=needle)
        return outcome


class _Body:
    """Keeps the first ``limit`` bytes of a body, counts the rest and looks for a needle across chunks."""

    def __init__(self, limit: int, needle: bytes | None) -> None:
        self.sink = Sink(limit)
        self.needle = needle
        self.found = not needle
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk of the body."""
        self.sink.feed(chunk)
        if not self.found and self.needle:
            window = self._tail + chunk
            self.found = self.needle in window
            overlap = len(self.needle) - 1
            self._tail = window[-overlap:] if overlap else b""

    @property
    def size(self) -> int:
        """Bytes received."""
        return self.sink.kept + self.sink.dropped

    def text(self, charset: str) -> str:
        """The kept bytes as text."""
        return b"".join(self.sink.chunks).decode(charset, "replace")


def _statuses(value: Any) -> list[int] | None:
    """Return expected_status as a list (it may be one integer), or None when unset."""
    if value is None:
        return None
    return [value] if isinstance(value, int) else list(value)


def _status_ok(status: int, expected: list[int] | None) -> bool:
    return 200 <= status <= 299 if expected is None else status in expected


def _describe(expected: list[int] | None) -> str:
    """Return ``a 2xx status``, ``status 200`` or ``status 200, 201 or 204``."""
    if not expected:
        return "a 2xx status"
    words = [str(s) for s in expected]
    return f"status {words[0]}" if len(words) == 1 else f"status {', '.join(words[:-1])} or {words[-1]}"


def _charset(content_type: str) -> str:
    """Return the charset a Content-Type names, or UTF-8 when it names none (or one Python lacks)."""
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            name = value.strip().strip("\"'")
            try:
                return codecs.lookup(name).name
            except LookupError:
                break
    return "utf-8"


def _encode(text: str | None, charset: str) -> bytes | None:
    """Return ``text`` in the body's charset, so the body can be searched as bytes while it streams."""
    if text is None:
        return None
    try:
        return text.encode(charset)
    except UnicodeEncodeError:
        return text.encode("utf-8")
