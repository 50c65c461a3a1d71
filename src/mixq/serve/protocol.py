"""OpenAI-compatible request and response schemas (pydantic), as in vLLM's entrypoints/openai/protocol.

Requests validate types strictly (a string where a number belongs is a 400, not a coercion); unknown
fields are ignored, as OpenAI clients send extras. Responses are what `openai` and lm-evaluation-harness read.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator,
                      model_validator)

Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20


class StreamOptions(BaseModel):
    include_usage: Optional[StrictBool] = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    temperature: Optional[Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0, le=2.0)]] = None
    top_p: Optional[Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0.0, le=1.0)]] = None
    n: Optional[Annotated[int, Field(strict=True, ge=1, le=1)]] = 1
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[StrictStr, Annotated[list[StrictStr], Field(max_length=MAX_STOP)]]] = None
    seed: Optional[StrictInt] = None
    logit_bias: Optional[dict[StrictStr, Float]] = None
    presence_penalty: Optional[Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-2.0, le=2.0)]] = None
    frequency_penalty: Optional[Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-2.0, le=2.0)]] = None
    user: Optional[StrictStr] = None

    def stop_list(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: Optional[StrictStr] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[Union[StrictStr, list[ContentPart]]] = None
    name: Optional[StrictStr] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[StrictStr] = None

    def text(self) -> Optional[str]:
        if self.content is None or isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.type != "text" or p.text is None:
                raise ValueError(f"content part of type {p.type!r} is not supported (text only)")
            parts.append(p.text)
        return "".join(parts)


class JsonSchemaFormat(BaseModel):
    name: Annotated[str, Field(strict=True, min_length=1, max_length=64)] = "response"
    description: Optional[StrictStr] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[StrictBool] = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("type json_schema needs json_schema.schema")
        return self


class NamedFunction(BaseModel):
    name: StrictStr


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


# fields of OpenAI's chat API this server does not implement: a request that sets one gets a 400
UNSUPPORTED_CHAT = ("functions", "function_call", "audio", "prediction", "web_search_options")


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Optional[StrictInt] = None
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_LOGPROBS)]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[StrictBool] = None
    response_format: Optional[ResponseFormat] = None
    modalities: Optional[list[Literal["text"]]] = None
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high"]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    # mixq extension: past this many reasoning tokens the think block is closed and the answer begins
    thinking_budget: Optional[Annotated[int, Field(strict=True, ge=0)]] = None

    @field_validator("tools")
    @classmethod
    def _tools_have_names(cls, v):
        for t in v or []:
            f = t.get("function") if isinstance(t, dict) else None
            if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                raise ValueError("every tool needs {'type': 'function', 'function': {'name': ...}}")
        return v

    def problem(self, raw: dict) -> Optional[tuple[str, str]]:
        """(param, message) for a request that is well-typed but asks what this server cannot do."""
        for k in UNSUPPORTED_CHAT:
            if raw.get(k) is not None:
                return k, f"{k} is not supported by this server" + (" (use tools and tool_choice)"
                                                                    if k.startswith("function") else "")
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        if (named or self.tool_choice == "required") and not self.tools:
            return "tool_choice", "tool_choice requires a function call but the request offers no tools"
        if named and named not in [t["function"]["name"] for t in self.tools]:
            return "tool_choice", f"tool_choice names {named[:80]!r}, which is not among the tools"
        return None

    def token_limit(self) -> tuple[Optional[int], str]:
        """(the limit, the field it came from)"""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(_Request):
    prompt: Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1)]]
    max_tokens: Optional[StrictInt] = 16
    logprobs: Optional[Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_LOGPROBS)]] = None
    echo: Optional[StrictBool] = False
    best_of: Optional[Annotated[int, Field(strict=True, ge=1, le=1)]] = None
    suffix: Optional[StrictStr] = None

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)



# ---------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    completion_tokens_details: Optional[CompletionTokensDetails] = None
    prompt_tokens_details: Optional[PromptTokensDetails] = None

    @classmethod
    def of(cls, u: Optional[dict]) -> "Usage":
        u = u or {}
        p, c = u.get("prompt_tokens", 0), u.get("completion_tokens", 0)
        return cls(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                   completion_tokens_details=CompletionTokensDetails(reasoning_tokens=u.get("reasoning_tokens", 0)),
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=u.get("cached_tokens", 0)))

    def __add__(self, o: "Usage") -> "Usage":
        return Usage.of({"prompt_tokens": self.prompt_tokens + o.prompt_tokens,
                         "completion_tokens": self.completion_tokens + o.completion_tokens,
                         "reasoning_tokens": self.completion_tokens_details.reasoning_tokens
                         + o.completion_tokens_details.reasoning_tokens,
                         "cached_tokens": self.prompt_tokens_details.cached_tokens
                         + o.prompt_tokens_details.cached_tokens})


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    index: Optional[int] = None
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionLogprobs(BaseModel):
    """The legacy format lm-evaluation-harness reads: one entry per token (echoed prompt, then output)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "mixq"
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
