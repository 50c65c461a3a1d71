"""Structured output on the demo model: does every answer validate, and what does the constraint cost per token?

1. End to end (`mixq serve`'s engine, llguidance): --requests chat requests with a JSON schema of nested
   objects, enums, arrays and bounded numbers (8 at a time, sampled with a seed each, thinking off); every
   answer is checked with jsonschema. Decode time per token, streamed one request at a time ((t_last -
   t_first) / (tokens - 1), median over --repeats), constrained vs unconstrained (the end-of-sequence token
   banned so the unconstrained request generates as many tokens).
2. Per-token mask cost of the libraries that fit mlx-lm's logits processors on the CPU: the token sequences
   of the answers above replayed through llguidance (LLMatcher.compute_bitmask) and outlines-core
   (Guide.write_mask_into after Index construction), timing the mask step alone, plus each one's compile time.
   xgrammar is not measured: its wheel requires torch, triton and transformers (several GB on Linux).

Usage: python benchmarks/structured_output.py [--requests 50] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "genre": {"enum": ["poem", "story", "letter"]},
    "author": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                                "born": {"type": "integer", "minimum": 1000, "maximum": 2100}},
               "required": ["name", "born"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"enum": ["old", "new", "sea", "war", "love"]}, "maxItems": 3},
    "rating": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["title", "genre", "author", "tags"], "additionalProperties": False}
ASK = [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "Describe a famous poem as JSON."}]


def post_all(h, bodies, concurrency=8):
    out, lock, todo = [None] * len(bodies), threading.Lock(), list(range(len(bodies)))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            out[i] = h.post("/v1/chat/completions", json=bodies[i]).json()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def per_token(h, body) -> tuple[float, int]:
    stamps = []
    with h.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line and '"content": ""' not in line:
                stamps.append(time.perf_counter())
    usage_tokens = len(stamps)
    return (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1), usage_tokens


def end_to_end(args):
    import httpx
    import jsonschema

    import mixq  # noqa: F401
    from mixq.core.modelio import load
    from mixq.serve.app import ServeSettings, create_app
    from mixq.serve.engine import Engine
    from mixq.serve.runner import ServerThread

    lm = load("demo", compute_dtype="float32")
    engine = Engine(lm.model, lm.tokenizer, max_concurrency=8).start()
    fmt = {"type": "json_schema", "json_schema": {"name": "work", "schema": SCHEMA, "strict": True}}
    try:
        with ServerThread(create_app(engine, ServeSettings(model_id="demo"))) as srv, \
                httpx.Client(base_url=srv.url, trust_env=False, timeout=600) as h:
            bodies = [{"model": "demo", "messages": ASK, "max_tokens": 300, "temperature": 1.0, "seed": i,
                       "response_format": fmt} for i in range(args.requests)]
            results = post_all(h, bodies)
            valid, texts = 0, []
            for r in results:
                text = r["choices"][0]["message"]["content"]
                try:
                    jsonschema.validate(json.loads(text), SCHEMA)
                    valid += r["choices"][0]["finish_reason"] == "stop"
                except (ValueError, jsonschema.ValidationError):
                    pass
                texts.append(text)
            constrained, free = [], []
            for i in range(args.repeats):
                body = {"model": "demo", "messages": ASK, "temperature": 1.0, "seed": i, "max_tokens": 64}
                t, n = per_token(h, {**body, "response_format": fmt})
                constrained.append(t)
                free.append(per_token(h, {**body, "max_tokens": n, "logit_bias": {"5": -100}})[0])
    finally:
        engine.stop()
    return lm.tokenizer, texts, valid, statistics.median(constrained), statistics.median(free)


def mask_costs(tokenizer, texts):
    import llguidance
    import numpy as np
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    rows = {}
    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(tokenizer._tokenizer.backend_tokenizer.to_str(), n_vocab=len(tokenizer),
                                   eos_token=[5])
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, overrides={"whitespace_flexible": False})
    llguidance.LLMatcher(lltok, grammar)
    compile_s, spent, steps = time.perf_counter() - t0, 0.0, 0
    for seq in sequences:
        m = llguidance.LLMatcher(lltok, grammar)
        for tok in seq:
            t = time.perf_counter()
            m.compute_bitmask()
            spent += time.perf_counter() - t
            steps += 1
            m.consume_token(tok)
    rows["llguidance"] = (compile_s, spent / steps)

    t0 = time.perf_counter()
    vocab = {}
    for i in range(len(tokenizer)):
        if i != 5:
            vocab.setdefault(tokenizer._tokenizer.convert_ids_to_tokens(i), []).append(i)
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), Vocabulary(5, vocab))
    compile_s, spent, steps = time.perf_counter() - t0, 0.0, 0
    mask = np.zeros((len(tokenizer) + 31) // 32, dtype=np.int32)
    for seq in sequences:
        g = Guide(index)
        for tok in seq:
            t = time.perf_counter()
            g.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)
            spent += time.perf_counter() - t
            steps += 1
            try:
                g.advance(tok)
            except Exception:  # a tokenization outlines' byte-level vocabulary does not know: stop this one
                break
    rows["outlines-core"] = (compile_s, spent / max(1, steps))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    tokenizer, texts, valid, constrained, free = end_to_end(args)
    print(f"JSON schema answers that validate (finish_reason stop + jsonschema): {valid} of {len(texts)}")
    print(f"decode per token, streamed: constrained {constrained * 1e3:.2f} ms, unconstrained {free * 1e3:.2f} ms, "
          f"overhead {(constrained - free) * 1e3:+.2f} ms ({(constrained / free - 1) * 100:+.0f}%)")
    costs = mask_costs(tokenizer, texts)
    print(f"{'library':<14} {'compile':>9} {'mask per token':>15}")
    for name, (compile_s, per) in costs.items():
        print(f"{name:<14} {compile_s * 1e3:>7.1f}ms {per * 1e6:>12.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"valid": valid, "requests": len(texts), "constrained_s": constrained, "free_s": free,
                       "libraries": costs}, f, indent=2)


if __name__ == "__main__":
    main()
