"""`mixq serve` against `mlx_lm.server` on the same model in the same run: decode tokens per second for one
stream, and aggregate throughput with concurrent clients.

Both servers run at once as their own processes on loopback and take turns (--rounds), on one float32 copy
of the model (mlx-lm would run the stored bfloat16 weights, which are slow and, for MoE, broken on the CPU;
mixq computes in float32 there). On Linux `mixq serve` loads the optimized BLAS (see the README) and
mlx_lm.server keeps mlx's bundled one; MIXQ_BLAS=off in the environment gives both the bundled one.
Requests are /v1/completions with greedy decoding and the end-of-sequence token banned (logit_bias), so
every request generates exactly --tokens tokens.

- single stream: decode tok/s = (N - 1) / (t(N tokens) - t(1 token)), the median over --repeats pairs of
  sequential requests (the difference cancels prefill and HTTP overhead);
- aggregate: --clients threads each send --requests requests at once; generated tokens / wall seconds
  (prefill included).

Usage: python benchmarks/serve_vs_mlx_lm.py [--model fixture:nemotron-dense] [--tokens 64] [--clients 8]
       [--requests 2] [--repeats 3] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPT = "The history of the printing press begins in the fifteenth century, when"


def float32_copy(name: str, out: Path) -> tuple[Path, int]:
    """The model as a float32 directory both servers load; returns (dir, eos token id)."""
    import mixq  # noqa: F401  (fast BLAS before mlx)
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mixq.core.modelio import load

    lm = load(name, compute_dtype="float32")
    out.mkdir(parents=True)
    for f in lm.path.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.suffix in (".json", ".jinja", ".txt", ".model"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((lm.path / "config.json").read_text())
    cfg["torch_dtype"] = "float32"
    cfg.pop("quantization", None), cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if any(k.endswith(".scales") for k, _ in tree_flatten(lm.model.parameters())):
        raise SystemExit("benchmark a float model (a quantized one would need its quantization config kept)")
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(lm.model.parameters())),
                        metadata={"format": "mlx"})
    return out, next(iter(lm.tokenizer.eos_token_ids))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not come up in {timeout:.0f}s")


def start_mixq(model_dir: Path, clients: int):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mixq", "serve", str(model_dir), "--port", str(port),
                             "--served-model-name", "bench", "--max-concurrency", str(clients),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, f"http://127.0.0.1:{port}", "bench"


def start_mlx_lm(model_dir: Path, clients: int):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir), "--host",
                             "127.0.0.1", "--port", str(port), "--decode-concurrency", str(clients),
                             "--log-level", "WARNING"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, f"http://127.0.0.1:{port}", str(model_dir)


def complete(client, model: str, n: int, eos: int) -> int:
    r = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0,
                                             "logit_bias": {str(eos): -100.0}})
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


def measure(url: str, model: str, args, eos: int) -> dict:
    import httpx

    with httpx.Client(base_url=url, timeout=600, trust_env=False) as c:
        complete(c, model, 4, eos)  # warm-up
        rates = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            complete(c, model, 1, eos)
            t1 = time.perf_counter()
            n = complete(c, model, args.tokens, eos)
            t2 = time.perf_counter()
            one, full = t1 - t0, t2 - t1
            rates.append((n - 1) / max(1e-9, full - one))
    totals, errors = [], []

    def client():
        with httpx.Client(base_url=url, timeout=600, trust_env=False) as c:
            for _ in range(args.requests):
                try:
                    totals.append(complete(c, model, args.tokens, eos))
                except Exception as e:  # noqa: BLE001 - reported, not raised
                    errors.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"single_tok_s": statistics.median(rates), "aggregate_tok_s": sum(totals) / wall, "wall_s": wall,
            "tokens": sum(totals), "errors": len(errors)}


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fixture:nemotron-dense")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2, help="requests per client in the aggregate run")
    ap.add_argument("--repeats", type=int, default=3, help="single-stream measurements per round (median)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per server (medians reported)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    tmp = Path(tempfile.mkdtemp(prefix="mixq-serve-bench-"))
    runs: dict[str, list] = {"mixq serve": [], "mlx_lm.server": []}
    procs = []
    try:
        model_dir, eos = float32_copy(args.model, tmp / "model")
        servers = {}
        for name, start in (("mixq serve", start_mixq), ("mlx_lm.server", start_mlx_lm)):
            proc, url, model = start(model_dir, args.clients)
            procs.append(proc)
            wait_ready(url, proc)
            servers[name] = (url, model)
        # both stay up and take turns, round after round, so a busy machine slows both alike
        for _ in range(args.rounds):
            for name, (url, model) in servers.items():
                runs[name].append(measure(url, model, args, eos))
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    results = {name: {"single_tok_s": statistics.median(r["single_tok_s"] for r in rs),
                      "aggregate_tok_s": statistics.median(r["aggregate_tok_s"] for r in rs),
                      "wall_s": statistics.median(r["wall_s"] for r in rs),
                      "errors": sum(r["errors"] for r in rs), "rounds": rs} for name, rs in runs.items()}

    import mixq  # noqa: F401
    import mlx.core as mx

    print(f"model: {args.model} (float32 copy)   device: {mx.default_device()}   {args.tokens} tokens/request, "
          f"greedy, EOS banned   aggregate: {args.clients} clients x {args.requests} requests   "
          f"median of {args.rounds} alternating rounds")
    print(f"{'server':<16} {'single-stream decode tok/s':>27} {'aggregate tok/s':>16} {'wall s':>8} {'errors':>7}")
    for name, r in results.items():
        print(f"{name:<16} {r['single_tok_s']:>27.1f} {r['aggregate_tok_s']:>16.1f} {r['wall_s']:>8.2f} "
              f"{r['errors']:>7}")
    a, b = results["mixq serve"], results["mlx_lm.server"]
    print(f"mixq / mlx_lm: single stream x{a['single_tok_s'] / b['single_tok_s']:.2f}, "
          f"aggregate x{a['aggregate_tok_s'] / b['aggregate_tok_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
