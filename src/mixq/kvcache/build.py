"""The kv-cache pipeline: load, measure K/V sensitivity per attention layer, allocate, check on held-out
text, write kv_config.json. Every stage returns JSON-serialisable data."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mixq.core.errors import MixqError

DEFAULT_CANDIDATES = (3, 4, 5, 6, 8)


def parse_candidates(text) -> list[int]:
    """"4,8" (or a list) -> sorted unique widths, each a supported one (16 = keep float)."""
    from mixq.kvcache.cache import ALL_BITS

    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        bits = sorted({int(str(b).strip()) for b in items if str(b).strip()})
    except ValueError as e:
        raise MixqError(f"candidates {text!r}: expected comma-separated integers") from e
    bad = [b for b in bits if b not in ALL_BITS]
    if not bits or bad:
        raise MixqError(f"candidates {text!r}: each must be one of {', '.join(map(str, ALL_BITS))} (16 = float)")
    return bits


def plan_config(lm, sensitivity: dict, layout: list[dict], identity: dict, *, target_bits: float,
                candidates: list[int], group_size: int, scale_bits: int = 16, extra: dict | None = None,
                bits_override: dict | None = None) -> dict:
    """Allocate under `target_bits` from measured sensitivities and build the config dict
    (`bits_override`: layer -> (k_bits, v_bits) replaces the allocation, e.g. after refinement)."""
    from mixq.kvcache import config as kvconfig
    from mixq.kvcache.policy import allocate

    by_layer = {r["layer"]: r for r in sensitivity["layers"]}
    entries = [{**e, "sensitivity": {key: by_layer[e["layer"]][key] for key in ("k", "v", "se")
                                      if key in by_layer[e["layer"]]}} for e in layout]
    alloc = allocate(entries, candidates, target_bits, group_size=group_size, scale_bits=scale_bits)
    bits = alloc["bits"] if bits_override is None else bits_override
    predicted = alloc["predicted_kl"] if bits_override is None else sum(
        float(e["sensitivity"]["k"][str(bits[e["layer"]][0])]) + float(e["sensitivity"]["v"][str(bits[e["layer"]][1])])
        for e in entries)
    meta = {
        "policy": "measured",
        "candidates": list(candidates),
        "target_bits": float(target_bits),
        "predicted_kl": float(f"{predicted:.6g}"),
        "allocation": {"budget_bytes_per_token": alloc["budget_bytes"], "exact": alloc["exact"],
                       "solver": "mixq.core.knapsack"},
        "sensitivity": {k: v for k, v in sensitivity.items() if k != "layers"},
        **(extra or {}),
    }
    cfg = kvconfig.build(identity, entries, bits, group_size=group_size, scale_bits=scale_bits,
                         name=getattr(lm, "name", None), extra=meta)
    if bits_override is None and cfg["bytes_per_token"] != alloc["bytes_per_token"]:  # the config's own accounting must agree
        raise AssertionError("byte accounting disagrees between policy and config")
    return cfg


def refine(lm, cfg: dict, tokens, cands: list[int], group_size: int) -> tuple[int | None, dict]:
    """Per-layer KLs add only approximately (and are noisy where MoE routing flips): measure the mix end to
    end on the calibration windows against every uniform width within the same byte budget, and return
    the uniform width to use instead when one measures lower (else None), with the measurements."""
    from mixq.kvcache import uniform_config
    from mixq.kvcache.sensitivity import evaluate_many

    budget = cfg["allocation"]["budget_bytes_per_token"]
    rivals = {b: u for b in cands if b != 16
              for u in [uniform_config(lm, b, group_size=group_size)] if u["bytes_per_token"] <= budget}
    mixed, *kls = (r["kl_mean"] for r in evaluate_many(lm, [cfg, *rivals.values()], tokens))
    winner, best, tried = None, mixed, {}
    for b, kl in zip(rivals, kls):
        tried[str(b)] = float(f"{kl:.6g}")
        if kl < best:
            winner, best = b, kl
    return winner, {"calibration_kl_mixed": float(f"{mixed:.6g}"), "calibration_kl_uniform": tried,
                    "applied": winner is not None}


def plan_refined(lm, sens: dict, layout: list[dict], identity: dict, tokens, *, target_bits: float,
                 candidates: list[int], group_size: int) -> dict:
    """plan_config, then `refine` on the calibration `tokens`: the config build_kv_config ships."""
    cfg = plan_config(lm, sens, layout, identity, target_bits=target_bits, candidates=candidates,
                      group_size=group_size)
    winner, note = refine(lm, cfg, tokens, candidates, group_size)
    if winner is None:
        return {**cfg, "refinement": note}
    from mixq.kvcache.policy import uniform

    return plan_config(lm, sens, layout, identity, target_bits=target_bits, candidates=candidates,
                       group_size=group_size, bits_override=uniform(layout, winner), extra={"refinement": note})


def build_kv_config(model, *, target_bits: float, candidates=DEFAULT_CANDIDATES, group_size: int = 64,
                    samples: int = 16, seq_len: int = 512, output: str | os.PathLike | None = None,
                    corpus: str | os.PathLike | None = None, heldout_samples: int | None = None,
                    write: bool = True, progress=None) -> dict:
    """Measure, allocate, evaluate on held-out text and (with write) save kv_config.json.

    `model` is a name for mixq.core.modelio.load or a LoadedModel. Returns {"output", "config",
    "seconds"}; the config carries sensitivities, the allocation and predicted and measured KL.
    """
    from mixq.core.anatomy import describe
    from mixq.core.modelio import load
    from mixq.kvcache import config as kvconfig
    from mixq.kvcache.cache import GROUP_SIZES
    from mixq.kvcache.sensitivity import evaluate, measure, text_windows

    t0 = time.time()
    cands = parse_candidates(candidates)
    if group_size not in GROUP_SIZES:
        raise MixqError(f"group size {group_size} not supported (choose from {', '.join(map(str, GROUP_SIZES))})")
    if samples < 1:
        raise MixqError(f"--samples must be >= 1, got {samples}")
    if seq_len < 4:
        raise MixqError(f"--seq-len must be >= 4, got {seq_len}")
    lm = load(model) if isinstance(model, (str, os.PathLike)) else model
    anatomy = describe(lm.model, lm.config, group_size=group_size)
    layout = kvconfig.attention_layout(lm.model, anatomy)
    identity = kvconfig.model_identity(lm.model, lm.config, lm.path, anatomy=anatomy)
    # fail on an impossible target before spending time measuring
    from mixq.kvcache.policy import allocate

    allocate([{**e, "sensitivity": {p: {str(b): 0.0 for b in cands} for p in "kv"}} for e in layout], cands,
             target_bits, group_size=group_size)

    tokens, source = text_windows(lm.tokenizer, n_samples=samples, seq_len=seq_len, split="train", corpus_dir=corpus)
    sens = measure(lm.model, layout, tokens, cands, group_size=group_size, progress=progress)
    sens["calibration"] = source
    cfg = plan_refined(lm, sens, layout, identity, tokens, target_bits=target_bits, candidates=cands,
                       group_size=group_size)
    held, held_source = text_windows(lm.tokenizer, n_samples=heldout_samples or samples, seq_len=seq_len,
                                     split="heldout", corpus_dir=corpus)
    cfg["measured_kl"] = {**evaluate(lm, cfg, held), "split": "heldout", "corpus": held_source["corpus"]}
    kvconfig.validate(cfg)
    out = None
    if write:
        out = Path(output) if output is not None else Path(lm.path) / "kv_config.json"
        kvconfig.save(cfg, out)
    return {"output": str(out) if out else None, "model": lm.name, "path": str(lm.path), "config": cfg,
            "seconds": round(time.time() - t0, 3)}
