"""``GET /api/v1/openapi.json``: an OpenAPI 3.1 document built from the URL map and each view's models."""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.api import Doc, document
from app.errors import HTTP_CODES
from app.schemas import ErrorBody
from app.schemas import Response as Model

bp = Blueprint("openapi", __name__, url_prefix="/api/v1")

REF = "#/components/schemas/{model}"
EVERYWHERE = {429: ("rate_limited",), 500: ("internal_error",), 503: ("database_unavailable",)}
GUARDED = {400: ("invalid_request",)}  # every endpoint with a token refuses a query string it does not take
_PARAMETER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


class OpenAPIDocument(Model):
    """An OpenAPI 3.1 document."""

    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]
    components: dict[str, Any]
    security: list[dict[str, Any]]


def _views(app: Flask) -> list[tuple[str, str, str, Doc, tuple[str, ...] | None]]:
    found = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        view = app.view_functions[rule.endpoint]
        doc = getattr(view, "__doc_api__", None)
        if doc is None:
            raise LookupError(f"view {rule.endpoint} has no @document description")
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            path = _PARAMETER.sub(r"{\1}", rule.rule)
            found.append((path, method.lower(), rule.endpoint, doc, getattr(view, "__roles__", None)))
    return found


def _models(views: list[tuple[str, str, str, Doc, tuple[str, ...] | None]]) -> list[type[BaseModel]]:
    models: dict[str, type[BaseModel]] = {"ErrorBody": ErrorBody}
    for _, _, _, doc, _ in views:
        for model in (doc.body, doc.query, *doc.responses.values()):
            if model is not None:
                models[model.__name__] = model
    return list(models.values())


def _error_response(codes: tuple[str, ...]) -> dict[str, Any]:
    return {
        "description": "error codes: " + ", ".join(codes),
        "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorBody")}}},
    }


def _operation(path: str, endpoint: str, doc: Doc, roles: tuple[str, ...] | None) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": doc.summary, "operationId": endpoint, "tags": [endpoint.split(".")[0]]}
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{([^}]+)}", path)
    ]
    if doc.query is not None:
        schema = doc.query.model_json_schema(ref_template=REF)
        for name, prop in schema.get("properties", {}).items():
            parameters.append(
                {"name": name, "in": "query", "required": name in schema.get("required", []), "schema": prop}
            )
    parameters += [
        {"name": h, "in": "header", "required": False, "schema": {"type": "string", "maxLength": 255}}
        for h in doc.headers
    ]
    if parameters:
        operation["parameters"] = parameters
    if doc.body is not None:
        required = any(f.is_required() for f in doc.body.model_fields.values())
        operation["requestBody"] = {
            "required": required,
            "content": {"application/json": {"schema": {"$ref": REF.format(model=doc.body.__name__)}}},
        }
    responses: dict[str, Any] = {}
    for status, model in sorted(doc.responses.items()):
        entry: dict[str, Any] = {"description": HTTP_CODES.get(status, "success").replace("_", " ")}
        if status < 300 or model is not None:
            entry["description"] = "success" if status < 300 else entry["description"]
        if model is not None:
            media_type = doc.media_type if status < 300 else "application/json"
            entry["content"] = {media_type: {"schema": {"$ref": REF.format(model=model.__name__)}}}
        responses[str(status)] = entry
    always = EVERYWHERE if doc.public else {**EVERYWHERE, **GUARDED}
    everywhere = {
        status: tuple(dict.fromkeys((*doc.errors.get(status, ()), *codes))) for status, codes in always.items()
    }
    for status, codes in sorted({**doc.errors, **everywhere}.items()):
        responses.setdefault(str(status), _error_response(codes))
    operation["responses"] = responses
    if doc.public:
        operation["security"] = []
    if roles is not None:
        operation["x-roles"] = list(roles)
    return operation


def build_document(app: Flask) -> dict[str, Any]:
    """Return the OpenAPI document of every route of ``app``."""
    views = _views(app)
    models = _models(views)
    _, schemas = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for path, method, endpoint, doc, roles in views:
        paths.setdefault(path, {})[method] = _operation(path, endpoint, doc, roles)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Automation platform control plane",
            "version": app.config["VERSION"],
            "description": 'Every error is {"error": code, "message": text}; see docs/API.md.',
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
        "security": [{"bearer": []}],
    }


@bp.get("/openapi.json")
@document("This API's OpenAPI 3.1 document (no token needed)", responses={200: OpenAPIDocument}, public=True)
def openapi() -> Response:
    """Serve the OpenAPI document."""
    if "openapi" not in current_app.extensions:
        current_app.extensions["openapi"] = build_document(current_app._get_current_object())  # type: ignore[attr-defined]
    return jsonify(current_app.extensions["openapi"])
