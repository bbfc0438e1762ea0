"""Issue and verify the platform's JWTs (HS256, signed with JWT_SECRET)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt

from app.errors import Unauthorized

ALGORITHM = "HS256"
ROLES = ("admin", "tenant_admin", "operator", "viewer", "agent")
REQUIRED_CLAIMS = ("sub", "tenant_id", "role", "exp", "iat")

INVALID_TOKEN = "the token is invalid: {reason}"  # noqa: S105 - a message, not a secret


class TokenError(Unauthorized):
    """Raised when a token cannot be issued or accepted; the message says why (never echoing the token)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the verified claims of its token."""

    subject: str
    tenant_id: str
    role: str
    project_id: str | None = None
    agent_id: str | None = None

    @property
    def is_admin(self) -> bool:
        """Tell whether this is a platform administrator."""
        return self.role == "admin"


def issue_token(
    secret: str,
    *,
    tenant_id: str,
    role: str,
    subject: str | None = None,
    project_id: str | None = None,
    agent_id: str | None = None,
    ttl: int = 86400,
    now: float | None = None,
) -> str:
    """Return a signed token with the design document's claims plus ``role`` (and ``agent_id`` for agents)."""
    if role not in ROLES:
        raise TokenError(f"unknown role '{role}': choose one of {', '.join(ROLES)}")
    if role == "agent" and not agent_id:
        raise TokenError("an agent token needs an agent id")
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "sub": subject or (f"agent:{agent_id}" if role == "agent" else f"{role}@{tenant_id}"),
        "tenant_id": tenant_id,
        "project_id": project_id,
        "role": role,
        "iat": issued,
        "exp": issued + ttl,
        "jti": uuid.uuid4().hex,
    }
    if agent_id:
        claims["agent_id"] = agent_id
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


# Tokens that verified, until they expire: an agent or a pipeline sends the same token with every request,
# and checking its HMAC and claims again costs more than the rest of a small request's authentication.
_verified: dict[tuple[str, str], tuple[Principal, float]] = {}
VERIFIED_CACHE_SIZE = 4096


def verify_token(secret: str, token: str) -> Principal:
    """Return the principal of a valid token, or raise TokenError (expired, tampered, claim-less, ...)."""
    known = _verified.get((secret, token))
    if known is not None and time.time() < known[1]:
        return known[0]
    principal, expires = _verify(secret, token)
    if len(_verified) >= VERIFIED_CACHE_SIZE:
        _verified.clear()
    _verified[(secret, token)] = (principal, expires)
    return principal


def _verify(secret: str, token: str) -> tuple[Principal, float]:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],  # one algorithm only: "none" and RS/HS confusion are refused
            options={"require": list(REQUIRED_CLAIMS)},
        )
    except jwt.ExpiredSignatureError:
        raise TokenError(INVALID_TOKEN.format(reason="it has expired")) from None
    except jwt.InvalidSignatureError:
        raise TokenError(INVALID_TOKEN.format(reason="its signature does not verify")) from None
    except jwt.MissingRequiredClaimError as exc:
        raise TokenError(INVALID_TOKEN.format(reason=f"claim '{exc.claim}' is missing")) from None
    except jwt.InvalidTokenError as exc:
        raise TokenError(INVALID_TOKEN.format(reason=str(exc) or type(exc).__name__)) from None
    return _principal(claims), float(claims["exp"])


def _principal(claims: dict[str, Any]) -> Principal:
    def text(name: str, *, required: bool) -> str | None:
        value = claims.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise TokenError(INVALID_TOKEN.format(reason=f"claim '{name}' must be a non-empty string"))
        return value

    role = text("role", required=True)
    if role not in ROLES:
        raise TokenError(INVALID_TOKEN.format(reason=f"role '{role}' is unknown"))
    agent_id = text("agent_id", required=role == "agent")
    return Principal(
        subject=str(text("sub", required=True)),
        tenant_id=str(text("tenant_id", required=True)),
        role=role,
        project_id=text("project_id", required=False),
        agent_id=agent_id if role == "agent" else None,
    )
