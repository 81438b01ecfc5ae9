"""The FastAPI app: OpenAI-compatible routes, the web page, metrics, and the safety middleware."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..generation.sampling import GREEDY_BELOW
from .errors import ServeError, bad_request, internal_error, shutting_down, timeout_error
from .inputs import check_image_prompt, count_prompt_tokens, png_base64, to_conversation
from .metrics import Metrics, route_label
from .scheduler import Channel, ChatJob, ImageJob, Job, QueueFull, Scheduler
from .schemas import ChatCompletionRequest, ImageGenerationRequest
from .settings import ServeSettings

log = logging.getLogger("openjanus.serve")

OPEN_ROUTES = {("GET", "/health"), ("GET", "/"), ("HEAD", "/health"), ("HEAD", "/")}


def create_app(pipe, settings: ServeSettings | None = None) -> FastAPI:
    """The server for one JanusPipeline; its model worker starts and stops with the app's lifespan."""
    settings = settings or ServeSettings()
    metrics = Metrics()
    scheduler = Scheduler(pipe, settings, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="openjanus", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API for DeepSeek Janus / Janus-Pro.")
    app.state.settings, app.state.metrics, app.state.scheduler = settings, metrics, scheduler
    _add_error_handlers(app)
    api = _Api(pipe, settings, scheduler)
    page, page_headers = _page()

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return HTMLResponse(page, headers=page_headers)

    @app.get("/health")
    async def health() -> Response:
        """Liveness: whether the model worker runs (no API key needed)."""
        ok = scheduler.alive
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": settings.model_id,
                             "queue_depth": scheduler.depth}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus metrics (text format)."""
        return PlainTextResponse(metrics.render(scheduler.depth, scheduler.running_rows),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models() -> Response:
        """The one served model."""
        return JSONResponse({"object": "list", "data": [api.model_card()]})

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> Response:
        """The served model by id."""
        if model_id != settings.model_id:
            raise ServeError(404, f"model {model_id[:100]!r} not found", code="model_not_found", param="model")
        return JSONResponse(api.model_card())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat with text and image_url parts; `stream: true` answers with server-sent events."""
        return await api.chat(body, request)

    @app.post("/v1/images/generations")
    async def images_generations(body: ImageGenerationRequest, request: Request) -> Response:
        """Text-to-image at the model's native size, returned as base64 PNGs."""
        return await api.images(body, request)

    # Added innermost first: metrics see everything, CORS answers preflights before the key is checked.
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


class _Api:
    """The handlers of the model routes: validate, queue, wait for the worker, answer."""

    def __init__(self, pipe, settings: ServeSettings, scheduler: Scheduler):
        self.pipe = pipe
        self.settings = settings
        self.scheduler = scheduler
        self.created = int(time.time())

    def model_card(self) -> dict[str, Any]:
        config = self.pipe.config
        return {"id": self.settings.model_id, "object": "model", "created": self.created, "owned_by": "openjanus",
                "image_size": config.image_size, "context_length": config.llm.context_length,
                "max_tokens": self.settings.max_tokens_limit,
                "max_images_per_request": self.settings.max_images_per_request}

    # ------------------------------------------------------------------ chat

    def _chat_options(self, body: ChatCompletionRequest) -> dict[str, Any]:
        if body.n not in (None, 1):
            raise bad_request("only n=1 is supported", param="n")
        if body.tools or body.functions:
            raise bad_request("tools and function calling are not supported by this model", param="tools")
        if body.logprobs:
            raise bad_request("logprobs are not supported", param="logprobs")
        max_tokens = (body.max_completion_tokens or body.max_tokens
                      or min(self.settings.default_max_tokens, self.settings.max_tokens_limit))
        if max_tokens > self.settings.max_tokens_limit:
            raise bad_request(f"max_tokens must be at most {self.settings.max_tokens_limit}", param="max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(len(s) > 256 for s in stop):
            raise bad_request("stop takes at most 4 strings of at most 256 characters", param="stop")
        return {"max_tokens": max_tokens, "temperature": _temperature(body.temperature, 0.0),
                "top_p": body.top_p, "top_k": body.top_k, "seed": body.seed,
                "stop": tuple(s for s in stop if s)}

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        arrived = time.monotonic()
        options = self._chat_options(body)
        conversation = await run_in_threadpool(to_conversation, body.messages, self.settings)
        prompt_tokens = await run_in_threadpool(count_prompt_tokens, self.pipe, conversation)
        job = ChatJob(channel=Channel(asyncio.get_running_loop()), deadline=arrived + self.settings.request_timeout,
                      timeout=self.settings.request_timeout, conversation=conversation, prompt_tokens=prompt_tokens,
                      **options)
        self._submit(job)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.settings.model_id}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(job, meta, prompt_tokens, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, result = "", None
        async for kind, value in self._events(job, request):
            if kind == "delta":
                text += value
            elif kind == "error":
                raise value
            else:
                result = value
        if result is None:
            return Response(status_code=499)  # the client went away; nobody reads this
        return JSONResponse({
            **meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": result.finish_reason}],
            "usage": _usage(prompt_tokens, result.completion_tokens),
        })

    async def _sse(self, job: ChatJob, meta: dict[str, Any], prompt_tokens: int,
                   include_usage: bool) -> AsyncIterator[str]:
        def event(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
            return event({**meta, "object": "chat.completion.chunk",
                          "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

        yield chunk({"role": "assistant", "content": ""})
        try:
            async for kind, value in self._events(job, None):
                if kind == "delta":
                    yield chunk({"content": value})
                elif kind == "error":
                    yield event(value.body())
                else:
                    yield chunk({}, value.finish_reason)
                    if include_usage:
                        yield event({**meta, "object": "chat.completion.chunk", "choices": [],
                                     "usage": _usage(prompt_tokens, value.completion_tokens)})
        except ServeError as error:
            yield event(error.body())
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ images

    async def images(self, body: ImageGenerationRequest, request: Request) -> Response:
        arrived = time.monotonic()
        native = f"{self.pipe.config.image_size}x{self.pipe.config.image_size}"
        if body.size not in (None, "auto", native):
            raise bad_request(f"size must be {native!r}, the model's native size", param="size")
        if body.response_format not in (None, "b64_json"):
            raise bad_request("response_format must be 'b64_json' (this server does not host image URLs)",
                              param="response_format")
        n = body.n or 1
        if n > self.settings.max_images_per_request:
            raise bad_request(f"n must be at most {self.settings.max_images_per_request}", param="n")
        await run_in_threadpool(check_image_prompt, self.pipe, body.prompt)
        guidance = next((g for g in (body.guidance_scale, body.cfg_weight) if g is not None), 5.0)
        job = ImageJob(channel=Channel(asyncio.get_running_loop()), deadline=arrived + self.settings.request_timeout,
                       timeout=self.settings.request_timeout, prompt=body.prompt, n=n, guidance_scale=guidance,
                       temperature=_temperature(body.temperature, 1.0), top_k=body.top_k,
                       top_p=body.top_p, seed=body.seed)
        self._submit(job)
        images = None
        async for kind, value in self._events(job, request):
            if kind == "error":
                raise value
            images = value
        if images is None:
            return Response(status_code=499)
        data = await run_in_threadpool(lambda: [{"b64_json": png_base64(image)} for image in images])
        return JSONResponse({"created": int(time.time()), "data": data})

    # ------------------------------------------------------------------ plumbing

    def _submit(self, job: Job) -> None:
        try:
            self.scheduler.submit(job)
        except QueueFull:
            raise ServeError(429, f"the server is busy ({self.settings.max_queue} requests are waiting); "
                             f"retry after {self.settings.retry_after} s", type="rate_limit_error",
                             code="queue_full", headers={"Retry-After": str(self.settings.retry_after)}) from None

    async def _events(self, job: Job, request: Request | None) -> AsyncIterator[tuple[str, Any]]:
        """The job's events up to its final one; the job is cancelled on timeout, disconnect or early exit."""
        watcher = asyncio.create_task(_watch_disconnect(request, job.channel)) if request is not None else None
        try:
            while True:
                try:
                    kind, value = await job.channel.get(max(job.deadline - time.monotonic(), 0.0))
                except asyncio.TimeoutError:
                    self.scheduler.cancel(job, "timeout")
                    raise timeout_error(self.settings.request_timeout) from None
                if kind == "disconnected":
                    return
                yield kind, value
                if kind != "delta":
                    return
        finally:
            if watcher is not None:
                watcher.cancel()
            self.scheduler.cancel(job, "disconnect")  # no-op once the job has finished


async def _watch_disconnect(request: Request, channel: Channel) -> None:
    """Tell the waiting handler when the client goes away (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            channel.put(("disconnected", None))
            return


def _temperature(value: float | None, default: float) -> float:
    # The sampler treats tiny temperatures as greedy; saying so here lets greedy requests share a batch.
    if value is None:
        return default
    return 0.0 if value < GREEDY_BELOW else value


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _page() -> tuple[str, dict[str, str]]:
    """The bundled web page and its headers (a CSP that allows only its own inline script and style)."""
    page = resources.files("openjanus.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")
    return page, {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                  "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


# ---------------------------------------------------------------------- errors


def _add_error_handlers(app: FastAPI) -> None:
    async def serve_error(_: Request, error: ServeError) -> Response:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    async def validation_error(_: Request, error: RequestValidationError) -> Response:
        return JSONResponse(_validation_error(error.errors()).body(), status_code=400)

    async def http_error(_: Request, error: StarletteHTTPException) -> Response:
        messages = {404: "not found", 405: "method not allowed"}
        message = messages.get(error.status_code) or (error.detail if isinstance(error.detail, str) else "error")
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return JSONResponse(ServeError(error.status_code, message, type=kind, code=code).body(),
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    async def unexpected(_: Request, error: Exception) -> Response:
        log.error("unhandled error", exc_info=error)
        return JSONResponse(internal_error().body(), status_code=500)

    app.add_exception_handler(ServeError, serve_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _validation_error(errors: list[dict[str, Any]]) -> ServeError:
    """One readable 400 from pydantic's errors: where and what, never the offending input."""
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return bad_request("the request body is not valid JSON")
    where = ".".join(loc)
    message = str(first.get("msg", "invalid value"))
    return bad_request(f"{where}: {message}" if where else message, param=where or None)


# ---------------------------------------------------------------------- middleware


async def _send_error(send: Send, error: ServeError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class MetricsMiddleware:
    """Counts requests by route and status and times them to their last byte.

    A request that the server cancels before it answered (uvicorn does so to requests still
    running when its graceful shutdown period ends) gets a 503 rather than uvicorn's bare 500.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), None

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except asyncio.CancelledError:
            if status is None:
                status = 503
                await _send_error(send, shutting_down())
            raise
        finally:
            status = 500 if status is None else status
            self.metrics.observe_request(route_label(scope["path"]), scope["method"], status,
                                         time.perf_counter() - started)


class BodyLimitMiddleware:
    """Refuses request bodies over the limit with 413 before the app parses them."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_large = ServeError(413, f"request body over the limit of {self.limit} bytes", code="body_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _send_error(send, too_large if declared.isdigit() else bad_request("bad Content-Length"))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _send_error(send, too_large)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` (constant-time compare) on every route but /health and the page."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in OPEN_ROUTES:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            error = ServeError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                               type="invalid_request_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
            return await _send_error(send, error)
        await self.app(scope, receive, send)
