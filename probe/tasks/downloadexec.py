"""The ``downloadexec`` task type: download a program, verify it, and only then run it.

The file is streamed into a private temporary directory (mode 0700), its SHA-256 (and, when configured, its
detached Ed25519 signature) is checked while it is still not executable, and only a verified file is made
executable and run. Plain-HTTP downloads, and redirects to them, are refused unless explicitly allowed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import requests
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from probe.errors import TaskError
from probe.process import run_process
from probe.tasks._web import AbortableSession
from probe.tasks.command import exit_outcome
from probe.tasktype import Option, Outcome, TaskContext, TaskType, register

log = logging.getLogger(__name__)

BAD_SHA256 = "sha256 must be 64 hexadecimal characters (the file's SHA-256), got {value!r}"
SIGNATURE_WITHOUT_KEY = "signature needs public_key, the Ed25519 public key that verifies it"
KEY_WITHOUT_SIGNATURE = "public_key needs signature, the file's detached Ed25519 signature"
BAD_SIGNATURE = "signature must be a base64 Ed25519 signature (64 bytes)"
BAD_PUBLIC_KEY = "public_key must be a base64 Ed25519 public key (32 bytes)"
BAD_URL = "url must be an https:// URL with a host (http:// only with allow_insecure_http: true), got {url!r}"
INSECURE_URL = "refusing to download {url} over plain HTTP; use https:// or set allow_insecure_http: true"
REDIRECTED = "the server redirected to {url}: {problem}"
TOO_MANY_REDIRECTS = "more than {count} redirects while downloading {url}"
BAD_MAX_BYTES = "max_bytes must be at least 1, got {value}"
DOWNLOAD_STATUS = "download of {url} failed: the server answered {status}"
TOO_LARGE = "the download is larger than max_bytes ({limit} bytes); aborted"
SHA256_MISMATCH = "sha256 mismatch: expected {expected}, got {actual}"
SIGNATURE_FAILED = "signature verification failed: the file is not signed by the key in public_key"
TLS_HINT = "; trust its CA with ca_file"

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
MAX_REDIRECTS = 10
CHUNK = 64 * 1024
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@register
class DownloadExecTask(TaskType):
    """Download a file over HTTPS, verify its SHA-256 (and Ed25519 signature), then run it."""

    name = "downloadexec"
    summary = "download a program, verify its checksum and signature, then run it"
    options = {
        "url": Option("string", required=True, help="where to download the program (https://)"),
        "sha256": Option("string", required=True, help="the file's SHA-256, 64 hexadecimal characters"),
        "signature": Option("string", help="the file's detached Ed25519 signature, base64"),
        "public_key": Option("string", help="the Ed25519 public key that verifies signature, base64"),
        "args": Option("list", items="string", help="arguments for the program"),
        "timeout": Option("duration", help="time allowed for the download and the run together"),
        "cleanup": Option("boolean", default=True, help="remove the downloaded file when done"),
        "max_bytes": Option("integer", default=DEFAULT_MAX_BYTES, help="largest download accepted (bytes)"),
        "allow_insecure_http": Option("boolean", default=False, help="allow http:// URLs and redirects"),
        "ca_file": Option("string", help="a PEM file of CA certificates to trust besides the default ones"),
    }

    def check(self, config: Mapping[str, Any]) -> list[str]:
        """Check the checksum's form, that signature and public_key come together, and the URL's scheme."""
        problems = []
        sha256 = config.get("sha256")
        if sha256 is not None and not _HEX64.fullmatch(sha256.strip()):
            problems.append(BAD_SHA256.format(value=sha256))
        signature, key = config.get("signature"), config.get("public_key")
        if signature is not None and key is None:
            problems.append(SIGNATURE_WITHOUT_KEY)
        if key is not None and signature is None:
            problems.append(KEY_WITHOUT_SIGNATURE)
        if signature is not None and _base64(signature, 64) is None:
            problems.append(BAD_SIGNATURE)
        if key is not None and _base64(key, 32) is None:
            problems.append(BAD_PUBLIC_KEY)
        url = config.get("url")
        if url is not None:
            problem = _url_problem(url, bool(config.get("allow_insecure_http")))
            if problem:
                problems.append(problem)
        max_bytes = config.get("max_bytes")
        if max_bytes is not None and max_bytes < 1:
            problems.append(BAD_MAX_BYTES.format(value=max_bytes))
        return problems

    def run(self, config: dict[str, Any], ctx: TaskContext) -> Outcome:
        """Download into a private directory, verify, make executable, run, and clean up."""
        problems = self.check(config)  # the engine checked already; this guards direct callers too
        if problems:
            raise TaskError("; ".join(problems))
        url = config["url"]
        directory = Path(tempfile.mkdtemp(prefix="probe-download-"))  # mode 0700
        path = directory / _file_name(url)
        try:
            started = time.monotonic()
            digest = _download(url, path, config, ctx)
            metrics: dict[str, Any] = {
                "bytes": path.stat().st_size,
                "download_ms": int((time.monotonic() - started) * 1000),
            }
            problem = _verify(path, digest, config)
            if problem is not None:
                path.unlink()
                return Outcome(False, "", problem, metrics)
            path.chmod(0o700)
            ctx.log(f"downloaded and verified {metrics['bytes']} bytes from {url}; running {path.name}")
            result = run_process([str(path), *(config.get("args") or [])], ctx=ctx)
            outcome = exit_outcome(result.exit_code, result.output, result.stderr, [0], result.dropped)
            outcome.metrics.update(metrics)
            return outcome
        finally:
            if config.get("cleanup", True) or not path.exists():
                shutil.rmtree(directory, ignore_errors=True)
            else:
                ctx.log(f"kept the downloaded file: {path}")


def _download(url: str, path: Path, config: Mapping[str, Any], ctx: TaskContext) -> str:
    """Stream ``url`` into a new file at ``path`` (mode 0600); return its SHA-256 in hex."""
    limit = config.get("max_bytes", DEFAULT_MAX_BYTES)
    digest = hashlib.sha256()
    size = 0
    with AbortableSession(ctx, ca_file=config.get("ca_file")) as session:
        try:
            response = _open(session, url, bool(config.get("allow_insecure_http")))
            with response:
                if not 200 <= response.status_code <= 299:
                    raise TaskError(DOWNLOAD_STATUS.format(url=response.url, status=response.status_code))
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise TaskError(TOO_LARGE.format(limit=limit))
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
                with open(fd, "wb") as file:
                    for chunk in response.iter_content(CHUNK):
                        size += len(chunk)
                        if size > limit:
                            raise TaskError(TOO_LARGE.format(limit=limit))
                        digest.update(chunk)
                        file.write(chunk)
                        ctx.check()
        except OSError as exc:  # every requests error is an OSError
            path.unlink(missing_ok=True)
            raise session.failure(exc, url, tls_hint=TLS_HINT) from exc
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    ctx.check()  # a socket shut down by the abort can end the body early without an error
    return digest.hexdigest()


def _open(session: AbortableSession, url: str, insecure_ok: bool) -> requests.Response:
    """GET ``url``, following redirects by hand so that each hop's scheme is checked before it is used."""
    headers = {"Accept-Encoding": "identity"}  # the checksum is of the file's bytes as served
    for _ in range(MAX_REDIRECTS + 1):
        response = session.get(url, stream=True, allow_redirects=False, headers=headers)
        target = session.get_redirect_target(response)
        if target is None:
            return response
        response.close()
        url = urljoin(url, target)
        problem = _url_problem(url, insecure_ok)
        if problem:
            raise TaskError(REDIRECTED.format(url=url, problem=problem))
    raise TaskError(TOO_MANY_REDIRECTS.format(count=MAX_REDIRECTS, url=url))


def _verify(path: Path, digest: str, config: Mapping[str, Any]) -> str | None:
    """Return why the downloaded file must not run (checksum first, then signature), or None."""
    expected = config["sha256"].strip().lower()
    if digest != expected:
        return SHA256_MISMATCH.format(expected=expected, actual=digest)
    signature, key = config.get("signature"), config.get("public_key")
    if signature is None or key is None:
        return None
    key_bytes, signature_bytes = _base64(key, 32), _base64(signature, 64)
    if key_bytes is None or signature_bytes is None:  # check() refuses these before a run
        return SIGNATURE_FAILED
    try:
        VerifyKey(key_bytes).verify(path.read_bytes(), signature_bytes)
    except BadSignatureError:
        return SIGNATURE_FAILED
    return None


def _url_problem(url: str, insecure_ok: bool) -> str | None:
    """Return why ``url`` may not be downloaded from, or None."""
    try:
        parts = urlsplit(url)
    except ValueError:  # such as "Invalid IPv6 URL"
        return BAD_URL.format(url=url)
    scheme = parts.scheme.lower()
    if not parts.hostname or scheme not in ("http", "https"):
        return BAD_URL.format(url=url)
    if scheme == "http" and not insecure_ok:
        return INSECURE_URL.format(url=url)
    return None


def _base64(value: str, size: int) -> bytes | None:
    """Decode base64 text (whitespace allowed) of exactly ``size`` bytes; None when it is not that."""
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if len(data) == size else None


def _file_name(url: str) -> str:
    """Return a safe file name from the URL's last path segment, keeping its extension (.exe, .bat, .sh)."""
    name = _UNSAFE.sub("_", unquote(urlsplit(url).path.rsplit("/", 1)[-1])).lstrip(".-_")
    return name[-100:] or "download"
