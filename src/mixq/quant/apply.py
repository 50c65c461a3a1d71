"""Apply a plan: fake-quant in place for measurement, real quantization for writing, and verification.

Writing goes through mlx's own `nn.quantize` with a per-path predicate and records every quantized
module in config.json "quantization" (mlx-lm's per-path format), so stock `mlx_lm.load` rebuilds exactly
the planned layers. `verify` reloads the written model with `mlx_lm.load` and checks every module and the
bits per weight against the plan.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

from mixq.core.errors import MixqError
from mixq.core.formats import Format
from mixq.quant.gptq import RTN, Rounding

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


def _param(modules: dict, path: str):
    module_path, name = path.rsplit(".", 1)
    return modules[module_path], name


@contextmanager
def fake_quantized(model, formats: dict[str, Format], source_dtypes: dict, rounding: Rounding = RTN):
    """Within the block, each tensor in `formats` holds its quantize->dequantize value (compute dtype)."""
    import mlx.core as mx

    modules = dict(model.named_modules())
    saved = {}
    try:
        for path, fmt in formats.items():
            if not fmt.is_quantized:
                continue
            module, name = _param(modules, path)
            w = getattr(module, name)
            saved[path] = w
            src = getattr(mx, source_dtypes.get(path, str(w.dtype).rsplit(".", 1)[-1]))
            setattr(module, name, rounding.qdq(path, w.astype(src), fmt, keep=True).astype(w.dtype))
        mx.eval(model.parameters())
        yield model
    finally:
        for path, w in saved.items():
            module, name = _param(modules, path)
            setattr(module, name, w)


def quantize_in_place(model, config: dict, plan: dict, rounding: Rounding = RTN) -> dict:
    """Quantize `model` (stored dtypes) as planned; returns the config with per-path quantization.

    mlx's `nn.quantize` builds the quantized layers (round-to-nearest); tensors the plan rounds with GPTQ
    then get their packed weight, scales and biases replaced by the GPTQ solution, same shapes and dtypes.
    """
    import mlx.nn as nn

    entries = {}
    for e in plan["tensors"].values():
        fmt = Format.parse(e["format"])
        if fmt.is_quantized:
            entries[e["module"]] = fmt.config_entry()

    def predicate(path, module):
        return entries.get(path, False)

    modules = dict(model.named_modules())
    originals = {}
    for path, e in plan["tensors"].items():
        fmt = Format.parse(e["format"])
        if e.get("rounding") == "gptq":
            if not rounding.uses_gptq(path, fmt):
                raise MixqError(f"{path}: the plan rounds it with GPTQ but no Hessian was collected for it")
            module, name = _param(modules, path)
            originals[path] = getattr(module, name)
    nn.quantize(model, group_size=64, bits=4, mode="affine", class_predicate=predicate)
    modules = dict(model.named_modules())
    for path, w in originals.items():
        fmt = Format.parse(plan["tensors"][path]["format"])
        wq, scales, biases = rounding.quantized(path, w, fmt)
        module, _ = _param(modules, path)
        if module.weight.shape != wq.shape or module.scales.shape != scales.shape:
            raise MixqError(f"{path}: GPTQ arrays do not match the quantized layer's shapes")
        module.weight, module.scales, module.biases = wq, scales.astype(module.scales.dtype), \
            biases.astype(module.biases.dtype)
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    quant = {"group_size": 64, "bits": 4, "mode": "affine", **dict(sorted(entries.items()))}
    config["quantization"] = quant
    config["quantization_config"] = quant
    return config


def write_model(model, config: dict, src_dir: Path, out_dir: Path) -> None:
    """Weights in mlx-lm layout, config.json, tokenizer files copied unchanged."""
    from mlx_lm.utils import save_config, save_model

    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(save_path=out_dir, model=model)
    save_config(config=dict(config), config_path=out_dir / "config.json")
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, out_dir / name)


def verify(out_dir: Path, plan: dict) -> dict:
    """Reload with stock mlx_lm.load; every planned module and the bpw must match. Raises MixqError."""
    import mlx.core as mx
    from mlx_lm import load as lm_load
    from mlx_lm.utils import compute_bits_per_weight

    try:
        model, _ = lm_load(path_or_hf_repo=str(out_dir), lazy=True)
    except Exception as e:
        raise MixqError(f"verification failed: mlx_lm.load cannot read {out_dir}: {e}") from e
    modules = dict(model.named_modules())
    problems = []
    for path, e in plan["tensors"].items():
        fmt = Format.parse(e["format"])
        m = modules.get(e["module"])
        if m is None:
            problems.append(f"{e['module']}: missing")
            continue
        got = Format(getattr(m, "mode", "affine"), m.bits, m.group_size) if hasattr(m, "bits") else Format("float")
        if got != fmt:
            problems.append(f"{e['module']}: planned {fmt}, loaded {got}")
    from mlx.utils import tree_flatten

    total_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    bpw = compute_bits_per_weight(model)
    if total_bytes != plan["total_bytes"]:
        problems.append(f"model bytes {total_bytes} != planned {plan['total_bytes']}")
    if abs(bpw - plan["achieved_bpw"]) > 1e-9 * plan["achieved_bpw"]:
        problems.append(f"bpw {bpw:.6f} != planned {plan['achieved_bpw']:.6f}")
    if bpw > plan["target_bpw"] + 1e-12:
        problems.append(f"bpw {bpw:.6f} above the target {plan['target_bpw']}")
    if problems:
        shown = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
        raise MixqError(f"verification failed for {out_dir}: {shown}")
    del model
    mx.clear_cache()
    return {"ok": True, "bpw": bpw, "total_bytes": total_bytes, "modules_checked": len(plan["tensors"])}


def load_plan(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MixqError(f"{path}: cannot read plan ({e})") from e
