"""bfcl (AST, type and value checks) and humaneval (sandboxed execution: code that passes, fails, loops,
crashes, eats memory, or tries the network, a subprocess or the file system outside its directory)."""

import json
import time

import pytest

from mixq.core.errors import MixqError
from mixq.eval import registry
from mixq.eval.backend import GenResult
from mixq.eval.runner import EvalOptions, run_task
from mixq.eval.sandbox import run_program
from mixq.eval.tasks import bfcl, humaneval

FN = {"name": "shop.quote", "parameters": {"type": "dict", "properties": {
    "weight": {"type": "float"}, "count": {"type": "integer"}, "express": {"type": "boolean"},
    "country": {"type": "string"}, "sizes": {"type": "array", "items": {"type": "integer"}},
    "notes": {"type": "dict", "properties": {"diet": {"type": "string"}}}},
    "required": ["weight", "country"]}}
GT = [{"shop.quote": {"weight": [2.0], "count": [1, ""], "express": [True, ""], "country": ["Canada"],
                      "sizes": [[1, 2], ""], "notes": [{"diet": ["vegetarian"]}, ""]}}]


def _check(args, name="shop_quote", calls=None):
    return bfcl.check_calls(FN, calls if calls is not None else [{"name": name, "arguments": args}], GT)


def test_bfcl_ast_checks():
    assert _check({"weight": 2.0, "country": "Canada"})["valid"]
    assert _check({"weight": 2, "country": " canada"})["valid"]                  # int for float; standardized
    assert _check({"weight": 2.0, "country": "Canada"}, name="shop.quote")["valid"]
    full = {"weight": 2.0, "country": "Canada", "count": 1, "express": True, "sizes": [1, 2],
            "notes": {"diet": "Vegetarian"}}
    assert _check(full)["valid"]
    cases = [
        ({"weight": 2.0}, "missing_required"),
        ({"weight": 2.0, "country": "Canada", "colour": "red"}, "unexpected_param"),
        ({"weight": "2", "country": "Canada"}, "type"),                          # string for float
        ({"weight": 2.0, "country": "Canada", "count": 1.0}, "type"),            # float for integer
        ({"weight": 2.0, "country": "Canada", "count": True}, "type"),           # bool is not an integer
        ({"weight": 2.0, "country": "Canada", "sizes": [1, "2"]}, "type"),       # array item type
        ({"weight": 3.0, "country": "Canada"}, "value"),
        ({"weight": 2.0, "country": "Mexico"}, "value"),
        ({"weight": 2.0, "country": "Canada", "express": False}, "value"),
        ({"weight": 2.0, "country": "Canada", "sizes": [2, 1]}, "value"),
        ({"weight": 2.0, "country": "Canada", "notes": {"diet": "vegan"}}, "value"),
        ({"weight": 2.0, "country": "Canada", "notes": {"allergy": "nuts"}}, "value"),
    ]
    for args, kind in cases:
        assert _check(args)["error_type"] == kind, (args, _check(args))
    assert _check({}, name="other_fn")["error_type"] == "wrong_function"
    assert _check(None, calls=[])["error_type"] == "no_call"
    two = [{"name": "shop_quote", "arguments": {"weight": 2.0, "country": "Canada"}}] * 2
    assert _check(None, calls=two)["error_type"] == "wrong_count"
    strict = [{"shop.quote": {**GT[0]["shop.quote"], "count": [3]}}]
    assert bfcl.check_calls(FN, [{"name": "shop_quote", "arguments": {"weight": 2.0, "country": "Canada"}}],
                            strict)["error_type"] == "missing_optional"


def test_bfcl_tool_conversion():
    t = bfcl.to_openai(FN)
    assert t["function"]["name"] == "shop_quote" and t["function"]["parameters"]["type"] == "object"
    props = t["function"]["parameters"]["properties"]
    assert props["weight"]["type"] == "number" and props["notes"]["type"] == "object"
    assert FN["parameters"]["type"] == "dict"  # the data is not modified


class Scripted:
    kind, chat = "scripted", True

    def __init__(self, gen):
        self.gen = gen

    def identity(self):
        return {"name": "s", "fingerprint": "1" * 64, "size_bytes": 0}

    def settings(self):
        return {}

    def generate(self, reqs):
        return [GenResult(text=t, reasoning="", answer=t, tokens=1, finish="stop") for t in map(self.gen, reqs)]


def _run(name, gen, **kw):
    return run_task(registry.get(name), Scripted(gen), None,
                    EvalOptions(cache_dir=None, progress=False, **kw), "model")


def test_bfcl_pipeline_on_sample_data():
    data = registry.get("bfcl").load(EvalOptions(), None)
    answers = {}
    for s in data.samples:  # build a correct call from the first allowed value of every parameter
        gt = s["ground_truth"][0][s["function"]["name"]]
        args = {k: v[0] for k, v in gt.items() if v[0] != ""}
        args = {k: ({kk: vv[0] for kk, vv in v.items() if vv[0] != ""} if isinstance(v, dict) else v)
                for k, v in args.items()}
        answers[s["messages"][0]["content"]] = {"name": s["function"]["name"].replace(".", "_"), "arguments": args}
    right = _run("bfcl", lambda r: "<TOOLCALL>" + json.dumps([answers[r.messages[0]["content"]]]) + "</TOOLCALL>")
    assert right["metrics"]["accuracy"] == 1.0, [x["error"] for x in right["samples"]]
    wrong = _run("bfcl", lambda r: "I would call a function, but I won't.")
    assert wrong["metrics"] == {"accuracy": 0.0, "errors": {"no_call": 5}}
    broken = _run("bfcl", lambda r: "<TOOLCALL>[{'name': 'x'}]</TOOLCALL>", limit=1)
    assert broken["samples"][0]["error_type"] == "malformed"
    seen = []
    _run("bfcl", lambda r: seen.append(r.tools) or "", limit=1)
    assert seen[0][0]["function"]["parameters"]["type"] == "object"


def test_bfcl_missing_answer_file(tmp_path):
    d = tmp_path / "bfcl"
    (d / "possible_answer").mkdir(parents=True)
    (d / "BFCL_v3_simple.json").write_text(json.dumps({"id": "simple_0", "question": "q", "function": [FN]}))
    (d / "possible_answer" / "BFCL_v3_simple.json").write_text("")
    with pytest.raises(MixqError, match="no ground truth"):
        registry.get("bfcl").load(EvalOptions(data_dir=str(tmp_path)), None)


# ------------------------------------------------------------------------------------------- sandbox

def test_sandbox_outcomes(tmp_path):
    assert run_program("assert 1 + 1 == 2\n").status == "passed"
    r = run_program("assert 1 + 1 == 3, 'math'\n")
    assert r.status == "failed" and "AssertionError" in r.detail
    assert run_program("def f(:\n").status == "failed"                            # syntax error
    assert run_program("import os\nos.abort()\n").status == "failed"              # crash
    t0 = time.perf_counter()
    r = run_program("while True:\n    pass\n", timeout=1.0)
    assert r.status == "timeout" and time.perf_counter() - t0 < 5
    r = run_program("while True:\n    print('x' * 4096)\n", timeout=3.0)  # output is capped, not buffered
    assert r.status in ("failed", "timeout")
    r = run_program("x = bytearray(4 << 30)\n", memory=512 << 20)
    assert r.status == "failed" and "MemoryError" in r.detail
    r = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n")
    assert r.status == "failed" and "mixq sandbox: socket" in r.detail
    r = run_program("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)\n")
    assert r.status == "failed"
    r = run_program("import subprocess\nsubprocess.run(['true'])\n")
    assert r.status == "failed" and "subprocess.Popen" in r.detail
    target = tmp_path / "outside.txt"
    r = run_program(f"open({str(target)!r}, 'w').write('x')\n")
    assert r.status == "failed" and not target.exists()
    assert run_program("open('inside.txt', 'w').write('x')\nprint(open('inside.txt').read())\n").status == "passed"


def _canonical() -> dict:
    from mixq.eval.datafiles import SHIPPED

    lines = (SHIPPED / "humaneval" / "HumanEval.jsonl").read_text().splitlines()
    return {r["task_id"]: r["canonical_solution"] for r in map(json.loads, lines)}


def test_sandbox_without_network_namespace(monkeypatch):
    """The audit hook alone keeps the network out (kernels without user namespaces)."""
    from mixq.eval import sandbox

    monkeypatch.setattr(sandbox, "_NETNS", False)
    r = run_program("import socket\ns = socket.socket()\n")
    assert r.status == "failed" and "socket" in r.detail and not r.network_namespace


def test_humaneval_programs_and_canonical_solutions():
    data = registry.get("humaneval").load(EvalOptions(), None)
    t = data.samples[0]
    canon = _canonical()[t["id"]]
    assert run_program(humaneval.program(t, canon, chat=False)).status == "passed"
    full = t["prompt"] + canon
    assert run_program(humaneval.program(t, f"Sure:\n```python\n{full}```\n", chat=True)).status == "passed"
    assert run_program(humaneval.program(t, f"```python\n{canon}```", chat=True)).status == "passed"  # body only
    assert run_program(humaneval.program(t, "    return 0\n", chat=False)).status == "failed"

    def solve(r):
        prompt = r.messages[0]["content"]
        s = next(x for x in data.samples if x["prompt"] in prompt)
        return f"```python\n{s['prompt']}{_canonical()[s['id']]}```"

    res = _run("humaneval", solve)
    assert res["metrics"]["pass@1"] == 1.0, [r["detail"] for r in res["samples"]]
    res = _run("humaneval", lambda r: "```python\nwhile True: pass\n```", limit=1, timeout=1.0)
    assert res["samples"][0]["status"] == "timeout" and res["metrics"]["pass@1"] == 0.0
