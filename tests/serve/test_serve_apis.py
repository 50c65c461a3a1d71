"""Anthropic's Messages API and OpenAI's Responses API on the live server, driven by the official `anthropic`
and `openai` clients: the scripted model's conversation (thinking, a tool call, the answer from the tool's
result) round-trips through each, streamed and not; errors come back in each API's shape."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import httpx
import openai
import pytest

from mixq.core.modelio import load
from mixq.serve.app import ServeSettings, create_app
from mixq.serve.engine import Engine
from mixq.serve.runner import ServerThread
from scripted import ASK, TOOLS

A_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
            "input_schema": t["function"]["parameters"]} for t in TOOLS]
R_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]
THINK = {"type": "enabled", "budget_tokens": 32}


@pytest.fixture(scope="module")
def served(scripted_model):
    lm = load(str(scripted_model))
    engine = Engine(lm.model, lm.tokenizer, max_concurrency=4).start()
    try:
        with ServerThread(create_app(engine, ServeSettings(model_id="m", api_key="sk-test"))) as srv:
            yield srv, engine
    finally:
        engine.stop()


def claude(srv, key="sk-test"):
    import httpx2  # what anthropic >= 2.14 speaks HTTP with

    return anthropic.Anthropic(base_url=srv.url, api_key=key, max_retries=0, timeout=60,
                               http_client=httpx2.Client(trust_env=False))


def responses(srv, key="sk-test"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60,
                         http_client=httpx.Client(trust_env=False))


def anthropic_turn(c, messages, stream):
    # this SDK has no temperature argument; the API still takes one
    kw = dict(model="m", max_tokens=64, messages=messages, tools=A_TOOLS, thinking=THINK,
              extra_body={"temperature": 0})
    if not stream:
        return c.messages.create(**kw)
    with c.messages.stream(**kw) as s:
        return s.get_final_message()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_anthropic_thinking_and_tool_use_round_trip(served, stream):
    srv, _ = served
    c = claude(srv)
    first = anthropic_turn(c, ASK, stream)
    assert first.stop_reason == "tool_use" and [b.type for b in first.content] == ["thinking", "tool_use"]
    thinking, use = first.content
    assert thinking.thinking == "I should call the tool."
    assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id.startswith("toolu_")
    history = ASK + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                   "content": "sunny, 21 C"}]}]
    second = anthropic_turn(c, history, stream)
    assert second.stop_reason == "end_turn" and [b.type for b in second.content] == ["thinking", "text"]
    assert second.content[0].thinking == "The tool answered."
    assert second.content[1].text == "It is sunny in Paris."
    assert second.usage.cache_read_input_tokens > 0  # the first turn's prompt came from the prefix cache


def test_anthropic_defaults_errors_and_forced_tools(served):
    srv, _ = served
    c = claude(srv)
    off = c.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": "Say hi."}])
    assert all(b.type != "thinking" for b in off.content)  # no thinking unless asked for (Anthropic's default)
    # the grammar bounds the call (city at most 20 characters) so it ends whatever the model would write
    bounded = [{**A_TOOLS[0], "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                                               "required": ["city"], "additionalProperties": False}}]
    forced = c.messages.create(model="m", max_tokens=160, messages=[{"role": "user", "content": "Say hi."}],
                               tools=bounded, tool_choice={"type": "tool", "name": "get_weather"}, thinking=THINK)
    schema = {"type": "object", "properties": {"greeting": {"enum": ["hi", "hello"]}}, "required": ["greeting"],
              "additionalProperties": False}
    shaped = c.messages.create(model="m", max_tokens=40, messages=[{"role": "user", "content": "Say hi."}],
                               output_config={"format": {"type": "json_schema", "schema": schema}})
    assert json.loads(shaped.content[-1].text)["greeting"] in ("hi", "hello")
    assert forced.stop_reason == "tool_use" and forced.content[-1].name == "get_weather"
    jsonschema.validate(forced.content[-1].input, bounded[0]["input_schema"])
    assert c.messages.count_tokens(model="m", messages=ASK).input_tokens > 0
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        c.messages.create(model="nope", max_tokens=8, messages=ASK)
    with pytest.raises(anthropic.AuthenticationError):
        claude(srv, "wrong").messages.create(model="m", max_tokens=8, messages=ASK)


def responses_turn(c, items, stream):
    kw = dict(model="m", input=items, tools=R_TOOLS, temperature=0, max_output_tokens=64)
    if not stream:
        return c.responses.create(**kw)
    with c.responses.stream(**kw) as s:
        for _ in s:
            pass
        return s.get_final_response()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_responses_reasoning_and_function_call_round_trip(served, stream):
    srv, _ = served
    c = responses(srv)
    first = responses_turn(c, ASK, stream)
    assert first.status == "completed" and [i.type for i in first.output] == ["reasoning", "function_call"]
    reasoning, call = first.output
    assert reasoning.content[0].text == "I should call the tool."
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    items = ASK + [i.model_dump(exclude_none=True) for i in first.output] + [
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}]
    second = responses_turn(c, items, stream)
    assert [i.type for i in second.output] == ["reasoning", "message"]
    assert second.output_text == "It is sunny in Paris." and second.usage.input_tokens_details.cached_tokens > 0


def test_responses_formats_and_errors(served):
    srv, _ = served
    c = responses(srv)
    r = c.responses.create(model="m", input="Say hi.", max_output_tokens=40, temperature=0,
                           text={"format": {"type": "json_schema", "name": "g", "strict": True, "schema": {
                               "type": "object", "properties": {"greeting": {"enum": ["hi", "hello"]}},
                               "required": ["greeting"], "additionalProperties": False}}},
                           reasoning={"effort": "none"})
    assert json.loads(r.output_text)["greeting"] in ("hi", "hello")
    cut = c.responses.create(model="m", input="Say hi.", max_output_tokens=2, temperature=0)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    for bad in ({"previous_response_id": "resp_1"}, {"tools": [{"type": "web_search"}]},
                {"input": [{"type": "item_reference", "id": "x"}]}):
        with pytest.raises(openai.BadRequestError):
            c.responses.create(**{"model": "m", "input": "hi", **bad})
