"""Request and response models of project secrets: values go in, never out."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, Field

from app.schemas import Request, Response

MAX_SECRET_BYTES = 65536


def _bounded(value: str) -> str:
    if len(value.encode()) > MAX_SECRET_BYTES:
        raise ValueError(f"a secret's value is at most {MAX_SECRET_BYTES} bytes of UTF-8")
    return value


class SecretSet(Request):
    """``PUT .../secrets/{name}``: the value (up to 64 KiB of UTF-8)."""

    value: Annotated[str, Field(min_length=1), AfterValidator(_bounded)]


class SecretOut(Response):
    """A secret as the API shows it: its name and history, never its value."""

    tenant_id: str
    project_id: str
    name: str
    created_at: datetime
    updated_at: datetime
    updated_by: str


class SecretList(Response):
    """A project's secrets, by name."""

    secrets: list[SecretOut]
