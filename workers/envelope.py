"""Verify a job envelope before anything runs: signature, expiry, audience, tenant, project, replay."""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import VerifyKey

from dispatch.contract import ENVELOPE_FIELDS, ENVELOPE_VERSION, agent_queue, shared_queue

CLOCK_SKEW = 60  # seconds an envelope's issue time may lie in the future


class EnvelopeRefused(Exception):
    """Raised when a job message must not run; ``reason`` is a short code, the message says why."""

    def __init__(self, reason: str, message: str, claims: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.claims = claims or {}


@dataclass(frozen=True)
class Envelope:
    """A verified job envelope."""

    audience: str
    tenant: str
    project: str
    job_id: str
    attempt: int
    issued_at: int
    expires_at: int
    nonce: str
    name: str
    workflow: str
    variables: dict[str, Any]


class Verifier:
    """Checks envelopes against the pinned public key and the identity of this agent."""

    def __init__(self, verify_key: str, *, tenant: str, project: str, agent_id: str, platform: str) -> None:
        try:
            self.key = VerifyKey(base64.b64decode(verify_key, validate=True))
        except (ValueError, CryptoError, binascii.Error) as exc:
            raise ValueError("JOB_VERIFY_KEY must be a base64 Ed25519 public key (32 bytes)") from exc
        self.tenant, self.project = tenant, project
        self.audiences = {agent_id, agent_queue(tenant, agent_id), shared_queue(tenant, project, platform)}
        self._seen: dict[str, float] = {}  # nonce -> expiry of the envelopes this agent has taken
        self._expiring: list[tuple[float, str]] = []  # the same as a heap, soonest expiry first
        self._lock = threading.Lock()

    def verify(self, kwargs: dict[str, Any], now: float | None = None, *, take: bool = True) -> Envelope:
        """Return the envelope in a message's kwargs, or raise EnvelopeRefused saying why.

        With ``take`` false, only prove the message genuine: an envelope already taken is not refused as a replay,
        nor remembered (what the agent knows of a message it refuses anyway).
        """
        now = time.time() if now is None else now
        try:
            body = base64.b64decode(kwargs["envelope"], validate=True)
            signature = base64.b64decode(kwargs["signature"], validate=True)
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise EnvelopeRefused("unsigned", "the message has no signed envelope") from None
        try:
            self.key.verify(body, signature)
        except (BadSignatureError, CryptoError, ValueError):
            raise EnvelopeRefused(
                "bad_signature", "the envelope's signature does not verify with JOB_VERIFY_KEY"
            ) from None
        try:
            claims = json.loads(body)
        except ValueError:
            raise EnvelopeRefused("malformed", "the signed envelope is not JSON") from None
        if not isinstance(claims, dict) or claims.get("v") != ENVELOPE_VERSION or set(claims) != set(ENVELOPE_FIELDS):
            raise EnvelopeRefused("malformed", "the envelope has the wrong version or fields", claims)
        if claims["exp"] <= now:
            raise EnvelopeRefused("expired", f"the envelope expired {int(now - claims['exp'])} s ago", claims)
        if claims["iat"] > now + CLOCK_SKEW:
            raise EnvelopeRefused("not_yet_valid", "the envelope was issued in the future", claims)
        if claims["tenant"] != self.tenant or claims["project"] != self.project:
            raise EnvelopeRefused(
                "wrong_audience",
                f"the envelope is for {claims['tenant']}/{claims['project']}, not this agent's "
                f"{self.tenant}/{self.project}",
                claims,
            )
        if claims["aud"] not in self.audiences:
            raise EnvelopeRefused("wrong_audience", f"the envelope is addressed to {claims['aud']!r}", claims)
        if take:
            self._take(claims, now)
        return Envelope(
            audience=claims["aud"],
            tenant=claims["tenant"],
            project=claims["project"],
            job_id=claims["job_id"],
            attempt=int(claims["attempt"]),
            issued_at=int(claims["iat"]),
            expires_at=int(claims["exp"]),
            nonce=claims["nonce"],
            name=claims["name"],
            workflow=claims["workflow"],
            variables=dict(claims["variables"] or {}),
        )

    def forget(self, nonce: str) -> None:
        """Take an envelope's nonce back: its message goes back to the queue unrun (the agent stops), and whichever
        agent takes it next, this one included, must not refuse it as replayed."""
        with self._lock:
            self._seen.pop(nonce, None)

    def _take(self, claims: dict[str, Any], now: float) -> None:
        """Remember the envelope's nonce until it expires; EnvelopeRefused ``replayed`` if it was taken already."""
        with self._lock:
            self._forget_expired(now)
            if claims["nonce"] in self._seen:
                raise EnvelopeRefused("replayed", "this envelope was already delivered to this agent", claims)
            expires = float(claims["exp"])
            self._seen[claims["nonce"]] = expires
            heapq.heappush(self._expiring, (expires, claims["nonce"]))

    def _forget_expired(self, now: float) -> None:
        """Drop the nonces of envelopes expired by ``now`` (an expired envelope is refused anyway): the work is
        proportional to what expired, not to how many nonces are kept."""
        while self._expiring and self._expiring[0][0] <= now:
            _, nonce = heapq.heappop(self._expiring)
            self._seen.pop(nonce, None)
