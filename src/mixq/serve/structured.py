"""Structured output by constrained decoding (llguidance): JSON mode, JSON schemas and forced tool calls.

A request's constraint is a grammar compiled once (and cached); each generation gets a fresh matcher
wrapped as an mlx-lm logits processor, so it works the same in mlx-lm's BatchGenerator and in the
round-robin stepper. The grammar applies to the answer: while the model is inside its think block it
reasons freely (it may not end there), and the first token after the block is the grammar's first.
Tokens the grammar forbids get -inf before sampling; once the grammar is complete only end-of-sequence
remains.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

from mixq.serve.parsing import HERMES_TOOLS, NEMOTRON_TOOLS, ThinkTracker, ToolFormat

JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: no room to wander in whitespace
LEAD = r'/[ \n]{0,2}/'  # whitespace a model may put between its think block and the answer
MAX_GRAMMARS = 64
NEG_INF = float("-inf")


class ConstraintError(ValueError):
    """The constraint cannot be built (a schema the compiler refuses, a tool format without a grammar)."""


@dataclass(frozen=True)
class Constraint:
    """A compiled grammar (llguidance's serialized form) and what it was made for."""

    grammar: str
    kind: str  # json_object | json_schema | tool_call


def _tool_schema(tools: list[dict]) -> dict:
    """One call to any of `tools`: {"name": <const>, "arguments": <its parameters>}."""
    options = []
    for t in tools:
        f = t["function"]
        params = f.get("parameters") or {"type": "object"}
        options.append({"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def _literal(tokenizer, text: str) -> str:
    """A Lark item for `text`: a special token by id when the vocabulary has it as one, else a string."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1 and tokenizer.decode(ids) == text and text in _special_tokens(tokenizer):
        return f"<[{ids[0]}]>"
    return json.dumps(text)


def _special_tokens(tokenizer) -> set:
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    getter = getattr(inner, "get_added_vocab", None)
    return set(getter()) if getter else set()


class Grammars:
    """Compiles constraints for one tokenizer (the llguidance tokenizer is built once, on first use)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lltok = None
        self._cache: dict[str, Constraint] = {}
        self._lock = threading.Lock()

    def lltokenizer(self):
        if self._lltok is None:
            import llguidance

            backend = getattr(getattr(self.tokenizer, "_tokenizer", None), "backend_tokenizer", None)
            if backend is None:
                raise ConstraintError("structured output needs a fast (tokenizers) tokenizer, which this model lacks")
            self._lltok = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size,
                                                 eos_token=sorted(self.tokenizer.eos_token_ids))
        return self._lltok

    def _compile(self, key: str, kind: str, lark: str) -> Constraint:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                return hit
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.lltokenizer())
        if error and not error.startswith("WARNING"):
            raise ConstraintError(error.strip().splitlines()[0][:300])
        c = Constraint(grammar, kind)
        with self._lock:
            if len(self._cache) >= MAX_GRAMMARS:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = c
        return c

    def json(self, schema: Optional[dict]) -> Constraint:
        """JSON mode (schema None: any object) or a JSON schema."""
        s = {"type": "object"} if schema is None else dict(schema)
        s["x-guidance"] = {**(s.get("x-guidance") or {}), **JSON_OPTIONS}
        body = json.dumps(s)
        return self._compile("json:" + body, "json_object" if schema is None else "json_schema",
                             f"start: {LEAD} answer\nanswer: %json {body}\n")

    def tool_call(self, tools: list[dict], fmt: ToolFormat, parallel: bool) -> Constraint:
        """One call (or, with parallel, one or more) to the given tools, in the model's JSON tool format."""
        if fmt not in (NEMOTRON_TOOLS, HERMES_TOOLS) or fmt.end is None:
            raise ConstraintError(f"forced tool calls need a JSON tool-call format; this model calls tools with "
                                  f"{fmt.start!r}, which has no grammar here")
        schema = _tool_schema(tools)
        schema["x-guidance"] = JSON_OPTIONS
        start, end = _literal(self.tokenizer, fmt.start), _literal(self.tokenizer, fmt.end)
        more = ' ("," " "? call)*' if parallel else ""
        if fmt is NEMOTRON_TOOLS:  # <TOOLCALL>[{...}, ...]</TOOLCALL>
            body = f'{start} "[" call{more} "]" {end}'
        else:  # <tool_call>{...}</tool_call>, one block per call
            body = f'block{"+" if parallel else ""}\nblock: {start} {LEAD} call {LEAD} {end} {LEAD}'
        lark = f"start: {LEAD} {body}\ncall: %json {json.dumps(schema)}\n"
        return self._compile(f"tools:{parallel}:{fmt.start}:" + json.dumps(tools, sort_keys=True), "tool_call", lark)

    def processor(self, constraint: Constraint, think_ids: Optional[tuple], reasoning: bool) -> "GrammarProcessor":
        import llguidance

        matcher = llguidance.LLMatcher(self.lltokenizer(), constraint.grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(matcher.get_error())
        return GrammarProcessor(matcher, self.vocab_size, sorted(self.tokenizer.eos_token_ids), think_ids, reasoning)


class GrammarProcessor:
    """mlx-lm logits processor `(tokens, logits) -> logits` for one generation."""

    def __init__(self, matcher, vocab_size: int, eos: list, think_ids: Optional[tuple], reasoning: bool):
        self.matcher, self.vocab, self.eos = matcher, vocab_size, eos
        start, end = think_ids or ((), ())
        self.think = ThinkTracker(start, end, reasoning) if think_ids else None
        self.first = True
        self.eos_only = mx.array(np.isin(np.arange(vocab_size), eos))

    def _feed(self, token: int) -> None:
        if self.think is not None and self.think.inside:
            self.think.feed(token)  # still reasoning: the grammar has not started
            return
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)  # a token the mask allowed; an error state only ends the mask

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.first:  # the context ends with the prompt's last token
            self.first = False
        else:
            self._feed(int(tokens[-1].item()))
        if self.think is not None and self.think.inside:  # reasoning may not end the output
            return mx.where(self.eos_only[: logits.shape[-1]], NEG_INF, logits)
        if self.matcher.is_stopped() or self.matcher.is_error():
            allowed = self.eos_only
        else:
            bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = mx.array(bits[: self.vocab].astype(bool))
        return mx.where(allowed[: logits.shape[-1]], logits, NEG_INF)


__all__ = ["Grammars", "GrammarProcessor", "Constraint", "ConstraintError"]
