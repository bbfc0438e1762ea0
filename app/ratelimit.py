"""The per-token rate limit: fixed windows counted in Valkey, or in each process's memory without it.

Agents have a limit of their own, ``AGENT_RATE_LIMIT``: a busy agent makes a claim, task results, log batches and a
final report for every job, far more requests than a person or a script, and a refused report only delays the
job it is about. The limit follows the role of the verified token (the token cache makes that a lookup); a
token that does not verify counts under ``RATE_LIMIT`` and is then refused by authentication.

With Valkey, a process does not ask it about every request: it takes a caller's hits for the current window in
blocks (``Reservations``: one ``INCRBY`` for up to ``BLOCK`` requests) and spends them locally. No more than
the limit ever gets through: a block is granted only up to the limit. The block shrinks as the window's count
(as this process last saw it) nears the limit, down to one hit at a time; the price is that hits a process
reserved and did not use lapse when the window ends (fewer than ``BLOCK`` per process and caller), so a caller
spread over several processes may be refused a little before its limit.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, cast

import redis
from flask import Flask, current_app, request
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from app.auth.tokens import TokenError, verify_token
from app.config import ConfigError
from app.errors import AppError

log = logging.getLogger(__name__)

RETRY_VALKEY_AFTER = 10.0  # seconds of counting in memory after Valkey failed, before trying it again
RATE_LIMITED = "rate limit exceeded: {limit}; retry in {seconds} s"
BAD_LIMIT = "{name} must be like '600 per minute' (several: '10 per second; 600 per minute'), got {value!r}"
BLOCK = 10  # hits of a caller's window a process takes from Valkey at once, far from the limit
SPREAD = 8  # a block is at most 1/SPREAD of what is left of the limit (so: one at a time near it)
KEY_PREFIX = "automation.ratelimit."
SWEEP_ABOVE = 10000  # callers held by a process before the ones whose windows ended are forgotten

# KEYS[1]: the window's counter. ARGV: hits taken, window in ms. Returns {the count with them, ms left}.
_RESERVE_LUA = """
local count = redis.call('INCRBY', KEYS[1], ARGV[1])
local left = redis.call('PTTL', KEYS[1])
if left < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  left = tonumber(ARGV[2])
end
return {count, left}
"""


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


@dataclass
class _Held:
    """A caller's hits this process took from one window: until when, how many are left, the window's count."""

    ends: float  # time.monotonic() when the window ends
    left: int
    count: int


class Reservations:
    """Callers' hits taken from Valkey's fixed-window counters in blocks and spent in this process."""

    def __init__(self, client: redis.Redis) -> None:
        self._reserve = client.register_script(_RESERVE_LUA)
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()

    def hit(self, item: RateLimitItem, key: str, cost: int = 1) -> tuple[bool, float]:
        """Count ``cost`` requests of ``key`` under ``item``; whether they are allowed, and seconds until the window
        ends. Hits a refused request was granted stay with the caller, for smaller requests.

        Raises:
            redis.RedisError, OSError: Valkey could not be asked (the caller counts in memory instead).
        """
        name = item.key_for(key)
        now = time.monotonic()
        with self._lock:
            held = self._held.get(name)
            if held is not None and held.ends <= now:
                held = None
            if held is not None and held.left >= cost:
                held.left -= cost
                return True, held.ends - now
            spare = held.left if held is not None else 0
            counted = held.count if held is not None else 0
        wanted = max(cost - spare, min(BLOCK, max(1, (item.amount - counted) // SPREAD)))
        reply = cast(list[Any], self._reserve(keys=[KEY_PREFIX + name], args=[wanted, item.get_expiry() * 1000]))
        count, ends_in = int(reply[0]), int(reply[1]) / 1000
        granted = max(0, min(wanted, item.amount - (count - wanted)))
        allowed = spare + granted >= cost
        with self._lock:
            if len(self._held) >= SWEEP_ABOVE:
                self._held = {k: v for k, v in self._held.items() if v.ends > now}
            left = spare + granted - (cost if allowed else 0)
            self._held[name] = _Held(ends=time.monotonic() + ends_in, left=left, count=count)
        return allowed, ends_in


class RateLimit:
    """Counts each caller's API requests and refuses (429, with Retry-After) those over ``RATE_LIMIT``."""

    def __init__(self, app: Flask) -> None:
        self.items = _limits(app, "RATE_LIMIT")
        self.agent_items = _limits(app, "AGENT_RATE_LIMIT")
        url = app.config["VALKEY_URL"]
        timeout = app.config["HEALTH_TIMEOUT"]
        self.shared: Reservations | None = None
        if url:
            client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
            self.shared = Reservations(client)
        self.local = FixedWindowRateLimiter(MemoryStorage())
        self.valkey_failed_at: float | None = None

    def _use_valkey(self) -> bool:
        failed = self.valkey_failed_at
        return self.shared is not None and (failed is None or time.monotonic() - failed > RETRY_VALKEY_AFTER)

    def check(self) -> None:
        """Count this request; raise RateLimited when it is over a limit. Registered before API requests."""
        if request.path.startswith("/api/"):
            self.count(1)

    def count(self, cost: int) -> None:
        """Count ``cost`` requests of this request's caller; raise RateLimited when they are over a limit."""
        key = caller_key()
        items = self.agent_items if _is_agent() else self.items
        if self._use_valkey():
            try:
                self._hit_shared(items, key, cost)
            except (redis.RedisError, OSError) as exc:  # Valkey unreachable: keep limiting, in memory
                log.warning("rate limit storage failed, counting in memory for %.0f s: %s", RETRY_VALKEY_AFTER, exc)
                self.valkey_failed_at = time.monotonic()
            else:
                self.valkey_failed_at = None
                return
        self._hit_local(items, key, cost)

    def _hit_shared(self, items: list[RateLimitItem], key: str, cost: int) -> None:
        assert self.shared is not None
        for item in items:
            allowed, ends_in = self.shared.hit(item, key, cost)
            if not allowed:
                raise _refusal(item, ends_in)

    def _hit_local(self, items: list[RateLimitItem], key: str, cost: int) -> None:
        for item in items:
            if not self.local.hit(item, key, cost=cost):
                raise _refusal(item, self.local.get_window_stats(item, key).reset_time - time.time())


def _refusal(item: RateLimitItem, ends_in: float) -> RateLimited:
    seconds = max(1, math.ceil(ends_in))
    return RateLimited(RATE_LIMITED.format(limit=item, seconds=seconds), headers={"Retry-After": str(seconds)})


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


def charge_rate_limit(extra: int) -> None:
    """Count ``extra`` more requests of the current caller, when the rate limit is on (a batch of N jobs counts N)."""
    limit = current_app.extensions.get("rate_limit")
    if extra > 0 and isinstance(limit, RateLimit):
        limit.count(extra)


def init_rate_limit(app: Flask) -> None:
    """Install the rate limit on ``app`` when ``RATE_LIMIT_ENABLED`` is on."""
    if not app.config["RATE_LIMIT_ENABLED"]:
        return
    limit = RateLimit(app)
    app.extensions["rate_limit"] = limit
    app.before_request(limit.check)
