"""Speed-up of mixq's fast-BLAS path: a 512-token float32 forward of a fixture model, with and without it.

Runs itself twice in subprocesses (MIXQ_BLAS=off, then auto) because the BLAS is chosen at process start.
Usage: python benchmarks/cpu_blas.py [--fixture nemotron-dense] [--tokens 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import mixq
import mlx.core as mx
from mixq.core import blas
from mixq.core.modelio import load
lm = load(sys.argv[1])  # float32 compute
tokens = mx.array([[i % 500 + 3 for i in range(int(sys.argv[2]))]])
mx.eval(lm.model(tokens))  # warm-up
times = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter(); mx.eval(lm.model(tokens)); times.append(time.perf_counter() - t)
a = mx.random.normal((1024, 1024)); mx.eval(a)
t = time.perf_counter(); mx.eval(a @ a); mx.eval(a @ a); gemm = 2 * 2 * 1024**3 / (time.perf_counter() - t) / 1e9
print(json.dumps({"blas": blas.info(), "forward_s": min(times), "gemm_gflops": gemm}))
"""

# a wider fixture than the test ones, so the forward is matmul-bound as real models are
BENCH_CONFIG = {"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8, "num_key_value_heads": 4,
                "head_dim": 64, "mamba_num_heads": 16, "mamba_head_dim": 32, "ssm_state_size": 64,
                "hybrid_override_pattern": "M*-M*-M-"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", help="model dir or demo name (default: a built 512-wide nemotron_h fixture)")
    args = ap.parse_args()
    model = args.model
    if model is None:
        import mixq  # noqa: F401
        from mixq.core import synth

        tmp = tempfile.mkdtemp(prefix="mixq-bench-")
        synth.FIXTURES["bench"] = {**synth.FIXTURES["nemotron-dense"], **BENCH_CONFIG}
        model = str(synth.build_fixture("bench", os.path.join(tmp, "bench")))
    rows = {}
    for mode in ("off", "auto"):
        env = {**os.environ, "MIXQ_BLAS": mode}
        r = subprocess.run([sys.executable, "-c", CHILD, model, str(args.tokens), str(args.repeats)],
                           capture_output=True, text=True, env=env)
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        rows[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    off, fast = rows["off"], rows["auto"]
    print(f"model: {model}   tokens: {args.tokens}   float32 forward, best of {args.repeats}")
    print(f"{'BLAS':<44} {'forward (s)':>12} {'fp32 GEMM GFLOP/s':>18}")
    print(f"{'bundled reference (MIXQ_BLAS=off)':<44} {off['forward_s']:>12.3f} {off['gemm_gflops']:>18.1f}")
    label = f"mixq auto: {fast['blas']['status']} {os.path.basename(fast['blas']['library'] or '')}"
    print(f"{label:<44} {fast['forward_s']:>12.3f} {fast['gemm_gflops']:>18.1f}")
    print(f"speed-up: forward x{off['forward_s'] / fast['forward_s']:.1f}, "
          f"GEMM x{fast['gemm_gflops'] / off['gemm_gflops']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
