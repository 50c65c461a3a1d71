"""OpenAI's Responses API, `POST /v1/responses` (stream or not, reasoning items, function calls), translated
into the chat pipeline every route shares and rendered back as output items and typed stream events.

Responses are not stored: `previous_response_id` is refused (send the conversation as `input`), and every
response says `"store": false`."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from mixq.serve import protocol as P
from mixq.serve.errors import APIError, error_body
from mixq.serve.render_parts import CALL, REASONING, TEXT, Parts
from mixq.serve.serving import Serving, translated_chat_request

UNSUPPORTED = ("previous_response_id", "conversation", "prompt", "background")


class Item(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Optional[StrictStr] = None
    role: Optional[Literal["user", "assistant", "system", "developer"]] = None
    content: Optional[Union[StrictStr, list[dict[str, Any]]]] = None
    call_id: Optional[StrictStr] = None
    name: Optional[StrictStr] = None
    arguments: Optional[StrictStr] = None
    output: Optional[Union[StrictStr, list[dict[str, Any]]]] = None


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: StrictStr
    name: Optional[StrictStr] = None
    description: Optional[StrictStr] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[StrictBool] = None


class TextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[StrictStr] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[StrictBool] = None


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: Optional[TextFormat] = None


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="ignore")

    effort: Optional[Literal["none", "minimal", "low", "medium", "high"]] = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    input: Union[StrictStr, Annotated[list[Item], Field(min_length=1)]]
    instructions: Optional[StrictStr] = None
    max_output_tokens: Optional[StrictInt] = None
    temperature: Optional[Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0, le=2.0)]] = None
    top_p: Optional[Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0.0, le=1.0)]] = None
    stream: Optional[StrictBool] = False
    tools: Optional[list[FunctionTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    parallel_tool_calls: Optional[StrictBool] = None
    reasoning: Optional[Reasoning] = None
    text: Optional[TextOptions] = None
    store: Optional[StrictBool] = None
    metadata: Optional[dict[str, Any]] = None


def _text(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    out = []
    for part in content:
        if part.get("type") not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise APIError(f"{where}: content of type {part.get('type')!r} is not supported (text only)",
                           param="input")
        out.append(part["text"])
    return "".join(out)


def _messages(req: ResponsesRequest) -> list[dict]:
    out = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if isinstance(req.input, str):
        return out + [{"role": "user", "content": req.input}]
    for i, it in enumerate(req.input):
        where, kind = f"input.{i}", it.type or "message"
        if kind == "message":
            if it.role is None:
                raise APIError(f"{where}: a message needs a role", param="input")
            out.append({"role": it.role, "content": _text(it.content, where)})
        elif kind == "function_call":
            call = {"id": it.call_id or "", "type": "function",
                    "function": {"name": it.name or "", "arguments": it.arguments or "{}"}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": it.call_id or "", "content": _text(it.output, where)})
        elif kind == "reasoning":
            continue  # past reasoning is not shown to the model again (as its chat template does)
        else:
            raise APIError(f"{where}: input items of type {kind!r} are not supported", param="input")
    return out


def _tools(req: ResponsesRequest) -> Optional[list]:
    tools = []
    for i, t in enumerate(req.tools or []):
        if t.type != "function" or not t.name:
            raise APIError(f"tools.{i}: only function tools are supported (got {t.type!r})", param="tools")
        tools.append({"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                       "parameters": t.parameters or {"type": "object"}}})
    return tools or None


def to_chat(req: ResponsesRequest, raw: dict) -> P.ChatCompletionRequest:
    for k in UNSUPPORTED:
        if raw.get(k) is not None:
            raise APIError(f"{k} is not supported by this server (responses are not stored; send the whole "
                           "conversation as input)" if k == "previous_response_id" else f"{k} is not supported",
                           param=k)
    chat: dict = {"model": req.model, "messages": _messages(req), "max_completion_tokens": req.max_output_tokens,
                  "temperature": req.temperature, "top_p": req.top_p, "tools": _tools(req),
                  "parallel_tool_calls": req.parallel_tool_calls}
    tc = req.tool_choice
    if isinstance(tc, dict):
        if tc.get("type") != "function" or not isinstance(tc.get("name"), str):
            raise APIError("tool_choice: only {'type': 'function', 'name': ...} is supported", param="tool_choice")
        tc = {"type": "function", "function": {"name": tc["name"]}}
    chat["tool_choice"] = tc
    if req.reasoning is not None and req.reasoning.effort is not None:
        chat["reasoning_effort"] = req.reasoning.effort
    f = req.text.format if req.text is not None else None
    if f is not None and f.type != "text":
        chat["response_format"] = {"type": f.type} if f.type == "json_object" else {
            "type": "json_schema", "json_schema": {"name": f.name or "response", "schema": f.schema_,
                                                   "strict": f.strict}}
    return translated_chat_request(chat)


class ResponseRender:
    """Engine outputs -> a Responses API `response` object (collected) or its typed stream events."""

    def __init__(self, model: str, req: ResponsesRequest):
        self.id, self.model, self.req = f"resp_{uuid.uuid4().hex}", model, req
        self.created = int(time.time())
        self.parts = Parts()
        self.item_ids: dict[int, str] = {}
        self.call_ids: dict[int, str] = {}
        self.finish: Optional[str] = None
        self.usage: Optional[dict] = None
        self.seq = 0

    def _item_id(self, part) -> str:
        prefix = {REASONING: "rs", TEXT: "msg", CALL: "fc"}[part.kind]
        return self.item_ids.setdefault(part.index, f"{prefix}_{uuid.uuid4().hex[:24]}")

    def item(self, part, done: bool = True) -> dict:
        status = "completed" if done else "in_progress"
        if part.kind == REASONING:
            return {"type": "reasoning", "id": self._item_id(part), "summary": [], "status": status,
                    "content": [{"type": "reasoning_text", "text": part.text}] if done else []}
        if part.kind == TEXT:
            return {"type": "message", "id": self._item_id(part), "role": "assistant", "status": status,
                    "content": [self._text_part(part.text)] if done else []}
        return {"type": "function_call", "id": self._item_id(part), "status": status, "name": part.name,
                "call_id": self.call_ids.setdefault(part.index, f"call_{uuid.uuid4().hex[:24]}"),
                "arguments": part.text if done else ""}

    @staticmethod
    def _text_part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def response(self, status: Optional[str] = None) -> dict:
        if status is None:
            status = "incomplete" if self.finish == "length" else "completed"
        u = self.usage or {}
        usage = None if self.usage is None else {
            "input_tokens": u.get("prompt_tokens", 0), "output_tokens": u.get("completion_tokens", 0),
            "total_tokens": u.get("prompt_tokens", 0) + u.get("completion_tokens", 0),
            "input_tokens_details": {"cached_tokens": u.get("cached_tokens", 0)},
            "output_tokens_details": {"reasoning_tokens": u.get("reasoning_tokens", 0)}}
        done = status in ("completed", "incomplete")
        req = self.req
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.model, "output": [self.item(p) for p in self.parts.parts] if done else [],
                "usage": usage, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
                "parallel_tool_calls": req.parallel_tool_calls is not False,
                "temperature": req.temperature, "top_p": req.top_p, "tool_choice": req.tool_choice or "auto",
                "tools": [t.model_dump(exclude_none=True) for t in req.tools or []], "store": False,
                "text": {"format": {"type": "text"}} if req.text is None else req.text.model_dump(
                    exclude_none=True, by_alias=True), "metadata": req.metadata or {}}

    def add(self, out) -> None:
        self.parts.feed(out.delta)
        if out.finish_reason:
            self.finish, self.usage = out.finish_reason, out.usage or {}

    # the stream
    def _event(self, kind: str, **data) -> str:
        body = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    def start(self) -> list:
        r = self.response("in_progress")
        return [self._event("response.created", response=r), self._event("response.in_progress", response=r)]

    def render(self, out) -> list:
        lines = []
        for e in self.parts.feed(out.delta) + (self.parts.finish() if out.finish_reason else []):
            lines += getattr(self, f"_on_{e.what}")(e)
        if out.finish_reason:
            self.finish, self.usage = out.finish_reason, out.usage or {}
            r = self.response()
            lines.append(self._event(f"response.{r['status']}", response=r))
        return lines

    def _where(self, part, content: bool = True) -> dict:
        d = {"item_id": self._item_id(part), "output_index": part.index}
        return {**d, "content_index": 0} if content else d

    def _on_start(self, e) -> list:
        p = e.part
        lines = [self._event("response.output_item.added", output_index=p.index, item=self.item(p, done=False))]
        if p.kind == TEXT:
            lines.append(self._event("response.content_part.added", **self._where(p), part=self._text_part("")))
        return lines

    def _on_delta(self, e) -> list:
        p = e.part
        if p.kind == REASONING:
            return [self._event("response.reasoning_text.delta", **self._where(p), delta=e.delta)]
        if p.kind == TEXT:
            return [self._event("response.output_text.delta", **self._where(p), delta=e.delta, logprobs=[])]
        return [self._event("response.function_call_arguments.delta", **self._where(p, False), delta=e.delta)]

    def _on_stop(self, e) -> list:
        p = e.part
        if p.kind == REASONING:
            lines = [self._event("response.reasoning_text.done", **self._where(p), text=p.text)]
        elif p.kind == TEXT:
            lines = [self._event("response.output_text.done", **self._where(p), text=p.text, logprobs=[]),
                     self._event("response.content_part.done", **self._where(p), part=self._text_part(p.text))]
        else:
            lines = [self._event("response.function_call_arguments.done", **self._where(p, False), name=p.name,
                                 arguments=p.text)]
        return lines + [self._event("response.output_item.done", output_index=p.index, item=self.item(p))]

    def error(self, message: str) -> list:
        err = error_body(message, "server_error", code="server_error")["error"]
        return [self._event("error", code=err["code"], message=message, param=None),
                self._event("response.failed", response={**self.response("failed"),
                                                         "error": {"code": "server_error", "message": message}})]

    def end(self) -> list:
        return []


def responses_router(s: Serving) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/responses")
    async def responses(request: Request):
        req, raw = await s.parse(request, ResponsesRequest)
        gen = s.chat_job(to_chat(req, raw), prompt_param="input")
        ticket, q = s.submit(gen, bool(req.stream))
        render = ResponseRender(req.model, req)
        if req.stream:
            return s.stream(request, ticket, q, render)
        error = await s.collect(request, ticket, q, render.add)
        if error:
            raise APIError(error, 503, "server_error")
        return render.response()

    return router


__all__ = ["responses_router", "ResponsesRequest", "ResponseRender", "to_chat"]
