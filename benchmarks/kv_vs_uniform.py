"""mixq's measured mixed-bit KV cache against uniform ones: KV bytes per token and held-out KL.

For each model: measure K/V sensitivity once on calibration text (corpus train split), allocate at each
target, then at each context length run held-out windows of context + continuation tokens through the
model with each cache and compare the continuation's next-token distributions with the float cache's.

Rows: float, uniform 8-bit, uniform 4-bit (and any --uniform widths; mixq's cache class), mixq at each
target, and, as a peer cross-check, mlx-lm's own QuantizedKVCache at 8 and 4 bits (one width for K and
V and all layers).
"B/tok" is the served cost (16-bit model: 16-bit floats, 16-bit group scales and biases); "held" is what
the caches actually held per token here (float32 compute on the CPU, so 32-bit scales). KL is
heavy-tailed on MoE models (quantization noise flips a few routing decisions), so every mean comes with
its standard error over positions.

Usage: python benchmarks/kv_vs_uniform.py [--models demo,demo-moe] [--contexts 512,2048] [--uniform 8,6,5,4]
       [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _peer_caches(model, bits: int, group_size: int, layout: list[dict]):
    from mlx_lm.models.cache import QuantizedKVCache

    from mixq.kvcache import make_cache
    from mixq.kvcache.cache import effective_group_size

    caches = make_cache(model)
    for e in layout:
        heads, dim = e["k_shape"]
        g = effective_group_size(heads, dim, group_size)
        if dim % g:
            return None  # mlx-lm groups within a head only
        caches[e["cache_slot"]] = QuantizedKVCache(group_size=g, bits=bits)
    return caches


def run_model(name: str, args) -> dict:
    import mlx.core as mx
    import numpy as np

    from mixq.core.anatomy import describe
    from mixq.core.metrics import kl_per_token
    from mixq.core.modelio import load
    from mixq.kvcache import config as kvconfig
    from mixq.kvcache import make_cache, uniform_config
    from mixq.kvcache.build import parse_candidates, plan_refined
    from mixq.kvcache.cache import kv_bytes, part_bytes_per_token
    from mixq.kvcache.sensitivity import measure, text_windows

    t0 = time.time()
    lm = load(name)
    anatomy = describe(lm.model, lm.config, group_size=args.group_size)
    layout = kvconfig.attention_layout(lm.model, anatomy)
    identity = kvconfig.model_identity(lm.model, lm.config, lm.path, anatomy=anatomy)
    cands = parse_candidates(args.candidates)
    calib, _ = text_windows(lm.tokenizer, n_samples=args.calib_samples, seq_len=args.calib_seq_len, split="train")
    sens = measure(lm.model, layout, calib, cands, group_size=args.group_size)
    print(f"# {name}: pattern {identity['layer_pattern']}, {len(layout)} attention layers, sensitivity "
          f"{sens['forwards']} forwards in {sens['seconds']:.1f}s", file=sys.stderr)

    configs: dict[str, dict | None] = {"float": None}
    for b in sorted(set(args.uniform) | {8, 4}, reverse=True):
        configs[f"uniform {b}-bit"] = uniform_config(lm, b, group_size=args.group_size)
    for t in args.targets:
        configs[f"mixq @{t:g}"] = plan_refined(lm, sens, layout, identity, calib, target_bits=t, candidates=cands,
                                               group_size=args.group_size)
    served = {k: (c["bytes_per_token"] if c else c) for k, c in configs.items()}
    served["float"] = sum(2 * (e["k_shape"][0] * e["k_shape"][1] + e["v_shape"][0] * e["v_shape"][1]) for e in layout)
    peers = {}
    if not args.no_peers:
        for b in (8, 4):
            if _peer_caches(lm.model, b, args.group_size, layout) is not None:
                peers[f"mlx-lm q{b}"] = b
                served[f"mlx-lm q{b}"] = sum(part_bytes_per_token(*e["k_shape"], b, args.group_size)
                                             + part_bytes_per_token(*e["v_shape"], b, args.group_size) for e in layout)
    elements = sum(e["k_shape"][0] * e["k_shape"][1] + e["v_shape"][0] * e["v_shape"][1] for e in layout)

    results = {"model": name, "pattern": identity["layer_pattern"], "attention_layers": len(layout),
               "elements_per_token": elements, "sensitivity": {k: v for k, v in sens.items()},
               "configs": {k: {"layers": [{"layer": l["layer"], "k_bits": l["k_bits"], "v_bits": l["v_bits"]}
                                          for l in c["layers"]], "achieved_bits": c["achieved_bits"],
                               "predicted_kl": c.get("predicted_kl")}
                           for k, c in configs.items() if c},
               "contexts": {}}
    for ctx in args.contexts:
        held, _ = text_windows(lm.tokenizer, n_samples=args.samples, seq_len=ctx + args.continuation, split="heldout")
        rows = {k: {"kl": [], "agree": [], "held": 0, "tokens": 0} for k in [*configs, *peers]}
        for i in range(held.shape[0]):
            x = mx.array(held[i:i + 1])
            ref = lm.model(x, cache=make_cache(lm))[:, -args.continuation:]
            mx.eval(ref)
            for key in rows:
                caches = (_peer_caches(lm.model, peers[key], args.group_size, layout) if key in peers
                          else make_cache(lm, configs[key]))
                out = lm.model(x, cache=caches)[:, -args.continuation:]
                mx.eval(out)
                kl = np.asarray(kl_per_token(ref, out))[0]
                rows[key]["kl"].append(kl)
                rows[key]["agree"].append(np.asarray(mx.argmax(ref, -1) == mx.argmax(out, -1))[0])
                rows[key]["held"] += kv_bytes(caches)
                rows[key]["tokens"] += x.shape[1]
        table = {}
        kl_u4 = np.concatenate(rows["uniform 4-bit"]["kl"])
        for key, r in rows.items():
            kl = np.concatenate(r["kl"])
            diff = kl - kl_u4  # paired by position: the routing-flip noise both share cancels
            table[key] = {"bits": round(8 * served[key] / elements, 3), "bytes_per_token": served[key],
                          "vs_uniform8": round(served[key] / served["uniform 8-bit"], 3),
                          "held_bytes_per_token": round(r["held"] / r["tokens"], 1),
                          "kl_mean": float(f"{kl.mean():.4g}"), "kl_se": float(f"{kl.std() / np.sqrt(kl.size):.2g}"),
                          "kl_p99": float(f"{np.percentile(kl, 99):.4g}"), "positions": int(kl.size),
                          "top1": round(float(np.concatenate(r["agree"]).mean()), 4),
                          "minus_uniform4": float(f"{diff.mean():.4g}"),
                          "minus_uniform4_se": float(f"{diff.std() / np.sqrt(diff.size):.2g}")}
        results["contexts"][str(ctx)] = table
        print(f"# {name}: context {ctx} done ({time.time() - t0:.0f}s)", file=sys.stderr)
    results["seconds"] = round(time.time() - t0, 1)
    return results


def _checks(res: dict, targets) -> list[str]:
    lines = []
    for ctx, table in res["contexts"].items():
        for t in targets:
            m = table[f"mixq @{t:g}"]
            u4, u8 = table["uniform 4-bit"], table["uniform 8-bit"]
            ok = m["kl_mean"] < u4["kl_mean"] and m["bytes_per_token"] <= 0.75 * u8["bytes_per_token"]
            same = all((l["k_bits"], l["v_bits"]) == (4, 4) for l in res["configs"][f"mixq @{t:g}"]["layers"])
            verdict = "SAME" if same else "PASS" if ok else "FAIL"
            note = f" (the target leaves no room above uniform 4-bit, which costs {u4['bits']:g} bits here)" if same else ""
            lines.append(f"{verdict}  {res['model']} ctx {ctx} mixq @{t:g}: KL {m['kl_mean']:.3g} "
                         f"± {m['kl_se']:.2g} vs uniform 4-bit {u4['kl_mean']:.3g} ± {u4['kl_se']:.2g} "
                         f"(paired difference {m['minus_uniform4']:.3g} ± {m['minus_uniform4_se']:.2g}); "
                         f"bytes {m['vs_uniform8']:.3f}x uniform 8-bit (<= 0.75){note}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,demo-moe")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--continuation", type=int, default=128, help="scored tokens after each context (default 128)")
    ap.add_argument("--samples", type=int, default=32, help="held-out windows per context (default 32)")
    ap.add_argument("--targets", default="5,6")
    ap.add_argument("--uniform", default="8,4", help="uniform widths to compare (8 and 4 always)")
    ap.add_argument("--candidates", default="3,4,5,6,8")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--no-peers", action="store_true", help="skip the mlx-lm QuantizedKVCache rows")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.targets = [float(t) for t in args.targets.split(",")]
    args.uniform = [int(b) for b in args.uniform.split(",")]

    import mixq  # noqa: F401  (fast BLAS before mlx)
    from mixq.core.errors import MixqError

    all_res, checks = [], []
    for name in args.models.split(","):
        try:
            res = run_model(name, args)
        except MixqError as e:
            print(f"{name}: {e}", file=sys.stderr)
            return 2
        all_res.append(res)
        checks += _checks(res, args.targets)
        print(f"\n{name}  (layers {res['pattern']}, {res['attention_layers']} attention layers)")
        for key, c in res["configs"].items():
            if key.startswith("mixq"):
                bits = " ".join(f"L{l['layer']}:K{l['k_bits']}/V{l['v_bits']}" for l in c["layers"])
                print(f"  {key}: {bits}  (achieved {c['achieved_bits']:.3f} bits, predicted KL {c['predicted_kl']:.3g})")
        print(f"{'context':>7}  {'cache':<14} {'bits':>6} {'B/tok':>7} {'x q8':>6} {'held':>7}  "
              f"{'KL mean':>9} {'± se':>8} {'KL p99':>9} {'top1':>6}  {'- u4 (paired)':>19}")
        for ctx, table in res["contexts"].items():
            for key, r in table.items():
                print(f"{ctx:>7}  {key:<14} {r['bits']:>6.2f} {r['bytes_per_token']:>7} {r['vs_uniform8']:>6.3f} "
                      f"{r['held_bytes_per_token']:>7.0f}  {r['kl_mean']:>9.3g} {r['kl_se']:>8.2g} {r['kl_p99']:>9.3g} "
                      f"{r['top1']:>6.3f}  {r['minus_uniform4']:>9.3g} ± {r['minus_uniform4_se']:<8.2g}")
    print()
    for line in checks:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "results": all_res}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
