"""Pydantic building blocks shared by the request and response models of every resource."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.columns import SLUG_PATTERN

Slug = Annotated[str, StringConstraints(pattern=SLUG_PATTERN, max_length=63)]
Platform = Annotated[str, StringConstraints(pattern=r"^(linux|windows|darwin)$")]


class Request(BaseModel):
    """A request body: strict types (no "5" for 5), unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Query(BaseModel):
    """A query string: values converted from text, unknown parameters refused."""

    model_config = ConfigDict(extra="forbid")


class Page(Query):
    """Paging parameters of every list."""

    limit: int = Field(50, ge=1, le=500)
    offset: int = Field(0, ge=0)


class Response(BaseModel):
    """A response body."""


class ErrorBody(Response):
    """The one error shape: a stable code and a message; some errors add details."""

    error: str
    message: str
    line: int | None = None
    problems: list[dict[str, Any]] | None = None
    details: list[dict[str, str]] | None = None
    state: str | None = None
