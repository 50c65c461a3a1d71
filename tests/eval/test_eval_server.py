"""--server: lm-eval's tasks and mixq's own through an OpenAI-compatible server (a canned one on loopback):
HumanEval's six exit-0 tricks score 0 and a correct solution 1; the API key goes with every request."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mixq.core.errors import MixqError
from mixq.eval.runner import EvalOptions, run_eval

TRICKS = {
    "sys_exit": "    return 0\nimport sys\nsys.exit(0)\n",
    "os_exit": "    return 0\nimport os\nos._exit(0)\n",
    "system_exit": "    return 0\nraise SystemExit(0)\n",
    "unittest_main": "    return 0\nimport unittest\nunittest.main()\n",
    "atexit": "    return a - b\nimport atexit, os\natexit.register(lambda: os._exit(0))\n",
    "fork_exec": ("    return 0\nimport _posixsubprocess, os\nr, w = os.pipe()\ntry:\n"
                  "    _posixsubprocess.fork_exec([b'/bin/sh', b'-c', b'exit 0'], [b'/bin/sh'], True, (), None, None,"
                  " -1, -1, -1, -1, -1, -1, r, w, True, False, 0, None, None, None, -1, None, False)\n"
                  "except BaseException:\n    pass\nos._exit(0)\n"),
    "correct": "    return a + b\n",
}


class Handler(BaseHTTPRequestHandler):
    seen: list = []

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
        Handler.seen.append(("GET", self.path, self.headers.get("Authorization")))
        self._send({"data": [{"id": "canned"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.seen.append(("POST", self.path, self.headers.get("Authorization")))
        if self.path == "/v1/completions":  # HumanEval: the canned completion for the function asked for
            name = re.search(r"def (\w+)\(", body["prompt"]).group(1).split("_", 1)[1]
            return self._send({"choices": [{"index": 0, "text": TRICKS[name], "finish_reason": "stop"}]})
        if self.path == "/v1/chat/completions":  # BFCL: a call with a parameter the function does not have
            name = body["tools"][0]["function"]["name"]
            msg = {"content": None, "tool_calls": [{"type": "function", "function": {
                "name": name, "arguments": json.dumps({"bogus": 1})}}]}
            return self._send({"choices": [{"message": msg, "finish_reason": "stop"}]})
        self._send({"error": {"message": "no such route"}}, 404)


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def _humaneval_dir(tmp_path):
    d = tmp_path / "humaneval"
    d.mkdir()
    rows = [{"task_id": f"Canned/{i}", "prompt": f'def add_{name}(a, b):\n    """Add a and b."""\n',
             "canonical_solution": "    return a + b\n", "entry_point": f"add_{name}",
             "test": "\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}
            for i, name in enumerate(TRICKS)]
    (d / "HumanEval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_humaneval_tricks_score_zero_through_a_server(server, tmp_path):
    Handler.seen.clear()
    opts = EvalOptions(server=server, tasks="humaneval", data_dir=str(_humaneval_dir(tmp_path)), api_key="sekrit",
                       cache_dir=None, progress=False)
    doc = run_eval(opts)
    res = doc["roles"]["model"]["lm_eval"]
    by_name = {r["doc"]["entry_point"].split("_", 1)[1]: r["pass@1"] for r in res["samples"]["humaneval"]}
    assert by_name == {name: (1.0 if name == "correct" else 0.0) for name in TRICKS}
    assert res["results"]["humaneval"]["pass@1,create_test"] == pytest.approx(1 / len(TRICKS))
    assert Handler.seen and all(auth == "Bearer sekrit" for _, _, auth in Handler.seen)
    assert "sekrit" not in json.dumps(doc["config"])


def test_mixq_tasks_and_refusals_through_a_server(server, nemotron_dense):
    doc = run_eval(EvalOptions(server=server, tasks="bfcl", limit=3, cache_dir=None, progress=False))
    assert doc["roles"]["model"]["lm_eval"]["results"]["bfcl"]["accuracy,none"] == 0.0
    recs = doc["roles"]["model"]["lm_eval"]["samples"]["bfcl"]
    assert len(recs) == 3 and {r["record"]["error_type"] for r in recs} <= {"unexpected_param", "missing_required"}
    with pytest.raises(MixqError, match="local models"):
        run_eval(EvalOptions(server=server, reference=str(nemotron_dense), tasks="kl", cache_dir=None,
                             progress=False))
    with pytest.raises(MixqError, match="tokenizer"):
        run_eval(EvalOptions(server=server, tasks="mmlu", cache_dir=None, progress=False))
    with pytest.raises(MixqError, match="cannot reach"):
        run_eval(EvalOptions(server="http://127.0.0.1:9", tasks="bfcl", cache_dir=None, progress=False))
