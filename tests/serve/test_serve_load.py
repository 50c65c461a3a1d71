"""A bounded load test: 8 concurrent clients x 28 requests on a Mamba hybrid, mixing plain and streamed
chat, echoed and streamed completions, Anthropic messages (streamed), Responses, and clients that hang up
mid-stream. No 5xx, every answer is the
one its own prompt gets when served alone, and the server is idle and healthy afterwards."""

from __future__ import annotations

import json
import threading
import time

import httpx
import mixq  # noqa: F401

from mixq.core.modelio import load
from mixq.serve.app import ServeSettings, create_app
from mixq.serve.engine import Engine
from mixq.serve.runner import ServerThread

CLIENTS, PER_CLIENT, MAX_TOKENS, KINDS = 8, 28, 6, 7
WORDS = ["apple", "river", "mountain", "violin", "winter", "copper", "lantern", "harbour"]


def chat_body(k, stream=False):
    # a chat prompt ends in the same template tail whatever the question, and a random-weight model barely
    # tells them apart; a per-prompt seed makes every prompt's answer its own (and still reproducible)
    return {"model": "m", "messages": [{"role": "user", "content": f"Question {k}: what is a {WORDS[k]}?"}],
            "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 1000 + k, "stream": stream}


def completion_body(k, stream=False, echo=False, prompt=None):
    return {"model": "m", "prompt": prompt or f"The {WORDS[k]} is", "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": stream, "echo": echo}


def messages_body(k, stream=False):
    return {"model": "m", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": f"Question {k}: what is a {WORDS[k]}?"}]}


def responses_body(k):
    return {"model": "m", "input": f"Tell me about the {WORDS[k]}.", "max_output_tokens": MAX_TOKENS,
            "temperature": 0}


def read_anthropic_stream(resp) -> str:
    """The text of a streamed Anthropic message; asserts it ends with message_stop and has no error."""
    text, events = "", []
    for line in resp.iter_lines():
        if line.startswith("event: "):
            events.append(line[7:])
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            if data["type"] == "content_block_delta" and data["delta"]["type"] == "text_delta":
                text += data["delta"]["text"]
    assert events and events[-1] == "message_stop" and "error" not in events, events
    return text


def message_text(body: dict) -> str:
    return "".join(b.get("text", "") for b in body["content"])


def read_stream(resp):
    """(reasoning, content or text, finish_reason) from an SSE stream; asserts it ends with [DONE]."""
    reasoning = text = ""
    finish, done = None, False
    for line in resp.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        data = json.loads(line[6:])
        assert "error" not in data, data
        for ch in data["choices"]:
            d = ch.get("delta", {})
            reasoning += d.get("reasoning_content") or ""
            text += d.get("content") or ch.get("text") or ""
            finish = ch.get("finish_reason") or finish
    assert done
    return reasoning, text, finish


def test_concurrent_clients(nemotron_dense):
    lm = load(str(nemotron_dense))
    engine = Engine(lm.model, lm.tokenizer, max_concurrency=6).start()
    app = create_app(engine, ServeSettings(model_id="m"))
    try:
        with ServerThread(app) as srv, httpx.Client(base_url=srv.url, trust_env=False, timeout=60) as h:
            chat_ref, text_ref = [], []
            for k in range(len(WORDS)):  # each prompt served alone first
                m = h.post("/v1/chat/completions", json=chat_body(k)).json()["choices"][0]["message"]
                chat_ref.append(((m.get("reasoning_content") or ""), m["content"] or ""))
                text_ref.append(h.post("/v1/completions", json=completion_body(k)).json()["choices"][0]["text"])
            assert len(set(chat_ref)) == len(set(text_ref)) == len(WORDS)  # answers tell prompts apart
            msg_ref = [message_text(h.post("/v1/messages", json=messages_body(k)).json()) for k in range(len(WORDS))]
            resp_ref = [h.post("/v1/responses", json=responses_body(k)).json()["output"] for k in range(len(WORDS))]

            statuses, failures, cancelled = [], [], []
            deadline = time.monotonic() + 100

            def client(c):
                with httpx.Client(base_url=srv.url, trust_env=False, timeout=60) as hc:
                    for i in range(PER_CLIENT):
                        if time.monotonic() > deadline:
                            failures.append((c, i, "out of time"))
                            return
                        k, kind = (c * 7 + i) % len(WORDS), i % KINDS
                        try:
                            if kind == 0:
                                r = hc.post("/v1/chat/completions", json=chat_body(k))
                                statuses.append(r.status_code)
                                m = r.json()["choices"][0]["message"]
                                got = ((m.get("reasoning_content") or ""), m["content"] or "")
                                if got != chat_ref[k]:
                                    failures.append((c, i, got, chat_ref[k]))
                            elif kind == 1:
                                with hc.stream("POST", "/v1/chat/completions", json=chat_body(k, True)) as r:
                                    statuses.append(r.status_code)
                                    reasoning, content, _ = read_stream(r)
                                if (reasoning, content) != chat_ref[k]:
                                    failures.append((c, i, (reasoning, content), chat_ref[k]))
                            elif kind == 2:
                                prompt = f"client {c} request {i}: the {WORDS[k]}"
                                r = hc.post("/v1/completions", json=completion_body(k, echo=True, prompt=prompt))
                                statuses.append(r.status_code)
                                body = r.json()
                                if not body["choices"][0]["text"].startswith(prompt) or \
                                        body["usage"]["prompt_tokens"] != len(lm.tokenizer.encode(prompt)):
                                    failures.append((c, i, body))
                            elif kind == 3:  # hang up after the first token
                                body = {**chat_body(k, True), "max_tokens": 200}
                                with hc.stream("POST", "/v1/chat/completions", json=body) as r:
                                    statuses.append(r.status_code)
                                    for line in r.iter_lines():
                                        if '"delta": {"reasoning' in line or '"delta": {"content' in line:
                                            break
                                cancelled.append((c, i))
                            elif kind == 4:
                                with hc.stream("POST", "/v1/completions", json=completion_body(k, True)) as r:
                                    statuses.append(r.status_code)
                                    _, text, _ = read_stream(r)
                                if text != text_ref[k]:
                                    failures.append((c, i, text, text_ref[k]))
                            elif kind == 5:
                                with hc.stream("POST", "/v1/messages", json=messages_body(k, True)) as r:
                                    statuses.append(r.status_code)
                                    text = read_anthropic_stream(r)
                                if text != msg_ref[k]:
                                    failures.append((c, i, text, msg_ref[k]))
                            else:
                                r = hc.post("/v1/responses", json=responses_body(k))
                                statuses.append(r.status_code)
                                strip = lambda items: [{**x, "id": None, "call_id": None} for x in items]  # noqa
                                if strip(r.json()["output"]) != strip(resp_ref[k]):
                                    failures.append((c, i, r.json()["output"], resp_ref[k]))
                        except Exception as e:  # noqa: BLE001 - any client-side failure is a test failure
                            failures.append((c, i, repr(e)))

            threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not any(t.is_alive() for t in threads)
            assert not failures, failures[:5]
            assert len(statuses) == CLIENTS * PER_CLIENT and all(s == 200 for s in statuses)
            # hung-up streams leave the engine: nothing active once the dust settles
            for _ in range(200):
                if engine.load()["active"] == 0 and engine.load()["waiting"] == 0:
                    break
                time.sleep(0.05)
            health = h.get("/health").json()
            assert health["status"] == "ok" and health["active"] == 0 and health["errors"] == 0
            assert health["cancelled"] >= 1 and len(cancelled) == CLIENTS * PER_CLIENT // KINDS
            assert health["requests"] == 4 * len(WORDS) + CLIENTS * PER_CLIENT
    finally:
        engine.stop()
