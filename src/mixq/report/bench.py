"""`mixq bench`: prompt-processing and generation speed, time to first token and peak memory of a model.

What: for each prompt length, a warm-up and then `runs` timed runs of greedy generation through mlx-lm's
`generate_step` (the loop under `generate` / `stream_generate`, which does not stop at an end-of-sequence
token, so every run decodes exactly `gen_tokens`). Per run: time to first token (prefill + first token),
prompt tok/s = prompt tokens / TTFT (mlx-lm's own definition), generation tok/s = (tokens - 1) / time after
the first token, and MLX's peak-memory counter (reset before the run; weights included). Reported as the
median and spread (min, max, every value) over runs, and saved to MODEL/mixq/bench.json.

Why this shape: a single run is noisy (first-call compilation, caches, other load), so the warm-up is
discarded and the median is what the card shows; the spread says how far to trust it. bench.json keeps
one entry per (KV cache setting, device, compute dtype), so a float-KV and a mixed-KV run sit side by side.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import mixq
from mixq.core.errors import MixqError

BENCH_FORMAT = "mixq-bench/1"
DEFAULT_PROMPT_TOKENS = (512, 2048)


@dataclass
class BenchOptions:
    model: str
    prompt_tokens: list[int] = field(default_factory=lambda: list(DEFAULT_PROMPT_TOKENS))
    gen_tokens: int = 128
    runs: int = 5
    warmup: int = 1
    kv_config: str | None = None
    kv_quantize_after: int = 0
    dtype: str = "auto"          # auto: float32 on the CPU, stored dtypes on a GPU; or float32/bfloat16/float16/stored
    save: bool = True            # write MODEL/mixq/bench.json when MODEL is a writable local directory
    progress: Callable[[str], None] | None = None


def parse_token_counts(text: str) -> list[int]:
    """"512,2048" -> [512, 2048]; each a positive integer."""
    try:
        counts = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError as e:
        raise MixqError(f"--prompt-tokens {text!r}: expected comma-separated integers") from e
    if not counts or any(c < 1 for c in counts):
        raise MixqError(f"--prompt-tokens {text!r}: expected positive integers")
    return counts


def stats(values: list[float]) -> dict:
    """Median and spread of one measurement over runs."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread_pct": (max(values) - min(values)) / med * 100 if med else 0.0, "values": list(values)}


def prompt_ids(tokenizer, n: int) -> list[int]:
    """n token ids of real text (the package's sample text, repeated as needed): deterministic."""
    from mixq.core.corpus import sample_text

    text = sample_text()
    chars = min(len(text), 8 * n + 64)  # tokenize only what is needed (the whole text is ~70k tokens)
    while True:
        ids = list(tokenizer.encode(text[:chars]))
        if len(ids) >= n or chars >= len(text):
            break
        chars = min(len(text), chars * 2)
    if not ids:
        raise MixqError("the tokenizer produced no tokens for the sample text")
    reps = -(-n // len(ids))
    return (ids * reps)[:n]


def _versions() -> dict:
    from importlib.metadata import version

    return {"mixq": mixq.__version__, "mlx": version("mlx"), "mlx-lm": version("mlx-lm")}


def _environment(compute_dtype: str) -> dict:
    import mlx.core as mx

    from mixq.core import blas

    dev = mx.default_device()
    env = {"device": "gpu" if dev == mx.gpu else "cpu", "compute_dtype": compute_dtype,
           "platform": f"{platform.system()} {platform.machine()}", "cpu_count": os.cpu_count(),
           "versions": _versions()}
    if env["device"] == "cpu":
        env["blas"] = blas.info().get("status")
    else:
        try:
            env["gpu"] = mx.device_info().get("device_name")
        except Exception:  # not every backend describes itself
            pass
    return env


def _cache_factory(lm, opts: BenchOptions):
    """() -> a fresh cache list, plus a description of the KV setting for bench.json."""
    from mlx_lm.models.cache import make_prompt_cache

    if opts.kv_config is None:
        return (lambda: make_prompt_cache(lm.model)), None
    try:
        from mixq.kvcache import load_config, make_cache
    except ImportError as e:
        raise MixqError(f"--kv-config needs mixq.kvcache.make_cache, which this install lacks ({e})") from e
    cfg = load_config(opts.kv_config)
    make_cache(lm, kv_config=cfg, quantize_after=opts.kv_quantize_after)  # refuses a config for another model
    raw = json.dumps(cfg, sort_keys=True).encode()
    info = {"path": str(opts.kv_config), "sha256": hashlib.sha256(raw).hexdigest(),
            "achieved_bits": cfg.get("achieved_bits"), "bytes_per_token": cfg.get("bytes_per_token"),
            "float16_bytes_per_token": cfg.get("float16_bytes_per_token"),
            "quantize_after": opts.kv_quantize_after}
    return (lambda: make_cache(lm.model, kv_config=cfg, quantize_after=opts.kv_quantize_after)), info


def _one_run(model, prompt, gen_tokens: int, cache) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    mx.clear_cache()
    mx.reset_peak_memory()
    n, first = 0, None
    t0 = time.perf_counter()
    for _tok, _ in generate_step(prompt, model, max_tokens=gen_tokens, prompt_cache=cache):
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    peak = mx.get_peak_memory()
    if first is None:
        raise MixqError("generation produced no token")
    ttft = first - t0
    out = {"ttft_s": ttft, "prompt_tps": int(prompt.size) / ttft, "peak_memory_bytes": int(peak),
           "generated": n}
    if n > 1:
        out["generation_tps"] = (n - 1) / (end - first)
    return out


def _model_info(lm, bpw: float, weights_bytes: int) -> dict:
    from mixq.core.modelio import fingerprint

    files = sorted(Path(lm.path).glob("model*.safetensors"))
    info = {"name": lm.name, "path": str(lm.path),
            "model_type": lm.config.get("model_type") or lm.config.get("text_config", {}).get("model_type"),
            "bits_per_weight": bpw, "weights_bytes": weights_bytes,
            "disk_bytes": sum(f.stat().st_size for f in files)}
    try:
        info["fingerprint"] = fingerprint(Path(lm.path))
    except (OSError, ValueError):
        info["fingerprint"] = None
    return info


def run_bench(opts: BenchOptions) -> dict:
    """Measure and (with opts.save) record; returns this run's entry plus where it was saved."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import compute_bits_per_weight

    from mixq.core.modelio import cast_floats, load

    if opts.runs < 1 or opts.warmup < 0:
        raise MixqError("--runs must be >= 1 and --warmup >= 0")
    if opts.gen_tokens < 1:
        raise MixqError(f"--gen-tokens must be >= 1, got {opts.gen_tokens}")
    if opts.kv_quantize_after < 0:
        raise MixqError(f"--kv-quantize-after must be >= 0, got {opts.kv_quantize_after}")
    counts = parse_token_counts(",".join(map(str, opts.prompt_tokens)))
    dtype = opts.dtype
    if dtype == "auto":
        dtype = "float32" if mx.default_device() == mx.cpu else "stored"
    if dtype not in ("stored", "float32", "bfloat16", "float16"):
        raise MixqError(f"--dtype {opts.dtype!r}: expected auto, stored, float32, bfloat16 or float16")
    say = opts.progress or (lambda msg: None)

    lm = load(opts.model, compute_dtype=None)
    bpw = compute_bits_per_weight(lm.model)
    weights_bytes = sum(v.nbytes for _, v in tree_flatten(lm.model.parameters()))
    if dtype != "stored":
        cast_floats(lm.model, getattr(mx, dtype))
    mx.eval(lm.model.parameters())
    new_cache, kv_info = _cache_factory(lm, opts)

    results = []
    for p in counts:
        prompt = mx.array(prompt_ids(lm.tokenizer, p), dtype=mx.int32)
        for i in range(opts.warmup):
            say(f"prompt {p}: warm-up {i + 1}/{opts.warmup}")
            _one_run(lm.model, prompt, min(opts.gen_tokens, 16), new_cache())
        runs = []
        for i in range(opts.runs):
            say(f"prompt {p}: run {i + 1}/{opts.runs}")
            runs.append(_one_run(lm.model, prompt, opts.gen_tokens, new_cache()))
        row = {"prompt_tokens": p, "gen_tokens": opts.gen_tokens,
               **{k: stats([r[k] for r in runs]) for k in ("ttft_s", "prompt_tps", "peak_memory_bytes")}}
        if all("generation_tps" in r for r in runs):
            row["generation_tps"] = stats([r["generation_tps"] for r in runs])
        results.append(row)

    entry = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": _model_info(lm, bpw, weights_bytes),
        "environment": _environment(dtype),
        "settings": {"prompt_tokens": counts, "gen_tokens": opts.gen_tokens, "runs": opts.runs,
                     "warmup": opts.warmup, "sampler": "greedy", "prefill_step_size": 2048,
                     "prompt_source": "mixq sample text, repeated"},
        "kv_config": kv_info,
        "results": results,
    }
    saved = None
    if opts.save and _writable_local_dir(opts.model, lm.path):
        saved = str(save_entry(Path(lm.path) / "mixq" / "bench.json", entry))
    return {**entry, "saved": saved}


def _writable_local_dir(name: str, path: Path) -> bool:
    """Only a directory the user named (not a hub snapshot, the bundled demo or a fixture cache)."""
    given = Path(str(name)).expanduser()
    if str(name).startswith("fixture:") or not given.is_dir() or given.resolve() != Path(path).resolve():
        return False
    return os.access(path, os.W_OK)


def _entry_key(e: dict) -> tuple:
    kv = e.get("kv_config") or {}
    env = e.get("environment", {})
    return (kv.get("sha256"), kv.get("quantize_after"), env.get("device"), env.get("compute_dtype"))


def save_entry(path: Path, entry: dict) -> Path:
    """Add `entry` to bench.json, replacing an earlier one with the same KV setting / device / dtype.

    Entries measured on other weights (another fingerprint) are dropped: they describe another model.
    """
    doc = {"format": BENCH_FORMAT, "benchmarks": []}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(old, dict) and old.get("format") == BENCH_FORMAT:
                doc = old
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # a broken file is replaced
    fp = entry["model"].get("fingerprint")
    doc["benchmarks"] = [e for e in doc.get("benchmarks", [])
                         if _entry_key(e) != _entry_key(entry) and e.get("model", {}).get("fingerprint") == fp]
    doc["benchmarks"].append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def format_table(entry: dict) -> str:
    """The human table `mixq bench` prints: medians with min-max."""
    def cell(s: dict, fmt: str) -> str:
        return f"{format(s['median'], fmt)} ({format(s['min'], fmt)}-{format(s['max'], fmt)})"

    lines = [f"{'prompt':>7} {'gen':>5}  {'prompt tok/s':>24}  {'gen tok/s':>24}  {'TTFT s':>24}  {'peak MB':>24}"]
    for r in entry["results"]:
        mb = {k: v / 1e6 for k, v in r["peak_memory_bytes"].items() if k != "values"}
        gen = cell(r["generation_tps"], ".1f") if "generation_tps" in r else "-"
        lines.append(f"{r['prompt_tokens']:>7} {r['gen_tokens']:>5}  {cell(r['prompt_tps'], '.1f'):>24}  "
                     f"{gen:>24}  {cell(r['ttft_s'], '.3f'):>24}  {cell(mb, '.1f'):>24}")
    return "\n".join(lines)
