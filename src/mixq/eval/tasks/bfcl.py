"""`bfcl`: Berkeley Function-Calling Leaderboard v3, `simple` category: one function, one call, AST-checked.

Files (gorilla/berkeley-function-call-leaderboard/data): `BFCL_v3_simple.json` (JSON lines: `id`,
`question` - a list of turns, each a list of messages - and `function`, a list of one Gorilla-style
schema) and `possible_answer/BFCL_v3_simple.json` (`id`, `ground_truth`: `[{name: {param: [allowed
values]}}]`, where "" among the allowed values means the parameter may be left out).

The function is offered as an OpenAI-style tool through the model's chat template (Gorilla types
converted: dict->object, float->number, tuple->array, any->string; dots in names become underscores, as
BFCL does for such models). The reply's tool call (`<TOOLCALL>[...]`, Hermes `<tool_call>`, bare JSON, or
a server's `tool_calls`) is checked like BFCL's AST checker:

1. exactly one call, to the function (names compared with `.` and `_` identified);
2. every required parameter present, no parameter the schema or the answer does not know;
3. types: the schema's type exactly (bool is not an integer), an integer accepted for a float, array
   items checked against `items`;
4. values among the allowed ones: strings compared case-insensitively without spaces and `,./-_*^`,
   lists element by element, dicts key by key; an omitted optional parameter needs "" among its values.

Headline: accuracy; the records carry the error type (no_call, malformed, wrong_count, wrong_function,
missing_required, unexpected_param, type, value, missing_optional).
"""

from __future__ import annotations

import copy
import re

from mixq.core.errors import MixqError
from mixq.eval.backend import GenRequest
from mixq.eval.datafiles import Source, require
from mixq.eval.registry import Task, TaskData, register
from mixq.eval.textproc import parse_tool_calls

ANSWER_TOKENS = 256
FILE = "BFCL_v3_simple.json"
PY_TYPES = {"string": str, "integer": int, "float": float, "number": float, "boolean": bool, "array": list,
            "tuple": list, "dict": dict, "object": dict}
OPENAI_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": "string"}


def to_openai(fn: dict) -> dict:
    def conv(schema):
        if isinstance(schema, dict):
            out = {k: conv(v) for k, v in schema.items()}
            if isinstance(out.get("type"), str):
                out["type"] = OPENAI_TYPES.get(out["type"], out["type"])
            return out
        if isinstance(schema, list):
            return [conv(v) for v in schema]
        return schema

    params = conv(copy.deepcopy(fn.get("parameters", {"type": "dict", "properties": {}})))
    return {"type": "function", "function": {"name": fn["name"].replace(".", "_"),
                                             "description": fn.get("description", ""), "parameters": params}}


def _norm_name(n: str) -> str:
    return n.replace(".", "_")


def standardize(s: str) -> str:
    return re.sub(r"[ ,./\-_*^]", "", s).lower().replace("'", '"')


def _typed(value, spec: dict):
    """(ok, value converted as BFCL does: int -> float where a float is wanted)."""
    t = spec.get("type", "any")
    if t == "any":
        return True, value
    if t in ("float", "number") and type(value) is int:
        value = float(value)
    want = PY_TYPES.get(t)
    if want is None:
        raise MixqError(f"bfcl: unknown parameter type {t!r}")
    if type(value) is not want:
        return False, value
    if want is list and isinstance(spec.get("items"), dict) and "type" in spec["items"]:
        items = []
        for v in value:
            ok, v = _typed(v, spec["items"])
            if not ok:
                return False, value
            items.append(v)
        value = items
    return True, value


def _same(v, a) -> bool:
    if isinstance(v, str) and isinstance(a, str):
        return standardize(v) == standardize(a)
    if isinstance(v, bool) or isinstance(a, bool):
        return type(v) is type(a) and v == a
    if isinstance(v, list) and isinstance(a, list):
        return len(v) == len(a) and all(_same(x, y) for x, y in zip(v, a))
    if isinstance(v, dict) and isinstance(a, dict):
        return _dict_ok(v, a)
    return v == a


def _dict_ok(v: dict, expected: dict) -> bool:
    """A model dict against one allowed dict whose values are lists of allowed values."""
    for k, x in v.items():
        allowed = expected.get(k)
        if allowed is None or not any(_same(x, a) for a in (allowed if isinstance(allowed, list) else [allowed])):
            return False
    return all(k in v or (isinstance(al, list) and "" in al) for k, al in expected.items())


def _value_ok(v, allowed: list) -> bool:
    for a in allowed:
        if a == "" and not (isinstance(v, str) and v == ""):
            continue
        if isinstance(v, dict) and isinstance(a, dict):
            if _dict_ok(v, a):
                return True
        elif _same(v, a):
            return True
    return False


def _fail(kind: str, detail: str) -> dict:
    return {"valid": False, "error_type": kind, "error": detail}


def check_calls(function: dict, calls: list[dict] | None, ground_truth: list[dict]) -> dict:
    """BFCL's simple-category AST check of parsed calls [{name, arguments}] against one function."""
    if not calls:
        return _fail("no_call", "no function call in the reply")
    if len(calls) != 1:
        return _fail("wrong_count", f"{len(calls)} calls, expected 1")
    call = calls[0]
    name = function["name"]
    if _norm_name(call["name"]) != _norm_name(name):
        return _fail("wrong_function", f"called {call['name']!r}, expected {name!r}")
    answers = {_norm_name(k): v for gt in ground_truth for k, v in gt.items()}
    expected = answers.get(_norm_name(name))
    if expected is None:
        raise MixqError(f"bfcl: no ground truth for {name}")
    params = function.get("parameters", {})
    props, required = params.get("properties", {}), params.get("required", [])
    args = call["arguments"]
    for p in required:
        if p not in args:
            return _fail("missing_required", f"missing required parameter {p!r}")
    for p, v in args.items():
        if p not in props or p not in expected:
            return _fail("unexpected_param", f"unexpected parameter {p!r}")
        ok, v = _typed(v, props[p])
        if not ok:
            return _fail("type", f"{p}: {type(v).__name__} {v!r} is not of type {props[p].get('type')}")
        if not _value_ok(v, expected[p]):
            return _fail("value", f"{p}: {v!r} not among {expected[p]!r}")
    for p, allowed in expected.items():
        if p not in args and "" not in allowed:
            return _fail("missing_optional", f"parameter {p!r} was expected")
    return {"valid": True, "error_type": None, "error": None}


def question_messages(q) -> list[dict]:
    if isinstance(q, str):
        return [{"role": "user", "content": q}]
    if isinstance(q, list) and q and isinstance(q[0], list):
        return list(q[0])
    if isinstance(q, list) and all(isinstance(m, dict) for m in q):
        return list(q)
    raise MixqError("bfcl: question must be a string, a list of messages or a list of turns")


@register
class BFCL(Task):
    name = "bfcl"
    title = "BFCL v3 simple"
    metric = "accuracy"
    metric_label = "AST accuracy %"
    batch_size = 8

    def settings(self, opts) -> dict:
        return {"max_tokens": opts.budget(ANSWER_TOKENS)}

    def load(self, opts, limit):
        src = Source("bfcl", opts.data_dir, [FILE])
        questions = src.jsonl(FILE)
        answers = {a.get("id"): a for a in src.jsonl(f"possible_answer/{FILE}")}
        items = []
        for n, q in enumerate(questions, 1):
            require(q, ("id", "question", "function"), f"bfcl {FILE}: line {n}")
            fns = q["function"] if isinstance(q["function"], list) else [q["function"]]
            if len(fns) != 1 or "name" not in fns[0]:
                raise MixqError(f"bfcl {FILE}: line {n}: the simple category has exactly one function")
            ans = answers.get(q["id"])
            if ans is None or not isinstance(ans.get("ground_truth"), list):
                raise MixqError(f"bfcl: no ground truth for {q['id']} in possible_answer/{FILE}")
            items.append({"id": q["id"], "messages": question_messages(q["question"]), "function": fns[0],
                          "ground_truth": ans["ground_truth"]})
        return TaskData(items[:limit] if limit else items, src.label, src.hashes, total=len(items),
                        sample_data=src.sample)

    def process(self, samples, ctx):
        reqs = [GenRequest(messages=s["messages"], tools=[to_openai(s["function"])],
                           max_tokens=ctx.opts.budget(ANSWER_TOKENS)) for s in samples]
        outs = ctx.backend.generate(reqs)
        recs = []
        for s, o in zip(samples, outs):
            calls, res = o.tool_calls, None
            if calls is None:
                try:
                    calls = parse_tool_calls(o.answer)
                except (ValueError, TypeError) as e:
                    res = _fail("malformed", f"unparseable tool call: {e}")
            res = res or check_calls(s["function"], calls, s["ground_truth"])
            recs.append({"id": s["id"], "calls": calls, **res, "output": o.text, "finish": o.finish})
        return recs

    def aggregate(self, records):
        errors: dict[str, int] = {}
        for r in records:
            if not r["valid"]:
                errors[r["error_type"]] = errors.get(r["error_type"], 0) + 1
        return {"accuracy": sum(r["valid"] for r in records) / len(records), "errors": errors}

    def per_sample(self, record):
        return {"accuracy": float(record["valid"])}
