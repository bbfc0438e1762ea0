"""The control plane's exceptions (one root) and the single JSON error shape for every failure."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from sqlalchemy.exc import DBAPIError, OperationalError
from werkzeug.exceptions import HTTPException

from app.extensions import db

log = logging.getLogger(__name__)

# Error codes for Werkzeug's own HTTP errors (routing, size limits, rate limits).
HTTP_CODES = {
    400: "bad_request",
    401: "missing_token",
    403: "access_denied",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
}

NOT_FOUND = "{kind} '{id}' does not exist"
ACCESS_DENIED = "role '{role}' may not {action}"
INTERNAL_ERROR = "the server failed to handle the request; the incident was logged"
DATABASE_UNAVAILABLE = "the database is unavailable; try again shortly"
# MariaDB errors PyMySQL raises as OperationalError that refuse one statement, the server being fine: a value its
# column or CHECK constraint refuses (4025 a failed CHECK, such as a JSON column's; 1366 an incorrect string value;
# 1406 data too long; 1264 out of range; 1292 a truncated value; 3140 invalid JSON). Retrying cannot help: a bug
# let the value through, and "the database is unavailable" would send the operator to look at the database.
REFUSED_STATEMENT = frozenset({4025, 1366, 1406, 1264, 1292, 3140})


class AppError(Exception):
    """Raised for every error the control plane answers with; the root of the package's exceptions."""

    status = 500
    code = "internal_error"

    def __init__(
        self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers or {}
        self.extra = extra


class BadRequest(AppError):
    """Raised when a request is malformed: bad JSON, wrong types, missing or unknown fields."""

    status = 400
    code = "invalid_request"


class Unauthorized(AppError):
    """Raised when a request carries no valid token (missing, expired, tampered, wrongly signed)."""

    status = 401
    code = "invalid_token"


class Forbidden(AppError):
    """Raised when the caller's role may not do what it asks, or it names a tenant not its own."""

    status = 403
    code = "access_denied"


class NotFound(AppError):
    """Raised when an object does not exist within the caller's tenant (another tenant's included)."""

    status = 404
    code = "not_found"


class Conflict(AppError):
    """Raised when the request contradicts the current state: an illegal transition, a stale attempt."""

    status = 409
    code = "conflict"


class PayloadTooLarge(AppError):
    """Raised when a body or one of its fields is larger than allowed."""

    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(AppError):
    """Raised when a request body is not JSON."""

    status = 415
    code = "unsupported_media_type"


class Unprocessable(AppError):
    """Raised when a well-formed request cannot be acted on: an invalid workflow, an unknown project."""

    status = 422
    code = "unprocessable"


class ServiceUnavailable(AppError):
    """Raised when a backing service (the database) cannot be reached."""

    status = 503
    code = "service_unavailable"


def error_response(status: int, code: str, message: str, **extra: Any) -> Response:
    """Return the one JSON error shape: ``{"error": code, "message": text}`` plus optional details."""
    response = jsonify({"error": code, "message": message, **extra})
    response.status_code = status
    return response


def register_error_handlers(app: Flask) -> None:
    """Answer every error, ours and Flask's own (404, 405, 413, 429, 500), with the JSON error shape."""

    @app.errorhandler(AppError)
    def _app_error(exc: AppError) -> Response:
        response = error_response(exc.status, exc.code, exc.message, **exc.extra)
        response.headers.update(exc.headers)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        message = exc.description or exc.name
        response = error_response(status, HTTP_CODES.get(status, "error"), message)
        allowed = getattr(exc, "valid_methods", None)
        if status == 405 and allowed:
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.errorhandler(OperationalError)
    def _database_down(exc: OperationalError) -> Response:
        if _refused_statement(exc):
            return _unexpected(exc)
        log.warning("database unavailable: %s", exc)
        _rollback_quietly()
        return error_response(503, "database_unavailable", DATABASE_UNAVAILABLE)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            _rollback_quietly()
            return error_response(503, "database_unavailable", DATABASE_UNAVAILABLE)
        log.exception("unhandled error")
        _rollback_quietly()
        return error_response(500, "internal_error", INTERNAL_ERROR)


def _refused_statement(exc: OperationalError) -> bool:
    """Whether the database refused one statement for its values rather than being out of reach."""
    code = exc.orig.args[0] if exc.orig is not None and exc.orig.args else None
    return isinstance(code, int) and code in REFUSED_STATEMENT


def _rollback_quietly() -> None:
    try:
        db.session.rollback()
    except Exception:  # the connection may be gone too
        log.debug("rollback after an error failed", exc_info=True)
