"""The agent's REST client: its own JWT, retries with backoff on transient errors, never silently drops a result."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import requests

from workers.settings import AgentSettings

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
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


class ControlPlane:
    """Calls the control plane's API as this agent."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {settings.jwt_token}"
        self.session.headers["User-Agent"] = f"automation-agent/{settings.agent_id}"
        if settings.ca_file:
            self.session.verify = settings.ca_file

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, deadline: float | None = None
    ) -> Reply:
        """Send one request, retrying connection errors, 429 and 5xx with jittered backoff until ``deadline``.

        Raises:
            ControlPlaneError: no definite answer before the deadline (default: the settings' report deadline).
        """
        url = self.settings.api + path
        give_up = time.monotonic() + (self.settings.report_deadline if deadline is None else deadline)
        delay = 0.2
        attempt = 0
        while True:
            attempt += 1
            problem: str
            wait = delay
            try:
                response = self.session.request(method, url, json=body, timeout=self.settings.request_timeout)
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code not in RETRY_STATUSES:
                    try:
                        data = response.json()
                    except ValueError:
                        data = {}
                    return Reply(response.status_code, data if isinstance(data, dict) else {"data": data})
                problem = f"HTTP {response.status_code}"
                retry_after = response.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    wait = max(wait, float(retry_after))
            left = give_up - time.monotonic()
            if left <= 0:
                raise ControlPlaneError(f"{method} {path} failed {attempt} times; last: {problem}")
            log.warning("%s %s failed (%s); retrying in %.1fs", method, path, problem, min(wait, left))
            time.sleep(min(wait * (0.5 + random.random()), left))
            delay = min(delay * 2, MAX_BACKOFF)
