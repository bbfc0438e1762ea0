"""Request and response models of project secrets: values go in, never out."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field, StringConstraints

from app.schemas import Request, Response

MAX_SECRET_BYTES = 65536
SecretName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,128}$")]


class SecretSet(Request):
    """``PUT .../secrets/{name}``: the value (up to 64 KiB)."""

    value: str = Field(min_length=1, max_length=MAX_SECRET_BYTES)


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
