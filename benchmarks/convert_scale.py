"""`mixq convert` at the real widths of the models mixq is for, on random bf16 weights: seconds per stage,
peak RSS, stored bytes and the calibration state, then projections to the full models.

Models (random weights, the demo model's tokenizer; written tensor by tensor, never whole in memory):
  (a) nano9b-slice   Nemotron-Nano-9B-v2 as a 3-layer slice `M*-`: hidden 4480; Mamba 128 heads x 80,
                     8 groups, state 128; attention 40 / 8 heads x 128; MLP 15680; vocab 131072
  (b) nano30b-slice  Nemotron-3-Nano-30B-A3B as a 2-layer slice `ME`: hidden 2688; 128 experts x 1856, top-6,
                     shared expert 3712; Mamba 64 heads x 64, 8 groups, state 128; vocab 131072
  (c) llama135m      llama, hidden 576, 30 layers, 9 / 3 heads, intermediate 1536, vocab 49152, tied
Each runs the default `mixq convert` (16 x 256 calibration tokens, the default candidates, 4.5 bpw) in a
fresh process, which reports its own peak RSS (VmHWM).

Projections: memory from mixq's own preflight for the full configuration (the same formula the convert
checks against the machine), scaled by the slice's measured / preflight ratio; time from the slice's
seconds per block by layer kind (Mamba, attention, MLP, MoE) times the full model's count of each kind,
plus the slice's seconds outside the blocks (embedding, head, their rounding), which do not change.

Usage: python benchmarks/convert_scale.py [--models nano9b-slice nano30b-slice llama135m] [--experts 128]
       [--work /tmp/mixq-scale] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mixq  # noqa: F401  (fast BLAS before mlx)

NEMO = {"model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "attention_bias": False,
        "mamba_proj_bias": False, "mlp_bias": False, "use_bias": False, "use_conv_bias": True, "conv_kernel": 4,
        "layer_norm_epsilon": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "vocab_size": 131072, "torch_dtype": "bfloat16"}
NANO9B = {**NEMO, "hidden_size": 4480, "intermediate_size": 15680, "num_attention_heads": 40,
          "num_key_value_heads": 8, "head_dim": 128, "mamba_num_heads": 128, "mamba_head_dim": 80, "n_groups": 8,
          "ssm_state_size": 128}
NANO30B = {**NEMO, "hidden_size": 2688, "intermediate_size": 1856, "num_attention_heads": 32,
           "num_key_value_heads": 2, "head_dim": 128, "mamba_num_heads": 64, "mamba_head_dim": 64, "n_groups": 8,
           "ssm_state_size": 128, "n_routed_experts": 128, "num_experts_per_tok": 6, "moe_intermediate_size": 1856,
           "n_shared_experts": 1, "moe_shared_expert_intermediate_size": 3712, "n_group": 1, "topk_group": 1,
           "norm_topk_prob": True, "routed_scaling_factor": 2.5}
H4B = {**NEMO, "hidden_size": 3072, "intermediate_size": 12288, "num_attention_heads": 32, "num_key_value_heads": 8,
       "head_dim": 128, "mamba_num_heads": 112, "mamba_head_dim": 64, "n_groups": 8, "ssm_state_size": 128}
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_hidden_layers": 30,
         "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
         "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
         "torch_dtype": "bfloat16"}



# the default convert's Gram windows beyond its calibration windows (--hessian-samples 64, --samples 16)
GRAM = 48

def _pattern(counts: dict, period: str) -> str:
    """A layer pattern with exactly these counts of each letter, spread in the order of `period`."""
    out, left = [], dict(counts)
    while sum(left.values()):
        for c in period:
            if left.get(c):
                out.append(c)
                left[c] -= 1
    return "".join(out)


SLICES = {
    "nano9b-slice": {**NANO9B, "hybrid_override_pattern": "M*-", "num_hidden_layers": 3},
    "nano30b-slice": {**NANO30B, "hybrid_override_pattern": "ME", "num_hidden_layers": 2},
    "llama135m": LLAMA,
}
# full models: layer counts as published (9B-v2: 27 Mamba, 25 MLP, 4 attention of 56; 30B-A3B: 23 Mamba,
# 23 MoE, 6 attention of 52; Nemotron-H-4B: its published 52-layer pattern)
FULL = {
    "Nemotron-Nano-9B-v2": ("nano9b-slice", {**NANO9B, "hybrid_override_pattern": _pattern({"M": 27, "-": 25, "*": 4},
                                                                                             "M-M-M-M-M-M*")}),
    "Nemotron-3-Nano-30B-A3B": ("nano30b-slice", {**NANO30B, "hybrid_override_pattern":
                                                  _pattern({"M": 23, "E": 23, "*": 6}, "MEMEMEME*")}),
    "Nemotron-H-4B": ("nano9b-slice", {**H4B, "hybrid_override_pattern":
                                       "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"}),
}


def build(config: dict, out: Path, seed: int = 0) -> Path:
    """A model dir with random bf16 weights, written one tensor at a time (the stored model never in memory)."""
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mixq.core.modelio import demo_dir
    from mixq.core.stwriter import ShardWriter
    from mixq.core.synth import router_weight

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = dict(config)
    cfg.setdefault("num_hidden_layers", len(cfg.get("hybrid_override_pattern", "")) or cfg.get("num_hidden_layers"))
    arch = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    mx.random.seed(seed)
    model = arch.Model(arch.ModelArgs.from_dict(cfg))  # parameters are lazy: nothing allocated yet
    params = tree_flatten(model.parameters())
    dtype = lambda v: "bfloat16" if mx.issubdtype(v.dtype, mx.floating) else str(v.dtype).rsplit(".", 1)[-1]  # noqa
    writer = ShardWriter(tmp, [(k, v.shape, dtype(v)) for k, v in params])
    names = {k for k, _ in params}
    for k, v in params:
        v = router_weight(k, names, v)
        a = v.astype(mx.bfloat16) if dtype(v) == "bfloat16" else v
        mx.eval(a)
        writer.put(k, a)
        del a
    writer.close()
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in demo_dir("demo").glob("*.json"):
        if f.name != "config.json":
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


CHILD = """
import json, sys, time
from mixq.quant.convert import ConvertOptions, convert
t0 = time.perf_counter()
r = convert(ConvertOptions(model=sys.argv[1], out=sys.argv[2], force=True, command=["convert_scale"]))
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print("RESULT " + json.dumps({"report": r, "peak_rss": hwm, "wall": time.perf_counter() - t0}))
"""


def run_convert(model: Path, out: Path) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"convert of {model} failed:\n{p.stderr[-3000:]}")
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _kinds(config: dict) -> list:
    pat = config.get("hybrid_override_pattern")
    return list(pat) if pat else ["L"] * config["num_hidden_layers"]


def preflight_of(config: dict, experts: int | None = None) -> dict:
    """mixq's preflight for a configuration (a lazily built model: no weight exists)."""
    import importlib

    import mlx.core as mx

    from mixq.core.anatomy import describe
    from mixq.core.formats import DEFAULT_CANDIDATES
    from mixq.quant.preflight import preflight

    cfg = dict(config)
    cfg["num_hidden_layers"] = len(_kinds(cfg)) if cfg.get("hybrid_override_pattern") else cfg["num_hidden_layers"]
    arch = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(cfg))
    from mlx.utils import tree_flatten

    src = {k: "bfloat16" if mx.issubdtype(v.dtype, mx.floating) else "uint32" for k, v in tree_flatten(model.parameters())}
    a = describe(model, cfg)
    pf = preflight(a, list(DEFAULT_CANDIDATES), src, samples=16, seq_len=256, batch_size=8, gram_samples=GRAM, own_inputs=True, hidden=cfg["hidden_size"],
                   vocab=cfg["vocab_size"], top_k=a.top_k, available=None,
                   stream_weights="off")
    streamed = preflight(a, list(DEFAULT_CANDIDATES), src, samples=16, seq_len=256, batch_size=8, gram_samples=GRAM, own_inputs=True,
                         hidden=cfg["hidden_size"], vocab=cfg["vocab_size"], top_k=a.top_k,
                         available=None, stream_weights="on")
    kinds = _kinds(cfg)
    layer_params = {}
    for layer in a.layers:
        layer_params.setdefault(kinds[layer.index], layer.params)
    outside = sum(t.params for t in a.tensors if t.layer is None)
    return {"stored": pf.stored_bytes, "resident_peak": pf.peak, "streamed_peak": streamed.peak,
            "params": pf.params, "layer_params": layer_params, "outside_params": outside}


def project_time(slice_cfg: dict, result: dict, slice_pf: dict, full_cfg: dict, full_pf: dict) -> float:
    """Seconds for the full model: the slice's seconds per layer of each kind (all stages summed), scaled by
    the kind's parameter ratio, times the full model's count of the kind; the rest (embedding, head, their
    rounding, setup) scaled by the ratio of the parameters outside the blocks."""
    rep = result["report"]
    kinds = _kinds(slice_cfg)
    per_kind: dict = {}
    in_blocks = 0.0
    for secs in rep["block_seconds"].values():
        for k, s in zip(kinds, secs):
            per_kind[k] = per_kind.get(k, 0.0) + s
            in_blocks += s
    per_layer = {k: v / kinds.count(k) for k, v in per_kind.items()}
    mean = sum(per_layer.values()) / len(per_layer)
    est = (rep["seconds"]["total"] - in_blocks) * full_pf["outside_params"] / slice_pf["outside_params"]
    for k in _kinds(full_cfg):
        base = per_layer.get(k, mean)  # a kind the slice lacks is priced like its mean layer
        ref = slice_pf["layer_params"].get(k) or (sum(slice_pf["layer_params"].values()) / len(slice_pf["layer_params"]))
        est += base * full_pf["layer_params"][k] / ref
    return est


def main() -> int:
    ap = argparse.ArgumentParser(description="mixq convert at real widths")
    ap.add_argument("--models", nargs="+", default=list(SLICES))
    ap.add_argument("--experts", type=int, default=128, help="routed experts of the 30B-A3B slice (default 128)")
    ap.add_argument("--work", default="/tmp/mixq-scale")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.models:
        cfg = dict(SLICES[name])
        if name == "nano30b-slice":
            cfg["n_routed_experts"] = args.experts
        t0 = time.perf_counter()
        path = build(cfg, work / f"{name}-{cfg.get('n_routed_experts', 0)}")
        built = time.perf_counter() - t0
        res = run_convert(path, work / f"{name}-out")
        res["build_seconds"] = built
        res["stored"] = sum(f.stat().st_size for f in path.glob("model*.safetensors"))
        res["config"] = cfg
        results[name] = res
        rep = res["report"]
        pre = rep["preflight"]
        print(f"\n== {name}: {rep['preflight']['params'] / 1e9:.3f}B params, stored {res['stored'] / 2**30:.2f} GiB; "
              f"weights {'streamed' if pre['stream_weights'] else 'resident'}")
        print(f"peak RSS {res['peak_rss'] / 2**30:.2f} GiB = stored + {(res['peak_rss'] - res['stored']) / 2**30:.2f} GiB; "
              f"preflight estimate {pre['peak_bytes'] / 2**30:.2f} GiB")
        print("calibration state (preflight): " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in pre["memory"].items()))
        print("seconds: " + ", ".join(f"{k} {v}" for k, v in rep["seconds"].items()))
        print(f"written {rep['disk_bytes'] / 2**30:.3f} GiB at {rep['plan']['achieved_bpw']:.3f} bpw; verified: "
              f"{rep['verify']['ok']}; held-out KL {rep['comparison'][0]['kl_mean']:.4g}")
    print("\n== projections to the full models (from the slices above)")
    print(f"{'model':<26} {'params':>7} {'stored':>8} {'peak (resident)':>16} {'peak (streamed)':>16} {'time':>9}")
    for full, (slice_name, cfg) in FULL.items():
        if slice_name not in results:
            continue
        res = results[slice_name]
        pf_slice = preflight_of(res["config"])
        ratio = res["peak_rss"] / (pf_slice["streamed_peak"] if res["report"]["preflight"]["stream_weights"]
                                   else pf_slice["resident_peak"])
        pf = preflight_of(cfg)
        secs = project_time(res["config"], res, pf_slice, cfg, pf)
        print(f"{full:<26} {pf['params'] / 1e9:>6.2f}B {pf['stored'] / 2**30:>7.1f}G "
              f"{pf['resident_peak'] * ratio / 2**30:>15.1f}G {pf['streamed_peak'] * ratio / 2**30:>15.1f}G "
              f"{secs / 60:>8.1f}m")
        results.setdefault("projections", {})[full] = {"preflight": pf, "measured_over_estimate": ratio,
                                                       "seconds": secs}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
