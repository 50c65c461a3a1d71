"""Measured sensitivity: for every quantizable tensor and candidate format, the KL divergence of the
model's next-token distribution from the float model's, with only that tensor quantized.

Cheap without being wrong: one float pass caches every block's input for every calibration batch and the
float log-probabilities; perturbing a tensor in block i then re-runs only blocks i..N (the lm_head only
re-runs the projection). Weights are quantized then dequantized in float32, which is exactly what the
quantized kernels compute up to accumulation order. Cost is linear in tensors x candidates; it is reported
as block-forwards against a naive sweep that re-runs the whole model per measurement.

Results stream to a partial file after every tensor, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mixq.core.anatomy import Anatomy, TensorInfo
from mixq.core.errors import MixqError
from mixq.core.formats import Format, applicable
from mixq.core.forward import BlockRunner
from mixq.quant.gptq import RTN, Rounding

METHOD = "kl-blockwise-v2"


def candidate_items(anatomy: Anatomy) -> list[TensorInfo]:
    """Tensors the allocator may choose a format for: everything no hard rule keeps float."""
    return [t for t in anatomy.tensors if not t.float_by_rule and t.current is None]


def _round(x: float) -> float:
    # 6 significant digits: run-to-run float noise never reaches plan.json
    return float(f"{x:.6g}")


@dataclass
class _Start:
    kind: str   # "embed" | "block" | "head"
    block: int = 0


def _start_for(t: TensorInfo) -> _Start:
    if t.layer is not None:
        return _Start("block", t.layer)
    if t.module == "lm_head":
        return _Start("head")
    return _Start("embed")


def _kl_mean(ref_logp, logits):
    import mlx.core as mx

    logq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    kl = (mx.exp(ref_logp) * (ref_logp - logq)).sum(axis=-1)
    return kl.mean()


class _Partial:
    """Append-only JSON-lines store of finished tensors, tied to the settings key."""

    def __init__(self, path: Path | None, key: dict):
        self.path, self.key, self.done = path, key, {}
        if path is None:
            return
        if path.is_file():
            lines = path.read_text().splitlines()
            try:
                head = json.loads(lines[0]) if lines else None
                if head == {"key": key}:
                    for line in lines[1:]:
                        rec = json.loads(line)
                        self.done[rec["path"]] = rec
            except (json.JSONDecodeError, KeyError):
                self.done = {}  # a torn last line or foreign file: start over
        if not self.done:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"key": key}, sort_keys=True) + "\n")

    def add(self, rec: dict) -> None:
        self.done[rec["path"]] = rec
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())


def measure(model, anatomy: Anatomy, tokens, candidates: list[Format], *, key: dict,
            source_dtypes: dict | None = None, rounding: Rounding = RTN, batch_size: int = 8,
            partial: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Sensitivity of every candidate tensor to every applicable candidate format (see module doc).

    `tokens` is an (n, L) int32 array of calibration windows; `key` identifies every setting that affects
    the numbers and is stored with them. `source_dtypes` (path -> stored dtype) makes the fake quant
    round scales/biases as the written model will; default: the loaded dtype. `rounding` is how a weight is
    rounded to each format (GPTQ where it has a Hessian); its settings belong in `key`. Returns sensitivity.json.
    """
    import mlx.core as mx
    from tqdm import tqdm

    runner = BlockRunner(model)
    modules = dict(model.named_modules())
    items = candidate_items(anatomy)
    store = _Partial(Path(partial) if partial else None, key)
    todo = [t for t in items if t.path not in store.done]
    t0 = time.perf_counter()
    n_blocks = runner.num_blocks

    # float pass: block inputs, final normed hidden state and reference log-probs per batch
    batches = []
    for s in range(0, tokens.shape[0], batch_size):
        x = tokens[s:s + batch_size]
        h = runner.embed(x)
        inputs = []
        for i in range(n_blocks):
            inputs.append(h)
            h = runner.block(i, h)
            mx.eval(h)
        hn = runner.norm(h)
        logits = runner.project(hn)
        ref = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(hn, ref)
        batches.append({"tokens": x, "inputs": inputs, "hn": hn, "ref": ref})
    block_forwards = n_blocks * len(batches)
    naive = block_forwards
    measurements = 0

    total = sum(sum(1 for f in candidates if f.mode != "float" and applicable(t.shape, f)) for t in todo)
    bar = tqdm(total=total, desc="sensitivity", unit="meas", disable=not progress, leave=False)
    for t in todo:
        module = modules[t.module]
        name = t.path.rsplit(".", 1)[1]
        original = getattr(module, name)
        src = getattr(mx, (source_dtypes or {}).get(t.path, t.dtype))
        w_src = original.astype(src)
        start = _start_for(t)
        costs: dict[str, float] = {}
        for f in candidates:
            if f.mode == "float":
                costs[str(f)] = 0.0
                continue
            if not applicable(t.shape, f):
                continue
            setattr(module, name, rounding.qdq(t.path, w_src, f).astype(original.dtype))
            acc = 0.0
            for b in batches:
                if start.kind == "head":
                    logits = runner.project(b["hn"])
                elif start.kind == "embed":
                    logits = runner.run(b["tokens"])
                    block_forwards += n_blocks
                else:
                    logits = runner.run(h=b["inputs"][start.block], start=start.block)
                    block_forwards += n_blocks - start.block
                naive += n_blocks
                acc += _kl_mean(b["ref"], logits).item() * b["tokens"].shape[0]
            setattr(module, name, original)
            costs[str(f)] = _round(acc / tokens.shape[0])
            measurements += 1
            bar.update(1)
        if not all(c == c and c != float("inf") for c in costs.values()):
            raise MixqError(f"{t.path}: sensitivity is NaN/Inf (check the weights)")
        store.add({"path": t.path, "costs": costs})
    bar.close()

    tensors = {}
    for t in items:
        rec = store.done[t.path]
        tensors[t.path] = {"module": t.module, "layer": t.layer, "shape": t.shape, "params": t.params,
                           "dtype": t.dtype, "costs": rec["costs"]}
    return {
        "format": "mixq-sensitivity/1",
        "method": METHOD,
        "key": key,
        "tensors": tensors,
        "cost": {
            "measurements": measurements,
            "resumed_tensors": len(items) - len(todo),
            "block_forwards": block_forwards,
            "naive_block_forwards": naive,
            "seconds": round(time.perf_counter() - t0, 2),
            "batches": len(batches),
        },
    }


def load_sensitivity(path: str | os.PathLike, key: dict) -> dict:
    """A saved sensitivity.json, refused unless it was measured with exactly these settings."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise MixqError(f"{p}: no such sensitivity file") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MixqError(f"{p}: not a valid sensitivity file ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != "mixq-sensitivity/1":
        raise MixqError(f"{p}: not a mixq sensitivity file")
    if doc.get("key") != key:
        theirs = doc.get("key") or {}
        diff = sorted(k for k in set(key) | set(theirs) if key.get(k) != theirs.get(k))
        raise MixqError(f"{p}: measured with different settings ({', '.join(diff)}); re-measure or match them")
    return doc
