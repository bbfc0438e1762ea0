"""Project secrets: set, list and delete them (admins of the project's tenant), and open the ones a claimed job's
workflow names, for the agent that claimed it.

A value is sealed with XChaCha20-Poly1305 (libsodium, through PyNaCl) under ``SECRETS_KEY``, with its tenant,
project and name as associated data: a sealed value copied into another row, project or tenant does not open.
"""

from __future__ import annotations

import base64
import binascii
import logging

from flask import current_app
from nacl import bindings
from nacl.exceptions import CryptoError
from nacl.utils import random as random_bytes
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError

from app.audit import service as audit
from app.auth.tokens import Principal
from app.columns import utcnow
from app.config import ConfigError, secrets_key
from app.errors import NOT_FOUND, Conflict, NotFound, ServiceUnavailable
from app.extensions import db
from app.secretstore.models import ProjectSecret
from app.tenants.service import get_project
from probe.templates import secret_names

log = logging.getLogger(__name__)

NONCE_BYTES = bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
UNOPENED = (CryptoError, ValueError, binascii.Error)  # a sealed value that does not open with the key tried
NO_KEY = "project secrets need SECRETS_KEY (automation keys secrets-key makes one): the instance folder's key: {reason}"
CHANGED_MEANWHILE = "secret '{name}' was set or deleted by another request at the same time; set it again"


def _key() -> bytes:
    """The key of ``SECRETS_KEY``, or of the instance folder's key file (made on first use)."""
    try:
        text = secrets_key(current_app.config["SECRETS_KEY"], current_app.instance_path)
    except OSError as exc:  # a read-only instance folder: the hardened units'
        raise ServiceUnavailable(NO_KEY.format(reason=exc), code="secrets_not_configured") from None
    return base64.b64decode(text)


def _bound_to(secret: ProjectSecret) -> bytes:
    return "\0".join((secret.tenant_id, secret.project_id, secret.name)).encode()


def _seal(key: bytes, secret: ProjectSecret, value: str) -> str:
    nonce = random_bytes(NONCE_BYTES)
    sealed = bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(value.encode(), _bound_to(secret), nonce, key)
    return base64.b64encode(nonce + sealed).decode()


def _open(key: bytes, secret: ProjectSecret) -> str:
    raw = base64.b64decode(secret.sealed)
    nonce, sealed = raw[:NONCE_BYTES], raw[NONCE_BYTES:]
    return bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, _bound_to(secret), nonce, key).decode()


def set_secret(
    *, caller: Principal, tenant_id: str, project_id: str, name: str, value: str
) -> tuple[ProjectSecret, bool]:
    """Create or replace a project's secret; returns it and whether it is new."""
    get_project(caller=caller, tenant_id=tenant_id, project_id=project_id)  # 404 outside what the caller sees
    key = _key()
    now = utcnow()
    secret = db.session.get(ProjectSecret, (tenant_id, project_id, name))
    created = secret is None
    if secret is None:
        secret = ProjectSecret(tenant_id=tenant_id, project_id=project_id, name=name, created_at=now)
        db.session.add(secret)
    secret.sealed = _seal(key, secret, value)
    secret.updated_at, secret.updated_by = now, caller.subject
    audit.record(
        action="secret.set",
        principal=caller,
        tenant_id=tenant_id,
        target_type="secret",
        target_id=f"{project_id}/{name}",
        details={"project_id": project_id, "name": name, "created": created},  # never the value
    )
    try:
        db.session.commit()
    except (IntegrityError, StaleDataError):  # created, or deleted, by a concurrent request
        db.session.rollback()
        raise Conflict(CHANGED_MEANWHILE.format(name=name), code="concurrent_update") from None
    return secret, created


def list_secrets(*, caller: Principal, tenant_id: str, project_id: str) -> list[ProjectSecret]:
    """A project's secrets (names and history), by name."""
    get_project(caller=caller, tenant_id=tenant_id, project_id=project_id)
    query = select(ProjectSecret).where(ProjectSecret.tenant_id == tenant_id, ProjectSecret.project_id == project_id)
    return list(db.session.scalars(query.order_by(ProjectSecret.name)))


def delete_secret(*, caller: Principal, tenant_id: str, project_id: str, name: str) -> None:
    """Delete a project's secret; 404 if it has none of that name."""
    get_project(caller=caller, tenant_id=tenant_id, project_id=project_id)
    secret = db.session.get(ProjectSecret, (tenant_id, project_id, name))
    if secret is None:
        raise NotFound(NOT_FOUND.format(kind="secret", id=name))
    db.session.delete(secret)
    audit.record(
        action="secret.deleted",
        principal=caller,
        tenant_id=tenant_id,
        target_type="secret",
        target_id=f"{project_id}/{name}",
        details={"project_id": project_id, "name": name},
    )
    db.session.commit()


def reseal(old_key: str) -> tuple[int, int, list[str]]:
    """Seal again under today's key every secret that opens with ``old_key`` (base64), in one transaction, after a
    change of ``SECRETS_KEY``; returns how many were resealed, how many already opened with today's key, and the
    ``tenant/project/name`` of those that open with neither (left as they are). Raises ConfigError for a malformed
    ``old_key``."""
    old = base64.b64decode(secrets_key(old_key, current_app.instance_path))
    key = _key()
    resealed, current, neither = 0, 0, []
    for secret in db.session.scalars(select(ProjectSecret).order_by(ProjectSecret.tenant_id, ProjectSecret.project_id)):
        try:
            _open(key, secret)
            current += 1
            continue
        except UNOPENED:
            pass
        try:
            value = _open(old, secret)
        except UNOPENED:
            neither.append(f"{secret.tenant_id}/{secret.project_id}/{secret.name}")
            continue
        secret.sealed = _seal(key, secret, value)
        resealed += 1
    audit.record(
        action="secret.resealed",
        principal=None,
        target_type="secret",
        details={"resealed": resealed, "current": current, "unopened": neither},
    )
    db.session.commit()
    return resealed, current, neither


def named(workflow: str) -> set[str]:
    """The names of the secrets ``workflow``'s placeholders use, as probe reads them (a substring test first: most
    workflows name none)."""
    return secret_names(workflow) if ".secrets." in workflow else set()


def missing(tenant_id: str, project_id: str, workflow: str) -> list[str]:
    """The secrets ``workflow`` names that the project does not have, sorted; [] when it names none."""
    names = named(workflow)
    if not names:
        return []
    query = select(ProjectSecret.name).where(
        ProjectSecret.tenant_id == tenant_id, ProjectSecret.project_id == project_id, ProjectSecret.name.in_(names)
    )
    return sorted(names - set(db.session.scalars(query)))


def for_workflow(tenant_id: str, project_id: str, workflow: str) -> dict[str, str]:
    """The values of the project's secrets that ``workflow`` names, for the claim's answer.

    A name without a secret is left out (the agent then fails the job: the secret 'NAME' was not given), and so is
    a value that does not open with today's key, or at all without a key, which is logged: asking again would not
    open it, so the claim goes on. Read in the claim's transaction, before its commit: a database error here rolls the
    claim back. Costs a job that names no secret a substring test.
    """
    names = named(workflow)
    if not names:
        return {}
    query = select(ProjectSecret).where(
        ProjectSecret.tenant_id == tenant_id, ProjectSecret.project_id == project_id, ProjectSecret.name.in_(names)
    )
    found = list(db.session.scalars(query))
    if not found:
        return {}
    try:
        key = _key()
    except (ServiceUnavailable, ConfigError) as exc:  # not passing: the claim goes on, the job fails on the agent
        log.error("the secrets of project %s/%s cannot be opened: %s", tenant_id, project_id, exc.message)
        return {}
    values = {}
    for secret in found:
        try:
            values[secret.name] = _open(key, secret)
        except UNOPENED:
            log.error(
                "secret %s of project %s/%s does not open with SECRETS_KEY (was the key changed?); set it again",
                secret.name,
                tenant_id,
                project_id,
            )
    return values
