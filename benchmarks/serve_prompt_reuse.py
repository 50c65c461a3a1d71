"""Prompt reuse across chat turns on the hybrid demo models: greedy output with and without the prefix cache,
`cached_tokens`, and time to first token, in one run.

Two `mixq serve` apps run on one engine each (prefix cache on: 16 entries; off: 0) over the same float32
model. A 5-turn conversation opens with a long system prompt (held-out text shipped with mixq, about
--history tokens); each turn's greedy reply (thinking off) is appended before the next question, as a chat
client does. Per turn: whether the two replies are identical, the prompt tokens, the cached tokens, and the
time to first token of a streamed request (median of --repeats, each repeat on a fresh conversation so the
cache holds only what the earlier turns left).

Usage: python benchmarks/serve_prompt_reuse.py [--models demo,demo-moe] [--history 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

QUESTIONS = ["Who wrote this?", "Summarise it in one line.", "Name one word from it.", "Is it old?",
             "Say thanks."]


def history_text(tokenizer, n_tokens: int) -> str:
    from importlib import resources

    text = resources.files("mixq.data").joinpath("heldout.txt").read_text()
    ids = tokenizer.encode(text)[:n_tokens]
    return tokenizer.decode(ids)


def stream_turn(client, messages, max_tokens):
    """(reply text, usage, seconds to the first chunk with text)"""
    t0, first, text, usage = time.perf_counter(), None, "", None
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            for ch in data["choices"]:
                piece = ch["delta"].get("content") or ""
                if (piece or ch["delta"].get("reasoning_content")) and first is None:
                    first = time.perf_counter() - t0
                text += piece
    return text, usage, first


def conversation(client, system, max_tokens):
    messages = [{"role": "system", "content": system + "\n/no_think"}]
    turns = []
    for q in QUESTIONS:
        messages.append({"role": "user", "content": q})
        text, usage, ttft = stream_turn(client, messages, max_tokens)
        turns.append((text, usage, ttft))
        messages.append({"role": "assistant", "content": text})
    return turns


def run_model(name: str, history: int, repeats: int, max_tokens: int) -> list:
    import httpx

    import mixq  # noqa: F401
    from mixq.core.modelio import load
    from mixq.serve.app import ServeSettings, create_app
    from mixq.serve.engine import Engine
    from mixq.serve.runner import ServerThread

    lm = load(name, compute_dtype="float32")
    results = {}
    for label, size in (("reuse", 16), ("no reuse", 0)):
        engine = Engine(lm.model, lm.tokenizer, prefix_cache_size=size).start()
        try:
            with ServerThread(create_app(engine, ServeSettings(model_id="m"))) as srv, \
                    httpx.Client(base_url=srv.url, trust_env=False, timeout=600) as h:
                runs = []
                for r in range(repeats):  # a different opening each repeat: nothing carries over between them
                    system = f"Conversation {r}. " + history_text(lm.tokenizer, history)
                    runs.append(conversation(h, system, max_tokens))
                results[label] = runs
        finally:
            engine.stop()
    rows = []
    for t in range(len(QUESTIONS)):
        on = [run[t] for run in results["reuse"]]
        off = [run[t] for run in results["no reuse"]]
        rows.append({"model": name, "turn": t + 1,
                     "identical": all(a[0] == b[0] for a, b in zip(on, off)),
                     "prompt_tokens": on[0][1]["prompt_tokens"],
                     "cached_tokens": on[0][1]["prompt_tokens_details"]["cached_tokens"],
                     "ttft_reuse_s": statistics.median(x[2] for x in on),
                     "ttft_no_reuse_s": statistics.median(x[2] for x in off)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,demo-moe")
    ap.add_argument("--history", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = [r for m in args.models.split(",") for r in run_model(m, args.history, args.repeats, args.max_tokens)]
    print(f"{'model':<9} {'turn':>4} {'same':>5} {'prompt':>6} {'cached':>6} {'TTFT reuse':>11} {'TTFT none':>10}")
    for r in rows:
        print(f"{r['model']:<9} {r['turn']:>4} {str(r['identical']):>5} {r['prompt_tokens']:>6} {r['cached_tokens']:>6} "
              f"{r['ttft_reuse_s']:>10.3f}s {r['ttft_no_reuse_s']:>9.3f}s")
    diffs = sum(not r["identical"] for r in rows)
    print(f"differences in greedy output with vs without reuse: {diffs} of {len(rows)} turns")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
