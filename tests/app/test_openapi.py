"""``GET /api/v1/openapi.json`` describes every route the server has, with the models it really uses."""

from __future__ import annotations

import json
import re

from flask import Flask

from tests.app.support import Api

DOCUMENTED_PATHS = re.compile(r"`(GET|POST|PUT|DELETE) (/[^`]*)`")


def routes(app: Flask) -> set[tuple[str, str]]:
    found = set()
    for rule in app.url_map.iter_rules():
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            found.add((method.lower(), re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)))
    return found


def test_the_document_lists_every_route_and_nothing_else(api: Api, app: Flask) -> None:
    response = api.get("/api/v1/openapi.json")
    assert response.status_code == 200
    document = response.json
    assert document["openapi"].startswith("3.")
    described = {(method, path) for path, ops in document["paths"].items() for method in ops}
    assert described == routes(app)


def test_every_operation_names_its_roles_errors_and_models(api: Api) -> None:
    document = api.get("/api/v1/openapi.json").json
    schemas = document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation["summary"], (method, path)
            for status, response in operation["responses"].items():
                ref = response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
                if ref:
                    assert ref.split("/")[-1] in schemas, (method, path, status)
            if operation.get("security") != []:
                assert operation["x-roles"], (method, path)
                assert "401" in operation["responses"] and "403" in operation["responses"]
                assert "invalid_request" in operation["responses"]["400"]["description"], (method, path)
    submit = document["paths"]["/api/v1/jobs"]["post"]
    assert "invalid_workflow" in submit["responses"]["422"]["description"]
    assert submit["requestBody"]["required"] is True
    assert any(p["name"] == "Idempotency-Key" for p in submit["parameters"])
    assert schemas["JobSubmit"]["additionalProperties"] is False


def test_the_api_document_and_the_server_list_the_same_endpoints(app: Flask) -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "API.md").read_text()
    served = ("/api", "/health", "/metrics")
    documented = {(m.lower(), p) for m, p in DOCUMENTED_PATHS.findall(text) if p.startswith(served)}
    assert documented == routes(app)


def test_every_reference_in_the_document_resolves(api: Api) -> None:
    document = api.get("/api/v1/openapi.json").json
    text = json.dumps(document)
    for ref in set(re.findall(r'"\$ref": "([^"]+)"', text)):
        node = document
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        assert node, ref
