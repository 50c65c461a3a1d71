"""The live server, driven with the real `openai` client over loopback.

A fixture model with random weights says nothing useful, so the reasoning and tool-call round trips use a
one-layer model trained here in a few seconds to say exactly three scripted replies (a tool call, an
answer from the tool's result, a greeting), each with a think block. The server renders, decodes and
parses them like any model's output: nothing in the server knows about the script.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager

import httpx
import mixq  # noqa: F401
import mlx.core as mx
import pytest

from mixq.core.modelio import load
from mixq.serve.app import ServeSettings, create_app
from mixq.serve.engine import Engine
from mixq.serve.runner import ServerThread

import openai  # noqa: E402  (a dev dependency)

from scripted import ASK, HI, SCRIPT, TOOLS  # noqa: E402  (tests/serve/scripted.py)


@contextmanager
def serving(path, max_concurrency=4, **settings):
    lm = load(str(path))
    engine = Engine(lm.model, lm.tokenizer, max_concurrency=max_concurrency).start()
    try:
        app = create_app(engine, ServeSettings(model_id="m", **settings))
        with ServerThread(app) as srv:
            yield srv, engine, lm
    finally:
        engine.stop()


def client_for(srv, key="none"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=30,
                         http_client=httpx.Client(trust_env=False))


@pytest.fixture(scope="module")
def scripted(scripted_model):
    with serving(scripted_model) as s:
        yield s


@pytest.fixture(scope="module")
def plain(qwen3):
    with serving(qwen3, context_length=256, max_body_bytes=64 << 10) as s:
        yield s


def extra(obj, name):
    return (obj.model_extra or {}).get(name)


def test_models_and_health(plain):
    srv, engine, _ = plain
    c = client_for(srv)
    assert [m.id for m in c.models.list().data] == ["m"]
    h = httpx.get(srv.url + "/health", trust_env=False).json()
    assert h["status"] == "ok" and h["batched"] is True


def test_reasoning_split(scripted):
    srv, _, lm = scripted
    c = client_for(srv)
    r = c.chat.completions.create(model="m", messages=HI, temperature=0, max_tokens=40)
    msg = r.choices[0].message
    assert msg.content == "Hi there!" and r.choices[0].finish_reason == "stop"
    assert extra(msg, "reasoning_content") == extra(msg, "reasoning") == "A greeting is needed."
    think_tokens = len(lm.tokenizer.encode("A greeting is needed.\n</think>", add_special_tokens=False))
    assert r.usage.completion_tokens_details.reasoning_tokens == think_tokens
    # streaming: the same split, and no tag fragment in any delta
    reasoning = content = ""
    finish = None
    for chunk in c.chat.completions.create(model="m", messages=HI, temperature=0, max_tokens=40, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens_details.reasoning_tokens == think_tokens
        for ch in chunk.choices:
            d = ch.delta
            piece = (d.content or "") + (extra(d, "reasoning_content") or "")
            assert "<" not in piece and "think>" not in piece
            content += d.content or ""
            reasoning += extra(d, "reasoning_content") or ""
            finish = ch.finish_reason or finish
    assert (reasoning, content, finish) == ("A greeting is needed.", "Hi there!", "stop")


def test_thinking_budget(scripted):
    srv, _, _ = scripted
    r = client_for(srv).chat.completions.create(model="m", messages=HI, temperature=0, max_tokens=16,
                                                 extra_body={"thinking_budget": 3})
    assert r.usage.completion_tokens_details.reasoning_tokens == 3
    assert "A greeting is needed.".startswith(extra(r.choices[0].message, "reasoning_content"))


def test_tool_call_round_trip(scripted):
    srv, _, _ = scripted
    c = client_for(srv)
    r = c.chat.completions.create(model="m", messages=ASK, tools=TOOLS, temperature=0, max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    assert extra(choice.message, "reasoning_content") == "I should call the tool."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # send the call and the tool's answer back: the model answers from it
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r2 = c.chat.completions.create(model="m", messages=history, tools=TOOLS, temperature=0, max_tokens=64)
    assert r2.choices[0].message.content == "It is sunny in Paris." and r2.choices[0].finish_reason == "stop"
    assert r2.usage.prompt_tokens_details.cached_tokens > 0  # the first turn's prompt came from the prefix cache
    # streamed, the call arrives as one tool_calls delta and the stream ends with finish_reason tool_calls
    calls, finish = [], None
    for chunk in c.chat.completions.create(model="m", messages=ASK, tools=TOOLS, temperature=0, max_tokens=64,
                                           stream=True):
        for ch in chunk.choices:
            calls += ch.delta.tool_calls or []
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and [tc.function.name for tc in calls] == ["get_weather"]
    # tool_choice "none": the tools are not offered, nothing is parsed as a call
    r3 = c.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="none", temperature=0,
                                   max_tokens=8)
    assert r3.choices[0].finish_reason != "tool_calls"


def test_chat_logprobs_and_completions(scripted):
    srv, _, lm = scripted
    c = client_for(srv)
    r = c.chat.completions.create(model="m", messages=HI, temperature=0, max_tokens=40, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)
    out = c.completions.create(model="m", prompt="Say hi.", max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens <= 5
    # echo + logprobs: the prompt's own log-likelihoods, as a full forward computes them
    ids = lm.tokenizer.encode("It is sunny in Paris.")
    e = c.completions.create(model="m", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = e.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert e.choices[0].text.startswith(lm.tokenizer.decode(ids))
    logits = lm.model(mx.array(ids)[None])[0]
    ref = (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[mx.arange(len(ids) - 1), mx.array(ids[1:])]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(ref.tolist(), abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_thinking_off_on_an_always_open_template(qwen3, tmp_path):
    """A template that opens `<think>` whatever it is told: the server closes the block itself."""
    path = tmp_path / "open"
    shutil.copytree(qwen3, path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = cfg["chat_template"].replace(
        "{%- if ns.no_think -%}<think></think>{%- else -%}<think>{{ '\\n' }}{%- endif -%}", "<think>{{ '\\n' }}")
    assert "<think></think>" not in cfg["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with serving(path) as (srv, _, lm):
        c = client_for(srv)
        bias = {str(lm.tokenizer.convert_tokens_to_ids("<think>")): 100}
        asks = [dict(messages=[{"role": "system", "content": "/no_think"}, {"role": "user", "content": "hi"}]),
                dict(messages=[{"role": "user", "content": "hi"}],
                     extra_body={"chat_template_kwargs": {"enable_thinking": False}}),
                dict(messages=[{"role": "user", "content": "hi"}], reasoning_effort="none")]
        for kw in asks:
            r = c.chat.completions.create(model="m", temperature=0, max_tokens=8, logit_bias=bias, **kw)
            assert r.usage.completion_tokens_details.reasoning_tokens == 0
            assert not extra(r.choices[0].message, "reasoning_content")
        on = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0,
                                       max_tokens=8)
        assert on.usage.completion_tokens_details.reasoning_tokens == 8  # the template opened the block


BAD = [
    ("chat", b"{not json"), ("chat", b"[1, 2]"), ("chat", b'"text"'), ("chat", b"\xff\xfe"),
    ("chat", b"[" * 100000), ("chat", b"[" * 50000), ("chat", {"model": "m"}), ("chat", {"model": "m", "messages": []}),
    ("chat", {"model": "m", "messages": "hi"}), ("chat", {"model": "nope", "messages": [{"role": "user",
                                                                                          "content": "x"}]}),
    ("chat", {"model": "m", "messages": [{"role": "wizard", "content": "x"}]}),
    ("chat", {"model": "m", "messages": [{"role": "user"}]}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 12}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 1e400}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 99}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999": 1}}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 100}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": "x"}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "word " * 400}]}),  # > context of 256
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
    ("completions", {"model": "m", "prompt": ""}), ("completions", {"model": "m", "prompt": [10 ** 6]}),
    ("completions", {"model": "m", "prompt": [[1, 2], "x"]}), ("completions", {"model": "m", "prompt": 5}),
    ("completions", {"model": "m", "prompt": "x", "logprobs": -1}),
    ("completions", {"model": "m", "prompt": "x", "max_tokens": 300}),
    ("completions", {"model": "m", "prompt": ["a", "b"], "stream": True}),
    ("completions", {"model": "m", "prompt": "x", "best_of": 3}),
    ("messages", {"model": "m", "messages": [{"role": "user", "content": "x"}]}),  # max_tokens is required
    ("messages", {"model": "m", "max_tokens": 4, "messages": []}),
    ("messages", {"model": "m", "max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}),
    ("messages", {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image"}]}]}),
    ("messages", {"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}),
    ("messages", {"model": "m", "max_tokens": 4, "top_k": 5, "messages": [{"role": "user", "content": "x"}]}),
    ("messages", {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}],
                  "tool_choice": {"type": "any"}}),
    ("messages", {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}],
                  "thinking": {"type": "enabled", "budget_tokens": 8}}),
    ("messages", {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "a\ud800"}]}),
    ("responses", {"model": "m"}), ("responses", {"model": "m", "input": []}),
    ("responses", {"model": "m", "input": "x", "previous_response_id": "resp_1"}),
    ("responses", {"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
    ("responses", {"model": "m", "input": [{"type": "item_reference", "id": "x"}]}),
    ("responses", {"model": "m", "input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
    ("responses", {"model": "m", "input": "x", "max_output_tokens": -1}),
    ("responses", {"model": "m", "input": "x", "text": {"format": {"type": "bogus"}}}),
    ("responses", {"model": "m", "input": "x", "tool_choice": "required"}),
]
ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "messages": "/v1/messages",
          "responses": "/v1/responses"}


@pytest.mark.parametrize("route,body", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_malformed_requests_get_openai_errors(plain, route, body):
    srv, engine, _ = plain
    url = srv.url + ROUTES[route]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url, content=content, headers={"content-type": "application/json"}, trust_env=False, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if route == "messages":  # Anthropic's shape
        assert r.json()["type"] == "error" and err["type"].endswith("_error")
    assert engine.alive


def test_limits_routes_and_still_alive(plain):
    srv, engine, _ = plain
    big = json.dumps({"model": "m", "prompt": "x" * (100 << 10)}).encode()
    r = httpx.post(srv.url + "/v1/completions", content=big, headers={"content-type": "application/json"},
                   trust_env=False)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(srv.url + "/v1/nothing", trust_env=False).status_code == 404
    assert httpx.get(srv.url + "/v1/completions", trust_env=False).status_code == 405
    ok = client_for(srv).completions.create(model="m", prompt="still here", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens >= 1 and engine.stats["errors"] == 0


def test_bearer_auth(qwen3):
    with serving(qwen3, api_key="s3cret") as (srv, _, _):
        with pytest.raises(openai.AuthenticationError):
            client_for(srv, "wrong").models.list()
        r = httpx.get(srv.url + "/v1/models", trust_env=False)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert [m.id for m in client_for(srv, "s3cret").models.list().data] == ["m"]
        assert httpx.get(srv.url + "/health", trust_env=False).status_code == 200


@pytest.mark.parametrize("route", ["chat", "messages", "responses"])
def test_disconnect_mid_stream_frees_the_slot(qwen3, route):
    """One slot: a client that vanishes mid-stream gives it up, and the next request runs at once."""
    with serving(qwen3, max_concurrency=1, keepalive_s=0.2) as (srv, engine, _):
        body = {"model": "m", "messages": [{"role": "user", "content": "go"}], "max_tokens": 3000,
                "temperature": 0, "stream": True}
        if route == "responses":
            body = {"model": "m", "input": "go", "max_output_tokens": 3000, "temperature": 0, "stream": True}
        with httpx.Client(trust_env=False, timeout=30) as h:
            with h.stream("POST", srv.url + ROUTES[route], json=body) as r:
                lines = r.iter_lines()
                for _ in range(4):
                    next(lines)
        # the connection is closed; the engine drops the request within a few steps
        r = client_for(srv).completions.create(model="m", prompt="next", max_tokens=3, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop")
        for _ in range(100):  # the engine books the finished request just after handing out its answer
            if engine.load()["active"] == 0:
                break
            time.sleep(0.02)
        assert engine.stats["cancelled"] == 1 and engine.load()["active"] == 0


def test_lm_eval_local_completions(scripted, tmp_path):
    """lm-evaluation-harness (`local-completions`) scores a 3-way multiple-choice task through the server:
    every log-likelihood and greedy flag it gets equals a direct forward of the same model, and the accuracy
    it reports is the one those direct log-likelihoods give (independent of how well training went)."""
    import lm_eval  # noqa: F401  (a dev dependency)
    import subprocess
    import sys

    from mixq.serve.prompting import build_chat_prompt
    from mixq.serve.protocol import ChatMessage

    srv, _, lm = scripted
    tok = lm.tokenizer
    answers = [c.split("\n</think>")[0] for _, _, c in SCRIPT]
    docs = []
    for i, (messages, tools, _) in enumerate(SCRIPT):
        p = build_chat_prompt(tok, [ChatMessage.model_validate(m) for m in messages], tools=tools)
        docs.append({"question": p.text, "choices": answers, "answer": i})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "mixq_tiny_mc.yaml").write_text(
        "task: mixq_tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ntarget_delimiter: \"\"\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n")
    model_dir = tmp_path / "tokenizer"  # lm-eval tokenizes locally with the model's own tokenizer files
    model_dir.mkdir()
    for f in lm.path.glob("tokenizer*"):
        shutil.copy(f, model_dir / f.name)
    shutil.copy(lm.path / "special_tokens_map.json", model_dir / "special_tokens_map.json")
    env = {k: v for k, v in __import__("os").environ.items()}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    args = (f"model=m,base_url={srv.url}/v1/completions,tokenizer={model_dir},tokenizer_backend=huggingface,"
            "num_concurrent=1,max_retries=1")
    r = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", args,
                        "--tasks", "mixq_tiny_mc", "--include_path", str(tmp_path), "--output_path",
                        str(tmp_path / "out"), "--log_samples", "--batch_size", "2"],
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    (samples,) = (tmp_path / "out").rglob("samples_mixq_tiny_mc_*.jsonl")
    lines = samples.read_text().splitlines()
    assert len(lines) == len(SCRIPT)
    correct = []
    for line in lines:
        s = json.loads(line)
        got = [(float(ll), greedy in (True, "True")) for ll, greedy in s["filtered_resps"]]
        assert len(got) == len(answers)
        refs = []
        for (ll, greedy), answer in zip(got, answers):
            context = s["doc"]["question"]  # lm-eval's split: trailing whitespace goes to the continuation
            ctx = tok.encode(context.rstrip(), add_special_tokens=False)
            whole = tok.encode(context + answer, add_special_tokens=False)
            assert whole[: len(ctx)] == ctx and len(whole) > len(ctx)
            logits = lm.model(mx.array(whole)[None])[0]
            lps = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            cont = range(len(ctx), len(whole))
            ref = sum(lps[i - 1, whole[i]].item() for i in cont)
            top2 = mx.topk(logits, 2, axis=-1)
            margin = min((top2[i - 1].max() - top2[i - 1].min()).item() for i in cont)
            ref_greedy = all(int(logits[i - 1].argmax().item()) == whole[i] for i in cont)
            assert ll == pytest.approx(ref, abs=1e-3)
            if margin > 1e-3:  # a near-tie may resolve either way in another kernel's summation order
                assert greedy == ref_greedy
            refs.append(ll)
        correct.append(float(max(range(len(refs)), key=refs.__getitem__) == int(s["target"])))
    (results,) = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(results.read_text())["results"]["mixq_tiny_mc"]["acc,none"]
    assert acc == pytest.approx(sum(correct) / len(correct), abs=1e-9)
