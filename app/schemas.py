"""Pydantic building blocks shared by the request and response models of every resource."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    model_validator,
)
from pydantic_core import PydanticCustomError

from app.columns import SLUG_PATTERN

Slug = Annotated[str, StringConstraints(pattern=SLUG_PATTERN, max_length=63)]
Platform = Annotated[str, StringConstraints(pattern=r"^(linux|windows|darwin)$")]
# The largest count, attempt, position or line number a request may give: any database's INTEGER holds it.
BIGGEST = 2**31 - 1


def _storable(moment: datetime) -> datetime:
    """An aware time that has a UTC form (times are stored and compared in UTC): not 0001-01-01 at +14:00."""
    try:
        moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("the time is out of range once converted to UTC") from None
    return moment


NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")  # what pydantic would read as a Unix time


def _written_time(value: Any) -> Any:
    """Refuse a number, or a string of digits, where a time is due: pydantic reads them as Unix times
    ("scheduled_at": "0" was 1970, "since=2020" 33 minutes past it), which the API does not document."""
    if isinstance(value, int | float) or (isinstance(value, str) and NUMBER.fullmatch(value)):
        raise PydanticCustomError("iso_time", "give a time in ISO 8601 with its zone, such as 2026-12-08T09:00:00Z")
    return value


# An aware time of a request, written in ISO 8601, storable in UTC.
# Lax, as a str reaches the datetime's own parser after a "before" validator only in lax mode (models are strict).
Moment = Annotated[AwareDatetime, Strict(False), BeforeValidator(_written_time), AfterValidator(_storable)]

JSON_DEPTH = 31  # levels of objects and arrays a JSON column takes on MariaDB, the document's own included


def _storable_json(document: dict[str, Any]) -> dict[str, Any]:
    """A JSON object every database stores as it is: finite numbers (SQLite turns NaN into null, MariaDB refuses
    it) and no deeper than MariaDB takes."""
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise PydanticCustomError("finite_number", "numbers must be finite, not NaN or Infinity")
        if isinstance(value, dict | list):
            if depth > JSON_DEPTH:
                raise PydanticCustomError("too_deep", "nested deeper than {depth} levels", {"depth": JSON_DEPTH})
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return document


JsonObject = Annotated[dict[str, Any], AfterValidator(_storable_json)]  # stored in a JSON column


class Request(BaseModel):
    """A request body: strict types (no "5" for 5), unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Change(Request):
    """A ``PUT`` body: only the fields given change, and ``null`` is refused but where it means something."""

    NULLABLE: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _refuse_nulls(self) -> Self:
        nulls = sorted(key for key in self.model_fields_set if getattr(self, key) is None and key not in self.NULLABLE)
        if nulls:
            raise PydanticCustomError("not_null", "{fields}: may not be null", {"fields": ", ".join(nulls)})
        return self


class Query(BaseModel):
    """A query string: values converted from text, unknown parameters refused."""

    model_config = ConfigDict(extra="forbid")


class Page(Query):
    """Paging parameters of every list."""

    limit: int = Field(50, ge=1, le=500)
    offset: int = Field(0, ge=0, le=BIGGEST)


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
