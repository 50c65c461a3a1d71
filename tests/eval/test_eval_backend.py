"""The local backend: thinking on/off in the rendered prompt, batched generation equal to one-by-one
(hybrid models batch only equal-length prompts), stop strings."""

import pytest

from mixq.eval.backend import GenRequest, LocalBackend


@pytest.fixture(scope="module")
def dense(nemotron_dense):
    from mixq.core.modelio import load

    return load(nemotron_dense)


def test_no_think_renders_a_closed_block(dense):
    msgs = [{"role": "user", "content": "hi"}]
    text, ids, opened = LocalBackend(dense).render(GenRequest(messages=msgs))
    assert opened and text.rstrip().endswith("<think>")
    text, ids, opened = LocalBackend(dense, no_think=True).render(GenRequest(messages=msgs))
    assert not opened and text.endswith("<think></think>")
    text, _, opened = LocalBackend(dense, chat=False).render(GenRequest(messages=msgs))
    assert text == "user: hi\n\nassistant:" and not opened
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    text, _, _ = LocalBackend(dense).render(GenRequest(messages=msgs, tools=tools))
    assert '"name": "f"' in text and "<TOOLCALL>" in text


def test_batched_generation_matches_one_by_one(dense):
    be = LocalBackend(dense, no_think=True)
    reqs = [GenRequest(messages=[{"role": "user", "content": c}], max_tokens=5)
            for c in ("Hello there", "What is two plus two?", "Hi you!", "x")]
    together = be.generate(reqs)
    alone = [be.generate([r])[0] for r in reqs]
    assert [g.text for g in together] == [a.text for a in alone]
    assert all(g.tokens <= 5 for g in together)


def test_stop_strings_cut_the_output(dense):
    be = LocalBackend(dense)
    free = be.generate([GenRequest(prompt="Once upon a time", max_tokens=12)])[0]
    assert free.tokens == 12 or free.finish == "stop"
    cut_at = free.text[3:5]
    if cut_at.strip():
        stopped = be.generate([GenRequest(prompt="Once upon a time", max_tokens=12, stop=[cut_at])])[0]
        assert stopped.finish == "stop" and cut_at not in stopped.text and free.text.startswith(stopped.text)
