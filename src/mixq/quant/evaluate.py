"""End-to-end quality of sets of formats: KL vs the float model, top-1 agreement and perplexity.

Every evaluation is one forward sweep (`mixq.quant.sweep`): the float model and each quantized variant run
side by side, block by block, so several plans cost one pass over the model's weights. Quantized weights
are dequantized in float32 (the CPU-exact stand-in for the quantized kernels). A written model is read
back from its own files (`WrittenModel`): the held-out numbers are those of what was written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mixq.core.formats import Format
from mixq.quant.qweight import QuantizedWeight
from mixq.quant.sweep import ForwardSweep, Stream


def _round(x: float) -> float:
    # 6 significant digits: run-to-run float noise never reaches plan.json
    return float(f"{x:.6g}")


def summary(res: dict) -> dict:
    kl = res["kl"].astype(np.float64)
    return {
        "kl_mean": _round(kl.mean()),
        "kl_p99": _round(np.percentile(kl, 99)),
        "kl_max": _round(kl.max()),
        "top1": _round(float(res["same"].mean())),
        "ppl": _round(float(np.exp(res["nll"].astype(np.float64).mean()))),
        "tokens": int(kl.size),
    }


def evaluate(runner, anatomy, tokens, streams: list[Stream], *, batch_size: int = 8, gptq_paths=(),
             hessians=None, on_rounded=None, progress=None, references=None, gram_tokens=None) -> tuple[dict, object]:
    """name -> summary for each stream (and "float" -> its perplexity), plus the sweep result.
    `references`: the float model's on these windows, when an earlier sweep has them. `gram_tokens`: more
    windows GPTQ's second moments are taken over (`ForwardSweep`)."""
    sweep = ForwardSweep(runner, anatomy, tokens, batch_size=batch_size, gptq_paths=gptq_paths, progress=progress,
                         gram_tokens=gram_tokens)
    res = sweep.run(streams, grams=hessians is not None, hessians=hessians, on_rounded=on_rounded,
                    references=references)
    out = {name: summary(r) for name, r in res.streams.items()}
    nll = np.concatenate([np.array(ref.nll).ravel() for ref in res.references])
    valid = np.concatenate([np.array(t).ravel() >= 0 for t in sweep_targets(sweep)])
    out["float"] = {"ppl": _round(float(np.exp(nll[valid].astype(np.float64).mean())))}
    return out, res


def sweep_targets(sweep: ForwardSweep) -> list:
    from mixq.quant.sweep import targets_of

    return [targets_of(x) for x in sweep.batches]


class WrittenModel:
    """The quantized tensors of a written model dir, read from its shards when asked (path -> QuantizedWeight)."""

    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir)
        cfg = json.loads((self.dir / "config.json").read_text())
        q = cfg.get("quantization", {})
        self.formats = {f"{m}.weight": Format.from_config_entry(e) for m, e in q.items() if isinstance(e, dict)}
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
        else:
            import mlx.core as mx

            self.where = {k: "model.safetensors" for k in mx.load(str(self.dir / "model.safetensors"))}

    def keys(self):
        return self.formats.keys()

    def __getitem__(self, path: str) -> QuantizedWeight:
        import mlx.core as mx

        module = path.rsplit(".", 1)[0]
        names = {n: f"{module}.{n}" for n in ("weight", "scales", "biases")}
        arrays = {}
        for n, key in names.items():
            if key in self.where:
                arrays[n] = mx.load(str(self.dir / self.where[key]))[key]
        fmt = self.formats[path]
        cols = arrays["weight"].shape[-1] * 32 // fmt.bits
        return QuantizedWeight(fmt=fmt, wq=arrays["weight"], scales=arrays["scales"], biases=arrays.get("biases"),
                               cols=cols)
