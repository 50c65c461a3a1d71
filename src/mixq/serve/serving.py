"""What every API route shares: request parsing, sampling limits, the chat pipeline, hand-off to the engine,
and streaming (as vLLM's serving_engine). The OpenAI, Anthropic and Responses routes only translate."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from mixq.serve import protocol as P
from mixq.serve.engine import Engine, EngineError
from mixq.serve.errors import APIError, quoted
from mixq.serve.parsing import REASONING
from mixq.serve.prompting import PromptError, build_chat_prompt
from mixq.serve.sequence import GenRequest, SamplingParams
from mixq.serve.structured import ConstraintError, Grammars

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass
class ServeSettings:
    model_id: str
    aliases: tuple = ()
    api_key: Optional[str] = None
    max_body_bytes: int = 4 << 20
    body_timeout_s: float = 30.0  # the whole request body must arrive within this
    allowed_hosts: Optional[tuple] = ()  # Host names besides loopback a keyless server answers (None: any)
    context_length: int = 4096
    default_max_tokens: Optional[int] = None
    thinking_budget: Optional[int] = None
    keepalive_s: float = 2.0


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


def _surrogate_path(data: Any) -> Optional[str]:
    """Where the parsed body holds a lone UTF-16 surrogate (`"\\ud800"`), which no tokenizer can encode."""
    stack: list = [((), data)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return ".".join(str(p) for p in path) or "body"
        elif isinstance(v, dict):
            stack.extend(((*path, k), x) for k, x in v.items())
            stack.extend(((*path, k), k) for k in v)
        elif isinstance(v, list):
            stack.extend(((*path, i), x) for i, x in enumerate(v))
    return None


def _validation_error(e: ValidationError) -> APIError:
    errors = e.errors()
    field = errors[0].get("loc", ())[:1]
    # a union field fails once per alternative: say what each alternative wanted
    msgs = dict.fromkeys(str(x.get("msg")) for x in errors if x.get("loc", ())[:1] == field)
    loc = ".".join(str(x) for x in errors[0].get("loc", ())  # without pydantic's union member tags
                   if str(x) not in ("str", "int", "float", "bool", "dict") and "[" not in str(x)
                   and not str(x).startswith("function-"))
    text = " | ".join(msgs)[:500]
    return APIError(f"{loc}: {text}" if loc else text, param=str(field[0]) if field else None)


def translated_chat_request(chat: dict) -> P.ChatCompletionRequest:
    """A chat request built from another API's request (Anthropic Messages, Responses), checked like one."""
    try:
        out = P.ChatCompletionRequest.model_validate(chat)
    except ValueError as e:
        raise APIError(str(e).splitlines()[-1] if str(e) else "invalid request") from None
    problem = out.problem(chat)
    if problem is not None:
        raise APIError(problem[1], param=problem[0])
    return out


class Serving:
    """The engine and settings behind every route."""

    def __init__(self, engine: Engine, settings: ServeSettings):
        self.engine, self.settings, self.tokenizer = engine, settings, engine.tokenizer
        self.names = {settings.model_id, *settings.aliases}
        self.grammars = Grammars(engine.tokenizer, engine.vocab_size)

    # ------------------------------------------------------------ requests

    async def parse(self, request: Request, schema) -> tuple[Any, dict]:
        """(validated request, the raw JSON object); every problem is an APIError."""
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError("the request body is nested too deeply") from None
        if not isinstance(data, dict):
            raise APIError("the request body must be a JSON object")
        if _SURROGATE_ESCAPE.search(raw) and (where := _surrogate_path(data)) is not None:
            raise APIError(f"{where}: the text holds an unpaired UTF-16 surrogate, which is not a character",
                           param=where.split(".")[0])
        try:
            req = schema.model_validate(data)
        except RecursionError:
            raise APIError("the request body is nested too deeply") from None
        except ValidationError as e:
            raise _validation_error(e) from None
        self.check_model(req.model)
        return req, data

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise APIError(f"the model {quoted(name)} does not exist; this server serves {self.settings.model_id!r}",
                           404, code="model_not_found", param="model")

    def sampling(self, req, prompt_len: int, limit: Optional[int], *, allow_zero: bool,
                 limit_param: str = "max_tokens", prompt_param: str = "messages") -> SamplingParams:
        ctx = self.settings.context_length
        if prompt_len >= ctx:
            raise APIError(f"the prompt has {prompt_len} tokens; this model's context is {ctx} tokens",
                           code="context_length_exceeded", param=prompt_param)
        if limit is None:
            limit = ctx - prompt_len
            if self.settings.default_max_tokens:
                limit = min(limit, self.settings.default_max_tokens)
        if limit < (0 if allow_zero else 1):
            raise APIError(f"{limit_param} must be at least {0 if allow_zero else 1}", param=limit_param)
        if prompt_len + limit > ctx:
            raise APIError(f"prompt ({prompt_len} tokens) plus {limit_param} ({limit}) exceeds the context of {ctx} "
                           "tokens", code="context_length_exceeded", param=limit_param)
        bias = {}
        for k, v in (getattr(req, "logit_bias", None) or {}).items():
            if not k.lstrip("-").isdigit() or not 0 <= int(k) < self.engine.vocab_size:
                raise APIError(f"logit_bias: {quoted(k)} is not a token id of this model", param="logit_bias")
            if not -100 <= v <= 100:
                raise APIError("logit_bias values must lie in [-100, 100]", param="logit_bias")
            bias[int(k)] = v
        g = lambda name, default: default if getattr(req, name, None) is None else getattr(req, name)  # noqa: E731
        return SamplingParams(max_tokens=limit, temperature=g("temperature", 1.0), top_p=g("top_p", 1.0),
                              seed=g("seed", None), stop=req.stop_list(), logit_bias=bias or None,
                              presence_penalty=g("presence_penalty", 0.0), frequency_penalty=g("frequency_penalty", 0.0))

    def chat_job(self, req: P.ChatCompletionRequest, prompt_param: str = "messages") -> GenRequest:
        """A chat request (or one translated into it) -> the engine's request: prompt, sampling, constraint."""
        tk = dict(req.chat_template_kwargs or {})
        budget = req.thinking_budget
        if budget is None and isinstance(tk.get("thinking_budget"), int):
            budget = tk["thinking_budget"]
        if budget is None:
            budget = self.settings.thinking_budget
        try:
            prompt = build_chat_prompt(self.tokenizer, req.messages, tools=req.tools, tool_choice=req.tool_choice,
                                       template_kwargs=tk, reasoning_effort=req.reasoning_effort,
                                       thinking_budget=budget)
        except PromptError as e:
            raise APIError(str(e), param=prompt_param) from None
        limit, limit_param = req.token_limit()
        params = self.sampling(req, len(prompt.tokens), limit, allow_zero=False, limit_param=limit_param,
                               prompt_param=prompt_param)
        params.logprobs, params.top_logprobs = bool(req.logprobs), int(req.top_logprobs or 0)
        return GenRequest(prompt=prompt.tokens, params=params, thinking=prompt.thinking, parse=True,
                          tools=prompt.tools, checkpoint=prompt.checkpoint, constraint=self.constraint(req, prompt),
                          parallel_tool_calls=req.parallel_tool_calls is not False)

    def constraint(self, req: P.ChatCompletionRequest, prompt) -> Optional[Callable]:
        """The grammar processor factory for response_format / a forced tool call, or None."""
        rf, tc = req.response_format, req.tool_choice
        forced = tc == "required" or isinstance(tc, P.NamedToolChoice)
        if forced and rf is not None and rf.type != "text":
            raise APIError("response_format and a forced tool call cannot apply together", param="response_format")
        try:
            if forced:
                tools = req.tools if tc == "required" else [t for t in req.tools
                                                            if t["function"]["name"] == tc.function.name]
                parallel = tc == "required" and req.parallel_tool_calls is not False
                c = self.grammars.tool_call(tools, prompt.tools[0], parallel)
            elif rf is not None and rf.type == "json_object":
                c = self.grammars.json(None)
            elif rf is not None and rf.type == "json_schema":
                c = self.grammars.json(rf.json_schema.schema_)
            else:
                return None
        except ConstraintError as e:
            raise APIError(f"{'tool_choice' if forced else 'response_format'}: {e}",
                           param="tool_choice" if forced else "response_format") from None
        think = prompt.thinking
        ids = (think.start_ids, think.end_ids) if think is not None and think.end_ids else None
        reasoning = think is not None and think.initial == REASONING
        return lambda: self.grammars.processor(c, ids, reasoning)

    # ------------------------------------------------------------ the engine

    def submit(self, gen: GenRequest, streaming: bool):
        channel = Channel(asyncio.get_running_loop(), eager=streaming)
        try:
            return self.engine.submit(gen, channel.put), channel
        except EngineError as e:
            raise APIError(str(e), e.status, "server_error" if e.status >= 500 else "rate_limit_error") from None

    async def outputs(self, request: Request, ticket, channel: Channel, *, watch: bool):
        """The request's outputs up to its last; a vanished client cancels it (checked while idle)."""
        try:
            while True:
                try:
                    batch = await channel.get(self.settings.keepalive_s)
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

    async def collect(self, request: Request, ticket, channel: Channel, add: Callable) -> Optional[str]:
        """Feeds every output of a request that is not streamed to `add`; returns the engine's error, if any."""
        async for out in self.outputs(request, ticket, channel, watch=True):
            if out is not None:
                if out.error:
                    return out.error
                add(out)
        return None

    def stream(self, request: Request, ticket, channel: Channel, renderer) -> StreamingResponse:
        """Server-sent events: renderer.start(), renderer.render(out) for every output, then renderer.end(),
        or renderer.error(message) and renderer.end() when the engine fails the request (at shutdown, say).
        A client that goes away ends the generator (Starlette cancels it, or a write fails): that cancels it."""
        async def events():
            try:
                for s in renderer.start():
                    yield s
                async for out in self.outputs(request, ticket, channel, watch=False):
                    if out is None:
                        yield ": keepalive\n\n"
                        continue
                    if out.error:
                        for s in renderer.error(out.error):
                            yield s
                        break
                    for s in renderer.render(out):
                        yield s
                for s in renderer.end():
                    yield s
            finally:
                ticket.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["Serving", "ServeSettings", "Channel"]
