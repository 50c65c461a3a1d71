"""Streaming output parsers: stop strings, the reasoning block, tool calls. Pure Python, no mlx.

Everything works on decoded text, so a tag that arrives split over several tokens (`<th` + `ink>`) is
matched all the same: text that could still be the start of a tag is held back until the next chunk
decides it. `ThinkTracker` follows the same block on token ids, for counting and for the thinking budget.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Callable, Sequence

CONTENT, REASONING, TOOL = "content", "reasoning", "tool"


def _held_back(buf: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of buf that is a proper prefix of some marker."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(buf)), best, -1):
            if buf.endswith(m[:k]):
                best = k
                break
    return best


class StopFilter:
    """Cuts the text at the first stop string; holds back a possible partial match."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.buf += text
        hits = [(i, s) for s in self.stops if (i := self.buf.find(s)) >= 0]
        if hits:
            i, self.matched = min(hits)
            out, self.buf, self.stopped = self.buf[:i], "", True
            return out
        keep = _held_back(self.buf, self.stops)
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out


# ---------------------------------------------------------------- tool calls

def _json_calls(text: str) -> list[dict]:
    """`[{"name":..,"arguments":{..}}, ...]` or one such object (Nemotron, Hermes/Qwen, Llama JSON)."""
    data = json.loads(text.strip())
    items = data if isinstance(data, list) else [data]
    calls = []
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("name"), str):
            raise ValueError("a tool call needs a string name")
        args = it.get("arguments", it.get("parameters", {}))
        calls.append({"name": it["name"], "arguments": args})
    return calls


@dataclass(frozen=True)
class ToolFormat:
    """A tool-call block: start marker, end marker (None: the call runs to the end of the output), parser."""

    start: str
    end: str | None
    parse: Callable[[str], list[dict]]


NEMOTRON_TOOLS = ToolFormat("<TOOLCALL>", "</TOOLCALL>", _json_calls)
HERMES_TOOLS = ToolFormat("<tool_call>", "</tool_call>", _json_calls)


def mlx_lm_tool_format(tokenizer, tools) -> ToolFormat | None:
    """The format mlx-lm detected for this tokenizer (qwen3_coder, mistral, glm47, gemma4, pythonic, ...)."""
    if not getattr(tokenizer, "has_tool_calling", False) or tokenizer.tool_parser is None:
        return None
    parser = tokenizer.tool_parser

    def parse(text: str) -> list[dict]:
        out = parser(text, tools)
        items = out if isinstance(out, list) else [out]
        calls = []
        for it in items:
            if not isinstance(it, dict) or not isinstance(it.get("name"), str):
                raise ValueError("unparsable tool call")
            calls.append({"name": it["name"], "arguments": it.get("arguments", {})})
        return calls

    return ToolFormat(tokenizer.tool_call_start, tokenizer.tool_call_end or None, parse)


def tool_formats_for(tokenizer, tools) -> list[ToolFormat]:
    """The model's own format first, then Nemotron's `<TOOLCALL>` and Hermes' `<tool_call>` JSON."""
    formats = []
    own = mlx_lm_tool_format(tokenizer, tools)
    if own is not None:
        formats.append(own)
    for f in (NEMOTRON_TOOLS, HERMES_TOOLS):
        if all(f.start != g.start for g in formats):
            formats.append(f)
    return formats


def openai_tool_call(call: dict, index: int) -> dict:
    args = call.get("arguments", {})
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": args}}


# ---------------------------------------------------------------- reasoning + tools, streaming

@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list = field(default_factory=list)  # [{"name", "arguments"}]

    def __bool__(self):
        return bool(self.reasoning or self.content or self.tool_calls)

    def add(self, other: "Delta") -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls += other.tool_calls


class OutputParser:
    """Splits generated text into reasoning, content and tool calls, chunk by chunk.

    initial: REASONING when the prompt already opened the think block. think: (open, close) tags or None
    (no reasoning split). tools: the tool formats to recognise (empty: tool-call text stays content).
    """

    def __init__(self, initial: str = CONTENT, think: tuple[str, str] | None = ("<think>", "</think>"),
                 tools: Sequence[ToolFormat] = ()):
        self.think = think
        self.tools = list(tools)
        self.state = initial if think else CONTENT
        self.buf = ""
        self.tool: ToolFormat | None = None
        self.tool_text = ""
        # whitespace that pads the think block (`<think>\n...\n</think>\n`) is not part of either text:
        # leading whitespace is skipped, trailing whitespace of the reasoning is held until more text shows
        self.skip_ws = bool(think)
        self.pending_ws = ""

    def _markers(self) -> list[tuple[str, str, ToolFormat | None]]:
        """(marker, action, format) for the current state."""
        if self.state == REASONING:
            return [(self.think[1], CONTENT, None)]
        if self.state == TOOL:
            return [(self.tool.end, CONTENT, None)] if self.tool.end else []
        out = [(f.start, TOOL, f) for f in self.tools]
        if self.think:
            out += [(self.think[0], REASONING, None), (self.think[1], "drop", None)]
        return out

    def _switch(self, state: str) -> None:
        if state != self.state and state in (REASONING, CONTENT) and self.think:
            self.skip_ws, self.pending_ws = True, ""
        self.state = state

    def _emit(self, d: Delta, text: str) -> None:
        if not text:
            return
        if self.state == TOOL:
            self.tool_text += text
            return
        if self.skip_ws:
            text = text.lstrip()
            if not text:
                return
            self.skip_ws = False
        if self.state == REASONING:
            text = self.pending_ws + text
            body = text.rstrip()
            self.pending_ws = text[len(body):]
            d.reasoning += body
        else:
            d.content += text

    def _close_tool(self, d: Delta, terminated: bool) -> None:
        fmt, raw = self.tool, self.tool_text
        self.tool, self.tool_text, self.state = None, "", CONTENT
        self.skip_ws = True
        try:
            calls = fmt.parse(raw)
        except Exception:  # not a well-formed call: hand the text back verbatim
            d.content += fmt.start + raw + ((fmt.end or "") if terminated else "")
            return
        d.tool_calls += calls

    def feed(self, text: str) -> Delta:
        d = Delta()
        self.buf += text
        while True:
            markers = self._markers()
            found = [(i, m, a, f) for m, a, f in markers if (i := self.buf.find(m)) >= 0]
            if not found:
                break
            i, m, action, fmt = min(found, key=lambda x: (x[0], -len(x[1])))
            self._emit(d, self.buf[:i])
            self.buf = self.buf[i + len(m):]
            if self.state == TOOL:
                self._close_tool(d, terminated=True)
            elif action == TOOL:
                self.state, self.tool, self.tool_text = TOOL, fmt, ""
            elif action != "drop":
                self._switch(action)
        keep = _held_back(self.buf, [m for m, _, _ in self._markers()])
        self._emit(d, self.buf[: len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]
        return d

    def finish(self) -> Delta:
        """End of output: release held-back text; an open tool block is parsed as it stands."""
        d = Delta()
        self._emit(d, self.buf)
        self.buf = ""
        if self.state == TOOL:
            self._close_tool(d, terminated=False)
        return d


def parse_complete(text: str, **kw) -> Delta:
    p = OutputParser(**kw)
    d = p.feed(text)
    d.add(p.finish())
    return d


# ---------------------------------------------------------------- token-level think tracking

class ThinkTracker:
    """Follows the think block on token ids: whether we are inside it and how many tokens it took.

    A token counts as reasoning when it is inside the block or is part of one of its tags.
    """

    def __init__(self, start_ids: Sequence[int] | None, end_ids: Sequence[int] | None, inside: bool):
        self.start = tuple(start_ids or ())
        self.end = tuple(end_ids or ())
        self.inside = inside
        self.count = 0
        self.recent: list[int] = []

    def _ends_with(self, seq: tuple) -> bool:
        return bool(seq) and len(self.recent) >= len(seq) and tuple(self.recent[-len(seq):]) == seq

    def feed(self, token: int) -> None:
        self.recent = (self.recent + [token])[-8:]
        was = self.inside
        if self.inside and self._ends_with(self.end):
            self.inside = False
        elif not self.inside and self._ends_with(self.start):
            self.inside = True
        if was or self.inside:
            self.count += 1

    def closing_progress(self) -> int:
        """How many tokens of the end tag are already out (for forcing the rest)."""
        for k in range(len(self.end) - 1, 0, -1):
            if len(self.recent) >= k and tuple(self.recent[-k:]) == self.end[:k]:
                return k
        return 0

