"""Route registration that validates requests and describes them in OpenAPI, from one table."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from server import db
from server.access import authenticate
from server.errors import Invalid, UnsupportedMediaType
from server.schemas import ALL_SCHEMAS, Schema

PAGE_LIMIT_DEFAULT = 50
PAGE_LIMIT_MAX = 500


@dataclass
class Operation:
    """One documented API operation."""

    rule: str
    method: str
    summary: str
    tag: str
    body: Schema | None = None
    partial: bool = False
    response: Schema | None = None
    listing: bool = False
    status: int = 200
    auth: bool = True
    raw_response: dict[str, Any] | None = None
    errors: tuple[int, ...] = ()
    extra_query: dict[str, dict[str, Any]] = field(default_factory=dict)


class Api:
    """A blueprint plus the operations registered on it."""

    def __init__(self, name: str, url_prefix: str) -> None:
        self.blueprint = Blueprint(name, __name__, url_prefix=url_prefix)
        self.url_prefix = url_prefix
        self.operations: list[Operation] = []

    def route(self, rule: str, method: str, **options: Any) -> Callable[..., Any]:
        """Register a handler; it gets `body` (validated) and `page` (for listings) kwargs."""
        op = Operation(rule=rule, method=method, **options)
        self.operations.append(op)

        def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(handler)
            def view(**path: Any) -> Any:
                session = db.session()
                if op.auth:
                    g.principal = authenticate(session)
                kwargs: dict[str, Any] = dict(path)
                if op.body is not None:
                    kwargs["body"] = op.body.validate(read_json(), partial=op.partial)
                if op.listing:
                    kwargs["page"] = read_page()
                result = handler(**kwargs)
                session.commit()
                if isinstance(result, Response | tuple):
                    return result
                return jsonify(result), op.status

            endpoint = f"{handler.__name__}_{method.lower()}"
            self.blueprint.add_url_rule(rule, endpoint, view, methods=[method])
            return handler

        return decorate


def read_json() -> Any:
    """The request body parsed as JSON, or Invalid."""
    return parse_json_body(request.get_data(cache=True), request.mimetype)


def parse_json_body(raw: bytes, mimetype: str) -> Any:
    """A request body (`mimetype` lower-cased, without parameters) parsed as JSON, or Invalid."""
    if not raw.strip():
        raise Invalid("a JSON request body is required", code="missing_body")
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType("the request body must be application/json")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Invalid(f"the request body is not valid JSON: {exc}", code="malformed_json") from exc


@dataclass(frozen=True)
class Page:
    """Offset pagination of a listing."""

    limit: int
    offset: int


def read_page() -> Page:
    """Parse ?limit= and ?offset=, or raise Invalid."""
    values: dict[str, int] = {}
    for name, default, low, high in (
        ("limit", PAGE_LIMIT_DEFAULT, 1, PAGE_LIMIT_MAX),
        ("offset", 0, 0, 10**9),
    ):
        raw = request.args.get(name)
        if raw is None:
            values[name] = default
            continue
        if not re.fullmatch(r"[0-9]{1,10}", raw) or not low <= int(raw) <= high:
            raise Invalid(
                f"{name} must be an integer from {low} to {high}",
                code="invalid_query",
                details={"parameter": name},
            )
        values[name] = int(raw)
    return Page(**values)


def paginated(items: list[Any], total: int, page: Page) -> dict[str, Any]:
    """A listing response body."""
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset}


# ---------------------------------------------------------------- OpenAPI

_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "object"},
            },
            "required": ["code", "message", "details"],
        }
    },
    "required": ["error"],
}


def openapi_document(apis: list[Api], version: str) -> dict[str, Any]:
    """The OpenAPI 3 document of every registered operation."""
    components: dict[str, Any] = {s.name: s.openapi() for s in ALL_SCHEMAS}
    components.update({f"{s.name}Update": s.openapi(for_update=True) for s in ALL_SCHEMAS})
    components["Error"] = _ERROR_SCHEMA
    paths: dict[str, Any] = {}
    for api in apis:
        for op in api.operations:
            path = api.url_prefix + re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", op.rule)
            params = [
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "maxLength": 64},
                }
                for name in re.findall(r"{([a-z_]+)}", path)
            ]
            if op.listing:
                params += [
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": PAGE_LIMIT_MAX},
                    },
                    {
                        "name": "offset",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0, "maximum": 10**9},
                    },
                ]
            for name, schema in op.extra_query.items():
                params.append({"name": name, "in": "query", "required": False, "schema": schema})
            operation: dict[str, Any] = {
                "summary": op.summary,
                "tags": [op.tag],
                "operationId": f"{op.method.lower()}_{re.sub(r'[^a-z]+', '_', path.lower())}",
                "parameters": params,
                "responses": _responses(op),
            }
            if not op.auth:
                operation["security"] = []
            if op.body is not None:
                ref = op.body.name + ("Update" if op.partial else "")
                operation["requestBody"] = {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}
                    },
                }
            paths.setdefault(path, {})[op.method.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {"title": "Scalarium API", "version": version},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _responses(op: Operation) -> dict[str, Any]:
    error = {
        "description": "error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if op.raw_response is not None:
        body: dict[str, Any] = op.raw_response
    elif op.response is None:
        body = {"type": "object"}
    elif op.listing:
        body = {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "items": {"$ref": f"#/components/schemas/{op.response.name}"},
                },
                "total": {"type": "integer"},
                "limit": {"type": "integer"},
                "offset": {"type": "integer"},
            },
        }
    else:
        body = {"$ref": f"#/components/schemas/{op.response.name}"}
    responses: dict[str, Any] = {
        str(op.status): {
            "description": "success",
            "content": {"application/json": {"schema": body}},
        }
    }
    codes = set(op.errors) | ({400, 415} if op.body else {400} if op.listing else set())
    if op.auth:
        codes |= {401, 403, 404}
    for code in sorted(codes):
        responses[str(code)] = error
    return responses
