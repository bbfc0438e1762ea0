"""The `quickwit_server` fixture: a loopback STAND-IN for Quickwit's REST API (Quickwit cannot be installed here).

It checks what Quickwit checks and answers as Quickwit answers, for the subset the platform uses:

- ``POST /api/v1/<index>/ingest``: an NDJSON body, one JSON object per line, each with the required fields of
  ``deploy/quickwit/automation-logs.yaml`` and an RFC 3339 ``timestamp``; ``{"num_docs_for_processing": n}``.
  An unknown index is ``404``, a malformed body ``400``, both with Quickwit's ``{"message": ...}``.
- ``GET|POST /api/v1/<index>/search``: ``query`` in a subset of Quickwit's query language (``field:value`` terms
  on the raw fields, free words and ``"phrases"`` over ``message`` with its default tokenizer, ``AND``, ``OR``,
  ``NOT``/``-``, implicit AND, parentheses, backslash escapes; ``AND`` binds tighter than ``OR``), an unknown
  field is ``400``; ``start_timestamp``/``end_timestamp`` (seconds), ``max_hits``, ``start_offset``,
  ``sort_by=timestamp`` (newest first); ``{"hits": [...], "num_hits": n, "elapsed_time_micros": t}``.
- ``GET /health/livez`` and ``GET /api/v1/version``.

``fail_ingest(429, 503)`` makes the next ingest requests answer those statuses; ``search_status`` makes every
search answer it; ``stop()`` closes the port (connection refused from then on).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

INDEX = "automation-logs"
REQUIRED = ("timestamp", "tenant_id", "project_id", "job_id", "attempt", "seq", "level", "message")
RAW_FIELDS = frozenset({"tenant_id", "project_id", "job_id", "task", "level"})
NUMBER_FIELDS = frozenset({"attempt", "seq"})
TEXT_FIELDS = frozenset({"message"})
_WORD = re.compile(r"[0-9A-Za-z]+")


class QueryError(ValueError):
    """Raised for a query the stand-in (like Quickwit) cannot parse."""


def _tokens(text: str) -> list[str]:
    return [t.lower() for t in _WORD.findall(text)]


def _lex(query: str) -> list[tuple[str, str]]:
    """Split a query into ("(" | ")" | "word" | "phrase" | "colon", text)."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(query):
        char = query[i]
        if char.isspace():
            i += 1
        elif char in "()":
            out.append((char, char))
            i += 1
        elif char == ":":
            out.append(("colon", ":"))
            i += 1
        elif char == '"':
            j, value = i + 1, []
            while j < len(query) and query[j] != '"':
                if query[j] == "\\" and j + 1 < len(query):
                    j += 1
                value.append(query[j])
                j += 1
            if j >= len(query):
                raise QueryError("unterminated phrase")
            out.append(("phrase", "".join(value)))
            i = j + 1
        else:
            value = []
            while i < len(query) and not query[i].isspace() and query[i] not in '():"':
                if query[i] == "\\":
                    if i + 1 >= len(query):
                        raise QueryError("a trailing escape")
                    i += 1
                elif query[i] in "[]{}^~!":
                    raise QueryError(f"the stand-in does not support {query[i]!r}")
                value.append(query[i])
                i += 1
            out.append(("word", "".join(value)))
    return out


class _Parser:
    """Recursive descent over the lexed query; returns a predicate on documents."""

    def __init__(self, query: str) -> None:
        self.tokens = _lex(query)
        self.pos = 0

    def parse(self) -> Any:
        if not self.tokens:
            raise QueryError("empty query")
        node = self.or_expr()
        if self.pos != len(self.tokens):
            raise QueryError(f"unexpected {self.tokens[self.pos][1]!r}")
        return node

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def or_expr(self) -> Any:
        parts = [self.and_expr()]
        while self.peek() == ("word", "OR"):
            self.pos += 1
            parts.append(self.and_expr())
        return lambda doc: any(p(doc) for p in parts)

    def and_expr(self) -> Any:
        parts = [self.unary()]
        while (token := self.peek()) is not None and token != (")", ")") and token != ("word", "OR"):
            if token == ("word", "AND"):
                self.pos += 1
            parts.append(self.unary())
        return lambda doc: all(p(doc) for p in parts)

    def unary(self) -> Any:
        token = self.peek()
        if token == ("word", "NOT"):
            self.pos += 1
            inner = self.unary()
            return lambda doc: not inner(doc)
        if token is not None and token[0] == "word" and token[1].startswith("-") and len(token[1]) > 1:
            self.tokens[self.pos] = ("word", token[1][1:])
            inner = self.unary()
            return lambda doc: not inner(doc)
        return self.primary()

    def primary(self) -> Any:
        token = self.peek()
        if token is None:
            raise QueryError("the query ends too early")
        if token[0] == "(":
            self.pos += 1
            node = self.or_expr()
            if self.peek() != (")", ")"):
                raise QueryError("missing ')'")
            self.pos += 1
            return node
        if token[0] in (")", "colon"):
            raise QueryError(f"unexpected {token[1]!r}")
        self.pos += 1
        field = "message"
        if self.peek() == ("colon", ":") and token[0] == "word":
            field = token[1]
            self.pos += 1
            value_token = self.peek()
            if value_token is None or value_token[0] not in ("word", "phrase"):
                raise QueryError(f"field {field!r} has no value")
            self.pos += 1
            token = value_token
        elif token == ("word", "*"):
            return lambda doc: True
        return _clause(field, token[1], phrase=token[0] == "phrase")


def _clause(field: str, value: str, *, phrase: bool) -> Any:
    if field in RAW_FIELDS:
        return lambda doc: doc.get(field) is not None and str(doc[field]) == value
    if field in NUMBER_FIELDS:
        try:
            number = int(value)
        except ValueError:
            raise QueryError(f"{value!r} is not a number for field {field!r}") from None
        return lambda doc: doc.get(field) == number
    if field not in TEXT_FIELDS:
        raise QueryError(f"invalid query: field does not exist: {field!r}")
    if not phrase and value.endswith("*"):
        prefix = value[:-1].lower()
        return lambda doc: any(t.startswith(prefix) for t in _tokens(str(doc.get(field, ""))))
    wanted = _tokens(value)
    if not wanted:
        return lambda doc: False

    def match(doc: dict[str, Any]) -> bool:
        have = _tokens(str(doc.get(field, "")))
        size = len(wanted)
        return any(have[i : i + size] == wanted for i in range(len(have) - size + 1))

    return match


def _seconds(doc: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(doc["timestamp"]).replace("Z", "+00:00")).timestamp()


class QuickwitStandIn:
    """A Quickwit stand-in on 127.0.0.1 holding one index's documents in memory."""

    def __init__(self, index: str = INDEX) -> None:
        self.index = index
        self.documents: list[dict[str, Any]] = []
        self.ingests: list[bytes] = []  # every ingest body received, answered or not
        self.searches: list[dict[str, str]] = []  # the parameters of every search received
        self.ingest_failures: list[int] = []
        self.search_status: int | None = None
        self._lock = threading.Lock()
        self._server = _Server(self)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.stopped = False

    def fail_ingest(self, *statuses: int) -> None:
        """Answer the next ingest requests with these statuses (then normally again)."""
        with self._lock:
            self.ingest_failures.extend(statuses)

    def stop(self) -> None:
        """Stop listening: every later request is refused, as by a stopped Quickwit."""
        if not self.stopped:
            self.stopped = True
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)

    def ingest(self, body: bytes) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.ingests.append(body)
            if self.ingest_failures:
                status = self.ingest_failures.pop(0)
                return status, {"message": f"stand-in told to answer {status}"}
        docs = []
        for number, line in enumerate(body.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                return 400, {"message": f"line {number} is not JSON"}
            if not isinstance(doc, dict):
                return 400, {"message": f"line {number} is not a JSON object"}
            missing = [field for field in REQUIRED if doc.get(field) is None]
            if missing:
                return 400, {"message": f"line {number} lacks the required fields {missing}"}
            try:
                _seconds(doc)
            except ValueError:
                return 400, {"message": f"line {number}: timestamp is not RFC 3339"}
            docs.append(doc)
        if not docs:
            return 400, {"message": "the body holds no document"}
        with self._lock:
            self.documents.extend(docs)
        return 200, {"num_docs_for_processing": len(docs)}

    def search(self, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.searches.append(params)
            documents = list(self.documents)
        if self.search_status is not None:
            return self.search_status, {"message": f"stand-in told to answer {self.search_status}"}
        try:
            predicate = _Parser(params.get("query", "")).parse()
            start, end = params.get("start_timestamp"), params.get("end_timestamp")
            hits = [
                doc
                for doc in documents
                if predicate(doc)
                and (start is None or _seconds(doc) >= int(start))
                and (end is None or _seconds(doc) < int(end))
            ]
            offset, max_hits = int(params.get("start_offset", 0)), int(params.get("max_hits", 20))
        except (QueryError, ValueError) as exc:
            return 400, {"message": f"failed to parse query: {exc}"}
        if params.get("sort_by") == "timestamp":
            hits.sort(key=_seconds, reverse=True)
        return 200, {"hits": hits[offset : offset + max_hits], "num_hits": len(hits), "elapsed_time_micros": 1}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self) -> None:
        owner = self.server.owner
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.command == "GET" and url.path == "/health/livez":
            return self._reply(200, True)
        if self.command == "GET" and url.path == "/api/v1/version":
            return self._reply(200, {"build": {"version": "0.8.2-stand-in"}})
        match = re.fullmatch(r"/api/v1/([^/]+)/(ingest|search)", url.path)
        if match is None:
            return self._reply(404, {"message": "route not found"})
        if match[1] != owner.index:
            return self._reply(404, {"message": f"index `{match[1]}` not found"})
        if match[2] == "ingest" and self.command == "POST":
            return self._reply(*owner.ingest(body))
        if match[2] == "search":
            if self.command == "GET":
                params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            else:
                try:
                    params = {k: str(v) for k, v in json.loads(body or b"{}").items()}
                except (ValueError, AttributeError):
                    return self._reply(400, {"message": "the body is not a JSON object"})
            if "query" not in params:
                return self._reply(400, {"message": "missing field `query`"})
            return self._reply(*owner.search(params))
        return self._reply(405, {"message": "method not allowed"})

    do_GET = do_POST = _route


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, owner: QuickwitStandIn) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


@pytest.fixture
def quickwit_server() -> Iterator[QuickwitStandIn]:
    """A Quickwit stand-in on 127.0.0.1 with the empty index ``automation-logs``."""
    server = QuickwitStandIn()
    try:
        yield server
    finally:
        server.stop()
