"""The ASGI app: routes from the OpenAI, Anthropic and Responses modules over one engine, the guards in
front of them, and errors in each API's own shape.

Every request problem is a 4xx with `{"error": {"message", "type", "param", "code"}}` (Anthropic's routes:
`{"type": "error", "error": {"type", "message"}}`); the engine runs on its own thread and hands results back
to the event loop, so a slow or broken request never blocks the server. Streams are server-sent events; an
idle stream sends `: keepalive` comments, which is also how a vanished client is noticed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mixq.serve.engine import Engine
from mixq.serve.errors import APIError, error_response
from mixq.serve.middleware import BearerAuth, BodyLimit, HostGuard
from mixq.serve.serving import Serving, ServeSettings
from mixq.serve.serving_anthropic import anthropic_error, anthropic_router
from mixq.serve.serving_openai import openai_router
from mixq.serve.serving_responses import responses_router

log = logging.getLogger("mixq.serve")


def _error(request, status: int, message: str, type_: str, code=None, param=None) -> JSONResponse:
    if request.url.path.startswith("/v1/messages"):
        return JSONResponse(anthropic_error(status, message), status_code=status)
    return error_response(status, message, type_, code, param)


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    app = FastAPI(title="mixq serve", docs_url=None, redoc_url=None, openapi_url=None)
    serving = Serving(engine, settings)
    app.state.engine, app.state.settings, app.state.serving = engine, settings, serving

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error(request, e.status, str(e), e.type, e.code, e.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return _error(request, e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500
                      else "server_error")

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):  # a bug, not the client's fault: logged, reported as such
        log.exception("unhandled error")
        return _error(request, 500, f"internal error: {type(e).__name__}", "server_error")

    @app.get("/health")
    async def health():
        if not engine.alive:
            return error_response(503, "the engine is not running", "server_error")
        return {"status": "ok", "model": settings.model_id, **engine.load()}

    app.include_router(openai_router(serving))
    app.include_router(anthropic_router(serving))
    app.include_router(responses_router(serving))
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    if settings.api_key:  # outside the body limit: a request without the key is refused before its body is read
        app.add_middleware(BearerAuth, key=settings.api_key)
    # outermost: a keyless server answers loopback names only (DNS rebinding); POSTs must be JSON
    app.add_middleware(HostGuard, allowed_hosts=settings.allowed_hosts if not settings.api_key else None)
    return app


def model_aliases(name: str, path: Path) -> tuple:
    """Names a client may use for the served model: as given, its directory, the directory's name."""
    return tuple(dict.fromkeys([name, str(path), Path(path).name]))


def context_length(config: dict, override: Optional[int] = None) -> int:
    if override:
        return int(override)
    for cfg in (config, config.get("text_config") or {}):
        for k in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
            if isinstance(cfg.get(k), int) and cfg[k] > 0:
                return int(cfg[k])
    return 4096


__all__ = ["create_app", "ServeSettings", "APIError", "model_aliases", "context_length"]
