"""--server: tasks run against an OpenAI-compatible server (a scripted one on loopback): chat generation
with reasoning split and tool calls, echoed log-probs for multiple choice and perplexity."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mixq.core.errors import MixqError
from mixq.eval.runner import EvalOptions, run_eval


class Handler(BaseHTTPRequestHandler):
    bodies: list = []

    def log_message(self, *a):
        pass

    def _send(self, obj, code=200):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"data": [{"id": "scripted-model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.bodies.append((self.path, body))
        if self.path == "/v1/chat/completions":
            if body.get("tools"):
                name = body["tools"][0]["function"]["name"]
                msg = {"content": None, "tool_calls": [{"type": "function", "function": {
                    "name": name, "arguments": json.dumps({"bogus": 1})}}]}
            else:
                text = body["messages"][-1]["content"]
                edges = dict(re.findall(r"^(\w{8}) = (\w{8})$", text, flags=re.M))
                m = re.search(r"Start at (\w+) and follow (\d)", text)
                h = m.group(1) if m else ""
                for _ in range(int(m.group(2)) if m else 0):
                    h = edges[h]
                msg = {"content": h, "reasoning_content": "I follow the chain."}
            return self._send({"choices": [{"message": msg, "finish_reason": "stop"}]})
        if self.path == "/v1/completions":
            if body.get("echo"):
                toks = re.findall(r"\s*\S+|\s+", body["prompt"])
                offs, o = [], 0
                for t in toks:
                    offs.append(o)
                    o += len(t)
                lps = [None] + [-0.5 if t == " B" else -1.0 for t in toks[1:]]
                lp = {"tokens": toks + ["x"], "token_logprobs": lps + [-1.0], "text_offset": offs + [o]}
                return self._send({"choices": [{"text": body["prompt"] + "x", "logprobs": lp}]})
            return self._send({"choices": [{"text": "42", "finish_reason": "stop"}]})
        self._send({"error": {"message": "no such route"}}, 404)


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_tasks_through_a_server(server):
    Handler.bodies.clear()
    opts = EvalOptions(server=server, tasks="hashhop,mmlu,perplexity,bfcl", limit=3, no_think=True,
                       cache_dir=None, progress=False)
    doc = run_eval(opts)
    res = doc["results"]["model"]
    assert doc["models"]["model"]["name"] == "scripted-model" and doc["models"]["model"]["kind"] == "server"
    assert res["hashhop"]["metrics"]["exact_match"] == 1.0          # reasoning split off, answer scored
    assert all(r["answer"] == r["target"] for r in res["hashhop"]["samples"])
    truth = [r["answer"] for r in res["mmlu"]["samples"]]
    assert all(r["pred"] == "B" for r in res["mmlu"]["samples"])  # " B" is the likeliest continuation
    assert res["mmlu"]["metrics"]["accuracy"] == pytest.approx(truth.count("B") / len(truth))
    ppl = res["perplexity"]["samples"][0]
    assert ppl["tokens"] > 0 and ppl["nll"] == pytest.approx(ppl["tokens"] * 1.0, rel=0.2)
    assert res["bfcl"]["metrics"]["errors"] == {"missing_required": 3}  # server tool_calls are checked
    chats = [b for p, b in Handler.bodies if p == "/v1/chat/completions"]
    assert all(b["chat_template_kwargs"] == {"enable_thinking": False} and b["temperature"] == 0 for b in chats)
    assert any(b.get("tools") for b in chats)


def test_server_refusals(server, nemotron_dense):
    with pytest.raises(MixqError, match="local model"):
        run_eval(EvalOptions(server=server, reference=str(nemotron_dense), tasks="kl", cache_dir=None,
                             progress=False))
    with pytest.raises(MixqError, match="cannot reach"):
        run_eval(EvalOptions(server="http://127.0.0.1:9", tasks="hashhop", cache_dir=None, progress=False))
    with pytest.raises(MixqError, match="URL"):
        run_eval(EvalOptions(server="localhost:8000", tasks="hashhop", cache_dir=None, progress=False))
