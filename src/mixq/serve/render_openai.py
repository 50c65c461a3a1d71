"""Engine outputs -> OpenAI response objects and stream chunks (chat and legacy completions)."""

from __future__ import annotations

import json
from typing import Optional

from mixq.serve import protocol as P
from mixq.serve.parsing import Delta, openai_tool_call
from mixq.serve.sequence import GenRequest, Output, TokenInfo


def sse(obj, event: Optional[str] = None) -> str:
    data = obj.model_dump(exclude_none=True) if hasattr(obj, "model_dump") else obj
    if isinstance(obj, (P.ChatCompletionChunk, P.CompletionResponse)):  # OpenAI sends these keys as null
        for c, choice in zip(data["choices"], obj.choices):
            c["finish_reason"] = choice.finish_reason
            c.setdefault("logprobs", None)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _bytes(s: str) -> list:
    return list(s.encode("utf-8"))


def chat_logprobs(tokens: list[TokenInfo]) -> P.ChatLogprobs:
    return P.ChatLogprobs(content=[
        P.ChatTokenLogprob(token=t.token, logprob=t.logprob, bytes=_bytes(t.token),
                           top_logprobs=[P.TopLogprob(token=s, logprob=v, bytes=_bytes(s)) for s, v in t.top])
        for t in tokens])


class ChatAssembler:
    def __init__(self, model: str, logprobs: bool = False):
        self.id, self.model, self.logprobs = P.new_id("chatcmpl"), model, logprobs
        self.delta = Delta()
        self.tokens: list = []
        self.calls: list = []
        self.finish: Optional[str] = None
        self.usage = P.Usage.of(None)

    def _calls(self, delta: Delta) -> list[P.ToolCall]:
        out = []
        for c in delta.tool_calls:
            out.append(P.ToolCall.model_validate(openai_tool_call(c, len(self.calls))))
            self.calls.append(out[-1])
        return out

    def add(self, out: Output) -> None:
        self.delta.add(out.delta)
        self._calls(out.delta)
        self.tokens += out.tokens
        if out.finish_reason:
            self.finish, self.usage = out.finish_reason, P.Usage.of(out.usage)

    def response(self) -> dict:
        d = self.delta
        msg = P.AssistantMessage(content=d.content if d.content or not self.calls else None,
                                 reasoning_content=d.reasoning or None, reasoning=d.reasoning or None,
                                 tool_calls=[c.model_copy(update={"index": None}) for c in self.calls] or None)
        choice = P.ChatChoice(message=msg, finish_reason=self.finish,
                              logprobs=chat_logprobs(self.tokens) if self.logprobs else None)
        resp = P.ChatCompletionResponse(id=self.id, model=self.model, choices=[choice], usage=self.usage)
        return resp.model_dump(exclude_none=True)

    def _chunk(self, delta: P.DeltaMessage, finish=None, logprobs=None) -> P.ChatCompletionChunk:
        return P.ChatCompletionChunk(id=self.id, model=self.model,
                                     choices=[P.ChatChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)])

    def first_chunk(self) -> P.ChatCompletionChunk:
        return self._chunk(P.DeltaMessage(role="assistant", content=""))

    def chunks(self, out: Output, include_usage: bool = False) -> list:
        d, chunks = out.delta, []
        calls = self._calls(d)
        if d or (self.logprobs and out.tokens):
            chunks.append(self._chunk(P.DeltaMessage(content=d.content or None, reasoning_content=d.reasoning or None,
                                                     reasoning=d.reasoning or None, tool_calls=calls or None),
                                      logprobs=chat_logprobs(out.tokens) if self.logprobs and out.tokens else None))
        if out.finish_reason:
            chunks.append(self._chunk(P.DeltaMessage(), finish=out.finish_reason))
            if include_usage:
                chunks.append(P.ChatCompletionChunk(id=self.id, model=self.model, choices=[],
                                                    usage=P.Usage.of(out.usage)))
        return chunks


class CompletionAssembler:
    """One prompt's choice; echo puts the prompt (and, with logprobs, its scores) in front."""

    def __init__(self, model: str, index: int, gen: GenRequest, echo_text: Optional[str], token_text):
        self.id, self.model, self.index, self.gen = P.new_id("cmpl"), model, index, gen
        self.echo_text, self.token_text = echo_text, token_text
        self.text = ""
        self.lp = P.CompletionLogprobs() if gen.params.logprobs else None
        self.offset = 0
        self.finish: Optional[str] = None
        self.usage = P.Usage.of(None)
        self.started = False

    def _logprobs(self, out: Output, lp: P.CompletionLogprobs) -> None:
        entries = []
        if out.prompt_tokens is not None:
            for tok_id, info in zip(self.gen.prompt, out.prompt_tokens):
                s = self.token_text(tok_id)
                entries.append((s, None, None) if info is None else (s, info.logprob, dict(info.top)))
        for t in out.tokens:
            entries.append((t.token, t.logprob, dict(t.top) if t.top else {t.token: t.logprob}))
        for s, v, top in entries:
            lp.tokens.append(s)
            lp.token_logprobs.append(v)
            lp.top_logprobs.append(top)
            lp.text_offset.append(self.offset)
            self.offset += len(s)

    def _piece(self, out: Output) -> tuple[str, Optional[P.CompletionLogprobs]]:
        text = out.text
        if not self.started:
            self.started = True
            if self.echo_text is not None:
                text = self.echo_text + text
        lp = None
        if self.lp is not None:
            lp = P.CompletionLogprobs()
            self._logprobs(out, lp)
        return text, lp

    def add(self, out: Output) -> None:
        text, lp = self._piece(out)
        self.text += text
        if lp is not None:
            for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(self.lp, k).extend(getattr(lp, k))
        if out.finish_reason:
            self.finish, self.usage = out.finish_reason, P.Usage.of(out.usage)

    def choice(self) -> P.CompletionChoice:
        return P.CompletionChoice(index=self.index, text=self.text, logprobs=self.lp, finish_reason=self.finish)

    def chunks(self, out: Output, include_usage: bool = False) -> list:
        text, lp = self._piece(out)
        chunks = []
        if text or (lp is not None and lp.tokens) or out.finish_reason:
            chunks.append(P.CompletionResponse(id=self.id, model=self.model, choices=[P.CompletionChoice(
                index=self.index, text=text, logprobs=lp, finish_reason=out.finish_reason)]))
        if out.finish_reason and include_usage:
            chunks.append(P.CompletionResponse(id=self.id, model=self.model, choices=[], usage=P.Usage.of(out.usage)))
        return chunks

    @staticmethod
    def merge(asms: list["CompletionAssembler"]) -> dict:
        usage = P.Usage.of(None)
        for a in asms:
            usage = usage + a.usage
        resp = P.CompletionResponse(id=asms[0].id, model=asms[0].model, choices=[a.choice() for a in asms],
                                    usage=usage)
        return _dump_completion(resp)


def _dump_completion(resp: P.CompletionResponse) -> dict:
    """Like model_dump, but keeps the None entries inside logprobs (the first echoed token has none)."""
    d = resp.model_dump(exclude_none=True)
    for c, choice in zip(d["choices"], resp.choices):
        if choice.logprobs is not None:
            c["logprobs"] = choice.logprobs.model_dump()
        c.setdefault("finish_reason", choice.finish_reason)
    return d
