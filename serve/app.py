"""The HTTP layer: an OpenAI-compatible FastAPI application over a `Service`.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (never behind the key, for
load balancers), GET /metrics. Every error is an OpenAI error object {"error": {"message", "type", "param", "code"}}
with its status; a client never sees a traceback. Streams are Server-Sent Events: one OpenAI chunk per committed
canvas, a usage chunk when asked for, `data: [DONE]`; with stream_options.include_drafts also an `event: draft` per
denoising step (README "Serving" has the formats).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from .protocol import ChatRequest, CompletionRequest
from .service import ApiError, Job, Service

log = logging.getLogger("dgemma.serve")

MAX_BODY = 1 << 20  # bytes: a long prompt is tens of kB
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def create_app(service: Service, *, api_key: str | None = None, max_body: int = MAX_BODY) -> FastAPI:
    """The application; its lifespan starts and stops the service's engine thread."""

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        service.stop()

    app = FastAPI(title="dgemma", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, service=service, max_body=max_body)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        log.error("request failed", exc_info=e)  # the traceback stays in the server's log
        return error_response(ApiError(500, "internal error (the server's log has the details)", kind="server_error"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")  # fmt: skip

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.name}

    @app.get("/metrics")
    async def metrics(request: Request):
        authorize(request)
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        config = service.pipe.model.config
        card = {
            "id": service.name, "object": "model", "created": 0, "owned_by": "dgemma",
            "max_model_len": config.max_position_embeddings, "canvas_length": config.canvas_length,
            "chat": service.chat, "dtype": str(service.pipe.model.dtype).removeprefix("torch."),
        }  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        return await run(request, await parse(request, ChatRequest))

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        return await run(request, await parse(request, CompletionRequest))

    async def run(request: Request, body):
        job = Job(service, service.prepare(body))
        if job.prep.stream:
            return StreamingResponse(stream(job), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = asyncio.create_task(complete(job))
        gone = asyncio.create_task(disconnected(request))
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not result.done():  # the client went away: closing its events frees its row
            result.cancel()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return JSONResponse(result.result())

    return app


async def parse(request: Request, model):
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        loc = [str(p) for p in error["loc"]]
        where = ".".join(p for p in loc if not p.startswith(("list[", "dict[", "str", "int")))
        if error["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {error['msg']}") from None
        if error["type"] == "extra_forbidden":
            message = f"unknown field {where!r}: it is neither an OpenAI field this server takes nor an extension"
        else:
            message = f"{where or 'body'}: {error['msg']}"
        raise ApiError(400, message, param=loc[0] if loc else None, code="invalid_value") from None


async def disconnected(request: Request) -> None:
    """Returns when the client goes away: once the body has been read, http.disconnect is all that can arrive."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def complete(job: Job) -> dict:
    """The whole generation as one OpenAI response."""
    reason = None
    async for kind, value in job.events():
        if kind == "end":
            reason = value
    job.count()
    text, prep = job.text.text, job.prep
    choice = {"index": 0, "finish_reason": reason, "logprobs": None}
    choice |= {"message": {"role": "assistant", "content": text}} if prep.chat else {"text": text}
    if prep.token_ids:
        choice["token_ids"] = job.text.tokens
    out = {"id": job.id, "object": "chat.completion" if prep.chat else "text_completion", "created": job.created,
           "model": job.service.name, "choices": [choice], "usage": job.usage()}  # fmt: skip
    if prep.token_ids:
        out["prompt_token_ids"] = prep.prompt
    return out


async def stream(job: Job):
    """Server-Sent Events; the generator is closed when the client disconnects, which cancels the row."""
    prep, first = job.prep, True
    head = {"id": job.id, "object": "chat.completion.chunk" if prep.chat else "text_completion",
            "created": job.created, "model": job.service.name}  # fmt: skip

    def chunk(delta: str | None, reason=None, ids=None) -> str:
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        if prep.chat:
            choice["delta"] = {} if delta is None else {"content": delta} | ({"role": "assistant"} if first else {})
        else:
            choice["text"] = delta or ""
        if ids is not None:
            choice["token_ids"] = ids
        return sse(head | {"choices": [choice]})

    sent = 0
    try:
        async for kind, value in job.events():
            if kind == "draft":
                yield sse(value, "draft")
            elif kind == "text":
                tokens = job.text.tokens
                yield chunk(value, ids=tokens[sent:] if prep.token_ids else None)
                sent, first = len(tokens), False
            else:
                yield chunk(None, value)
        job.count()
        if prep.usage:
            yield sse(head | {"choices": [], "usage": job.usage()})
    except ApiError as e:
        yield sse(e.body())
    yield "data: [DONE]\n\n"


def sse(data: dict, event: str | None = None) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Guard:
    """ASGI middleware: refuses bodies over `max_body` bytes (413, by Content-Length or as they stream in) and counts
    requests by endpoint and status."""

    def __init__(self, app, service: Service, max_body: int):
        self.app, self.service, self.max_body = app, service, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        too_large = ApiError(413, f"the request body exceeds {self.max_body} bytes (--max-body)",
                             code="request_too_large")  # fmt: skip
        length = dict(scope["headers"]).get(b"content-length", b"0")
        try:
            if length.isdigit() and int(length) > self.max_body:
                await error_response(too_large)(scope, receive, counted)
                return
            received = 0

            async def limited():
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise too_large
                return message

            await self.app(scope, limited, counted)
        finally:
            self.service.metrics.requests.labels(endpoint, str(status)).inc()
