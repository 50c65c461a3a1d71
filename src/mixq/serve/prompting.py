"""Requests -> token prompts: the chat template, thinking on/off, tools, and the completions prompt.

Thinking off (a system message with `/no_think`, `chat_template_kwargs.enable_thinking = false`, or
`reasoning_effort = "none"`) is passed to the template; when the rendered prompt still ends in an open
think block (templates that always open one), the engine closes it itself by pre-filling the end tag, and
bans the start tag, so the model generates no reasoning at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from mixq.serve.parsing import CONTENT, REASONING, tool_formats_for
from mixq.serve.sequence import ThinkingPolicy


class PromptError(ValueError):
    """The request cannot be turned into a prompt (bad messages, template refused): a 400."""


@dataclass
class ChatPrompt:
    text: str
    tokens: list
    thinking: Optional[ThinkingPolicy]
    tools: list  # ToolFormat
    checkpoint: int  # tokens of the conversation before the generation prompt (prefix-cache point)


def thinking_requested_off(messages: list[dict], template_kwargs: dict, reasoning_effort: Optional[str]) -> bool:
    if reasoning_effort == "none":
        return True
    for k in ("enable_thinking", "thinking"):
        if k in template_kwargs and template_kwargs[k] is False:
            return True
    for m in messages:
        if m["role"] in ("system", "developer") and isinstance(m.get("content"), str) \
                and "/no_think" in m["content"]:
            return True
    return False


def _message_dicts(messages) -> list[dict]:
    out = []
    for m in messages:
        try:
            content = m.text()
        except ValueError as e:
            raise PromptError(str(e)) from e
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.role == "function":
            d["role"] = "tool"
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if d["content"] is None and not m.tool_calls and m.role != "assistant":
            raise PromptError(f"a {m.role} message needs content")
        out.append(d)
    return out


def _render(tokenizer, messages, tools, kwargs, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=add_generation_prompt,
                                             tokenize=False, **kwargs)
    except Exception as e:  # jinja raise_exception, missing keys in malformed messages, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PromptError(f"the chat template could not render these messages: {first}") from e


def _encode(tokenizer, text: str, **kw) -> list:
    try:
        return list(tokenizer.encode(text, **kw))
    except (TypeError, ValueError, UnicodeError) as e:  # text the tokenizer cannot take (a lone surrogate, ...)
        raise PromptError(f"the tokenizer cannot encode this text ({type(e).__name__})") from e


def build_chat_prompt(tokenizer, messages, *, tools: Optional[list] = None, tool_choice=None,
                      template_kwargs: Optional[dict] = None, reasoning_effort: Optional[str] = None,
                      thinking_budget: Optional[int] = None) -> ChatPrompt:
    if getattr(tokenizer, "chat_template", None) is None and getattr(tokenizer, "_chat_template", None) is None:
        raise PromptError("this model has no chat template; use /v1/completions")
    msgs = _message_dicts(messages)
    kwargs = {k: v for k, v in (template_kwargs or {}).items()
              if k not in ("messages", "tools", "add_generation_prompt", "tokenize", "conversation")}
    off = thinking_requested_off(msgs, kwargs, reasoning_effort)
    if off:
        kwargs["enable_thinking"] = False
    use_tools = tools if tools and tool_choice != "none" else None
    text = _render(tokenizer, msgs, use_tools, kwargs, add_generation_prompt=True)

    thinking = None
    if getattr(tokenizer, "has_thinking", False):
        start, end = tokenizer.think_start, tokenizer.think_end
        i = text.rfind(start)
        opened = i >= 0 and not text[i + len(start):].strip()
        if off and opened:
            text += end  # the template always opens the block: close it before the model starts
            opened = False
        thinking = ThinkingPolicy(start=start, end=end, start_ids=tuple(tokenizer.think_start_tokens or ()),
                                  end_ids=tuple(tokenizer.think_end_tokens or ()),
                                  initial=REASONING if opened else CONTENT, ban_start=off,
                                  budget=None if off else thinking_budget)
    tokens = _encode(tokenizer, text, add_special_tokens=False)

    checkpoint = 0
    if msgs[-1]["role"] != "assistant":
        try:
            history = _render(tokenizer, msgs, use_tools, kwargs, add_generation_prompt=False)
        except PromptError:
            history = ""
        if history and text.startswith(history) and len(history) < len(text):
            h = _encode(tokenizer, history, add_special_tokens=False)
            if tokens[: len(h)] == h:
                checkpoint = len(h)
    return ChatPrompt(text=text, tokens=tokens, thinking=thinking,
                      tools=tool_formats_for(tokenizer, tools) if use_tools else [], checkpoint=checkpoint)


def encode_completion_prompt(tokenizer, prompt) -> list:
    if isinstance(prompt, str):
        return _encode(tokenizer, prompt)
    return list(prompt)
