"""HTTP surface: OpenAI-compatible routes, Bearer auth, a body-size limit, OpenAI-style errors.

Every request problem is a 4xx with `{"error": {"message", "type", "param", "code"}}`; the engine runs on
its own thread and hands results back to the event loop, so a slow or broken request never blocks the
server. Streams are server-sent events ending with `data: [DONE]`; an idle stream sends `: keepalive`
comments, which is also how a vanished client is noticed while its request still waits in the queue.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mixq.serve import protocol as P
from mixq.serve.engine import Engine, EngineError
from mixq.serve.prompting import PromptError, build_chat_prompt, encode_completion_prompt
from mixq.serve.responses import ChatAssembler, CompletionAssembler, sse
from mixq.serve.sequence import GenRequest, SamplingParams

log = logging.getLogger("mixq.serve")
MAX_PROMPTS = 256


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, type_: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param


def error_body(message: str, type_: str = "invalid_request_error", code: Optional[str] = None,
               param: Optional[str] = None) -> dict:
    return P.ErrorResponse(error=P.ErrorInfo(message=message, type=type_, code=code, param=param)).model_dump()


def error_response(status: int, message: str, type_: str = "invalid_request_error", code: Optional[str] = None,
                   param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, param), status_code=status)


@dataclass
class ServeSettings:
    model_id: str
    aliases: tuple = ()
    api_key: Optional[str] = None
    max_body_bytes: int = 4 << 20
    context_length: int = 4096
    default_max_tokens: Optional[int] = None
    thinking_budget: Optional[int] = None
    keepalive_s: float = 2.0


# ---------------------------------------------------------------- ASGI middleware

async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """Reads the whole body up front (at most max_bytes, else 413) and replays it to the app."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await _send_json(send, 400, error_body("invalid Content-Length header"))
            if n > self.max_bytes:
                return await _send_json(send, 413, error_body(
                    f"request body of {n} bytes exceeds the limit of {self.max_bytes}", code="request_too_large"))
        body, more = bytearray(), True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if len(body) > self.max_bytes:
                return await _send_json(send, 413, error_body(
                    f"request body exceeds the limit of {self.max_bytes} bytes", code="request_too_large"))
            more = msg.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class BearerAuth:
    """`Authorization: Bearer KEY` on every /v1 route (constant-time compare); /health stays open."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").startswith("/v1"):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                return await _send_json(send, 401, error_body("invalid or missing API key", code="invalid_api_key"))
        return await self.app(scope, receive, send)


class Channel:
    """Engine thread -> event loop hand-off. The loop is woken at most once per batch of outputs (and, for a
    request that is not streamed, only for its last one), so a fast decode does not flood it with wake-ups."""

    def __init__(self, loop: asyncio.AbstractEventLoop, eager: bool):
        self.loop, self.eager = loop, eager
        self.items: list = []
        self.lock = threading.Lock()
        self.scheduled = False
        self.ready = asyncio.Event()

    def put(self, out) -> None:  # engine thread
        with self.lock:
            self.items.append(out)
            if self.scheduled or not (self.eager or out.finish_reason or out.error):
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self.ready.set)

    async def get(self, timeout: float) -> list:  # event loop
        await asyncio.wait_for(self.ready.wait(), timeout)
        with self.lock:
            items, self.items = self.items, []
            self.scheduled = False
            self.ready.clear()
        return items


# ---------------------------------------------------------------- the app

def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    app = FastAPI(title="mixq serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.settings = engine, settings
    names = {settings.model_id, *settings.aliases}
    tokenizer = engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return error_response(e.status, str(e), e.type, e.code, e.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500
                              else "server_error")

    @app.exception_handler(Exception)
    async def _unexpected(_request, e: Exception):  # a bug, not the client's fault: logged, reported as such
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(e).__name__}", "server_error")

    async def parse(request: Request, schema):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError("the request body is nested too deeply") from None
        if not isinstance(data, dict):
            raise APIError("the request body must be a JSON object")
        try:
            req = schema.model_validate(data)
        except RecursionError:
            raise APIError("the request body is nested too deeply") from None
        except ValidationError as e:
            errors = e.errors()
            field = errors[0].get("loc", ())[:1]
            # a union field fails once per alternative: say what each alternative wanted
            msgs = dict.fromkeys(str(x.get("msg")) for x in errors if x.get("loc", ())[:1] == field)
            loc = ".".join(str(x) for x in errors[0].get("loc", ())  # without pydantic's union member tags
                           if str(x) not in ("str", "int", "float", "bool", "dict") and "[" not in str(x))
            text = " | ".join(msgs)[:500]
            raise APIError(f"{loc}: {text}" if loc else text, param=str(field[0]) if field else None) from None
        if req.model not in names:
            raise APIError(f"the model {req.model!r} does not exist; this server serves {settings.model_id!r}",
                           404, code="model_not_found", param="model")
        return req

    def sampling(req, prompt_len: int, limit: Optional[int], *, allow_zero: bool) -> SamplingParams:
        ctx = settings.context_length
        if prompt_len >= ctx:
            raise APIError(f"the prompt has {prompt_len} tokens; this model's context is {ctx} tokens",
                           code="context_length_exceeded", param="messages")
        if limit is None:
            limit = ctx - prompt_len
            if settings.default_max_tokens:
                limit = min(limit, settings.default_max_tokens)
        if limit < (0 if allow_zero else 1):
            raise APIError(f"max_tokens must be at least {0 if allow_zero else 1}", param="max_tokens")
        if prompt_len + limit > ctx:
            raise APIError(f"prompt ({prompt_len} tokens) plus max_tokens ({limit}) exceeds the context of {ctx} "
                           "tokens", code="context_length_exceeded", param="max_tokens")
        bias = {}
        for k, v in (req.logit_bias or {}).items():
            if not k.lstrip("-").isdigit() or not 0 <= int(k) < engine.vocab_size:
                raise APIError(f"logit_bias: {k!r} is not a token id of this model", param="logit_bias")
            if not -100 <= v <= 100:
                raise APIError("logit_bias values must lie in [-100, 100]", param="logit_bias")
            bias[int(k)] = v
        temp = 1.0 if req.temperature is None else req.temperature
        return SamplingParams(max_tokens=limit, temperature=temp, top_p=1.0 if req.top_p is None else req.top_p,
                              seed=req.seed, stop=req.stop_list(), logit_bias=bias or None,
                              presence_penalty=req.presence_penalty or 0.0,
                              frequency_penalty=req.frequency_penalty or 0.0)

    def submit(gen: GenRequest, streaming: bool):
        channel = Channel(asyncio.get_running_loop(), eager=streaming)
        try:
            return engine.submit(gen, channel.put), channel
        except EngineError as e:
            raise APIError(str(e), e.status, "server_error" if e.status >= 500 else "rate_limit_error") from None

    async def outputs(request: Request, ticket, channel: "Channel", *, watch: bool):
        """The request's outputs up to its last; a vanished client cancels it (checked while idle)."""
        try:
            while True:
                try:
                    batch = await channel.get(settings.keepalive_s)
                except asyncio.TimeoutError:
                    if watch and await request.is_disconnected():
                        return
                    yield None  # idle: the caller may send a keepalive
                    continue
                for out in batch:
                    yield out
                    if out.finish_reason or out.error:
                        return
        finally:
            ticket.cancel()

    def sse_response(request: Request, ticket, channel: "Channel", render, first=None) -> StreamingResponse:
        """Server-sent events: the rendered chunks of every output, then `data: [DONE]`. A client that goes
        away ends the generator (Starlette cancels it, or the next write fails), which cancels the request."""
        async def events():
            try:
                if first is not None:
                    yield sse(first)
                async for out in outputs(request, ticket, channel, watch=False):
                    if out is None:
                        yield ": keepalive\n\n"
                        continue
                    if out.error:
                        yield sse(error_body(out.error, "server_error"))
                        break
                    for chunk in render(out):
                        yield sse(chunk)
                yield "data: [DONE]\n\n"
            finally:
                ticket.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------ routes

    @app.get("/health")
    async def health():
        if not engine.alive:
            return error_response(503, "the engine is not running", "server_error")
        return {"status": "ok", "model": settings.model_id, **engine.load()}

    @app.get("/v1/models")
    async def models():
        return P.ModelList(data=[P.ModelCard(id=settings.model_id, max_model_len=settings.context_length)]
                           ).model_dump()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, P.ChatCompletionRequest)
        tk = dict(req.chat_template_kwargs or {})
        budget = req.thinking_budget
        if budget is None and isinstance(tk.get("thinking_budget"), int):
            budget = tk["thinking_budget"]
        if budget is None:
            budget = settings.thinking_budget
        try:
            prompt = build_chat_prompt(tokenizer, req.messages, tools=req.tools, tool_choice=req.tool_choice,
                                       template_kwargs=tk, reasoning_effort=req.reasoning_effort,
                                       thinking_budget=budget)
        except PromptError as e:
            raise APIError(str(e), param="messages") from None
        params = sampling(req, len(prompt.tokens), req.token_limit(), allow_zero=False)
        params.logprobs, params.top_logprobs = bool(req.logprobs), int(req.top_logprobs or 0)
        gen = GenRequest(prompt=prompt.tokens, params=params, thinking=prompt.thinking, parse=True,
                         tools=prompt.tools, checkpoint=prompt.checkpoint)
        ticket, q = submit(gen, bool(req.stream))
        asm = ChatAssembler(settings.model_id, logprobs=params.logprobs)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            return sse_response(request, ticket, q, lambda out: asm.chunks(out, include_usage), asm.first_chunk())
        async for out in outputs(request, ticket, q, watch=True):
            if out is not None:
                if out.error:
                    return error_response(503, out.error, "server_error")
                asm.add(out)
        return asm.response()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, P.CompletionRequest)
        prompts = req.prompts()
        if len(prompts) > MAX_PROMPTS:
            raise APIError(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        if req.stream and len(prompts) != 1:
            raise APIError("streaming takes one prompt per request", param="prompt")
        if req.suffix:
            raise APIError("suffix is not supported", param="suffix")
        jobs = []
        for p in prompts:
            tokens = encode_completion_prompt(tokenizer, p)
            if not tokens:
                raise APIError("the prompt is empty", param="prompt")
            if any(t < 0 or t >= engine.vocab_size for t in tokens):
                raise APIError(f"prompt token ids must lie in [0, {engine.vocab_size})", param="prompt")
            params = sampling(req, len(tokens), req.max_tokens, allow_zero=True)
            params.logprobs = req.logprobs is not None
            params.top_logprobs = int(req.logprobs or 0)
            echo_text = (p if isinstance(p, str) else tokenizer.decode(tokens)) if req.echo else None
            gen = GenRequest(prompt=tokens, params=params, prompt_logprobs=bool(req.echo and params.logprobs))
            jobs.append((gen, echo_text))
        tickets = []
        try:
            for gen, _ in jobs:
                tickets.append(submit(gen, bool(req.stream)))
        except APIError:  # the queue filled up part-way: withdraw the prompts already queued
            for ticket, _ in tickets:
                ticket.cancel()
            raise
        asms = [CompletionAssembler(settings.model_id, i, gen, echo_text, engine.token_text)
                for i, (gen, echo_text) in enumerate(jobs)]
        if req.stream:
            (ticket, q), asm = tickets[0], asms[0]
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            return sse_response(request, ticket, q, lambda out: asm.chunks(out, include_usage))
        try:
            for (ticket, q), asm in zip(tickets, asms):
                async for out in outputs(request, ticket, q, watch=True):
                    if out is not None:
                        if out.error:
                            return error_response(503, out.error, "server_error")
                        asm.add(out)
        finally:
            for ticket, _ in tickets:
                ticket.cancel()
        return CompletionAssembler.merge(asms)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_key:  # added last: outermost, so a request without the key is refused before its body is read
        app.add_middleware(BearerAuth, key=settings.api_key)
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


__all__ = ["create_app", "ServeSettings", "APIError", "model_aliases", "context_length", "BodyLimit", "BearerAuth"]
