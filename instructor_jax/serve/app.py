"""The ASGI app: routes, the gate in front of them (auth, body size, request metrics) and error formats.

    POST /v1/embeddings   OpenAI's embeddings API (+ instruction / instructions / prompt_name)
    GET  /v1/models       the served model, as OpenAI lists models
    POST /embed           text-embeddings-inference's embed route (+ [instruction, text] pairs)
    GET  /info            model, width, limits, devices, programs, version
    GET  /health          200 once every program is compiled and has run; 503 before and while draining
    GET  /metrics         Prometheus

With an API key every route but /health and /metrics needs `Authorization: Bearer KEY` (compared in
constant time).
"""

from __future__ import annotations

import hmac
import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from instructor_jax.serve import schemas
from instructor_jax.serve.errors import ApiError, ClientGone, error_bytes, validation_message
from instructor_jax.serve.metrics import CONTENT_TYPE_LATEST
from instructor_jax.serve.service import EmbeddingService

ROUTES = ("/v1/embeddings", "/v1/models", "/embed", "/info", "/health", "/metrics")
OPEN_ROUTES = ("/health", "/metrics")
JSON = "application/json"


def error_response(path: str, error: ApiError) -> Response:
    return Response(error_bytes(path, error), status_code=error.status, media_type=JSON, headers=error.headers)


class Gate:
    """Pure ASGI middleware: counts and times every request, checks the key, reads the body up to the
    limit (413 beyond it) and hands it on; later receives (the disconnect) pass through."""

    def __init__(self, app, service: EmbeddingService, api_key: Optional[str]):
        self.app = app
        self.service = service
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "other"
        start, status = time.monotonic(), [499]

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self.refuse(scope)
            body = None
            if refusal is None and scope["method"] == "POST":
                body, refusal = await self.read_body(scope, receive)
            if refusal is not None:
                await error_response(path, refusal)(scope, receive, send_and_record)
                return
            if body is None:
                return await self.app(scope, receive, send_and_record)
            delivered = False

            async def replay():
                nonlocal delivered
                if delivered:
                    return await receive()
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, send_and_record)
        finally:
            self.service.metrics.observe_request(route, status[0], time.monotonic() - start)

    def refuse(self, scope) -> Optional[ApiError]:
        if self.api_key is None or scope["path"] in OPEN_ROUTES:
            return None
        headers = dict(scope["headers"])
        scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), self.api_key):
            return None
        return ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY` (the key the "
                             "server was started with, --api_key or INSTRUCTOR_JAX_API_KEY)", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})

    async def read_body(self, scope, receive):
        """(body, None), or (None, the error): 413 past the limit, 499 if the client left meanwhile."""
        limit = self.service.limits.max_body_bytes
        too_large = ApiError(413, f"the request body is over the limit of {limit} bytes (--max_body_bytes): send "
                                  "fewer or shorter inputs per request", code="body_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None, too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, ApiError(499, "the client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None, too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(request.url.path, error)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone):
        return error_response(request.url.path, ApiError(499, "the client disconnected; its inputs were dropped"))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        message, field = validation_message(error.errors())
        if message == "the body must be a JSON object":
            message += " (and the header Content-Type: application/json)"
        return error_response(request.url.path, ApiError(422, message, field, "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        path = request.url.path
        if error.status_code == 404:
            message = f"no route {request.method} {path}; this server has {', '.join(ROUTES)}"
        elif error.status_code == 405:
            message = f"{path} does not take {request.method}"
        else:
            message = str(error.detail)
        return error_response(path, ApiError(error.status_code, message, headers=error.headers))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        return error_response(request.url.path, ApiError(500, f"internal error: {type(error).__name__}: {error}"))


def create_app(service: EmbeddingService, api_key: Optional[str] = None) -> FastAPI:
    from instructor_jax import __version__

    app = FastAPI(title="instructor-jax", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    app.add_middleware(Gate, service=service, api_key=api_key)

    def disconnected(request: Request):
        async def wait():
            while (await request.receive())["type"] != "http.disconnect":
                pass
        return wait

    @app.post("/v1/embeddings")
    async def embeddings(body: schemas.EmbeddingsRequest, request: Request):
        if body.model is not None and body.model not in service.aliases:
            raise ApiError(404, f"the model `{body.model}` is not served here; this server serves `{service.name}` "
                                "(send that name as model)", "model", "model_not_found")
        if body.dimensions is not None and body.dimensions != service.dim:
            raise ApiError(422, f"dimensions={body.dimensions}, but this model's embeddings have {service.dim}: "
                                "INSTRUCTOR was not trained to be truncated; leave dimensions out", "dimensions")
        pairs = schemas.openai_pairs(body, service.resolve_prompt, service.default_instruction)
        out, tokens = await service.embed(pairs, disconnected=disconnected(request))
        return Response(schemas.openai_response(out, body.encoding_format, service.name, tokens), media_type=JSON)

    @app.post("/embed")
    async def embed(body: schemas.EmbedRequest, request: Request):
        pairs = schemas.embed_pairs(body, service.resolve_prompt, service.default_instruction)
        out, _ = await service.embed(pairs, normalize=body.normalize, truncate=body.truncate,
                                     disconnected=disconnected(request))
        return Response(schemas.embed_response(out), media_type=JSON)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0,
                                            "owned_by": "instructor-jax"}]}

    @app.get("/info")
    async def info():
        return service.info()

    @app.get("/health")
    async def health():
        if service.state != "ready":
            raise ApiError(503, f"not ready: {service.state}", code="not_ready")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
