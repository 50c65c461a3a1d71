"""kv_config.json: which bits every attention layer's keys and values get, and which model it is for.

The file is versioned (`format` tag + `version`) and names its model by model_type, layer pattern (one
letter per layer: M ssm, * attention, - mlp, E moe), the attention layer -> cache slot map and a
fingerprint of config.json + the weight files' headers (`mixq.core.modelio.fingerprint`). Using a config
with a model it was not made for is refused with one line saying what differs.

Layer entries are keyed by layer index *and* cache slot: on hybrids (Mamba + attention + MLP/MoE) the
two differ, and the runtime places each entry on its slot, checked against the model's own map.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mixq.core.anatomy import PATTERN_CHARS, describe
from mixq.core.errors import MixqError
from mixq.kvcache.cache import ALL_BITS, GROUP_SIZES, effective_group_size

FORMAT = "mixq-kv-config"
VERSION = 1
KIND_CHARS = {v: k for k, v in PATTERN_CHARS.items()}  # attention -> *, ssm -> M, ...


def _config_from_model(model) -> dict:
    """A config-like dict from a built mlx-lm model (its ModelArgs), enough for anatomy.describe."""
    args = getattr(model, "args", None)
    cfg = dict(vars(args)) if args is not None and hasattr(args, "__dict__") else {}
    cfg.setdefault("model_type", getattr(model, "model_type", None) or type(model).__module__.rsplit(".", 1)[-1])
    return cfg


def unwrap(model) -> tuple[Any, dict | None, Path | None]:
    """(mlx model, config dict or None, model dir or None) from a LoadedModel or a bare model."""
    if hasattr(model, "model") and hasattr(model, "tokenizer") and hasattr(model, "path"):
        return model.model, model.config, Path(model.path)
    return model, None, None


def model_identity(model, config: dict | None = None, path: str | os.PathLike | None = None,
                   anatomy=None) -> dict:
    """What a kv config records about its model (and what is compared when one is used)."""
    from mixq.core.modelio import fingerprint

    anatomy = anatomy or describe(model, config or _config_from_model(model))
    return {
        "model_type": anatomy.model_type,
        "layer_pattern": "".join(KIND_CHARS[l.kind] for l in anatomy.layers),
        "num_layers": len(anatomy.layers),
        "num_cache_slots": sum(l.cache_slot is not None for l in anatomy.layers),
        "attention_slots": {str(l.index): l.cache_slot for l in anatomy.layers if l.kind == "attention"},
        "fingerprint": fingerprint(Path(path)) if path is not None else None,
    }


def attention_layout(model, anatomy) -> list[dict]:
    """Every attention layer with a plain KV cache slot: layer, slot and K / V (heads, head_dim).

    The shapes come from the model itself: one 2-token forward with a float cache.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from mixq.core.anatomy import make_cache as base_cache

    caches = base_cache(model)
    model(mx.array([[1, 2]], dtype=mx.int32), cache=caches)
    out = []
    for l in anatomy.layers:
        if l.kind != "attention" or l.cache_slot is None:
            continue
        c = caches[l.cache_slot]
        if type(c) is not KVCache or c.keys is None:
            continue  # sliding-window / other cache types stay as the model makes them
        out.append({"layer": l.index, "cache_slot": l.cache_slot, "kind": l.kind,
                    "k_shape": [int(c.keys.shape[1]), int(c.keys.shape[3])],
                    "v_shape": [int(c.values.shape[1]), int(c.values.shape[3])]})
    if not out:
        raise MixqError("this model has no attention layer with a KV cache to quantize")
    return out


def build(identity: dict, layout: list[dict], bits: dict[int, tuple[int, int]], *, group_size: int,
          scale_bits: int = 16, name: str | None = None, extra: dict | None = None) -> dict:
    """A config dict: `bits` maps layer index -> (k_bits, v_bits); `extra` adds top-level fields."""
    from mixq import __version__
    from mixq.kvcache.cache import part_bytes_per_token

    layers = []
    for e in layout:
        kb, vb = bits[e["layer"]]
        (kh, kd), (vh, vd) = e["k_shape"], e["v_shape"]
        layers.append({
            "layer": e["layer"], "cache_slot": e["cache_slot"], "kind": e.get("kind", "attention"),
            "k_bits": int(kb), "v_bits": int(vb),
            "k_shape": [kh, kd], "v_shape": [vh, vd],
            "k_group_size": effective_group_size(kh, kd, group_size),
            "v_group_size": effective_group_size(vh, vd, group_size),
            "bytes_per_token": part_bytes_per_token(kh, kd, kb, group_size, scale_bits)
            + part_bytes_per_token(vh, vd, vb, group_size, scale_bits),
            **({"sensitivity": e["sensitivity"]} if "sensitivity" in e else {}),
        })
    elements = sum(e["k_shape"][0] * e["k_shape"][1] + e["v_shape"][0] * e["v_shape"][1] for e in layout)
    nbytes = sum(l["bytes_per_token"] for l in layers)
    cfg = {
        "format": FORMAT,
        "version": VERSION,
        "created_by": f"mixq {__version__}",
        "model": {"name": name, **identity},
        "group_size": group_size,
        "scale_bits": scale_bits,
        "bytes_per_token": nbytes,
        "float16_bytes_per_token": elements * 2,
        "achieved_bits": round(8 * nbytes / elements, 6),
        **(extra or {}),
        "layers": layers,
    }
    return validate(cfg, "kv config")


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise MixqError(f"{where}: {what}")


def validate(cfg: Any, where: str = "kv config") -> dict:
    """Check a config dict's format, version and fields; returns it."""
    _need(isinstance(cfg, dict), where, "not a JSON object")
    _need(cfg.get("format") == FORMAT, where, f"not a mixq kv config (format {cfg.get('format')!r}, expected {FORMAT!r})")
    v = cfg.get("version")
    _need(isinstance(v, int), where, f"version {v!r} is not an integer")
    _need(v <= VERSION, where, f"version {v} was written by a newer mixq (this one reads up to {VERSION})")
    _need(isinstance(cfg.get("model"), dict), where, "no model section")
    _need(cfg.get("group_size") in GROUP_SIZES, where, f"group_size {cfg.get('group_size')!r} not in {GROUP_SIZES}")
    layers = cfg.get("layers")
    _need(isinstance(layers, list) and layers, where, "no layers")
    seen_l, seen_s = set(), set()
    for e in layers:
        _need(isinstance(e, dict), where, "a layer entry is not an object")
        for key in ("layer", "cache_slot"):
            _need(isinstance(e.get(key), int) and e[key] >= 0, where, f"layer entry {e.get('layer')!r}: bad {key}")
        for key in ("k_bits", "v_bits"):
            _need(e.get(key) in ALL_BITS, where, f"layer {e['layer']}: {key} {e.get(key)!r} not in {ALL_BITS}")
        for key in ("k_shape", "v_shape"):
            s = e.get(key)
            _need(isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) and x > 0 for x in s),
                  where, f"layer {e['layer']}: bad {key} {s!r}")
        _need(e["layer"] not in seen_l and e["cache_slot"] not in seen_s, where,
              f"layer {e['layer']} / cache slot {e['cache_slot']} listed twice")
        seen_l.add(e["layer"])
        seen_s.add(e["cache_slot"])
    return cfg


def load(source: Any) -> dict:
    """A validated config from a dict, a JSON file path, or a model directory holding kv_config.json."""
    if isinstance(source, dict):
        return validate(source)
    path = Path(source)
    if path.is_dir():
        path = path / "kv_config.json"
    from mixq.core.jsonfile import read_json

    return validate(read_json(path, missing=f"{source}: no such kv config file"), str(path))


def save(cfg: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(validate(cfg), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def check(cfg: dict, identity: dict) -> None:
    """Refuse a config made for another model: one line naming the first thing that differs."""
    made = cfg["model"]
    who = made.get("name") or made.get("model_type")
    for key in ("model_type", "layer_pattern", "num_cache_slots", "attention_slots"):
        if key in made and made[key] != identity.get(key):
            raise MixqError(f"this kv config was made for another model ({who}): {key} is {made[key]!r} there, "
                            f"{identity.get(key)!r} here")
    fp, here = made.get("fingerprint"), identity.get("fingerprint")
    if fp and here and fp != here:
        raise MixqError(f"this kv config was made for another model ({who}): fingerprint {fp[:12]} there, "
                        f"{here[:12]} here")
    slots = identity.get("attention_slots", {})
    for e in cfg["layers"]:
        if slots.get(str(e["layer"])) != e["cache_slot"]:
            raise MixqError(f"this kv config was made for another model ({who}): layer {e['layer']} is cache slot "
                            f"{e['cache_slot']} there, {slots.get(str(e['layer']))!r} here")
