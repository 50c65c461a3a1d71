"""`mixq bench MODEL`: prompt and generation speed, time to first token and peak memory, saved to
MODEL/mixq/bench.json (see mixq.report.bench)."""

from __future__ import annotations

import json
import sys

from mixq.report.bench import DEFAULT_PROMPT_TOKENS, BenchOptions, format_table, parse_token_counts, run_bench


def add_arguments(p) -> None:
    p.add_argument("model", help="local model directory, hub id, demo / demo-moe, or fixture:KIND")
    p.add_argument("--prompt-tokens", default=",".join(map(str, DEFAULT_PROMPT_TOKENS)),
                   help="prompt lengths to measure, comma-separated (default 512,2048)")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens generated per run (default 128)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per prompt length, after warm-up (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per prompt length (default 1)")
    p.add_argument("--kv-config", help="kv_config.json from `mixq kv-cache`: measure with the mixed-precision KV cache")
    p.add_argument("--kv-quantize-after", type=int, default=0,
                   help="keep each KV cache float until it holds this many tokens (default 0)")
    p.add_argument("--dtype", default="auto", choices=("auto", "stored", "float32", "bfloat16", "float16"),
                   help="compute dtype for float tensors (auto: float32 on the CPU, stored dtypes on a GPU)")
    p.add_argument("--no-save", action="store_true", help="do not write MODEL/mixq/bench.json")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    def progress(msg: str) -> None:
        if not args.json and sys.stderr.isatty():
            print(f"\r  {msg:<40}", end="", file=sys.stderr, flush=True)

    opts = BenchOptions(model=args.model, prompt_tokens=parse_token_counts(args.prompt_tokens),
                        gen_tokens=args.gen_tokens, runs=args.runs, warmup=args.warmup, kv_config=args.kv_config,
                        kv_quantize_after=args.kv_quantize_after, dtype=args.dtype, save=not args.no_save,
                        progress=progress)
    entry = run_bench(opts)
    if not args.json and sys.stderr.isatty():
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(entry, indent=2))
        return 0
    m, env, kv = entry["model"], entry["environment"], entry["kv_config"]
    print(f"model   {m['name']}  ({m['model_type']}, {m['bits_per_weight']:.3f} bpw, "
          f"{m['weights_bytes'] / 1e6:.1f} MB of weights)")
    print(f"device  {env['device']}, compute {env['compute_dtype']}, "
          f"KV cache {'mixed: ' + str(kv['achieved_bits']) + ' bits avg' if kv else 'float (model default)'}")
    print(f"runs    {opts.runs} timed after {opts.warmup} warm-up; median (min-max)")
    print()
    print(format_table(entry))
    if entry["saved"]:
        print(f"\nwrote   {entry['saved']}")
    return 0
