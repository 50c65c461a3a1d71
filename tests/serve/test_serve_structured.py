"""Structured output by constrained decoding on the demo model: JSON schemas (batched, round-robin, streamed,
after a think block), JSON mode, forced tool calls. The schemas bound every string, array and number, so
the grammar itself ends the output: the checks hold whatever the model would rather say."""

from __future__ import annotations

import json
import threading

import httpx
import jsonschema
import mixq  # noqa: F401
import openai
import pytest

from mixq.core.modelio import load
from mixq.serve.app import ServeSettings, create_app
from mixq.serve.engine import Engine
from mixq.serve.runner import ServerThread

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "genre": {"enum": ["poem", "story", "letter"]},
    "author": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                                "born": {"type": "integer", "minimum": 1000, "maximum": 2100}},
               "required": ["name", "born"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"enum": ["old", "new", "sea", "war", "love"]}, "maxItems": 3},
    "rating": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["title", "genre", "author", "tags"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "work", "schema": SCHEMA, "strict": True}}
ASK = [{"role": "user", "content": "Describe a famous poem as JSON."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
             "additionalProperties": False}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"tz": {"enum": ["UTC", "JST"]}}, "required": ["tz"],
             "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def demo_lm():
    return load("demo", compute_dtype="float32")


@pytest.fixture(scope="module", params=[True, False], ids=["batched", "round-robin"])
def server(request, demo_lm):
    engine = Engine(demo_lm.model, demo_lm.tokenizer, max_concurrency=8, batched=request.param).start()
    try:
        with ServerThread(create_app(engine, ServeSettings(model_id="demo"))) as srv:
            yield srv, engine
    finally:
        engine.stop()


def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120,
                         http_client=httpx.Client(trust_env=False))


def test_json_schema_concurrent_requests_validate(server):
    srv, engine = server
    c, results = client(srv), [None] * 6

    def ask(i):
        results[i] = c.chat.completions.create(model="demo", messages=ASK, max_tokens=300, temperature=1.0, seed=i,
                                               response_format=FORMAT, reasoning_effort="none")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for r in results:
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    assert len({r.choices[0].message.content for r in results}) > 1  # sampled, not one fixed answer
    assert engine.stats["errors"] == 0


def test_json_schema_after_the_think_block_and_streamed(server):
    srv, _ = server
    c = client(srv)
    r = c.chat.completions.create(model="demo", messages=ASK, max_tokens=300, temperature=0, response_format=FORMAT,
                                  extra_body={"thinking_budget": 12})
    msg = r.choices[0].message
    assert (msg.model_extra or {}).get("reasoning_content")  # it reasoned freely first
    jsonschema.validate(json.loads(msg.content), SCHEMA)
    content = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="demo", messages=ASK, max_tokens=300, temperature=0, response_format=FORMAT, reasoning_effort="none",
        stream=True) if ch.choices)
    jsonschema.validate(json.loads(content), SCHEMA)


def test_forced_tool_calls(server):
    srv, _ = server
    c = client(srv)
    hello = [{"role": "user", "content": "Hello there"}]
    for choice, names in (("required", {"get_weather", "get_time"}),
                          ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})):
        r = c.chat.completions.create(model="demo", messages=hello, tools=TOOLS, tool_choice=choice, max_tokens=200,
                                      temperature=0, reasoning_effort="none", parallel_tool_calls=False)
        assert r.choices[0].finish_reason == "tool_calls"
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name in names
        params = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), params)


def test_json_mode_emits_only_what_the_grammar_allows(server, demo_lm):
    """JSON mode does not bound strings, so a weak model may run out of tokens inside one: every token it
    produced must still be one the JSON grammar accepts, and a finished answer must parse as an object."""
    import llguidance

    srv, engine = server
    r = client(srv).chat.completions.create(model="demo", messages=ASK, max_tokens=60, temperature=0,
                                            response_format={"type": "json_object"}, reasoning_effort="none")
    text = r.choices[0].message.content
    serving_grammars = srv.app.state.serving.grammars
    matcher = llguidance.LLMatcher(serving_grammars.lltokenizer(), serving_grammars.json(None).grammar)
    ids = demo_lm.tokenizer.encode(text, add_special_tokens=False)
    assert text.startswith("{") and matcher.consume_tokens(ids), matcher.get_error()
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
