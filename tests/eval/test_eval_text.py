"""Scorer helpers on hand-made strings: reasoning removal, number / code / tool-call extraction."""

import pytest

from mixq.eval.textproc import (extract_code, flexible_answer, normalize_number, parse_tool_calls,
                                split_reasoning, strict_answer, strip_reasoning)


def test_reasoning_removed_before_scoring():
    assert split_reasoning("<think>\n2+2 is 5?\n</think>\nThe answer is 4.") == ("2+2 is 5?", "The answer is 4.")
    # the prompt opened the block: everything up to </think> is reasoning
    assert split_reasoning("maybe 7\n</think>\n\n#### 8", opened=True) == ("maybe 7", "#### 8")
    # never closed: it ran out of tokens thinking, there is no answer
    assert split_reasoning("thinking about 42 forever", opened=True) == ("thinking about 42 forever", "")
    assert strip_reasoning("<think>unfinished 42") == ""
    # no reasoning at all; a stray closed block in the middle is still removed
    assert strip_reasoning("just 3") == "just 3"
    assert strip_reasoning("a <think>x</think> b") == "a  b"
    # an empty block (thinking off)
    assert strip_reasoning("<think></think>hello") == "hello"


def test_numbers():
    assert normalize_number("$1,234.00") == "1234"
    assert normalize_number("72.") == "72"
    assert normalize_number("-3.5") == "-3.5"
    assert normalize_number("abc") is None and normalize_number(None) is None
    assert strict_answer("so 6 eggs\n#### 18") == "18"
    assert strict_answer("The answer is 18.") is None  # malformed for strict
    assert flexible_answer("She pays $1,200 then 30, so 1,230.") == "1230"
    assert flexible_answer("no digits here") is None


def test_code_extraction():
    text = "Here:\n```python\ndef f():\n    return 1\n```\nand ```\nother\n```"
    assert extract_code(text) == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\nunterminated = 2\n") == "unterminated = 2\n"
    assert extract_code("plain") == "plain"


def test_tool_calls():
    nemo = 'ok <TOOLCALL>[{"name": "f", "arguments": {"a": 1}}]</TOOLCALL>'
    assert parse_tool_calls(nemo) == [{"name": "f", "arguments": {"a": 1}}]
    hermes = '<tool_call>{"name": "g", "arguments": "{\\"b\\": 2}"}</tool_call>'
    assert parse_tool_calls(hermes) == [{"name": "g", "arguments": {"b": 2}}]
    assert parse_tool_calls('{"name": "h", "parameters": {}}') == [{"name": "h", "arguments": {}}]
    assert parse_tool_calls("I cannot call anything.") is None
    with pytest.raises(ValueError):
        parse_tool_calls("<TOOLCALL>[{name: f}]</TOOLCALL>")
    with pytest.raises(ValueError):
        parse_tool_calls('<TOOLCALL>[{"name": 3, "arguments": {}}]</TOOLCALL>')
