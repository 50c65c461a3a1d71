"""`mixq eval MODEL`: benchmark scores, Capability Score, deltas against a baseline and degradation
verdicts against the float reference; a markdown table on stdout, the full record with --output."""

from __future__ import annotations

import json
from pathlib import Path

from mixq.core.errors import MixqError


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", help="local model directory, hub id, demo / demo-moe or fixture:KIND "
                                            "(with --server: the model name sent to the server)")
    p.add_argument("--baseline", help="a model to compare with (the delta column), e.g. a uniform 4-bit quant")
    p.add_argument("--reference", help="the float model: reference for kl and base of the verdicts")
    p.add_argument("--tasks", default="capability",
                   help="comma-separated tasks, 'capability' (mmlu,gsm8k,ifeval,bfcl,humaneval,hashhop) or "
                        "'all' (default: capability); see --list-tasks")
    p.add_argument("--data-dir", help="directory with the benchmarks' official files (DIR/<task>/...); "
                                      "'hf' loads them through the datasets library (default: the shipped samples)")
    p.add_argument("--limit", type=int, help="at most N samples per task (task defaults otherwise)")
    p.add_argument("--kv-config", help="kv_config.json for the model's KV cache (mixq kv-cache)")
    p.add_argument("--server", help="evaluate an OpenAI-compatible server at URL instead of a local model")
    p.add_argument("--output", "-o", help="write the full results (config, per-sample records) as JSON")
    p.add_argument("--no-think", action="store_true", help="render prompts with enable_thinking=False")
    p.add_argument("--no-chat-template", action="store_true",
                   help="plain-text prompts for generation tasks even when the model has a chat template")
    p.add_argument("--text", help="text file for perplexity / kl (default: the shipped held-out text)")
    p.add_argument("--seq-len", type=int, help="window length for perplexity (default 512) and kl (256)")
    p.add_argument("--max-tokens", type=int, help="token budget of every generation (task defaults otherwise)")
    p.add_argument("--think-tokens", type=int, default=512,
                   help="extra generation budget for reasoning when thinking is on (default 512)")
    p.add_argument("--timeout", type=float, default=10.0, help="humaneval: seconds per program (default 10)")
    p.add_argument("--seed", type=int, default=0, help="sampling of mmlu subjects, hashhop generation")
    p.add_argument("--cache-dir", help="per-sample result cache (default ~/.cache/mixq/eval)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the result cache")
    p.add_argument("--json", action="store_true", help="print the full results as JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--list-tasks", action="store_true", help="list the registered tasks and exit")


def _finite(obj):
    """JSON has no Infinity / NaN: a perplexity that overflowed is written as null."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def run(args) -> int:
    from mixq.eval import registry
    from mixq.eval.runner import EvalOptions, run_eval

    if args.list_tasks:
        for name in registry.names():
            t = registry.get(name)
            cap = " [capability]" if name in registry.CAPABILITY else ""
            print(f"{name:<16} {t.title}: {t.metric_label}{cap}")
        return 0
    if args.model is None and not args.server:
        raise MixqError("MODEL is required (or --server URL)")
    for flag in ("limit", "seq_len", "max_tokens"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise MixqError(f"--{flag.replace('_', '-')} must be >= 1 (got {v})")
    if args.think_tokens < 0 or args.timeout <= 0:
        raise MixqError("--think-tokens must be >= 0 and --timeout > 0")
    if args.output and Path(args.output).is_dir():
        raise MixqError(f"--output {args.output}: is a directory")
    opts = EvalOptions(
        model=args.model, baseline=args.baseline, reference=args.reference, tasks=args.tasks,
        data_dir=args.data_dir, limit=args.limit, kv_config=args.kv_config, server=args.server,
        server_model=args.model if args.server else None, output=args.output, no_think=args.no_think,
        chat=not args.no_chat_template, seed=args.seed, max_tokens=args.max_tokens,
        think_tokens=args.think_tokens, text=args.text, seq_len=args.seq_len, timeout=args.timeout,
        progress=not (args.quiet or args.json),
    )
    if args.no_cache:
        opts.cache_dir = None
    elif args.cache_dir:
        opts.cache_dir = args.cache_dir
    doc = _finite(run_eval(opts))
    if args.output:
        out = Path(args.output).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(doc, indent=1, ensure_ascii=False))
    else:
        print(doc["table"])
    return 0
