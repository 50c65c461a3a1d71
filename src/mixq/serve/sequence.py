"""One request's generation state: sampling, logits processing, and the token -> text -> events pipeline.

Runs on the engine thread. Tokens come in (from the batched or the round-robin stepper), the streaming
detokenizer turns them into text, stop strings cut it, the output parser splits reasoning / content /
tool calls, and each step leaves as one `Output` for the request's sink.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import mlx.core as mx

from mixq.serve.parsing import CONTENT, REASONING, Delta, OutputParser, StopFilter, ThinkTracker, ToolFormat


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list = field(default_factory=list)
    logprobs: bool = False  # report the chosen token's logprob
    top_logprobs: int = 0
    logit_bias: Optional[dict] = None  # token id -> bias
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass
class ThinkingPolicy:
    """How this request treats the model's think block (only for tokenizers that have one)."""

    start: str
    end: str
    start_ids: tuple
    end_ids: tuple
    initial: str = CONTENT  # REASONING when the prompt already opened the block
    ban_start: bool = False  # thinking off: the block may not be opened
    budget: Optional[int] = None  # close the block after this many reasoning tokens


@dataclass
class GenRequest:
    prompt: list  # token ids
    params: SamplingParams
    thinking: Optional[ThinkingPolicy] = None
    parse: bool = False  # chat: split reasoning / content / tool calls; completions: raw text
    tools: list = field(default_factory=list)  # ToolFormat, when the request offered tools
    prompt_logprobs: bool = False  # echo with logprobs: score every prompt token
    checkpoint: int = 0  # prompt length worth caching on its own (the conversation before this turn)
    constraint: Optional[Callable[[], Callable]] = None  # a fresh grammar logits processor per generation
    parallel_tool_calls: bool = True  # False: a second tool call is dropped


@dataclass
class TokenInfo:
    id: int
    token: str
    logprob: float
    top: list = field(default_factory=list)  # [(token str, logprob)], best first


@dataclass
class Output:
    """One step of one request, as handed to its sink."""

    delta: Delta = field(default_factory=Delta)
    text: str = ""  # raw text (completions)
    tokens: list = field(default_factory=list)  # TokenInfo of generated tokens, when logprobs were asked
    prompt_tokens: Optional[list] = None  # echo scoring: TokenInfo per prompt token (first is None)
    finish_reason: Optional[str] = None
    stop_text: Optional[str] = None  # the stop string that ended the output
    usage: Optional[dict] = None
    error: Optional[str] = None


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


class Sampler:
    """Temperature / top-p sampling; with a seed it draws from its own key, whatever else runs."""

    def __init__(self, temperature: float, top_p: float, seed: Optional[int]):
        self.temp, self.top_p = temperature, top_p
        self.key = mx.random.key(seed % (1 << 63)) if seed is not None else None

    def __call__(self, logprobs: mx.array) -> mx.array:
        logits = logprobs
        if self.top_p < 1.0:
            from mlx_lm.sample_utils import apply_top_p

            logits = apply_top_p(logits, self.top_p)
        logits = logits * (1.0 / self.temp)
        if self.key is None:
            return mx.random.categorical(logits)
        keys = mx.random.split(self.key)
        self.key = keys[0]
        return mx.random.categorical(logits, key=keys[1])


def make_sampler(p: SamplingParams):
    return greedy if p.temperature == 0 else Sampler(p.temperature, p.top_p, p.seed)


class Processor:
    """Logit bias, thinking off (the open tag is banned) and the thinking budget (the close tag is forced)."""

    def __init__(self, req: GenRequest, vocab_size: int):
        p, t = req.params, req.thinking
        self.vocab = vocab_size
        self.bias = None
        if p.logit_bias:
            b = [0.0] * vocab_size
            for i, v in p.logit_bias.items():
                b[int(i)] = float(v)
            self.bias = mx.array(b)
        self.ban = None
        if t is not None and t.ban_start and len(t.start_ids) == 1:
            m = [False] * vocab_size
            m[t.start_ids[0]] = True
            self.ban = mx.array(m)
        self.budget = t.budget if t is not None and t.end_ids else None
        self.end_ids = t.end_ids if t is not None else ()
        self.tracker = ThinkTracker(t.start_ids, t.end_ids, t.initial == REASONING) if t is not None else None
        self.first = True

    @staticmethod
    def needed(req: GenRequest) -> bool:
        t = req.thinking
        return bool(req.params.logit_bias) or (t is not None and (t.ban_start or t.budget is not None))

    def _force(self, logits: mx.array, token: int) -> mx.array:
        return mx.where(mx.arange(logits.shape[-1]) == token, 0.0, -math.inf).astype(logits.dtype)[None]

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.first:  # the context ends with the last prompt token
            self.first = False
        elif self.tracker is not None:
            self.tracker.feed(int(tokens[-1].item()))
        if self.bias is not None:
            logits = logits + self.bias[: logits.shape[-1]].astype(logits.dtype)
        # the block takes at most `budget` tokens, its close tag included
        if self.budget is not None and self.tracker.inside and \
                self.tracker.count + len(self.end_ids) - self.tracker.closing_progress() >= self.budget:
            return self._force(logits, self.end_ids[self.tracker.closing_progress()])
        if self.ban is not None and not (self.tracker and self.tracker.inside):
            logits = mx.where(self.ban[: logits.shape[-1]], -math.inf, logits)
        return logits


def make_processors(req: GenRequest, vocab_size: int) -> list:
    from mlx_lm.sample_utils import make_frequency_penalty, make_presence_penalty

    procs: list[Callable] = []
    if Processor.needed(req):
        procs.append(Processor(req, vocab_size))
    if req.params.presence_penalty:
        procs.append(make_presence_penalty(req.params.presence_penalty, context_size=256))
    if req.params.frequency_penalty:
        procs.append(make_frequency_penalty(req.params.frequency_penalty, context_size=256))
    if req.constraint is not None:  # last: it only ever removes tokens
        procs.append(req.constraint())
    return procs


class TokenText:
    """Token id -> display string, cached (decode of one token; partial UTF-8 shows as U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, i: int) -> str:
        s = self.cache.get(i)
        if s is None:
            s = self.cache[i] = self.tokenizer.decode([i])
        return s


def token_infos(logprobs: mx.array, chosen: list, k: int, text: TokenText) -> list:
    """TokenInfo for each row of logprobs (rows, vocab) and its chosen token, with the k best."""
    rows = mx.arange(len(chosen))
    picked = logprobs[rows, mx.array(chosen)]
    if k > 0:
        idx = mx.argpartition(-logprobs, k - 1, axis=-1)[:, :k]
        vals = mx.take_along_axis(logprobs, idx, axis=-1)
        mx.eval(picked, idx, vals)
        idx, vals = idx.tolist(), vals.tolist()
    else:
        mx.eval(picked)
    out = []
    for r, (tok, lp) in enumerate(zip(chosen, picked.tolist())):
        top = []
        if k > 0:
            top = sorted(((text(i), v) for i, v in zip(idx[r], vals[r])), key=lambda x: -x[1])
        out.append(TokenInfo(tok, text(tok), lp, top))
    return out


class IncrementalText:
    """Generated token ids -> text, exactly as the tokenizer decodes the prompt's tail followed by them.

    mlx-lm's streaming detokenizers drop the first token's leading space (a chat reply starts a message), which
    breaks completions: `God` + ` of` must read `God of`. Each step decodes a short window (a few tokens of
    context, then the new ones) and emits what the new ones added; a partial UTF-8 character waits."""

    CONTEXT = 4

    def __init__(self, tokenizer, prompt: list):
        self.decode = tokenizer.decode
        self.tokens = list(prompt[-self.CONTEXT:])
        self.start = 0  # the window's first token
        self.read = len(self.tokens)  # tokens whose text is out

    def _tail(self) -> str:
        before = self.decode(self.tokens[self.start:self.read]) if self.read > self.start else ""
        now = self.decode(self.tokens[self.start:])
        return now[len(before):] if now.startswith(before) else now[len(before.rstrip("\ufffd")):]

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self._tail()
        if text.endswith("\ufffd"):
            return ""
        self.start, self.read = self.read, len(self.tokens)
        return text

    def flush(self) -> str:
        """What a partial character held back (shown as U+FFFD), at the end of the output."""
        if self.read == len(self.tokens):
            return ""
        text = self._tail()
        self.start, self.read = self.read, len(self.tokens)
        return text


class Sequence:
    """A request being generated: bookkeeping and the token pipeline."""

    def __init__(self, req: GenRequest, tokenizer, sink: Callable[[Output], Any], token_text: TokenText):
        self.req, self.sink, self.text_of = req, sink, token_text
        self.detok = IncrementalText(tokenizer, req.prompt)
        self.eos = set(tokenizer.eos_token_ids)
        self.stop = StopFilter(req.params.stop)
        t = req.thinking
        self.parser = None
        if req.parse:
            think = (t.start, t.end) if t is not None else None
            self.parser = OutputParser(t.initial if t is not None else CONTENT, think, req.tools)
        self.tracker = ThinkTracker(t.start_ids, t.end_ids, t.initial == REASONING) if t is not None else None
        self.n = 0
        self.cached = 0  # prompt tokens served from the prefix cache
        self.n_tool_calls = 0
        self.done = False
        self.cancelled = False
        self.uid = None  # batch generator uid

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.req.prompt), "completion_tokens": self.n,
                "reasoning_tokens": self.tracker.count if self.tracker else 0, "cached_tokens": self.cached}

    def emit(self, out: Output) -> None:
        if out.finish_reason or out.error:
            self.done = True
            out.usage = self.usage()
        try:
            self.sink(out)
        except Exception:  # the consumer went away (event loop closed): stop generating for it
            self.cancelled = True

    def fail(self, message: str) -> None:
        if not self.done:
            self.emit(Output(error=message, finish_reason="error"))

    def feed(self, token: int, logprobs: Optional[mx.array], backend_finish: Optional[str] = None) -> Output:
        """One generated token. Returns the Output it produced (already handed to the sink)."""
        p = self.req.params
        self.n += 1
        out = Output()
        if p.logprobs and logprobs is not None:
            out.tokens = token_infos(logprobs[None], [token], p.top_logprobs, self.text_of)
        if self.tracker is not None:
            self.tracker.feed(token)
        finish, piece = None, ""
        if token in self.eos:
            finish = "stop"
        else:
            piece = self.detok.add(token)
            if self.n >= p.max_tokens or backend_finish == "length":
                finish = "length"
        finish = finish or backend_finish
        if finish:
            piece += self.detok.flush()
        text = self.stop.feed(piece)
        if self.stop.stopped:
            finish, out.stop_text = "stop", self.stop.matched
        elif finish:
            text += self.stop.flush()
        if self.parser is not None:
            out.delta = self.parser.feed(text)
            if finish:
                out.delta.add(self.parser.finish())
            if not self.req.parallel_tool_calls:
                out.delta.tool_calls = out.delta.tool_calls[: max(0, 1 - self.n_tool_calls)]
            self.n_tool_calls += len(out.delta.tool_calls)
            if finish == "stop" and self.n_tool_calls:
                finish = "tool_calls"
        else:
            out.text = text
        out.finish_reason = finish
        self.emit(out)
        return out

    def finish_now(self, reason: str) -> None:
        """End without a further token (max_tokens 0, or an echo-only completion)."""
        out = Output(finish_reason=reason)
        if self.parser is not None:
            out.delta = self.parser.finish()
        self.emit(out)


__all__ = ["IncrementalText", "SamplingParams", "ThinkingPolicy", "GenRequest", "TokenInfo", "Output", "Sequence", "ToolFormat",
           "make_sampler", "make_processors", "greedy", "token_infos", "TokenText", "Delta"]
