"""bfcl: the AST checker (types, values, optional parameters), tool conversion, the pipeline on the
shipped sample data through a scripted backend, missing answer files."""

import json

import pytest

from mixq.core.errors import MixqError
from mixq.eval import registry
from mixq.eval.backend import GenResult
from mixq.eval.runner import EvalOptions, run_task
from mixq.eval.tasks import bfcl

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
    opts = EvalOptions(cache_dir=None, progress=False, **kw)
    task = registry.get(name)
    return run_task(task, Scripted(gen), None, opts, "model", task.load(opts, opts.limit))


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
