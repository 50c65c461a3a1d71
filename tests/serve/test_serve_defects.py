"""The defects an outside test found (issue 16), each as the request that showed it, on the bundled demo model."""

from __future__ import annotations

import json
import socket

import httpx
import mixq  # noqa: F401
import openai
import pytest

from mixq.core.modelio import load
from mixq.serve.app import ServeSettings, create_app
from mixq.serve.engine import Engine
from mixq.serve.runner import ServerThread

VERSE = {"model": "demo", "prompt": "Continue the verse: In the beginning God", "max_tokens": 2, "temperature": 0,
         "echo": True}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def demo():
    lm = load("demo", compute_dtype="float32")
    engine = Engine(lm.model, lm.tokenizer, max_concurrency=4).start()
    try:
        settings = ServeSettings(model_id="demo", context_length=512, body_timeout_s=1.0)
        with ServerThread(create_app(engine, settings)) as srv:
            yield srv, engine, lm
    finally:
        engine.stop()


def post(srv, path, body, **headers):
    return httpx.post(srv.url + path, json=body, headers=headers, trust_env=False, timeout=30)


def raw_request(srv, data: bytes, timeout: float = 15.0) -> bytes:
    """Send bytes on a fresh connection; everything the server answers until it closes the connection."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def split_response(resp: bytes) -> tuple[int, dict, bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_1_completions_keep_the_first_tokens_leading_space(demo):
    srv, _, _ = demo
    r = post(srv, "/v1/completions", {**VERSE, "logprobs": 1}).json()["choices"][0]
    lp = r["logprobs"]
    generated = lp["tokens"][-2:]
    assert r["text"] == VERSE["prompt"] + "".join(generated)  # was "...Godof the" with tokens [" of", " the"]
    for tok, off in zip(lp["tokens"], lp["text_offset"]):
        assert r["text"][off:off + len(tok)] == tok
    # the echoed text rescored gives the log-probabilities the generation reported
    again = post(srv, "/v1/completions", {"model": "demo", "prompt": r["text"], "max_tokens": 0, "echo": True,
                                          "logprobs": 0}).json()["choices"][0]["logprobs"]
    assert again["tokens"] == lp["tokens"]
    assert again["token_logprobs"][-2:] == pytest.approx(lp["token_logprobs"][-2:], abs=1e-3)
    # streamed, the same text
    with httpx.stream("POST", srv.url + "/v1/completions", json={**VERSE, "echo": False, "stream": True},
                      trust_env=False, timeout=30) as s:
        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in s.iter_lines()
                       if line.startswith("data: {"))
    assert text == "".join(generated)


def test_2_lone_surrogate_is_a_400(demo):
    srv, engine, _ = demo
    body = b'{"model": "demo", "messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}'
    r = httpx.post(srv.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                   trust_env=False, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and "surrogate" in err["message"]
    body = b'{"model": "demo", "prompt": "x\\udfffy", "max_tokens": 2}'
    r = httpx.post(srv.url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                   trust_env=False, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    pair = b'{"model": "demo", "prompt": "\\ud83d\\ude00", "max_tokens": 1}'  # a surrogate pair is a character
    r = httpx.post(srv.url + "/v1/completions", content=pair, headers={"content-type": "application/json"},
                   trust_env=False, timeout=30)
    assert r.status_code == 200 and engine.stats["errors"] == 0


def test_3_models_retrieve(demo):
    srv, _, _ = demo
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, http_client=httpx.Client(trust_env=False))
    assert c.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


def test_4_host_and_content_type_are_checked(demo):
    srv, _, _ = demo
    body = {"model": "demo", "prompt": "x", "max_tokens": 1}
    r = post(srv, "/v1/completions", body, host="evil.example")
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    r = httpx.get(srv.url + "/v1/models", headers={"host": "evil.example:8000"}, trust_env=False)
    assert r.status_code == 403
    r = httpx.post(srv.url + "/v1/completions", content=json.dumps(body), headers={"content-type": "text/plain"},
                   trust_env=False)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    for host in ("localhost:1234", "127.0.0.1", "[::1]:80"):
        assert post(srv, "/v1/completions", body, host=host).status_code == 200


def test_4_allowed_hosts_and_a_keyed_server(demo):
    _, engine, _ = demo
    for settings, host, status in ((ServeSettings(model_id="demo", allowed_hosts=("box.lan",)), "box.lan:80", 200),
                                   (ServeSettings(model_id="demo", allowed_hosts=("box.lan",)), "evil.example", 403),
                                   (ServeSettings(model_id="demo", api_key="k"), "evil.example", 200)):
        with ServerThread(create_app(engine, settings)) as srv:
            r = httpx.get(srv.url + "/v1/models", headers={"host": host, "authorization": "Bearer k"},
                          trust_env=False)
            assert r.status_code == status


def test_5_a_short_body_is_not_held_forever(demo):
    srv, engine, _ = demo
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"model\"")
    status, headers, body = split_response(raw_request(srv, head))  # returns once the server closes it
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert headers.get("connection") == "close"
    assert post(srv, "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 1}).status_code == 200


def test_6_unsupported_parameters_are_refused(demo):
    srv, _, _ = demo
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    bad = [({"response_format": {"type": "bogus"}}, "response_format"),
           ({"response_format": {"type": "json_schema"}}, "response_format"),
           ({"tool_choice": "required"}, "tool_choice"),  # no tools to call
           ({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
           ({"top_logprobs": 2}, "top_logprobs"),
           ({"functions": [{"name": "f"}]}, "functions"),
           ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
            "response_format")]
    for extra, param in bad:
        r = post(srv, "/v1/chat/completions", {"model": "demo", "messages": HI, "max_tokens": 2, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param, (extra, r.text)


def test_7a_too_long_completions_prompt_names_prompt(demo):
    srv, _, _ = demo
    r = post(srv, "/v1/completions", {"model": "demo", "prompt": "word " * 600, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_7b_max_completion_tokens_is_named(demo):
    srv, _, _ = demo
    r = post(srv, "/v1/chat/completions", {"model": "demo", "messages": HI, "max_completion_tokens": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    assert "max_completion_tokens" in r.json()["error"]["message"]


def test_7c_a_huge_model_name_is_not_echoed(demo):
    srv, _, _ = demo
    r = post(srv, "/v1/completions", {"model": "x" * (1 << 20), "prompt": "x"})
    assert r.status_code == 404 and len(r.text) < 1000


def test_7d_bad_content_length_gets_a_json_400(demo):
    srv, _, _ = demo
    status, headers, body = split_response(raw_request(srv, (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: abc\r\n\r\n{}")))
    assert status == 400 and headers["content-type"] == "application/json" and json.loads(body)["error"]["message"]


def test_7e_stream_chunks_carry_finish_reason_null(demo):
    srv, _, _ = demo
    with httpx.stream("POST", srv.url + "/v1/chat/completions", trust_env=False, timeout=30,
                      json={"model": "demo", "messages": HI, "max_tokens": 3, "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert all("finish_reason" in c["choices"][0] for c in chunks if c["choices"])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][:-1] == [None] * (len(chunks) - 1)
    with httpx.stream("POST", srv.url + "/v1/completions", trust_env=False, timeout=30,
                      json={"model": "demo", "prompt": "x", "max_tokens": 3, "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert all("finish_reason" in c["choices"][0] for c in chunks)
