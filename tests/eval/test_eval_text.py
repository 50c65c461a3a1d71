"""Scorer helpers on hand-made strings: reasoning removal, number / code / tool-call extraction."""

import pytest

from mixq.eval.textproc import answer_text, extract_code, parse_tool_calls, split_reasoning


def strip_reasoning(text, opened=False):
    return split_reasoning(text, opened)[1]


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


def test_answer_text_keeps_a_completion_as_it_is():
    assert answer_text("    return a + b\n") == "    return a + b\n"          # indentation kept
    assert answer_text("<think>hmm</think>\n\n    return 1") == "    return 1"
    assert answer_text("still thinking", opened=True) == ""
    assert answer_text("done</think>\nThe answer is 4.", opened=True) == "The answer is 4."


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
