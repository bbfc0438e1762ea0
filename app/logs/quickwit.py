"""Quickwit's search API for job logs: the query the server sends, with the caller's tenant always ANDed in."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import requests

from app.errors import BadRequest, ServiceUnavailable

RESERVED = frozenset('+^`:{}"[]()~!\\* ')  # Quickwit's query language: escaped with a backslash in filter values
OPENERS = {"(": ")", "[": "]}", "{": "]}"}  # a range may open with [ or { and close with ] or }
BAD_QUERY = "the query cannot be used: {reason}"
UNAVAILABLE = "log search is unavailable: Quickwit did not answer ({detail}); try again shortly"
REFUSED = "Quickwit refused the query: {detail}"


def escape(value: str) -> str:
    """Return ``value`` as one literal term of the query language."""
    return "".join(f"\\{char}" if char in RESERVED else char for char in value)


def check_query(text: str) -> None:
    """Refuse (400 invalid_query) a query that could reach outside the parentheses the server puts around it.

    Quotes must be closed, a backslash must escape something, and parentheses and range brackets must nest,
    so that ``tenant_id:acme AND (<query>)`` is always the tenant filter ANDed with the whole query.
    """
    closers: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif ord(char) < 32:
            raise BadRequest(BAD_QUERY.format(reason="it contains a control character"), code="invalid_query")
        elif char == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif char in OPENERS:
            closers.append(OPENERS[char])
        elif char in ")]}" and (not closers or char not in closers.pop()):
            raise BadRequest(BAD_QUERY.format(reason=f"an unbalanced '{char}'"), code="invalid_query")
    if escaped or quoted or closers:
        reason = "it ends inside a quote, a group or an escape"
        raise BadRequest(BAD_QUERY.format(reason=reason), code="invalid_query")


def build_query(*, filters: dict[str, str], text: str) -> str:
    """Return the query string: every filter (the tenant first) as a term, ANDed with the parenthesised ``text``.

    A filter value with a control character or whitespace other than a space is refused: a tab or a line break
    would end its term, and ``task:x<TAB>OR<TAB>word`` would OR a search of every tenant's lines into the query.
    """
    check_query(text)
    for field, value in filters.items():
        if any(ord(char) < 32 or (char.isspace() and char != " ") for char in value):
            reason = f"the {field} filter contains a control character or a line break"
            raise BadRequest(BAD_QUERY.format(reason=reason), code="invalid_query")
    terms = [f"{field}:{escape(value)}" for field, value in filters.items()]
    if text.strip():
        terms.append(f"({text})")
    return " AND ".join(terms)


def search(
    *,
    url: str,
    index: str,
    query: str,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    offset: int,
    timeout: float,
) -> tuple[list[dict[str, Any]], int]:
    """Run a search, newest first; return the hits (the stored documents) and the number of matches.

    ``since`` and ``until`` go to Quickwit as whole seconds (rounded outwards), its time filter's precision.

    Raises:
        BadRequest: Quickwit refused the query (400 invalid_query).
        ServiceUnavailable: Quickwit could not be reached or failed (503 search_unavailable).
    """
    params: dict[str, Any] = {"query": query, "max_hits": limit, "start_offset": offset, "sort_by": "timestamp"}
    if since is not None:
        params["start_timestamp"] = math.floor(since.timestamp())
    if until is not None:
        params["end_timestamp"] = math.ceil(until.timestamp())
    try:
        response = requests.get(f"{url.rstrip('/')}/api/v1/{index}/search", params=params, timeout=timeout)
    except requests.RequestException as exc:
        raise ServiceUnavailable(UNAVAILABLE.format(detail=type(exc).__name__), code="search_unavailable") from None
    if response.status_code == 400:
        raise BadRequest(REFUSED.format(detail=_message(response)), code="invalid_query")
    if response.status_code != 200:
        detail = f"HTTP {response.status_code}"
        raise ServiceUnavailable(UNAVAILABLE.format(detail=detail), code="search_unavailable")
    try:
        data = response.json()
        return list(data["hits"]), int(data["num_hits"])
    except (ValueError, KeyError, TypeError):
        raise ServiceUnavailable(UNAVAILABLE.format(detail="not a search result"), code="search_unavailable") from None


def _message(response: requests.Response) -> str:
    try:
        return str(response.json().get("message", ""))[:500]
    except ValueError:
        return response.text[:500]
