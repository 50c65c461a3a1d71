"""Anthropic's Messages API, `POST /v1/messages` (stream or not, thinking blocks, tool use), translated into
the chat pipeline every route shares and rendered back as Anthropic content blocks and events."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from mixq.serve import protocol as P
from mixq.serve.errors import APIError
from mixq.serve.render_parts import CALL, REASONING, TEXT, Parts, call_input
from mixq.serve.serving import Serving, translated_chat_request

Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def anthropic_error(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


class Block(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: Optional[StrictStr] = None
    id: Optional[StrictStr] = None
    name: Optional[StrictStr] = None
    input: Optional[dict[str, Any]] = None
    tool_use_id: Optional[StrictStr] = None
    content: Optional[Union[StrictStr, list["Block"]]] = None
    thinking: Optional[StrictStr] = None


class Message(BaseModel):
    role: Literal["user", "assistant"]
    content: Union[StrictStr, list[Block]]


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: Annotated[str, Field(strict=True, min_length=1)]
    description: Optional[StrictStr] = None
    input_schema: dict[str, Any]
    type: Optional[Literal["custom"]] = None


class ToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[StrictStr] = None
    disable_parallel_tool_use: Optional[StrictBool] = None


class Thinking(BaseModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Optional[Annotated[int, Field(strict=True, ge=1)]] = None


class OutputFormat(BaseModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    effort: Optional[StrictStr] = None  # accepted; reasoning here is on or off, with a token budget
    format: Optional[OutputFormat] = None


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: StrictInt
    messages: Annotated[list[Message], Field(min_length=1)]
    system: Optional[Union[StrictStr, list[Block]]] = None
    stop_sequences: Optional[Annotated[list[StrictStr], Field(max_length=P.MAX_STOP)]] = None
    temperature: Optional[Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0, le=1.0)]] = None
    top_p: Optional[Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0.0, le=1.0)]] = None
    top_k: Optional[StrictInt] = None
    stream: Optional[StrictBool] = False
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[Thinking] = None
    output_config: Optional[OutputConfig] = None
    metadata: Optional[dict[str, Any]] = None


def _text(blocks, where: str) -> str:
    if isinstance(blocks, str) or blocks is None:
        return blocks or ""
    out = []
    for b in blocks:
        if b.type != "text" or b.text is None:
            raise APIError(f"{where}: content blocks of type {b.type!r} are not supported here", param=where)
        out.append(b.text)
    return "".join(out)


def _messages(req: MessagesRequest) -> list[dict]:
    """Anthropic turns -> OpenAI-style chat messages (tool results become `tool` messages)."""
    out = [{"role": "system", "content": _text(req.system, "system")}] if req.system else []
    for i, m in enumerate(req.messages):
        where = f"messages.{i}.content"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        text, calls = [], []
        for b in m.content:
            if b.type == "text":
                text.append(b.text or "")
            elif b.type == "tool_result" and m.role == "user":
                out.append({"role": "tool", "tool_call_id": b.tool_use_id or "", "content": _text(b.content, where)})
            elif b.type == "tool_use" and m.role == "assistant":
                calls.append({"id": b.id or "", "type": "function",
                              "function": {"name": b.name or "", "arguments": json.dumps(b.input or {})}})
            elif b.type in ("thinking", "redacted_thinking") and m.role == "assistant":
                continue  # past reasoning is not shown to the model again (as its chat template does)
            else:
                raise APIError(f"{where}: a {m.role} block of type {b.type!r} is not supported", param="messages")
        if text or calls or m.role == "assistant":
            msg: dict = {"role": m.role, "content": "".join(text) if text or not calls else None}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    return out


def to_chat(req: MessagesRequest) -> P.ChatCompletionRequest:
    if req.top_k is not None:
        raise APIError("top_k is not supported by this server", param="top_k")
    chat: dict = {"model": req.model, "messages": _messages(req), "max_tokens": req.max_tokens,
                  "temperature": req.temperature, "top_p": req.top_p, "stop": req.stop_sequences}
    t = req.thinking
    if t is None or t.type == "disabled":  # Anthropic's default: no thinking unless asked for
        chat["chat_template_kwargs"] = {"enable_thinking": False}
    elif t.budget_tokens is not None:
        if t.budget_tokens >= req.max_tokens:
            raise APIError("thinking.budget_tokens must be less than max_tokens", param="thinking")
        chat["thinking_budget"] = t.budget_tokens
    if req.tools:
        chat["tools"] = [{"type": "function", "function": {"name": x.name, "description": x.description or "",
                                                           "parameters": x.input_schema}} for x in req.tools]
    if req.output_config is not None and req.output_config.format is not None:
        chat["response_format"] = {"type": "json_schema", "json_schema": {"schema": req.output_config.format.schema_}}
    tc = req.tool_choice
    if tc is not None:
        if tc.type == "tool" and not tc.name:
            raise APIError("tool_choice of type tool needs a name", param="tool_choice")
        chat["tool_choice"] = {"auto": "auto", "none": "none", "any": "required"}.get(
            tc.type, {"type": "function", "function": {"name": tc.name}})
        if tc.disable_parallel_tool_use:
            chat["parallel_tool_calls"] = False
    return translated_chat_request(chat)


class MessageRender:
    """Engine outputs -> an Anthropic message (collected) or its stream events."""

    def __init__(self, model: str, prompt_tokens: int):
        self.id, self.model = f"msg_{uuid.uuid4().hex[:24]}", model
        self.parts = Parts()
        self.ids: dict[int, str] = {}
        self.finish: Optional[str] = None
        self.stop_text: Optional[str] = None
        self.usage = {"input_tokens": prompt_tokens, "output_tokens": 0}

    def _tool_id(self, index: int) -> str:
        return self.ids.setdefault(index, f"toolu_{uuid.uuid4().hex[:24]}")

    def _block(self, part, full: bool) -> dict:
        if part.kind == REASONING:
            return {"type": "thinking", "thinking": part.text if full else "", "signature": ""}
        if part.kind == TEXT:
            return {"type": "text", "text": part.text if full else ""}
        return {"type": "tool_use", "id": self._tool_id(part.index), "name": part.name,
                "input": call_input(part) if full else {}}

    def _end(self, out) -> None:
        u = out.usage or {}
        cached = u.get("cached_tokens", 0)
        self.usage = {"input_tokens": u.get("prompt_tokens", 0) - cached, "output_tokens": u.get("completion_tokens", 0),
                      "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}
        self.finish, self.stop_text = out.finish_reason, out.stop_text

    def _stop_reason(self) -> str:
        return "stop_sequence" if self.stop_text is not None else STOP_REASONS.get(self.finish, "end_turn")

    def message(self, content: Optional[list] = None) -> dict:
        done = content is None
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [self._block(p, True) for p in self.parts.parts] if done else content,
                "stop_reason": self._stop_reason() if done else None,
                "stop_sequence": self.stop_text if done else None, "usage": self.usage}

    def add(self, out) -> None:
        self.parts.feed(out.delta)
        if out.finish_reason:
            self._end(out)

    # the stream
    def start(self) -> list:
        return [_event("message_start", {"message": self.message([])})]

    def render(self, out) -> list:
        events = self.parts.feed(out.delta) + (self.parts.finish() if out.finish_reason else [])
        lines = [self._event(e) for e in events]
        if out.finish_reason:
            self._end(out)
            lines.append(_event("message_delta", {"delta": {"stop_reason": self._stop_reason(),
                                                            "stop_sequence": self.stop_text},
                                                  "usage": self.usage}))
            lines.append(_event("message_stop", {}))
        return lines

    def _event(self, e) -> str:
        if e.what == "start":
            return _event("content_block_start", {"index": e.part.index, "content_block": self._block(e.part, False)})
        if e.what == "stop":
            return _event("content_block_stop", {"index": e.part.index})
        kind = {REASONING: ("thinking_delta", "thinking"), TEXT: ("text_delta", "text"),
                CALL: ("input_json_delta", "partial_json")}[e.part.kind]
        return _event("content_block_delta", {"index": e.part.index, "delta": {"type": kind[0], kind[1]: e.delta}})

    def error(self, message: str) -> list:
        return [_event("error", anthropic_error(503, message))]

    def end(self) -> list:
        return []


def _event(kind: str, data: dict) -> str:
    body = {"type": kind, **data} if kind != "error" else data
    return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"


def anthropic_router(s: Serving) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/messages")
    async def messages(request: Request):
        req, _ = await s.parse(request, MessagesRequest)
        gen = s.chat_job(to_chat(req))
        ticket, q = s.submit(gen, bool(req.stream))
        render = MessageRender(req.model, len(gen.prompt))
        if req.stream:
            return s.stream(request, ticket, q, render)
        error = await s.collect(request, ticket, q, render.add)
        if error:
            raise APIError(error, 503, "server_error")
        return render.message()

    @router.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        req, _ = await s.parse(request, _CountRequest)
        full = MessagesRequest.model_validate({**req.model_dump(exclude_none=True), "max_tokens": 1})
        chat = to_chat(full)
        from mixq.serve.prompting import PromptError, build_chat_prompt

        try:
            prompt = build_chat_prompt(s.tokenizer, chat.messages, tools=chat.tools, tool_choice=chat.tool_choice,
                                       template_kwargs=chat.chat_template_kwargs or {})
        except PromptError as e:
            raise APIError(str(e), param="messages") from None
        return {"input_tokens": len(prompt.tokens)}

    return router


class _CountRequest(MessagesRequest):
    max_tokens: Optional[StrictInt] = None  # count_tokens takes none


__all__ = ["anthropic_router", "anthropic_error", "MessagesRequest", "to_chat", "MessageRender"]
