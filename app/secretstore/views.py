"""The project secrets blueprint: ``/api/v1/tenants/{tenant_id}/projects/{project_id}/secrets``."""

from __future__ import annotations

import re

from flask import Blueprint, Response

from app.api import ERR_READ, ERR_WRITE, body, document, reply
from app.auth.guard import principal, require
from app.errors import BadRequest
from app.secretstore import service
from app.secretstore.models import ProjectSecret
from app.secretstore.schemas import SecretList, SecretOut, SecretSet

bp = Blueprint("secrets", __name__, url_prefix="/api/v1/tenants/<tenant_id>/projects/<project_id>/secrets")

ADMINS = ("admin", "tenant_admin")
NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
BAD_NAME = "a secret's name is 1 to 128 letters, digits, '_' or '-', as {{{{.secrets.NAME}}}} names it; got {name!r}"


def secret_out(secret: ProjectSecret) -> SecretOut:
    """The response model of a secret: everything but its value."""
    return SecretOut(
        tenant_id=secret.tenant_id,
        project_id=secret.project_id,
        name=secret.name,
        created_at=secret.created_at,
        updated_at=secret.updated_at,
        updated_by=secret.updated_by,
    )


def _name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise BadRequest(BAD_NAME.format(name=name[:140]))
    return name


@bp.get("")
@document("List a project's secrets (names, never values)", responses={200: SecretList}, errors=ERR_READ)
@require(*ADMINS, action="list secrets")
def list_secrets(tenant_id: str, project_id: str) -> Response:
    """List secrets."""
    secrets = service.list_secrets(caller=principal(), tenant_id=tenant_id, project_id=project_id)
    return reply(SecretList(secrets=[secret_out(s) for s in secrets]))


@bp.put("/<name>")
@document(
    "Set a project's secret (workflows name it as {{.secrets.NAME}}; only the claiming agent receives its value)",
    body=SecretSet,
    responses={201: SecretOut, 200: SecretOut},
    errors={**ERR_WRITE, 409: ("concurrent_update",)},
)
@require(*ADMINS, action="set secrets")
def set_secret(tenant_id: str, project_id: str, name: str) -> Response:
    """Set a secret."""
    data = body(SecretSet)
    secret, created = service.set_secret(
        caller=principal(), tenant_id=tenant_id, project_id=project_id, name=_name(name), value=data.value
    )
    return reply(secret_out(secret), 201 if created else 200)


@bp.delete("/<name>")
@document("Delete a project's secret", responses={204: None}, errors=ERR_READ)
@require(*ADMINS, action="delete secrets")
def delete_secret(tenant_id: str, project_id: str, name: str) -> Response:
    """Delete a secret."""
    service.delete_secret(caller=principal(), tenant_id=tenant_id, project_id=project_id, name=_name(name))
    return Response(status=204)
