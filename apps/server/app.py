"""The HTTP API: routes, request checks and responses (non-streaming JSON or server-sent events).

    request -> limits (Host, key, content type, body size and read time) -> pydantic (shapes)
            -> field checks -> ChatRequest.to_generation_config (values, checked by GenerationConfig)
            -> a place in the worker queue -> media read and decoded -> the job
            -> text pieces -> chat.completion | chat.completion.chunk events

Work is refused as early as it can be: a full queue before any media is read, an over-budget
request before any picture is decoded (media.py), a bad schema before the job is queued. A
stream's first chunk (the assistant role) goes out as soon as the job is queued, so clients and
proxies see the answer start while it waits or prefills; errors after that come in the stream.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_vlm import EdgeVLMError, GenerationConfig, __version__
from edge_vlm.text.constrained import compile_constraint
from edge_vlm.text.templates import TOOL_CALL_SYNTAX

from . import protocol
from .errors import APIError, error_body, error_response
from .media import Fit, MediaLimits, PixelBudget
from .messages import MediaReader
from .metrics import Metrics
from .worker import Job, ModelWorker, QueueFull

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/v1/health/",)  # the API paths that need no key and any Host (probes); the page needs no key


@dataclass
class ServerConfig:
    model_id: str = "model"
    aliases: tuple[str, ...] = ()  # other names the model answers to (its path, nvidia/vila, ...)
    api_key: str | None = None
    max_body_bytes: int = 20 * 2**20
    request_timeout_s: float = 300.0
    cors_origins: tuple[str, ...] = ()
    # without a key, the Host names served besides loopback ones ("*": any); with a key, any
    allowed_hosts: tuple[str, ...] = ()
    body_timeout_s: float = 30.0  # the whole body must arrive within this (a slow body is a 408)
    max_server_pixels: int = 160_000_000  # decoded pixels of all requests in flight together
    media: MediaLimits = field(default_factory=MediaLimits)
    gen_defaults: GenerationConfig = field(default_factory=GenerationConfig)


def loopback_host(name: str) -> bool:
    """Whether a host name is this machine's own: localhost, *.localhost, 127.x, ::1."""
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name of a Host header, without its port ("[::1]:8000" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Limits:
    """ASGI middleware in front of every route: the Host header (without a key only loopback
    names, so a page elsewhere cannot reach this server through DNS rebinding), the API key
    (constant-time compare), JSON content type, body size and the time it may take to arrive,
    and the requests-by-status counter. The body is read here once (up to the limit) and handed
    on, so disconnects still reach the route. CORS wraps it, so its errors carry CORS headers."""

    def __init__(self, app, config: ServerConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS":  # CORS preflights carry no key
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = "chat" if path == "/v1/chat/completions" or path.startswith("/v1/vlm/") else "other"
        status = {}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._check(scope, path, headers)
        if problem is not None:
            return await error_response(problem)(scope, receive, counted_send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, counted_send)
        body, more = bytearray(), True
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > self.config.max_body_bytes:
                        return await error_response(self._too_large())(scope, receive, counted_send)
        except TimeoutError:
            slow = APIError(408, f"the request body did not arrive within {self.config.body_timeout_s:g} s "
                                 "(the server's --body-timeout)", None, "body_timeout", {"Connection": "close"})
            return await error_response(slow)(scope, receive, counted_send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, counted_send)

    def _too_large(self) -> APIError:
        mb = self.config.max_body_bytes / 2**20
        return APIError(413, f"request body over {mb:g} MB (the server's --max-body-mb)", None, "request_too_large")

    def _check(self, scope, path: str, headers: dict) -> APIError | None:
        key = self.config.api_key
        allowed = self.config.allowed_hosts
        if not key and not path.startswith(OPEN_PATHS) and "*" not in allowed:
            name = _host_name(headers.get("host", ""))
            if not (loopback_host(name) or name in allowed):
                return APIError(400, "this server answers only to its loopback names without an API key (a page "
                                     "elsewhere could reach it through DNS rebinding): start it with --api-key, or "
                                     "name the host it is reached by with --allowed-hosts", None, "invalid_host")
        if key and path.startswith(("/v1/", "/metrics")) and not path.startswith(OPEN_PATHS):
            given = headers.get("authorization", "")
            token = given[7:].strip() if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode(), key.encode()):
                return APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", None,
                                "invalid_api_key")
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return APIError(415, f"content type must be application/json, not {ctype or 'none'}", None,
                                "unsupported_media_type")
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.config.max_body_bytes:
                return self._too_large()
        return None


def create_app(worker: ModelWorker, config: ServerConfig, metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or worker.metrics or Metrics()
    worker.metrics = metrics
    # no /docs or /redoc: their pages load Swagger UI from a CDN (nothing offline, a third party's
    # scripts next to the API); the schema itself stays at /openapi.json
    app = FastAPI(title="edge-vlm", version=__version__, docs_url=None, redoc_url=None,
                  description="OpenAI chat completions and the NIM VILA API over a local model.")
    names = {config.model_id, *config.aliases}
    budget = PixelBudget(config.max_server_pixels)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        errors = e.errors()
        err = errors[0] if errors else {}
        if err.get("type") == "json_invalid":
            return error_response(APIError(400, f"invalid JSON: {err.get('ctx', {}).get('error', 'cannot parse')}",
                                           None, "invalid_json"))
        # of a union's errors (content: a string, or a list of parts), the one that got deepest into the body
        paths = [_field_path(x.get("loc", ()), e.body, x.get("type") == "missing") for x in errors]
        if paths:
            k = max(range(len(paths)), key=lambda i: (len(paths[i]), -i))
            err, loc = errors[k], paths[k]
        else:
            loc = []
        param = ".".join(loc) or None
        msg = err.get("msg", "invalid request")
        if err.get("type") == "missing":
            msg = "required field is missing"
        return error_response(APIError(400, f"{param}: {msg}" if param else msg, param, err.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        msg = "no such route" if e.status_code == 404 else str(e.detail)
        return JSONResponse(error_body(e.status_code, f"{msg}: {request.method} {request.url.path}"),
                            status_code=e.status_code)

    @app.get("/v1/health/live", tags=["health"])
    async def live():
        return {"status": "live"}

    @app.get("/v1/health/ready", tags=["health"])
    async def ready():
        if not worker.ready:
            return JSONResponse(error_body(503, "the model is still loading", None, "not_ready"), status_code=503)
        return {"status": "ready"}

    @app.get("/v1/models", tags=["models"])
    async def models():
        ctx = worker.session.max_context if worker.ready else None
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": 0,
                                            "owned_by": "edge-vlm", "max_model_len": ctx,
                                            "aliases": sorted(names - {config.model_id})}]}

    @app.get("/metrics", tags=["metrics"])
    async def prometheus():
        return Response(metrics.render(worker), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def chat(body: protocol.ChatRequest, request: Request):
        deadline = time.monotonic() + config.request_timeout_s  # from arrival: media fetch and queue included
        body.check_fields(await request.json())
        if body.model is not None and body.model not in names:
            raise APIError(404, f"model {body.model!r} is not served here; this server has {config.model_id!r}",
                           "model", "model_not_found")
        if not worker.ready:
            raise APIError(503, "the model is still loading", None, "not_ready", {"Retry-After": "5"})
        template = worker.model.template
        if body.tools and template.tool_format is None:  # the model cannot take tools at all: say that first
            try:
                template.check_tools([{}], [])
            except EdgeVLMError as e:
                raise APIError(400, f"tools: {e}", "tools", "unsupported_field") from None
        plan = body.tool_plan(template.tool_format)
        context = body.context if isinstance(body.context, list) else [body.context] if body.context else []
        if context:
            try:
                template.check_tools([], context)
            except EdgeVLMError as e:
                raise APIError(400, f"context: {e}", "context", "context_not_supported") from None
        gen = body.to_generation_config(config.gen_defaults, plan)
        if gen.constraint is not None:  # a schema the grammar compiler refuses is the request's fault: 400 now
            try:  # compiled (then cached for the answer) and its first mask computed, before any decoding
                mask = compile_constraint(gen.constraint, worker.model.tokenizer, worker.model.eos_token_ids)
                mask.allowed(mask.vocab_size)
            except (EdgeVLMError, ValueError, RuntimeError) as e:
                param = body.field_of("constraint", plan)
                raise APIError(400, f"{param}: {e}", param, "invalid_value") from None
        try:
            place = worker.admit()  # before any media is read or decoded
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {worker.max_queue} requests already queued; retry later",
                           None, "queue_full", {"Retry-After": str(e.retry_after)}) from None
        try:
            reader = MediaReader(config.media, budget, Fit(worker.model))
            messages, _ = await reader.read(body, worker.model.is_multimodal, deadline)
            job = Job(messages, gen, asyncio.get_running_loop(), deadline, tools=plan.tools if plan else [],
                      context=context, place=place)
            worker.submit(job)
        except BaseException:
            place.release()
            raise
        try:
            opening = TOOL_CALL_SYNTAX[template.tool_format].opening if plan is not None else None
            return await _respond(job, request, body, metrics, config.model_id, opening)
        except BaseException:  # cancelled (shutdown) or failed here: the model must not go on for nobody
            job.cancel("disconnected")
            raise

    for path in ("/v1/chat/completions", "/v1/vlm/{org}/{name}"):
        app.add_api_route(path, chat, methods=["POST"], tags=["chat"],
                          summary="chat completion (OpenAI) / NIM VLM inference", response_model=None)

    if (STATIC / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        async def page():
            return Response((STATIC / "index.html").read_bytes(), media_type="text/html; charset=utf-8")

    app.add_middleware(Limits, config=config, metrics=metrics)
    if config.cors_origins:  # added last: the outermost, so the limits' own errors get CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Api-Key"])
    return app


async def _respond(job: Job, request: Request, body: protocol.ChatRequest, metrics: Metrics, model_id: str,
                   opening: str | None = None):
    """The answer as one chat.completion, or as a stream of chunks that starts at once (the role).
    `opening`: the tag that opens a tool call when the request offers tools (its calls are then
    the session's parsed ones, and `content` the text beside them)."""
    cid, created = protocol.completion_id(), protocol.now()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_events(job, request, cid, created, model_id, include_usage, metrics, opening),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, event = [], await _next(job, request)  # errors before the first token (prompt too long): plain 4xx
    while event[0] == "piece":
        text.append(event[1])
        event = await _next(job, request)
    if event[0] == "error":
        raise _stopped(job, event[1], metrics)
    result = event[1]
    return protocol.completion(cid, created, model_id, "".join(text) if opening is None else result.content, result)


async def _next(job: Job, request: Request):
    """The job's next event; stops the job when the client goes away or its time is up."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if time.monotonic() > job.deadline:
                job.cancel("timeout")
            elif await request.is_disconnected():
                job.cancel("disconnected")
                return ("error", None)


def _stopped(job: Job, error, metrics: Metrics) -> APIError:
    if error is not None:
        return error
    metrics.cancelled.labels(job.why_stopped or "stopped").inc()
    if job.why_stopped == "timeout":
        return APIError(504, "the request ran past the server's --request-timeout", None, "timeout")
    return APIError(499, "client closed the request", None, "client_closed")


def _field_path(loc, body, missing: bool) -> list[str]:
    """A pydantic error location as the request's own field path: the steps that lead through
    the body (keys and indices it has), without pydantic's names of union members ("str",
    "list[...]", a tagged union's tag); a missing field keeps its name at the end."""
    steps = [x for x in loc if x != "body"]
    out, node = [], body
    for n, step in enumerate(steps):
        if isinstance(node, dict) and isinstance(step, str) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
        elif missing and n == len(steps) - 1 and isinstance(node, dict):
            pass
        else:
            continue
        out.append(str(step))
    return out


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events(job: Job, request: Request, cid: str, created: int, model: str, include_usage: bool,
                  metrics: Metrics, opening: str | None = None):
    """chat.completion.chunk events: the role (at once), the text pieces, the finish reason, the
    usage, [DONE]; an error (a prompt over the context, a timeout) is an error event, then [DONE].
    With tools, text that may be call markup is held back; the calls follow as `tool_calls` deltas."""
    ended = False  # the worker's last event (done or error) was seen
    held = protocol.ContentFilter(opening) if opening is not None else None
    try:
        yield _sse(protocol.chunk(cid, created, model, {"role": "assistant", "content": ""}))
        event = await _next(job, request)
        while event[0] == "piece":
            piece = event[1] if held is None else held.push(event[1])
            if piece:
                yield _sse(protocol.chunk(cid, created, model, {"content": piece}))
            event = await _next(job, request)
        ended = True
        if event[0] == "error":
            e = _stopped(job, event[1], metrics)
            yield _sse(error_body(e.status, e.message, e.param, e.code))
        else:
            result = event[1]
            if held is not None:
                rest = held.rest(result.content)
                if rest:
                    yield _sse(protocol.chunk(cid, created, model, {"content": rest}))
                for delta in protocol.call_deltas(result.tool_calls):
                    yield _sse(protocol.chunk(cid, created, model, delta))
            yield _sse(protocol.chunk(cid, created, model, {}, protocol.finish_reason(result)))
            if include_usage:
                yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": protocol.usage(result), "timings": protocol.timings(result)})
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects mid-stream: the generation stops at its next token
        if not ended and not job.stop.is_set():
            job.cancel("disconnected")
            metrics.cancelled.labels("disconnected").inc()
