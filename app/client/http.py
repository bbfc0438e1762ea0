"""A small REST client of the control plane: one session, its token, and the API's errors as exit codes."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from typing import Any

import requests

# The exit codes scripts can rely on (docs/CLI.md).
OK = 0
NOT_COMPLETED = 1  # the job ended in another state than completed (--wait, watch)
USAGE = 2  # the command line, a file or the configuration is wrong
REFUSED = 3  # the API refused the request (4xx): not found, forbidden, invalid workflow, bad token...
UNREACHABLE = 4  # no answer from the control plane, or a server error (5xx)
INTERRUPTED = 130  # Ctrl-C

NO_URL = "set CONTROL_PLANE_URL (or pass --url) to the control plane's address, such as https://automation.example.com"
BAD_URL = "the control plane's address must start with http:// or https://, not {url!r}"
NO_TOKEN = "set JWT_TOKEN (or pass --token): make one with 'automation token create --role operator ...'"  # noqa: S105
CANNOT_REACH = "cannot reach the control plane at {url}: {problem}"
NOT_THE_API = "{status} from {url} (not an answer of the automation API): {text}"

RATE_LIMIT_RETRIES = 3
MAX_RETRY_AFTER = 30.0


class ClientError(Exception):
    """Raised when a command cannot do what it was asked; it prints ``message`` and exits with ``exit_code``."""

    exit_code = NOT_COMPLETED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(ClientError):
    """Raised when the command line, a file it names or the configuration is wrong."""

    exit_code = USAGE


class Unreachable(ClientError):
    """Raised when the control plane does not answer (refused, timed out, TLS failure)."""

    exit_code = UNREACHABLE


class ApiError(ClientError):
    """Raised when the API answers with an error: a refusal (4xx, exit 3) or a server error (5xx, exit 4)."""

    def __init__(
        self, status: int, code: str, message: str, body: Mapping[str, Any] | None = None, *, foreign: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.body = dict(body or {})
        self.foreign = foreign  # not an answer of the API: the URL points at something else

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        """3 for a refusal, 4 for a server error or an answer that is not the API's (whatever its status)."""
        return REFUSED if 400 <= self.status < 500 and not self.foreign else UNREACHABLE


def describe(exc: requests.RequestException, timeout: float) -> str:
    """A short reason for a failed connection (``connection refused``) instead of urllib3's long repr."""
    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS failed: {exc}"
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    return found.group(1).strip().lower() if found else type(exc).__name__


def error_from(response: requests.Response) -> ApiError:
    """The API's JSON error (``{"error", "message"}``) of a failed response, or a description of the reply."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return ApiError(response.status_code, str(body.get("error") or "error"), body["message"], body)
    text = " ".join(response.text.split())[:200] or response.reason
    message = NOT_THE_API.format(status=response.status_code, url=response.url, text=text)
    return ApiError(response.status_code, "error", message, foreign=True)


def retry_after(response: requests.Response) -> float:
    """Seconds to wait before asking again after a 429 (its ``Retry-After``, capped)."""
    try:
        return min(max(float(response.headers.get("Retry-After") or 1), 0.1), MAX_RETRY_AFTER)
    except ValueError:
        return 1.0


class Client:
    """Calls ``<url>/api/v1`` with a bearer token."""

    def __init__(self, url: str, token: str, *, ca_file: str | None = None, timeout: float = 10.0) -> None:
        url = url.strip().rstrip("/")
        if not url:
            raise UsageError(NO_URL)
        if not url.startswith(("http://", "https://")):
            raise UsageError(BAD_URL.format(url=url))
        if not token.strip():
            raise UsageError(NO_TOKEN)
        self.url = url.removesuffix("/api/v1")
        self.api = self.url + "/api/v1"
        self.token = token.strip()
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token.strip()}"
        self.session.headers["User-Agent"] = "automation-cli"
        if ca_file:
            self.session.verify = ca_file

    @classmethod
    def from_environment(
        cls, url: str | None = None, token: str | None = None, env: Mapping[str, str] = os.environ
    ) -> Client:
        """A client for ``--url``/``--token``, else ``CONTROL_PLANE_URL``/``JWT_TOKEN``; ``CONTROL_PLANE_CA_FILE``."""
        return cls(
            url or env.get("CONTROL_PLANE_URL", ""),
            token or env.get("JWT_TOKEN", ""),
            ca_file=env.get("CONTROL_PLANE_CA_FILE") or None,
        )

    def send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        timeout: float | tuple[float, float] | None = None,
    ) -> requests.Response:
        """Send one request and return its successful response; a 429 is waited out a few times.

        Raises:
            Unreachable: no answer.
            ApiError: an error status (after the rate-limit retries).
        """
        wait = timeout if timeout is not None else self.timeout
        retries = 0
        while True:
            try:
                response = self.session.request(
                    method,
                    self.api + path,
                    params=params,
                    json=body,
                    headers=headers,
                    stream=stream,
                    timeout=wait,
                )
            except requests.RequestException as exc:
                seconds = wait[-1] if isinstance(wait, tuple) else wait
                raise Unreachable(CANNOT_REACH.format(url=self.url, problem=describe(exc, seconds))) from None
            if response.status_code == 429 and retries < RATE_LIMIT_RETRIES:
                retries += 1
                response.close()
                time.sleep(retry_after(response))
                continue
            if response.status_code >= 400:
                error = error_from(response)
                response.close()
                raise error
            return response

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request and return its JSON body (None for an empty one, such as a 204)."""
        response = self.send(method, path, **kwargs)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise error_from(response) from None
