"""Server-Sent Events: a parser of ``text/event-stream`` and a reader that resumes with ``Last-Event-ID``.

The parser follows the WHATWG rules: lines end in CRLF, LF or CR; ``:`` starts a comment (the server's
keep-alives); ``data`` lines are joined with newlines; a blank line dispatches the event; ``id`` sets the
last event id, which the reader sends back as ``Last-Event-ID`` when it reconnects after a dropped
connection; ``retry`` sets the reconnection delay.
"""

from __future__ import annotations

import codecs
import re
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import requests
import urllib3

from app.client.http import ApiError, Client, Unreachable

_EOL = re.compile(r"\r\n|\r|\n")
READ_TIMEOUT = 45.0  # seconds without a byte (the server sends a keep-alive every 15 s): the connection is dead
CONNECT_TIMEOUT = 10.0
RECONNECT_DELAY = 1.0
MAX_RECONNECT_DELAY = 10.0
MAX_FAILURES = 5  # short connections in a row that bring no new event before giving up
HEALTHY_AFTER = 10.0  # seconds: a connection that stayed open this long was fine (the server ends streams in time)
GAVE_UP = "lost the event stream of {path} {failures} times in a row: {problem}"


@dataclass(frozen=True)
class Event:
    """One dispatched event: its type (``message`` unless named), its data, and the last event id then."""

    event: str
    data: str
    id: str | None


class NotAStream(Exception):
    """Raised when the server answers the events URL with something else than ``text/event-stream``."""


class Parser:
    """Turns the bytes of an event stream, fed in chunks of any size, into events."""

    def __init__(self, last_id: str | None = None) -> None:
        self.last_id = last_id  # as of the last dispatch: what a reconnection sends as Last-Event-ID
        self._id = last_id
        self.retry: float | None = None  # seconds, when the server set it
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._started = False
        self._type = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse a chunk; return the events it completes."""
        text = self._pending + self._decoder.decode(chunk)
        if not self._started and text:
            text, self._started = text.removeprefix("\ufeff"), True
        events: list[Event] = []
        position = 0
        for end in _EOL.finditer(text):
            if end.group() == "\r" and end.end() == len(text):
                break  # perhaps the first half of a CRLF split between chunks
            event = self._line(text[position : end.start()])
            if event is not None:
                events.append(event)
            position = end.end()
        self._pending = text[position:]
        return events

    def _line(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the server's keep-alive
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value) / 1000
        return None

    def _dispatch(self) -> Event | None:
        data, kind = self._data, self._type
        self._data, self._type, self.last_id = [], "", self._id
        if not data:
            return None
        return Event(kind or "message", "\n".join(data), self.last_id)


def stream(
    client: Client,
    path: str,
    *,
    last_id: str | None = None,
    resume: Callable[[], bool] = lambda: True,
    sleep: Callable[[float], None] = time.sleep,
) -> Generator[Event, None, None]:
    """Yield the events of ``path`` for as long as the caller reads them, reconnecting with ``Last-Event-ID``.

    The caller stops by leaving its loop (the connection is then closed). The first connection's refusal (an
    ``ApiError``, such as a 404) and an answer that is not an event stream (``NotAStream``) are raised, for
    the caller to fall back; a stream that drops is resumed after the last event received, and given up
    (``Unreachable``) after ``MAX_FAILURES`` short connections in a row that brought no new event. When a
    connection ends and ``resume()`` is false (the caller has seen the end), the stream ends too.
    """
    parser = Parser(last_id)
    failures = 0
    connected_once = False
    while True:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if parser.last_id is not None:
            headers["Last-Event-ID"] = parser.last_id
        problem = "the server closed the stream before the end"
        resumed_from, opened = parser.last_id, None
        try:
            response = client.send("GET", path, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        except (ApiError, Unreachable) as exc:
            if not connected_once or (isinstance(exc, ApiError) and exc.status < 500 and exc.status != 429):
                raise
            problem = exc.message
        else:
            try:
                if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
                    raise NotAStream(f"{path} answered {response.headers.get('Content-Type')!r}")
                connected_once, opened = True, time.monotonic()
                fresh = Parser(parser.last_id)  # a half-received event of the dropped connection is discarded
                fresh.retry, parser = parser.retry, fresh
                while True:
                    chunk = response.raw.read1(65536)
                    if not chunk:
                        break
                    yield from parser.feed(chunk)
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            finally:
                response.close()
            if not resume():
                return
        lasted = opened is not None and time.monotonic() - opened >= HEALTHY_AFTER
        fruitful = parser.last_id != resumed_from or lasted
        failures = 1 if fruitful else failures + 1
        if failures >= MAX_FAILURES:
            raise Unreachable(GAVE_UP.format(path=path, failures=failures, problem=problem))
        delay = parser.retry if parser.retry is not None else RECONNECT_DELAY
        sleep(min(delay * 2 ** (failures - 1), MAX_RECONNECT_DELAY))
