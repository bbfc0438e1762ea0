"""Request parsing (JSON only, validated by pydantic models) and the per-view OpenAPI description."""

from __future__ import annotations

import re
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from flask import Response, current_app, request
from pydantic import BaseModel, ValidationError

from app.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

# The roles that read and that operate, and the error codes every endpoint documents, shared by the blueprints.
READERS = ("admin", "tenant_admin", "operator", "viewer")
WRITERS = ("admin", "tenant_admin", "operator")
ERR_READ: dict[int, tuple[str, ...]] = {
    401: ("missing_token", "invalid_token"),
    403: ("access_denied",),
    404: ("not_found",),
}
ERR_WRITE: dict[int, tuple[str, ...]] = {
    **ERR_READ,
    400: ("invalid_request", "malformed_json"),
    413: ("payload_too_large",),
    415: ("unsupported_media_type",),
}

M = TypeVar("M", bound=BaseModel)
F = TypeVar("F", bound=Callable[..., Any])

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
NOT_JSON = "the request body must be JSON: send 'Content-Type: application/json'"
BODY_REQUIRED = "this endpoint needs a JSON object as its body"
MALFORMED_JSON = "the body is not valid JSON: {detail}"
REPEATED = "invalid query: {names}: given more than once"
NO_QUERY = "invalid query: {names}: this endpoint takes no query parameters"
# A query's numbers and switches as a JSON body would give them: pydantic alone reads "5.0", "+5", "05" and "5_000"
# as 5, and "yes", "on" or "1" as true.
WHOLE = re.compile(r"-?(0|[1-9][0-9]*)")
NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
SWITCH = ("true", "false")
NOT_WHOLE = "expected a whole number as JSON writes it (5, not 5.0, +5, 05 or 5_000)"
NOT_NUMBER = "expected a number as JSON writes it (2.5, not +2.5, .5 or 2_5)"
NOT_SWITCH = "expected true or false"
BODY_TOO_LARGE = "the body is larger than the {limit} bytes accepted"


def has_body() -> bool:
    """Tell whether the request carries a body."""
    return bool(request.content_length) or "chunked" in request.headers.get("Transfer-Encoding", "").lower()


def refuse_non_json() -> None:
    """Refuse (415) a body that is not declared as JSON; registered before every API request."""
    if request.method in BODY_METHODS and has_body() and request.mimetype != "application/json":
        raise UnsupportedMediaType(NOT_JSON)


def describe_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Return pydantic's errors as ``[{"field": "a.b", "message": ...}]``."""
    return [
        {"field": ".".join(str(part) for part in error["loc"]) or "(body)", "message": error["msg"]}
        for error in exc.errors(include_url=False, include_input=False)
    ]


def _refuse(exc: ValidationError, where: str) -> BadRequest:
    errors = exc.errors(include_url=False, include_input=False)
    if errors and errors[0]["type"] == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error", "invalid JSON")
        return BadRequest(MALFORMED_JSON.format(detail=detail), code="malformed_json")
    return _invalid(where, describe_errors(exc))


def _invalid(where: str, details: list[dict[str, str]]) -> BadRequest:
    """The 400 that names each field refused and why."""
    message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
    return BadRequest(f"invalid {where}: {message}", details=details)


def body(model: type[M], *, optional: bool = False) -> M:
    """Return the JSON body validated by ``model``; 400 for bad JSON or fields, 415 for other types."""
    if not has_body():
        if optional:
            return model()
        raise BadRequest(BODY_REQUIRED)
    refuse_non_json()
    data = request.get_data(cache=False)
    if request.content_length is None and len(data) == request.max_content_length:
        _refuse_longer()
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise _refuse(exc, "body") from None


def _refuse_longer() -> None:
    """413 when a body sent without a length (chunked) goes on past MAX_CONTENT_LENGTH: Werkzeug stops reading it
    there and hands over what it read, which would be refused as JSON cut short instead."""
    if request.environ["wsgi.input"].read(1):
        raise PayloadTooLarge(BODY_TOO_LARGE.format(limit=request.max_content_length))


def refuse_unknown_query() -> None:
    """Refuse (400) a query string sent to an endpoint that takes none; called once the caller is authenticated.

    Ignored, ``GET /api/v1/jobs/{id}?tenant_id=globex`` looks like a filter that was applied. Public endpoints
    (health, metrics, the OpenAPI document) ignore a query string: monitors and browsers add their own."""
    if not request.args:
        return
    view = current_app.view_functions.get(request.endpoint or "")
    doc: Doc | None = getattr(view, "__doc_api__", None)
    if doc is not None and doc.query is None and not doc.public:
        raise BadRequest(NO_QUERY.format(names=", ".join(sorted(request.args))))


def query(model: type[M]) -> M:
    """Return the query string validated by ``model`` (400 on unknown, malformed or repeated parameters)."""
    repeated = sorted(name for name, values in request.args.lists() if len(values) > 1)
    if repeated:  # which one was meant? Taking the first silently hid ?limit=10&limit=abc
        raise BadRequest(REPEATED.format(names=", ".join(repeated)))
    args = request.args.to_dict()
    details = _not_as_written(model, args)
    if details:
        raise _invalid("query", details)
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        raise _refuse(exc, "query") from None


def _not_as_written(model: type[BaseModel], args: dict[str, str]) -> list[dict[str, str]]:
    """Return a problem for each whole number or switch not written as JSON would write it."""
    details = []
    for name, value in args.items():
        field_info = model.model_fields.get(name)
        if field_info is None:
            continue  # the model refuses it as unknown
        kinds = _kinds(field_info.annotation)
        if bool in kinds and value not in SWITCH:
            details.append({"field": name, "message": NOT_SWITCH})
        elif int in kinds and not WHOLE.fullmatch(value):
            details.append({"field": name, "message": NOT_WHOLE})
        elif float in kinds and not NUMBER.fullmatch(value):
            details.append({"field": name, "message": NOT_NUMBER})
    return details


def _kinds(annotation: Any) -> set[Any]:
    """The scalar types a field's annotation allows, through ``Annotated`` (``PositiveInt``) and unions."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _kinds(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return set().union(*(_kinds(arg) for arg in get_args(annotation)))
    return {annotation} if origin is None else set()  # list[int] and the like are no scalar


def reply(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Serialize a response model as JSON."""
    return Response(model.model_dump_json(), status=status, headers=headers, mimetype="application/json")


@dataclass(frozen=True)
class Doc:
    """What the OpenAPI document says about one view."""

    summary: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    responses: dict[int, type[BaseModel] | None] = field(default_factory=dict)
    errors: dict[int, tuple[str, ...]] = field(default_factory=dict)
    headers: tuple[str, ...] = ()
    public: bool = False
    media_type: str = "application/json"  # of the success responses' models (text/event-stream for a stream)


def document(
    summary: str,
    *,
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    responses: dict[int, type[BaseModel] | None],
    errors: dict[int, tuple[str, ...]] | None = None,
    headers: tuple[str, ...] = (),
    public: bool = False,
    media_type: str = "application/json",
) -> Callable[[F], F]:
    """Attach the OpenAPI description of a view; the document is built from these and the URL map."""

    def decorate(view: F) -> F:
        view.__doc_api__ = Doc(summary, body, query, responses, errors or {}, headers, public, media_type)  # type: ignore[attr-defined]
        return view

    return decorate
