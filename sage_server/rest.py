"""The REST facade for scripts and probes: small, versioned, described by OpenAPI built from the same models."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sage_server.errors import InvalidInput, SageError, Unauthorized
from sage_server.models import (
    ContextResult,
    Document,
    DocumentIn,
    DocumentList,
    Health,
    History,
    Info,
    SearchResult,
    Translation,
)
from sage_server.service import KnowledgeService
from sage_server.version import __version__

PARTIAL_HEADER = "X-SAGE-Partial"


class ErrorBody(BaseModel):
    """The one error shape every endpoint returns."""

    status: int
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorResponse(BaseModel):
    error: ErrorBody


class ListQuery(BaseModel):
    layer: str | None = None
    tag: list[str] = Field(default_factory=list)
    limit: int = Field(50, ge=1, le=100)
    cursor: str | None = None


class SearchQuery(BaseModel):
    q: str = Field(min_length=1, max_length=4000, description='Any text; "phrases" and prefix* work')
    layer: list[str] = Field(default_factory=list)
    tag: list[str] = Field(default_factory=list)
    limit: int = Field(10, ge=1, le=100)
    cursor: str | None = None


class ContextQuery(BaseModel):
    task: str = Field(min_length=1, max_length=4000)
    max_tokens: int | None = Field(None, ge=200, le=100_000)
    layer: list[str] = Field(default_factory=list)


class DocumentBody(BaseModel):
    """A document to store under the id in the path."""

    title: str = Field(min_length=1, max_length=300)
    layer: str
    body: str = Field(min_length=1)
    tags: list[str] = Field(default_factory=list)
    triggers: list[str] = Field(default_factory=list)
    summary: str = ""
    related: list[str] = Field(default_factory=list)
    aliases: list[str] = Field(default_factory=list)
    translations: dict[str, Translation] = Field(default_factory=dict)


class RestoreBody(BaseModel):
    revision: int = Field(ge=1)


class Ready(BaseModel):
    ready: bool


def error_response(exc: SageError) -> JSONResponse:
    """Translate a SageError into the one JSON error body."""
    body = ErrorResponse(error=ErrorBody(status=exc.status, code=exc.code, message=exc.message, details=exc.details))
    return JSONResponse(body.model_dump(mode="json"), status_code=exc.status)


def _validation_error(exc: ValidationError) -> InvalidInput:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    errors = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
    return InvalidInput(f"{field}: {first['msg']}", field=field, errors=errors)


def _query(request: Request, model: type[BaseModel]) -> Any:
    params = request.query_params
    raw: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        values = params.getlist(name)
        if values:
            raw[name] = values if info.annotation == list[str] else values[-1]
    unknown = set(params) - set(model.model_fields)
    if unknown:
        raise InvalidInput(f"unknown query parameter {sorted(unknown)[0]!r}", field=sorted(unknown)[0])
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise _validation_error(exc) from exc


async def _body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}", field="body") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from exc


def _if_match(request: Request) -> int | None:
    value = request.headers.get("if-match")
    if value is None or value.strip() == "*":
        return None
    try:
        return int(value.strip().removeprefix("W/").strip('"'))
    except ValueError as exc:
        raise InvalidInput('If-Match must be a document revision, e.g. "3"', field="If-Match") from exc


def _json(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), status_code=status, headers=headers)


Handler = Callable[[Request, KnowledgeService], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    """One REST operation: its route, handler, and what OpenAPI says about it."""

    method: str
    path: str
    handler: Handler
    summary: str
    response: type[BaseModel]
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    public: bool = False  # no API key needed (probes)


async def health(request: Request, kb: KnowledgeService) -> Response:
    result = await kb.health()
    return _json(result, 503 if result.status == "unhealthy" else 200)


async def ready(request: Request, kb: KnowledgeService) -> Response:
    return _json(Ready(ready=kb.ready), 200 if kb.ready else 503)


async def list_documents(request: Request, kb: KnowledgeService) -> Response:
    q: ListQuery = _query(request, ListQuery)
    return _json(await kb.list(q.layer, q.tag, q.limit, q.cursor))


async def get_document(request: Request, kb: KnowledgeService) -> Response:
    doc = await kb.get(request.path_params["doc_id"])
    return _json(doc, headers={"ETag": f'"{doc.revision}"'})


async def put_document(request: Request, kb: KnowledgeService) -> Response:
    body: DocumentBody = await _body(request, DocumentBody)
    try:
        doc_in = DocumentIn(id=request.path_params["doc_id"], **body.model_dump())
    except ValidationError as exc:
        raise _validation_error(exc) from exc
    saved = await kb.save(doc_in, expected_revision=_if_match(request))
    return _json(saved, 201 if saved.revision == 1 else 200, headers={"ETag": f'"{saved.revision}"'})


async def delete_document(request: Request, kb: KnowledgeService) -> Response:
    return _json(await kb.delete(request.path_params["doc_id"], expected_revision=_if_match(request)))


async def document_history(request: Request, kb: KnowledgeService) -> Response:
    return _json(await kb.history(request.path_params["doc_id"]))


async def restore_document(request: Request, kb: KnowledgeService) -> Response:
    body: RestoreBody = await _body(request, RestoreBody)
    return _json(await kb.restore(request.path_params["doc_id"], body.revision))


def _partial(result: SearchResult | ContextResult) -> dict[str, str]:
    """A deadline cut the work short: say so in a header too, for scripts that only look at headers."""
    return {PARTIAL_HEADER: result.partial_reason or "partial"} if result.partial else {}


async def search(request: Request, kb: KnowledgeService) -> Response:
    q: SearchQuery = _query(request, SearchQuery)
    result = await kb.search(q.q, q.layer, q.tag, q.limit, q.cursor)
    return _json(result, headers=_partial(result))


async def context(request: Request, kb: KnowledgeService) -> Response:
    q: ContextQuery = _query(request, ContextQuery) if request.method == "GET" else await _body(request, ContextQuery)
    result = await kb.context(q.task, q.max_tokens, q.layer)
    return _json(result, headers=_partial(result))


async def info(request: Request, kb: KnowledgeService) -> Response:
    return _json(await kb.info())


ENDPOINTS = [
    Endpoint("GET", "/health", health, "Health of core, cache and knowledge (spec 6.3)", Health, public=True),
    Endpoint("GET", "/ready", ready, "503 until the first import has finished", Ready, public=True),
    Endpoint("GET", "/v1/knowledge", list_documents, "List documents by layer and tag", DocumentList, ListQuery),
    Endpoint("GET", "/v1/knowledge/{doc_id}", get_document, "Get one document (ETag: its revision)", Document),
    Endpoint(
        "PUT",
        "/v1/knowledge/{doc_id}",
        put_document,
        "Create or update (If-Match: expected revision)",
        Document,
        body=DocumentBody,
    ),
    Endpoint(
        "DELETE", "/v1/knowledge/{doc_id}", delete_document, "Soft-delete (If-Match: expected revision)", Document
    ),
    Endpoint("GET", "/v1/knowledge/{doc_id}/history", document_history, "Every revision, newest first", History),
    Endpoint(
        "POST",
        "/v1/knowledge/{doc_id}/restore",
        restore_document,
        "Make a revision current again",
        Document,
        body=RestoreBody,
    ),
    Endpoint(
        "GET", "/v1/search", search, "Full-text search (BM25, snippets, filters, cursor)", SearchResult, SearchQuery
    ),
    Endpoint(
        "GET", "/v1/context", context, "Context for a task, packed under a token budget", ContextResult, ContextQuery
    ),
    Endpoint("POST", "/v1/context", context, "Context for a long task description", ContextResult, body=ContextQuery),
    Endpoint("GET", "/v1/info", info, "What the knowledge base holds", Info),
]


def _authorized(request: Request, api_key: str) -> bool:
    supplied = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        supplied = auth[7:].strip()
    return hmac.compare_digest(supplied.encode(), api_key.encode())


def _route(endpoint: Endpoint, kb: KnowledgeService, api_key: str | None) -> Route:
    async def handle(request: Request) -> Response:
        if api_key and not endpoint.public and not _authorized(request, api_key):
            response = error_response(Unauthorized("a valid API key is required (Authorization: Bearer <key>)"))
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        try:
            return await endpoint.handler(request, kb)
        except SageError as exc:
            return error_response(exc)

    return Route(endpoint.path, handle, methods=[endpoint.method], name=f"{endpoint.method} {endpoint.path}")


def routes(kb: KnowledgeService, api_key: str | None, probes_only: bool = False) -> list[Route]:
    """The REST routes over `kb` and /openapi.json; with `probes_only`, just /health and /ready."""
    if probes_only:
        return [_route(e, kb, api_key) for e in ENDPOINTS if e.public]
    spec = openapi()

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(spec)

    return [*(_route(e, kb, api_key) for e in ENDPOINTS), Route("/openapi.json", openapi_json, methods=["GET"])]


def openapi() -> dict[str, Any]:
    """OpenAPI 3.1 for ENDPOINTS, with schemas generated from the pydantic models."""
    ref = "#/components/schemas/{model}"
    schemas: dict[str, Any] = {}

    def schema_ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template=ref)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": ref.format(model=model.__name__)}

    error = {"description": "Error", "content": {"application/json": {"schema": schema_ref(ErrorResponse)}}}
    paths: dict[str, Any] = {}
    for e in ENDPOINTS:
        op: dict[str, Any] = {
            "summary": e.summary,
            "operationId": f"{e.method.lower()}_{e.handler.__name__}",
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": schema_ref(e.response)}}},
                "default": error,
            },
        }
        params: list[dict[str, Any]] = []
        if "{doc_id}" in e.path:
            params.append(
                {
                    "name": "doc_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
                }
            )
        if e.query is not None:
            schema = e.query.model_json_schema()
            for name, prop in schema["properties"].items():
                param: dict[str, Any] = {
                    "name": name,
                    "in": "query",
                    "required": name in schema.get("required", []),
                    "schema": prop,
                }
                if prop.get("type") == "array":
                    param.update(style="form", explode=True)
                params.append(param)
        if e.method in {"PUT", "DELETE"}:
            params.append({"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}})
        if params:
            op["parameters"] = params
        if e.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema_ref(e.body)}}}
        if not e.public:
            op["security"] = [{"apiKey": []}, {}]
        paths.setdefault(e.path, {})[e.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "SAGE knowledge server", "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}},
    }
