"""`mixq kv-cache MODEL`: measure K/V sensitivity per attention layer, allocate bits under a target
average (in bytes), check on held-out text and write kv_config.json."""

from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("model", help="local model directory, hub id, demo / demo-moe, or fixture:KIND")
    p.add_argument("-o", "--output", help="where to write the config (default MODEL/kv_config.json)")
    p.add_argument("--target-bits", type=float, default=5.0,
                   help="ceiling on the average bits per cached K/V value, group scales included (default 5.0)")
    p.add_argument("--candidates", default="3,4,5,6,8",
                   help="bit widths to choose from, comma-separated; 16 = keep float (default 3,4,5,6,8)")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128),
                   help="quantization group size (smaller where head_dim needs it; default 64)")
    p.add_argument("--samples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seq-len", type=int, default=512,
                   help="tokens per window: the first half is prefilled, the second scored (default 512)")
    p.add_argument("--corpus", help="directory of .txt files (default: $MIXQ_CORPUS or shared/corpus)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    from mixq.kvcache.build import build_kv_config

    def progress(done, total, step, steps):
        if not args.json and sys.stderr.isatty():
            print(f"\r  measuring: windows {done}/{total}, measurement {step}/{steps}", end="", file=sys.stderr)

    res = build_kv_config(args.model, target_bits=args.target_bits, candidates=args.candidates,
                          group_size=args.group_size, samples=args.samples, seq_len=args.seq_len,
                          output=args.output, corpus=args.corpus, progress=progress)
    if not args.json and sys.stderr.isatty():
        print(file=sys.stderr)
    cfg = res["config"]
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    m = cfg["model"]
    print(f"model      {res['model']}  ({m['model_type']}, layers {m['layer_pattern']})")
    s = cfg["sensitivity"]
    print(f"measured   {s['samples']} windows x ({s['prefix']} prefix + {s['continuation']} scored) tokens, "
          f"{s['forwards']} forwards ({s.get('forward_equivalents', s['forwards'])} whole), {s['seconds']:.1f}s")
    print()
    print(f"{'layer':>5} {'slot':>4}  {'K bits':>6} {'V bits':>6} {'group':>5} {'B/token':>7}   "
          f"{'K KL by bits':<40} V KL by bits")
    for l in cfg["layers"]:
        def fmt(part):
            return " ".join(f"{b}:{v:.2g}" for b, v in sorted(l["sensitivity"][part].items(), key=lambda x: int(x[0]))
                            if b != "16")
        print(f"{l['layer']:>5} {l['cache_slot']:>4}  {l['k_bits']:>6} {l['v_bits']:>6} {l['k_group_size']:>5} "
              f"{l['bytes_per_token']:>7}   {fmt('k'):<40} {fmt('v')}")
    print()
    mk = cfg["measured_kl"]
    print(f"bits       target {cfg['target_bits']:g}, achieved {cfg['achieved_bits']:.3f} "
          f"({cfg['bytes_per_token']} B/token vs {cfg['float16_bytes_per_token']} in 16-bit)")
    print(f"KL         predicted {cfg['predicted_kl']:.3g}, measured {mk['kl_mean']:.3g} on held-out text "
          f"(top-1 agreement {mk['top1']:.3f})")
    print(f"wrote      {res['output']}")
    return 0
