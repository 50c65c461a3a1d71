"""`--distill-student`: the float student against the quantized one, in memory and seconds.

1. Preflight (the formula a convert checks against the machine) for the full models mixq is for, built lazily
   from their configurations (no weight exists): the measuring and writing sweeps' memory, then the
   distillation's with each student at 4.5 bpw, weights streamed, the default settings (a stage of its own:
   the run's peak is the larger).
2. Measured on a model (default: the random llama with SmolLM-135M's shapes from convert_scale.py, built if
   missing): one convert writes it, then the distillation stage alone runs in a fresh process per student
   (2 training + 2 validation windows, 1 epoch): peak RSS, mlx's peak, seconds, window forwards, and the
   validation KL before (the same targets and start for both).

Usage: python benchmarks/distill_students.py [--model DIR] [--work /tmp/mixq-students] [--no-measure]
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import mixq  # noqa: F401  (fast BLAS before mlx)

sys.path.insert(0, str(Path(__file__).parent))
from convert_scale import FULL, SLICES, _kinds, build  # noqa: E402

CHILD = """
import functools, json, resource, sys, time
import mixq
import mlx.core as mx
from mixq.core.anatomy import describe
from mixq.core.modelio import load, load_quantized
from mixq.quant import calibration
from mixq.quant.distill import DistillSettings, Distiller, streamed_targets
from mixq.quant.evaluate import WrittenModel

model, written, student = sys.argv[1:4]
lm = load(model, compute_dtype=None, lazy=True)
anatomy = describe(lm.model, lm.config)
w = WrittenModel(written)
before = {p: w[p] for p in w.keys()}
mx.eval([list(q.arrays().values()) for q in before.values()])
st = DistillSettings(windows=2, validation=2, epochs=1, student=student)
win = calibration.make_windows(calibration.load_documents(None), lm.tokenizer, n_samples=4, seq_len=256, seed=1)
t = time.perf_counter()
s = load(model, lazy=True).model if student == "float" else load_quantized(written)
_, rec = Distiller(s, before, st, teacher=functools.partial(streamed_targets, lm.runner(retain=False), anatomy)).run(
    win.tokens[2:], win.tokens[:2])
print(json.dumps({"student": student, "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "mlx_peak_gib": mx.get_peak_memory() / 2**30, "seconds": time.perf_counter() - t,
                  "window_forwards": rec["window_forwards"], "validation_kl_before": rec["validation_kl_before"]}))
"""



# the default convert's Gram windows beyond its calibration windows (--hessian-samples 64, --samples 16)
GRAM = 48

def projections() -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mixq.core.anatomy import describe
    from mixq.core.formats import DEFAULT_CANDIDATES
    from mixq.quant.distill import DistillSettings
    from mixq.quant.preflight import preflight

    print(f"{'model':<26} {'params':>7} | {'sweeps':>9} | {'float student':>14} {'run peak':>9} | "
          f"{'quantized':>10} {'run peak':>9}")
    for name, (_, cfg) in FULL.items():
        cfg = {**cfg, "num_hidden_layers": len(_kinds(cfg))}
        arch = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
        model = arch.Model(arch.ModelArgs.from_dict(cfg))
        src = {k: "bfloat16" if mx.issubdtype(v.dtype, mx.floating) else "uint32"
               for k, v in tree_flatten(model.parameters())}
        a = describe(model, cfg)
        got = {}
        for student in ("float", "quantized"):
            got[student] = preflight(a, list(DEFAULT_CANDIDATES), src, samples=16, seq_len=256, batch_size=8, gram_samples=GRAM, own_inputs=True,
                                     hidden=cfg["hidden_size"], vocab=cfg["vocab_size"], top_k=a.top_k,
                                     available=None, stream_weights="on", distill=DistillSettings(),
                                     distill_student=student, target_bpw=4.5)
        f, q = got["float"], got["quantized"]
        print(f"{name:<26} {a.mlx_lm_params / 1e9:>6.2f}B | {f.sweep / 2**30:>5.1f} GiB | "
              f"{f.memory['distillation'] / 2**30:>10.1f} GiB "
              f"{f.peak / 2**30:>5.1f} GiB | {q.memory['distillation'] / 2**30:>6.1f} GiB {q.peak / 2**30:>5.1f} GiB")


def measure(model: Path, work: Path) -> None:
    written = work / "written"
    if not (written / "config.json").is_file():
        p = subprocess.run(["mixq", "convert", str(model), "-o", str(written), "--target-bpw", "5.0", "--compare",
                            "none", "--force", "--quiet"], capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(p.stderr)
    rows = []
    for student in ("float", "quantized"):
        p = subprocess.run([sys.executable, "-c", CHILD, str(model), str(written), student], capture_output=True,
                           text=True)
        if p.returncode:
            raise SystemExit(p.stderr)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"\n{model.name}, the distillation stage alone (2 + 2 windows, 1 epoch):")
    for r in rows:
        print(f"  {r['student']:<9} peak RSS {r['rss_gib']:.2f} GiB, mlx peak {r['mlx_peak_gib']:.2f} GiB, "
              f"{r['seconds']:.1f} s, {r['window_forwards']} window forwards, validation KL before "
              f"{r['validation_kl_before']}")
    f, q = rows
    print(f"  quantized / float: memory {q['rss_gib'] / f['rss_gib']:.2f}x, seconds {q['seconds'] / f['seconds']:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="default: llama135m from convert_scale.py")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mixq-students"))
    ap.add_argument("--no-measure", action="store_true", help="the preflight projections only")
    args = ap.parse_args()
    projections()
    if not args.no_measure:
        model = args.model
        if model is None:
            model = args.work / "llama135m"
            if not (model / "config.json").is_file():
                build(SLICES["llama135m"], model)
        measure(model, args.work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
