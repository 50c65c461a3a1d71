"""The streaming output parsers, driven with known text and token sequences (no model)."""

from __future__ import annotations

import random

import pytest

from mixq.serve.parsing import (CONTENT, HERMES_TOOLS, NEMOTRON_TOOLS, REASONING, Delta, OutputParser, StopFilter,
                                ThinkTracker, parse_complete)

TOOLS = [NEMOTRON_TOOLS, HERMES_TOOLS]
SCRIPT = ('<think>\nThe user wants the weather.\nCall the tool.\n</think>\nLet me check. '
          '<TOOLCALL>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
          '{"name": "get_time", "arguments": {}}]</TOOLCALL>')


def _chunked(text: str, parser: OutputParser, rng: random.Random, max_len: int = 6) -> Delta:
    d, i = Delta(), 0
    while i < len(text):
        j = i + rng.randint(1, max_len)
        d.add(parser.feed(text[i:j]))
        i = j
    d.add(parser.finish())
    return d


def test_reasoning_content_and_tool_calls_split():
    d = parse_complete(SCRIPT, tools=TOOLS)
    assert d.reasoning == "The user wants the weather.\nCall the tool."
    assert d.content == "Let me check. "
    assert d.tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris"}},
                            {"name": "get_time", "arguments": {}}]


@pytest.mark.parametrize("seed", range(40))
def test_any_chunking_gives_the_same_split(seed):
    """Tags spanning chunk (token) boundaries: `<thi` + `nk>` etc. never leak into the text."""
    rng = random.Random(seed)
    whole = parse_complete(SCRIPT, tools=TOOLS)
    assert _chunked(SCRIPT, OutputParser(tools=TOOLS), rng) == whole
    one_by_one = OutputParser(tools=TOOLS)
    d = Delta()
    for ch in SCRIPT:
        step = one_by_one.feed(ch)
        assert "<" not in step.content + step.reasoning  # no tag fragment ever leaks out
        d.add(step)
    d.add(one_by_one.finish())
    assert d == whole


def test_prompt_opened_think_block():
    """The template put `<think>\\n` in the prompt: the output starts inside the block, with no open tag."""
    text = "weighing options\n</think>\n\nThe answer is 4."
    d = parse_complete(text, initial=REASONING, tools=TOOLS)
    assert (d.reasoning, d.content) == ("weighing options", "The answer is 4.")
    # the same text read as if no block were open: the stray close tag is dropped, nothing is reasoning
    d = parse_complete(text, initial=CONTENT)
    assert d.reasoning == "" and "</think>" not in d.content


def test_empty_think_block_and_no_think_model():
    assert parse_complete("<think></think>Hello") == Delta(content="Hello")
    # a tokenizer without think tags: everything is content, tags included
    assert parse_complete("<think>x</think>y", think=None) == Delta(content="<think>x</think>y")


def test_unfinished_reasoning_keeps_its_text():
    p = OutputParser(initial=REASONING)
    d = p.feed("thinking about it  ")
    d.add(p.finish())
    assert d.reasoning == "thinking about it" and d.content == ""


def test_bad_tool_json_comes_back_as_content():
    d = parse_complete('<TOOLCALL>[{"name": oops}]</TOOLCALL> ok', tools=TOOLS)
    assert d.tool_calls == [] and d.content.startswith("<TOOLCALL>[{") and d.content.endswith("ok")
    # without tools in the request the markup is plain content
    d = parse_complete('<TOOLCALL>[{"name": "f", "arguments": {}}]</TOOLCALL>', tools=[])
    assert d.tool_calls == [] and "<TOOLCALL>" in d.content


def test_hermes_and_unterminated_calls():
    d = parse_complete('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', tools=TOOLS)
    assert d.tool_calls == [{"name": "f", "arguments": {"x": 1}}]
    # the output ended (max_tokens, EOS) inside the block: parsed if it is complete JSON
    d = parse_complete('<TOOLCALL>[{"name": "f", "arguments": {"x": 1}}]', tools=TOOLS)
    assert d.tool_calls == [{"name": "f", "arguments": {"x": 1}}]


def test_stop_filter_across_chunks():
    f = StopFilter(["STOP", "\n\n"])
    out = f.feed("abc ST") + f.feed("O") + f.feed("P more")
    assert out == "abc " and f.stopped
    f = StopFilter(["STOP"])
    assert f.feed("a ST") + f.feed("x") + f.flush() == "a STx"


def test_think_tracker_counts_block_tokens():
    t = ThinkTracker([7], [8], inside=False)
    for tok in [1, 7, 2, 3, 8, 4]:
        t.feed(tok)
    assert t.count == 4 and not t.inside  # <think>, 2, 3, </think>
    multi = ThinkTracker([7], [8, 9], inside=True)
    for tok in [1, 2, 8]:
        multi.feed(tok)
    assert multi.inside and multi.closing_progress() == 1
    multi.feed(9)
    assert not multi.inside and multi.count == 4


def test_the_models_own_mlx_lm_tool_format_comes_first():
    """A tokenizer for which mlx-lm found a tool parser (here Qwen3-Coder's XML calls) is parsed with it."""
    from types import SimpleNamespace

    from mlx_lm.tool_parsers import qwen3_coder

    from mixq.serve.parsing import tool_formats_for

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    tok = SimpleNamespace(has_tool_calling=True, tool_parser=qwen3_coder.parse_tool_call,
                          tool_call_start=qwen3_coder.tool_call_start, tool_call_end=qwen3_coder.tool_call_end)
    formats = tool_formats_for(tok, tools)
    assert [f.start for f in formats] == ["<tool_call>", "<TOOLCALL>"]  # its own, then Nemotron's
    text = ("<think>\nneed weather\n</think>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
            "</parameter>\n</function>\n</tool_call>")
    d = _chunked(text, OutputParser(tools=formats), random.Random(0), max_len=3)
    assert d.reasoning == "need weather" and d.content == ""
    assert d.tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
