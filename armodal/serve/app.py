"""create_app(run, settings): the FastAPI app `armodal serve` runs under uvicorn.

Routes: POST /v1/completions (OpenAI completions, streaming as server-sent events),
GET /v1/models, GET /health, and the playground's GET / and POST /v1/media when
armodal.serve.playground is present. Every /v1/* route sits behind the API key when one is
configured (an ASGI guard, so routes added later are covered too); / and /health stay open.
Each request writes one JSON line to the `armodal.serve` logger. Shutdown stops taking
requests, lets running ones finish for settings.shutdown_grace_s, then cancels the rest.
"""

from __future__ import annotations

import hmac
import importlib
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from armodal.checkpoint import LoadedRun
from armodal.serve.api import ApiError, error_body, parse_completion
from armodal.serve.completions import Submission, complete, plan_completion, stream_chunks
from armodal.serve.engine import Engine
from armodal.serve.settings import ServerSettings

__all__ = ["create_app", "model_name", "LOGGER"]

LOGGER = logging.getLogger("armodal.serve")
MAX_BODY_BYTES = 4 * 2**20  # far above any prompt the limits let through, far below harm


def model_name(run: LoadedRun, settings: ServerSettings) -> str:
    """The id clients name in `model`: settings.model_name, else the run folder's name."""
    return settings.model_name or run.path.name


def create_app(run: LoadedRun, settings: ServerSettings, engine: Engine | None = None) -> FastAPI:
    """The app serving `run`; its engine thread starts and stops with the app's lifespan."""
    engine = engine or Engine(run.model, settings.max_batch, settings.max_queue)
    name = model_name(run, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        try:
            yield
        finally:
            # uvicorn has stopped accepting and waited for open connections by now; whatever
            # still runs gets the grace period, then a "shutdown" ending.
            await run_in_threadpool(engine.stop, settings.shutdown_grace_s)

    app = FastAPI(title="armodal", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.settings, app.state.run = engine, settings, run
    app.add_middleware(_ApiKeyGuard, api_key=settings.api_key)
    app.add_middleware(_AccessLog)  # outermost: logs every request, refused ones included
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        s = engine.stats
        return JSONResponse({"status": "ok", "model": name, "running_rows": s.running_rows,
                             "waiting": s.waiting, "max_batch": engine.max_batch,
                             "max_queue": engine.max_queue, "requests": s.requests,
                             "tokens": s.tokens, "uptime_s": round(time.monotonic() - s.started,
                                                                   3)})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{
            "id": name, "object": "model", "created": int(run.path.stat().st_mtime),
            "owned_by": "armodal", "max_model_len": run.model.config.max_seq_len}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        log = request.scope["armodal.log"]
        parsed = parse_completion(await _read_body(request, MAX_BODY_BYTES))
        plan = plan_completion(parsed, run, settings, engine, name)
        plan.log = log
        log.update(id=plan.id, n=plan.n, stream=bool(parsed.stream),
                   prompt_tokens=sum(len(g.prompt) for g in plan.generation),
                   max_tokens=plan.generation[0].config.max_new_tokens)
        submission = Submission(engine, plan)
        if parsed.stream:
            return StreamingResponse(stream_chunks(plan, submission),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "x-request-id": plan.id})
        return JSONResponse(await complete(plan, submission, request),
                            headers={"x-request-id": plan.id})

    _add_playground(app, run, settings)
    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (before reading it, when the client
    says how long it is)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise _too_large(len(body), limit)
    return bytes(body)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body is {size} bytes or more; this server takes at most "
                         f"{limit}", code="request_too_large")


def _add_playground(app: FastAPI, run: LoadedRun, settings: ServerSettings) -> None:
    """GET / and POST /v1/media from armodal.serve.playground, when that module exists."""
    try:
        playground = importlib.import_module("armodal.serve.playground")
    except ModuleNotFoundError as err:
        if err.name != "armodal.serve.playground":
            raise  # the playground exists but something it imports is missing: say so
        return
    playground.add_playground_routes(app, run, settings)


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, as OpenAI's error body."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        request.scope["armodal.log"].setdefault("error", error.message)
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": str(error)}
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        return _error_response(ApiError(400, f"invalid request: {first['msg']}", param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}
        return _error_response(ApiError(error.status_code,
                                        message.get(error.status_code, str(error.detail)),
                                        headers=dict(error.headers or {})))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        LOGGER.exception("unexpected error")
        return _error_response(ApiError(500, f"internal error: {type(error).__name__}",
                                        type="server_error"))


class _ApiKeyGuard:
    """ASGI middleware: with an API key set, every /v1/* request needs
    `Authorization: Bearer <key>` (compared in constant time); others pass."""

    def __init__(self, app, api_key: str | None):
        self.app, self.key = app, api_key

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if self.key is None or scope["type"] != "http" or not (path == "/v1" or
                                                              path.startswith("/v1/")):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              self.key.encode()):
            return await self.app(scope, receive, send)
        message = ("missing API key: send the header Authorization: Bearer <key>" if not given
                   else "incorrect API key provided")
        scope.setdefault("armodal.log", {})["error"] = message
        response = JSONResponse(error_body(message, "invalid_request_error", None,
                                           "invalid_api_key"), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class _AccessLog:
    """ASGI middleware: one JSON line per HTTP request on the `armodal.serve` logger, with
    the status, the latency and whatever the route added to scope["armodal.log"]."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record = scope.setdefault("armodal.log", {})
        record["t0"] = start = time.monotonic()
        status = {"code": None}

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            record.pop("t0", None)
            client = scope.get("client")
            line = {"ts": round(time.time(), 3), "event": "request",
                    "id": record.pop("id", None) or f"req-{uuid.uuid4().hex[:12]}",
                    "method": scope["method"], "path": scope["path"],
                    "status": record.pop("status", None) or status["code"] or 499,
                    "latency_s": round(time.monotonic() - start, 4),
                    "client": client[0] if client else None, **record}
            if "ttft_s" in line:
                line["ttft_s"] = round(line["ttft_s"], 4)
            LOGGER.info(json.dumps(line))
