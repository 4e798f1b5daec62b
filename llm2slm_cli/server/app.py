"""The HTTP layer: FastAPI routes over OpenAIServing, and every error as an OpenAI error body with its status.

Malformed JSON and bodies that do not fit the protocol get 400 (as OpenAI's API answers them), an unknown model 404,
a full queue 429 (with Retry-After, in seconds), a server shutting down 503, an unexpected failure 500 with one line;
never a traceback. `/metrics` gives the server's Prometheus metrics (server/metrics.py).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from llm2slm_cli.server import protocol as P
from llm2slm_cli.server.metrics import CountRequests, Metrics
from llm2slm_cli.server.serving import OpenAIServing, Reply, ServingError, chat_completion, completion
from llm2slm_cli.validation import field_name


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(ServingError(status, message, type=type, param=param, code=code).body(), status_code=status)


# fields that take one of several types: pydantic reports one error per type, which reads worse than this
UNION_FIELDS = {"prompt": "expected text, a list of texts, or token ids (a list of ints, or a list of such lists)",
                "stop": "expected a string or a list of strings"}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})", None
    if len(loc) > 1 and loc[0] in UNION_FIELDS:
        return f"{loc[0]}: {UNION_FIELDS[loc[0]]}", str(loc[0])
    where = field_name(loc) or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}", str(loc[0]) if loc else None


def build_app(serving: OpenAIServing) -> FastAPI:
    engine = serving.engine
    metrics = engine.observer = Metrics(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()  # in-flight requests have finished by now (uvicorn waits for them)

    app = FastAPI(title="llm2slm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(CountRequests, metrics=metrics)
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(400, message, param=param)

    @app.exception_handler(ServingError)
    async def serving_error(_: Request, exc: ServingError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), type=kind)

    @app.exception_handler(Exception)
    async def crash(_: Request, exc: Exception) -> JSONResponse:
        traceback.print_exception(exc, file=sys.stderr)
        return _error(500, f"internal error: {type(exc).__name__}", type="server_error")

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.closing:
            return _error(503, "shutting down", type="server_error", code="shutting_down")
        return JSONResponse({"status": "ok", "model": serving.name, "active": engine.active})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models() -> P.ModelList:
        return serving.models()

    @app.post("/v1/completions")
    async def completions(request: P.CompletionRequest):
        return _respond(await completion(serving, request))

    @app.post("/v1/chat/completions")
    async def chat(request: P.ChatCompletionRequest):
        return _respond(await chat_completion(serving, request))

    return app


def _respond(reply: Reply):
    if hasattr(reply.body, "__aiter__"):
        return StreamingResponse(reply.body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **reply.headers})
    return JSONResponse(jsonable_encoder(reply.body), headers=reply.headers or None)
