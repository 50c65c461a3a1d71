"""Measured mixed-precision KV cache: sensitivity per attention layer (K and V apart), an exact byte
allocation, a versioned kv_config.json bound to its model, and the runtime cache list.

    from mixq.kvcache import make_cache
    cache = make_cache(model, "path/to/kv_config.json")       # per-slot list for mlx-lm's generate
    mlx_lm.generate(model, tokenizer, prompt, prompt_cache=cache)

Imports mixq.core only (import-linter contract).
"""

from __future__ import annotations

from typing import Any

from mixq.kvcache.cache import (FLOAT_BITS, MixedKVCache, fork, kv_bytes, load_prompt_cache,
                                part_bytes_per_token, save_prompt_cache)

__all__ = ["make_cache", "MixedKVCache", "FLOAT_BITS", "fork", "kv_bytes", "load_prompt_cache",
           "save_prompt_cache", "part_bytes_per_token", "load_config", "uniform_config", "build_kv_config"]


def make_cache(model, kv_config: Any = None, quantize_after: int = 0) -> list:
    """The model's per-slot cache list, with a MixedKVCache on every attention slot the config names.

    `model` is an mlx-lm model or a mixq LoadedModel (then the config's weight fingerprint is checked
    too). `kv_config` is None (the model's own float caches), a config dict, a kv_config.json path, or a
    model directory holding one. Mamba / other slots are the model's own, untouched. A config made for
    another model (type, layer pattern, cache-slot map, fingerprint) is refused with MixqError.
    `quantize_after`: keep the cache float until it holds this many tokens (0: quantize from the start).
    """
    from mlx_lm.models.cache import KVCache

    from mixq.core.anatomy import make_cache as base_cache
    from mixq.core.errors import MixqError
    from mixq.kvcache import config as kvconfig

    net, cfg_dict, path = kvconfig.unwrap(model)
    if kv_config is None:
        return base_cache(net)
    cfg = kvconfig.load(kv_config)
    kvconfig.check(cfg, kvconfig.model_identity(net, cfg_dict, path))
    caches = base_cache(net)
    for e in cfg["layers"]:
        slot = e["cache_slot"]
        if type(caches[slot]) is not KVCache:
            raise MixqError(f"layer {e['layer']}: cache slot {slot} is a {type(caches[slot]).__name__}, not a KV cache")
        caches[slot] = MixedKVCache(e["k_bits"], e["v_bits"], cfg["group_size"], quantize_after,
                                    expect={"k": e["k_shape"], "v": e["v_shape"]})
    return caches


def load_config(source: Any) -> dict:
    """A validated kv config from a dict, a kv_config.json path or a model directory."""
    from mixq.kvcache import config as kvconfig

    return kvconfig.load(source)


def uniform_config(model, k_bits: int, v_bits: int | None = None, *, group_size: int = 64,
                   scale_bits: int = 16) -> dict:
    """A config with the same bits on every attention layer (for baselines)."""
    from mixq.core.anatomy import describe
    from mixq.kvcache import config as kvconfig
    from mixq.kvcache.config import _config_from_model
    from mixq.kvcache.policy import uniform

    net, cfg_dict, path = kvconfig.unwrap(model)
    anatomy = describe(net, cfg_dict or _config_from_model(net))
    layout = kvconfig.attention_layout(net, anatomy)
    identity = kvconfig.model_identity(net, cfg_dict, path, anatomy=anatomy)
    v_bits = k_bits if v_bits is None else v_bits
    name = getattr(model, "name", None) if net is not model else None
    return kvconfig.build(identity, layout, uniform(layout, k_bits, v_bits), group_size=group_size,
                          scale_bits=scale_bits, name=name, extra={"policy": f"uniform k{k_bits} v{v_bits}"})


def build_kv_config(*args, **kwargs) -> dict:
    """See mixq.kvcache.build.build_kv_config."""
    from mixq.kvcache.build import build_kv_config as _build

    return _build(*args, **kwargs)
