"""The per-token rate limit: fixed windows counted in Valkey, or in each process's memory without it.

Agents have a limit of their own, ``AGENT_RATE_LIMIT``: a busy agent makes a claim, task results, log batches and a
final report for every job, far more requests than a person or a script, and a refused report only delays the
job it is about. The limit follows the role of the verified token (the token cache makes that a lookup); a
token that does not verify counts under ``RATE_LIMIT`` and is then refused by authentication.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import cast

from flask import Flask, current_app, request
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage, Storage, storage_from_string
from limits.strategies import FixedWindowRateLimiter

from app.auth.tokens import TokenError, verify_token
from app.config import ConfigError
from app.errors import AppError

log = logging.getLogger(__name__)

RETRY_VALKEY_AFTER = 10.0  # seconds of counting in memory after Valkey failed, before trying it again
RATE_LIMITED = "rate limit exceeded: {limit}; retry in {seconds} s"
BAD_LIMIT = "{name} must be like '600 per minute' (several: '10 per second; 600 per minute'), got {value!r}"


class RateLimited(AppError):
    """Raised when a token (or an address without one) has used up its requests for the window."""

    status = 429
    code = "rate_limited"


def caller_key() -> str:
    """Key the limit by a digest of the caller's Authorization header, or by its address without one."""
    header = request.headers.get("Authorization", "")
    if header:
        return "token:" + hashlib.sha256(header.encode()).hexdigest()[:32]
    return "addr:" + (request.remote_addr or "unknown")


class RateLimit:
    """Counts each caller's API requests and refuses (429, with Retry-After) those over ``RATE_LIMIT``."""

    def __init__(self, app: Flask) -> None:
        self.items = _limits(app, "RATE_LIMIT")
        self.agent_items = _limits(app, "AGENT_RATE_LIMIT")
        url = app.config["VALKEY_URL"]
        timeout = app.config["HEALTH_TIMEOUT"]
        storage = (
            cast(Storage, storage_from_string(url, socket_connect_timeout=timeout, socket_timeout=timeout))
            if url
            else MemoryStorage()
        )
        self.shared = FixedWindowRateLimiter(storage)
        self.local = FixedWindowRateLimiter(MemoryStorage())
        self.valkey_failed_at: float | None = None if url else math.inf

    def _limiter(self) -> FixedWindowRateLimiter:
        failed = self.valkey_failed_at
        if failed is None or (failed != math.inf and time.monotonic() - failed > RETRY_VALKEY_AFTER):
            return self.shared
        return self.local

    def check(self) -> None:
        """Count this request; raise RateLimited when it is over a limit. Registered before API requests."""
        if not request.path.startswith("/api/"):
            return
        key = caller_key()
        items = self.agent_items if _is_agent() else self.items
        limiter = self._limiter()
        try:
            self._hit(limiter, items, key)
        except RateLimited:
            raise
        except Exception as exc:  # Valkey unreachable: keep limiting, in memory, rather than fail the API
            log.warning("rate limit storage failed, counting in memory for %.0f s: %s", RETRY_VALKEY_AFTER, exc)
            self.valkey_failed_at = time.monotonic()
            self._hit(self.local, items, key)
        else:
            if limiter is self.shared and self.valkey_failed_at not in (None, math.inf):
                self.valkey_failed_at = None

    def _hit(self, limiter: FixedWindowRateLimiter, items: list[RateLimitItem], key: str) -> None:
        for item in items:
            if not limiter.hit(item, key):
                reset = limiter.get_window_stats(item, key).reset_time
                seconds = max(1, math.ceil(reset - time.time()))
                raise RateLimited(
                    RATE_LIMITED.format(limit=item, seconds=seconds), headers={"Retry-After": str(seconds)}
                )


def _limits(app: Flask, name: str) -> list[RateLimitItem]:
    """The limits of setting ``name`` (``600 per minute``, or several: ``10 per second; 600 per minute``)."""
    try:
        return parse_many(app.config[name])
    except ValueError:
        raise ConfigError(BAD_LIMIT.format(name=name, value=app.config[name])) from None


def _is_agent() -> bool:
    """Whether the request carries a valid agent token (verified tokens are cached: usually a lookup)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    try:
        return verify_token(current_app.config["JWT_SECRET"], token.strip()).role == "agent"
    except TokenError:
        return False


def init_rate_limit(app: Flask) -> None:
    """Install the rate limit on ``app`` when ``RATE_LIMIT_ENABLED`` is on."""
    if not app.config["RATE_LIMIT_ENABLED"]:
        return
    limit = RateLimit(app)
    app.extensions["rate_limit"] = limit
    app.before_request(limit.check)
