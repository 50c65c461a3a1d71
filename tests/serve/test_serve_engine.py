"""The engine on fixture models: batching, the fair queue, thinking control, prefix cache, scoring, cancel.

Fixture weights are random, so checks compare against the model itself (greedy reference decodes, a full
forward for log-probabilities) or use logit_bias / scripted token sequences to make behaviour certain.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import mixq  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from mixq.core.modelio import load
from mixq.serve.engine import Engine
from mixq.serve.parsing import NEMOTRON_TOOLS
from mixq.serve.prompting import build_chat_prompt
from mixq.serve.protocol import ChatMessage
from mixq.serve.sequence import GenRequest, SamplingParams, Sequence, TokenText

OPEN_ALWAYS = "{%- if ns.no_think -%}<think></think>{%- else -%}<think>{{ '\\n' }}{%- endif -%}"


def always_open_copy(src, dst):
    """The fixture with a template that opens `<think>` whatever the request says (like many real ones)."""
    shutil.copytree(src, dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert OPEN_ALWAYS in cfg["chat_template"]
    cfg["chat_template"] = cfg["chat_template"].replace(OPEN_ALWAYS, "<think>{{ '\\n' }}")
    cfg_path.write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def qwen(qwen3):
    return load(str(qwen3))


@pytest.fixture(scope="module")
def open_qwen(qwen3, tmp_path_factory):
    return load(str(always_open_copy(qwen3, tmp_path_factory.mktemp("open") / "m")))


def msgs(*pairs):
    return [ChatMessage(role=r, content=c) for r, c in pairs]


def greedy_reference(lm, prompt, n):
    """(tokens, chosen-token logprobs) of a lone greedy decode."""
    out = []
    for (tok, lp), _ in zip(generate_step(mx.array(prompt), lm.model, max_tokens=n), range(n)):
        out.append((int(tok), lp[int(tok)].item()))
    return [t for t, _ in out], [v for _, v in out]


def gen_tokens(outs):
    return [t.id for o in outs for t in o.tokens]


def run_concurrently(engine, reqs, timeout=60):
    results = [None] * len(reqs)

    def go(i):
        results[i] = engine.generate(reqs[i], timeout=timeout)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results


@pytest.mark.parametrize("kind", ["nemotron_dense", "nemotron_moe", "qwen3"])
@pytest.mark.parametrize("batched", [True, False])
def test_concurrent_greedy_matches_single_stream_reference(kind, batched, request):
    """Batched decoding (Mamba state and KV caches merged) and the round-robin queue both give each
    request exactly what a lone greedy decode gives."""
    lm = load(str(request.getfixturevalue(kind)))
    # different lengths, so a joint prefill would need padding
    prompts = [lm.tokenizer.encode(s) for s in ("hello there", "hello world", "a rather longer prompt about words",
                                                "x")]
    refs = [greedy_reference(lm, p, 10) for p in prompts]
    engine = Engine(lm.model, lm.tokenizer, max_concurrency=3, batched=batched).start()
    try:
        assert engine.batched is batched
        reqs = [GenRequest(prompt=p, params=SamplingParams(max_tokens=10, temperature=0, logprobs=True))
                for p in prompts]
        results = run_concurrently(engine, reqs)
    finally:
        engine.stop()
    for outs, (ref, ref_lp), p in zip(results, refs, prompts):
        assert outs[-1].finish_reason in ("length", "stop")
        got = gen_tokens(outs)
        assert got == ref[: len(got)] and (len(got) == 10 or got[-1] in lm.tokenizer.eos_token_ids)
        lps = [t.logprob for o in outs for t in o.tokens]  # numerically the same model, not just the same argmax
        assert max(abs(a - b) for a, b in zip(lps, ref_lp)) < 1e-3
        assert outs[-1].usage["prompt_tokens"] == len(p)


def test_sequence_pipeline_on_scripted_tokens(qwen):
    """A known token stream (tags as single special tokens, then split into pieces) through the pipeline."""
    tok = qwen.tokenizer
    text = ('<think>\nplan it\n</think>\nSure. <TOOLCALL>[{"name": "f", "arguments": {"q": 1}}]</TOOLCALL>')
    think = build_chat_prompt(tok, msgs(("user", "hi"))).thinking
    for ids in (tok.encode(text, add_special_tokens=False),
                tok._tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)):
        from mixq.serve.sequence import ThinkingPolicy

        policy = ThinkingPolicy(**{**think.__dict__, "initial": "content"})
        got = []
        seq = Sequence(GenRequest(prompt=[1], params=SamplingParams(max_tokens=500), thinking=policy, parse=True,
                                  tools=[NEMOTRON_TOOLS]), tok, got.append, TokenText(tok))
        for t in ids + [next(iter(tok.eos_token_ids))]:
            seq.feed(t, None)
        assert seq.done and got[-1].finish_reason == "tool_calls"
        reasoning = "".join(o.delta.reasoning for o in got)
        content = "".join(o.delta.content for o in got)
        calls = [c for o in got for c in o.delta.tool_calls]
        assert (reasoning, content, calls) == ("plan it", "Sure. ", [{"name": "f", "arguments": {"q": 1}}])
        if len(ids) < 40:  # single-token tags: the block is exactly <think> \n plan it \n </think>
            assert got[-1].usage["reasoning_tokens"] == ids.index(tok.convert_tokens_to_ids("</think>")) + 1


@pytest.mark.parametrize("how", ["system", "kwargs", "effort"])
def test_thinking_off_on_a_template_that_always_opens(open_qwen, how):
    tok = open_qwen.tokenizer
    think_id = tok.convert_tokens_to_ids("<think>")
    m = msgs(("system", "Be brief. /no_think") if how == "system" else ("system", "Be brief."), ("user", "hi"))
    kw = {"template_kwargs": {"enable_thinking": False}} if how == "kwargs" else {}
    if how == "effort":
        kw["reasoning_effort"] = "none"
    on = build_chat_prompt(tok, msgs(("user", "hi")))
    assert on.text.endswith("<think>\n") and on.thinking.initial == "reasoning"
    p = build_chat_prompt(tok, m, **kw)
    assert p.text.endswith("<think>\n</think>") and p.thinking.initial == "content" and p.thinking.ban_start
    engine = Engine(open_qwen.model, tok).start()
    try:  # even a +100 bias on <think> cannot open the block
        params = SamplingParams(max_tokens=12, temperature=0, logit_bias={think_id: 100.0}, logprobs=True)
        outs = engine.generate(GenRequest(prompt=p.tokens, params=params, thinking=p.thinking, parse=True))
        on_outs = engine.generate(GenRequest(prompt=on.tokens, params=params, thinking=on.thinking, parse=True))
    finally:
        engine.stop()
    assert outs[-1].usage["reasoning_tokens"] == 0 and not "".join(o.delta.reasoning for o in outs)
    assert think_id not in gen_tokens(outs) and len(gen_tokens(outs)) == outs[-1].usage["completion_tokens"]
    assert on_outs[-1].usage["reasoning_tokens"] == 12  # thinking on: the same request reasons


def test_no_think_on_the_nemotron_template_is_not_closed_twice(qwen):
    p = build_chat_prompt(qwen.tokenizer, msgs(("system", "/no_think"), ("user", "hi")))
    assert p.text.endswith("<think></think>") and p.text.count("</think>") == 1


def test_thinking_budget_closes_the_block(open_qwen):
    tok = open_qwen.tokenizer
    end_id, eos = tok.convert_tokens_to_ids("</think>"), next(iter(tok.eos_token_ids))
    p = build_chat_prompt(tok, msgs(("user", "hi")), thinking_budget=5)
    engine = Engine(open_qwen.model, tok).start()
    try:  # the model is kept from closing the block or stopping on its own
        params = SamplingParams(max_tokens=12, temperature=0, logit_bias={end_id: -100.0, eos: -100.0},
                                logprobs=True)
        outs = engine.generate(GenRequest(prompt=p.tokens, params=params, thinking=p.thinking, parse=True))
    finally:
        engine.stop()
    tokens = gen_tokens(outs)
    assert tokens.index(end_id) == 4 and tokens.count(end_id) == 1  # forced as the 5th token of the block
    assert outs[-1].usage["reasoning_tokens"] == 5 and outs[-1].usage["completion_tokens"] == 12
    assert "".join(o.delta.reasoning for o in outs) and "".join(o.delta.content for o in outs)


def test_prefix_cache_reuses_the_conversation(nemotron_dense):
    """Turn 2 of a chat pre-fills only what is new, on a Mamba hybrid (whose state cannot be trimmed),
    and decodes exactly what a cold cache decodes."""
    lm = load(str(nemotron_dense))
    tok = lm.tokenizer
    t1 = build_chat_prompt(tok, msgs(("system", "You are terse."), ("user", "Name a colour.")))
    t2 = build_chat_prompt(tok, msgs(("system", "You are terse."), ("user", "Name a colour."),
                                     ("assistant", "Blue."), ("user", "Another one?")))
    assert 0 < t1.checkpoint < len(t1.tokens) and t2.tokens[: t1.checkpoint] == t1.tokens[: t1.checkpoint]
    results = {}
    for size in (16, 0):
        engine = Engine(lm.model, tok, prefix_cache_size=size).start()
        try:
            params = SamplingParams(max_tokens=6, temperature=0, logprobs=True)
            engine.generate(GenRequest(prompt=t1.tokens, params=params, checkpoint=t1.checkpoint))
            results[size] = engine.generate(GenRequest(prompt=t2.tokens, params=params, checkpoint=t2.checkpoint))
        finally:
            engine.stop()
    assert results[16][-1].usage["cached_tokens"] >= t1.checkpoint
    assert results[0][-1].usage["cached_tokens"] == 0
    assert gen_tokens(results[16]) == gen_tokens(results[0])


def test_echo_scoring_matches_a_full_forward(nemotron_moe):
    lm = load(str(nemotron_moe))
    prompt = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    logits = lm.model(mx.array(prompt)[None])[0]
    ref = (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[mx.arange(len(prompt) - 1), mx.array(prompt[1:])]
    engine = Engine(lm.model, lm.tokenizer).start()
    try:
        outs = engine.generate(GenRequest(prompt=prompt, params=SamplingParams(max_tokens=1, temperature=0,
                                                                                logprobs=True, top_logprobs=1),
                                          prompt_logprobs=True))
        only = engine.generate(GenRequest(prompt=prompt, params=SamplingParams(max_tokens=0, logprobs=True),
                                          prompt_logprobs=True))
    finally:
        engine.stop()
    scored = outs[0].prompt_tokens
    assert scored[0] is None and len(scored) == len(prompt)
    assert mx.allclose(mx.array([s.logprob for s in scored[1:]]), ref, atol=1e-4).item()
    assert all(s.top and s.top[0][1] >= s.logprob - 1e-6 for s in scored[1:])
    assert len(gen_tokens(outs)) == 1 and outs[-1].finish_reason in ("length", "stop")
    assert only[-1].finish_reason == "length" and only[-1].usage["completion_tokens"] == 0


def test_seed_and_stop_strings(qwen):
    tok = qwen.tokenizer
    prompt = tok.encode("Once upon a time")
    engine = Engine(qwen.model, tok).start()
    try:
        def sample(seed):
            return gen_tokens(engine.generate(GenRequest(prompt=prompt, params=SamplingParams(
                max_tokens=8, temperature=1.0, seed=seed, logprobs=True))))
        a, b, c = sample(3), sample(3), sample(4)
        full = engine.generate(GenRequest(prompt=prompt, params=SamplingParams(max_tokens=8, temperature=0)))
        text = "".join(o.text for o in full)
        stop = text[3:5]
        cut = engine.generate(GenRequest(prompt=prompt, params=SamplingParams(max_tokens=8, temperature=0,
                                                                              stop=[stop])))
    finally:
        engine.stop()
    assert a == b and a != c
    assert "".join(o.text for o in cut) == text[: text.find(stop)] and cut[-1].finish_reason == "stop"


@pytest.mark.parametrize("batched", [True, False])
def test_cancel_frees_the_slot_at_once(qwen, batched):
    """One slot, a long request in it and one waiting: cancelling the first lets the second run now."""
    tok = qwen.tokenizer
    engine = Engine(qwen.model, tok, max_concurrency=1, batched=batched).start()
    try:
        got = []
        long = engine.submit(GenRequest(prompt=tok.encode("go on"), params=SamplingParams(max_tokens=3000,
                                                                                         temperature=0)),
                             got.append)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got, "the long request never started"
        done = []
        waiting = threading.Thread(target=lambda: done.append(engine.generate(GenRequest(
            prompt=tok.encode("short"), params=SamplingParams(max_tokens=3, temperature=0)), timeout=120)))
        waiting.start()
        time.sleep(0.2)
        assert engine.load()["waiting"] + engine.load()["active"] == 2
        long.cancel()
        waiting.join(120)
        assert done and done[0][-1].finish_reason == "length"
        # one slot: the short request could only run once the long one left it, and the long one left it cut
        # short (it had 3000 tokens to go) and emitted nothing after the cancel took effect
        assert len(got) < 3000 and not any(getattr(o, "finish_reason", None) for o in got)
        for _ in range(100):  # the finished request is booked out just after its last output
            if engine.load()["active"] == 0:
                break
            time.sleep(0.02)
        assert engine.load()["active"] == 0 and engine.stats["cancelled"] == 1
    finally:
        engine.stop()


def test_kv_config_caches_use_the_fair_queue(nemotron_dense):
    import mixq.kvcache as kv
    from mixq.serve.engine import make_cache_factory

    lm = load(str(nemotron_dense))
    factory = make_cache_factory(lm, kv.uniform_config(lm, 8))
    engine = Engine(lm.model, lm.tokenizer, cache_factory=factory, max_concurrency=2).start()
    try:
        assert not engine.batched  # quantized KV slots cannot be merged: round-robin
        reqs = [GenRequest(prompt=lm.tokenizer.encode(s), params=SamplingParams(max_tokens=5, temperature=0))
                for s in ("one", "two two", "three three three")]
        results = run_concurrently(engine, reqs)
    finally:
        engine.stop()
    assert all(r[-1].finish_reason in ("length", "stop") for r in results)


def test_a_full_queue_refuses_with_429(qwen):
    from mixq.serve.engine import EngineError

    tok = qwen.tokenizer
    engine = Engine(qwen.model, tok, max_concurrency=1, max_queue=1).start()
    try:
        params = SamplingParams(max_tokens=3000, temperature=0)
        first = engine.submit(GenRequest(prompt=tok.encode("a"), params=params), lambda out: None)
        deadline = time.monotonic() + 10
        while engine.load()["active"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = engine.submit(GenRequest(prompt=tok.encode("b"), params=params), lambda out: None)
        with pytest.raises(EngineError) as e:
            engine.submit(GenRequest(prompt=tok.encode("c"), params=params), lambda out: None)
        assert e.value.status == 429
        first.cancel()
        second.cancel()
    finally:
        engine.stop()
    assert not engine.alive
    with pytest.raises(EngineError) as e:  # a stopped engine says so (503)
        engine.submit(GenRequest(prompt=tok.encode("d"), params=params), lambda out: None)
    assert e.value.status == 503


def test_top_p_keeps_only_the_nucleus(qwen):
    """top_p that keeps a single token makes sampling at any temperature the greedy decode."""
    tok = qwen.tokenizer
    prompt = tok.encode("Once upon a time")
    engine = Engine(qwen.model, tok).start()
    try:
        def run(**kw):
            return gen_tokens(engine.generate(GenRequest(prompt=prompt, params=SamplingParams(
                max_tokens=8, logprobs=True, **kw))))
        assert run(temperature=1.5, top_p=1e-6, seed=1) == run(temperature=0)
    finally:
        engine.stop()


@pytest.mark.parametrize("name", ["demo", "demo-moe"])
def test_prompt_reuse_over_five_turns_on_the_hybrid_demos(name):
    """A 5-turn chat on the bundled Mamba hybrids (whose state cannot be trimmed, so only exact prefixes are
    reused): every turn's greedy reply is the same token for token with the prefix cache as without it, and
    turns 2-5 report the reused prompt tokens."""
    from importlib import resources

    lm = load(name, compute_dtype="float32")
    tok = lm.tokenizer
    opening = tok.decode(tok.encode(resources.files("mixq.data").joinpath("heldout.txt").read_text())[:200])
    replies = {}
    for size in (16, 0):
        engine = Engine(lm.model, tok, prefix_cache_size=size).start()
        try:
            history, got = [("system", opening + "\n/no_think")], []
            for q in ("Who wrote this?", "Summarise it.", "Name one word from it.", "Is it old?", "Say thanks."):
                history.append(("user", q))
                p = build_chat_prompt(tok, msgs(*history))
                outs = engine.generate(GenRequest(prompt=p.tokens, params=SamplingParams(
                    max_tokens=12, temperature=0, logprobs=True), thinking=p.thinking, parse=True,
                    checkpoint=p.checkpoint), timeout=120)
                got.append((gen_tokens(outs), outs[-1].usage["cached_tokens"], len(p.tokens)))
                history.append(("assistant", "".join(o.delta.content for o in outs)))
        finally:
            engine.stop()
        replies[size] = got
    assert [t for t, _, _ in replies[16]] == [t for t, _, _ in replies[0]]
    assert all(tokens for tokens, _, _ in replies[16])
    assert [c for _, c, _ in replies[0]] == [0] * 5
    assert replies[16][0][1] == 0 and all(0 < c < n for _, c, n in replies[16][1:])
