"""Issue and verify the platform's JWTs (HS256, signed with JWT_SECRET)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt

from app.columns import ID_RULE, is_id
from app.errors import Unauthorized

ALGORITHM = "HS256"
ROLES = ("admin", "tenant_admin", "operator", "viewer", "agent")
REQUIRED_CLAIMS = ("sub", "tenant_id", "role", "exp", "iat")

INVALID_TOKEN = "the token is invalid: {reason}"  # noqa: S105 - a message, not a secret
CANNOT_ISSUE = "cannot issue the token: {reason}"
NOT_TEXT = "claim {name} is not valid UTF-8 text (it holds a lone surrogate)"  # name: ascii(), quoted
TOO_LONG = "claim '{name}' is longer than {most} characters"
# The longest value of each claim: the width of the columns that store it (tenants', projects' and agents' ids;
# an audit entry's actor, a job's created_by; an audit entry's role), so that a token never names what the
# database cannot write (MariaDB refuses a longer value, and the request that writes it fails).
LONGEST = {"sub": 255, "tenant_id": 64, "project_id": 64, "agent_id": 64, "role": 32}
# Tenants', projects' and agents' ids are written only as slugs (lower case, no spaces). A claim naming one must be
# one too: MariaDB's default collation compares text without case or trailing spaces, so a token for "ACME" or
# "acme " would otherwise read and write tenant acme's rows.
IDS = ("tenant_id", "project_id", "agent_id")
NOT_AN_ID = "claim '{name}' is not an id: " + ID_RULE + " characters"


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
        "tenant_id": tenant_id,
        "project_id": project_id,
        "role": role,
        "iat": issued,
        "exp": issued + ttl,
        "jti": uuid.uuid4().hex,
    }
    if agent_id:
        claims["agent_id"] = agent_id
    # after the ids: by default it repeats one, and a refusal should name the id the caller gave
    claims["sub"] = subject or (f"agent:{agent_id}" if role == "agent" else f"{role}@{tenant_id}")
    _principal(claims, message=CANNOT_ISSUE)  # a token that verification would refuse is never issued
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
    return _principal(claims), _expiry(claims)


def _expiry(claims: dict[str, Any]) -> float:
    """Return the expiry as a time, refusing one too large for a float (PyJWT accepts any integer)."""
    try:
        return float(claims["exp"])
    except (OverflowError, ValueError):
        raise TokenError(INVALID_TOKEN.format(reason="claim 'exp' is not a time")) from None


def _is_text(value: str) -> bool:
    """Tell whether a string is valid Unicode, which UTF-8 can encode.

    JSON's ``"\\ud800"`` escape decodes to a lone surrogate, which it cannot: no database column stores it and
    the audit chain could not hash it, so a claim holding one is refused before it goes anywhere.
    """
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _text(claims: dict[str, Any], name: str, *, required: bool, message: str) -> str | None:
    """Return a string claim short enough for the columns that store it, None if it is absent and optional."""
    value = claims.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise TokenError(message.format(reason=f"claim '{name}' must be a non-empty string"))
    if len(value) > LONGEST[name]:
        raise TokenError(message.format(reason=TOO_LONG.format(name=name, most=LONGEST[name])))
    if name in IDS and not is_id(value):
        raise TokenError(message.format(reason=NOT_AN_ID.format(name=name)))
    return value


def _all_text(claims: dict[str, Any], message: str) -> None:
    """Refuse a claim whose name or string value is not valid Unicode, naming it with ``ascii()``: the
    refusal is audited, and must not carry the surrogate into the audit log itself."""
    for name, value in claims.items():
        if not _is_text(name) or (isinstance(value, str) and not _is_text(value)):
            raise TokenError(message.format(reason=NOT_TEXT.format(name=ascii(name))))


def _principal(claims: dict[str, Any], *, message: str = INVALID_TOKEN) -> Principal:
    """Return the principal that ``claims`` name, or raise TokenError with ``message`` saying why not."""
    _all_text(claims, message)
    role = _text(claims, "role", required=True, message=message)
    if role not in ROLES:
        raise TokenError(message.format(reason=f"role '{role}' is unknown"))
    agent_id = _text(claims, "agent_id", required=role == "agent", message=message)
    return Principal(
        subject=str(_text(claims, "sub", required=True, message=message)),
        tenant_id=str(_text(claims, "tenant_id", required=True, message=message)),
        role=role,
        project_id=_text(claims, "project_id", required=False, message=message),
        agent_id=agent_id if role == "agent" else None,
    )
