"""Ed25519 job envelopes: the control plane signs every job message; agents verify it (workers/envelope.py)."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from nacl.encoding import Base64Encoder
from nacl.exceptions import CryptoError
from nacl.signing import SigningKey

from dispatch.contract import ENVELOPE_VERSION, canonical_json

DEFAULT_ENVELOPE_TTL = 24 * 3600
BAD_KEY = "JOB_SIGNING_KEY must be a base64 Ed25519 private key (32 bytes), as `automation keys generate` prints"


class SigningError(Exception):
    """Raised when the signing key is missing or malformed."""


def key_id(verify_key_bytes: bytes) -> str:
    """A short, stable name for a public key (the first 8 bytes of its SHA-256, hex)."""
    return hashlib.sha256(verify_key_bytes).hexdigest()[:16]


def load_signing_key(text: str | None) -> SigningKey:
    """Return the signing key encoded in ``text`` (base64 of the 32-byte seed)."""
    if not text:
        raise SigningError(BAD_KEY)
    try:
        seed = base64.b64decode(text.strip(), validate=True)
        return SigningKey(seed)
    except (ValueError, CryptoError, TypeError):
        raise SigningError(BAD_KEY) from None


def public_key(key: SigningKey) -> str:
    """The base64 public key (JOB_VERIFY_KEY) of a signing key."""
    return key.verify_key.encode(encoder=Base64Encoder).decode("ascii")


def generate_keypair() -> tuple[str, str]:
    """Return a new (private, public) key pair, each base64: for JOB_SIGNING_KEY and JOB_VERIFY_KEY."""
    key = SigningKey.generate()
    return base64.b64encode(bytes(key)).decode("ascii"), public_key(key)


@dataclass(frozen=True)
class Signer:
    """Signs job envelopes with the control plane's key."""

    key: SigningKey
    ttl: int = DEFAULT_ENVELOPE_TTL

    def sign(
        self,
        *,
        audience: str,
        tenant: str,
        project: str,
        job_id: str,
        attempt: int,
        name: str,
        workflow: str,
        variables: dict[str, Any],
        expires_at: float | None = None,
        now: float | None = None,
    ) -> dict[str, str]:
        """Return the message kwargs for one attempt: the envelope and its detached signature, both base64."""
        issued = int(now if now is not None else time.time())
        expiry = int(expires_at) if expires_at is not None else issued + self.ttl
        payload = {
            "v": ENVELOPE_VERSION,
            "aud": audience,
            "tenant": tenant,
            "project": project,
            "job_id": job_id,
            "attempt": attempt,
            "iat": issued,
            "exp": max(expiry, issued + 1),
            "nonce": secrets.token_hex(16),
            "name": name,
            "workflow": workflow,
            "variables": variables,
        }
        body = canonical_json(payload)
        signature = self.key.sign(body).signature
        return {
            "envelope": base64.b64encode(body).decode("ascii"),
            "signature": base64.b64encode(signature).decode("ascii"),
            "kid": key_id(bytes(self.key.verify_key)),
        }
