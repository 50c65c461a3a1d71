"""Text handling shared by the scorers: removing reasoning, pulling code and tool calls out of
model output. Pure Python, no mlx: every function is tested on hand-made strings.

Reasoning is always removed before anything is scored: a number or a hash mentioned while thinking is
not an answer. A generation prompt that opened `<think>` makes everything up to the first `</think>` the
reasoning; output that never closes the block has no answer at all (it ran out of tokens thinking).
"""

from __future__ import annotations

import json
import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOLCALL_OPEN, TOOLCALL_CLOSE = "<TOOLCALL>", "</TOOLCALL>"


def split_reasoning(text: str, opened: bool = False) -> tuple[str, str]:
    """(reasoning, answer). `opened`: the prompt ended inside an open `<think>` block."""
    if opened:
        if THINK_CLOSE not in text:
            return text.strip(), ""
        reasoning, answer = text.split(THINK_CLOSE, 1)
        reasoning = reasoning.replace(THINK_OPEN, "", 1) if reasoning.lstrip().startswith(THINK_OPEN) else reasoning
    else:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            # a stray closed block anywhere is still reasoning, not answer
            return "", re.sub(r"<think>.*?</think>", "", text, flags=re.S).strip()
        body = stripped[len(THINK_OPEN):]
        if THINK_CLOSE not in body:
            return body.strip(), ""
        reasoning, answer = body.split(THINK_CLOSE, 1)
    answer = re.sub(r"<think>.*?</think>", "", answer, flags=re.S)
    return reasoning.strip(), answer.strip()


def answer_text(text: str, opened: bool = False) -> str:
    """The generated text with a leading reasoning block removed and nothing else touched (a completion's
    indentation matters); "" when the block never closed."""
    if not opened:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            return text
        text = stripped[len(THINK_OPEN):]
    if THINK_CLOSE not in text:
        return ""
    return text.split(THINK_CLOSE, 1)[1].lstrip("\n")


# --------------------------------------------------------------------------------------------------- code

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> str:
    """The first fenced Python (or unlabelled) code block; the whole text when there is no fence."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    for lang, body in blocks:
        if lang in ("python", "py", "python3"):
            return body
    for lang, body in blocks:
        if lang == "":
            return body
    return text


# --------------------------------------------------------------------------------------------- tool calls

def _as_calls(data) -> list[dict]:
    items = data if isinstance(data, list) else [data]
    calls = []
    for it in items:
        if not isinstance(it, dict):
            raise ValueError("a tool call must be a JSON object")
        if "function" in it and isinstance(it["function"], dict):
            it = it["function"]
        name = it.get("name")
        args = it.get("arguments", it.get("parameters", {}))
        if isinstance(args, str):
            args = json.loads(args)
        if not isinstance(name, str) or not isinstance(args, dict):
            raise ValueError("a tool call needs a string name and an object of arguments")
        calls.append({"name": name, "arguments": args})
    return calls


def parse_tool_calls(text: str) -> list[dict] | None:
    """Tool calls from model output: `<TOOLCALL>[...]</TOOLCALL>` (Nemotron), `<tool_call>{...}</tool_call>`
    (Hermes / Qwen) or a bare JSON call. None when there is none; ValueError when one is malformed."""
    m = re.search(re.escape(TOOLCALL_OPEN) + r"(.*?)(?:" + re.escape(TOOLCALL_CLOSE) + r"|\Z)", text, re.S)
    if m:
        return _as_calls(json.loads(m.group(1).strip()))
    hermes = re.findall(r"<tool_call>(.*?)(?:</tool_call>|\Z)", text, re.S)
    if hermes:
        return [c for h in hermes for c in _as_calls(json.loads(h.strip()))]
    body = extract_code(text).strip() if "```" in text else text.strip()
    if body.startswith(("{", "[")):
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            return None
        try:
            return _as_calls(data)
        except ValueError:
            return None
    return None
