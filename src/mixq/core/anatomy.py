"""Model anatomy: every layer (index, kind, cache slot) and every tensor (shape, params, quantizable).

Layer kinds come from `hybrid_override_pattern` / `layers_block_type` for nemotron_h (the config is the
truth, and it is cross-checked against the built modules), and from module types elsewhere. Only
attention layers carry a KV cache and SSM layers a recurrent state; MLP/MoE layers carry nothing, so the
cache-slot map (layer index -> position in `model.make_cache()`) is derived, never assumed.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from mixq.core.errors import MixqError
from mixq.core.rules import float_reason

PATTERN_CHARS = {"M": "ssm", "*": "attention", "-": "mlp", "E": "moe"}
BLOCK_TYPE_CHARS = {
    "full_attention": "*", "attention": "*", "linear_attention": "M", "mamba": "M", "conv": "M",
    "mlp": "-", "moe": "E",
}
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class TensorInfo:
    path: str              # parameter path, e.g. backbone.layers.3.mixer.q_proj.weight
    module: str            # owning module path (the key mlx-lm uses in config "quantization")
    module_type: str
    layer: int | None
    shape: list[int]       # logical (unpacked) shape
    params: int
    dtype: str
    quantizable: bool
    reason: str | None     # why it stays float, when not quantizable
    current: dict | None = None  # existing quantization: bits, group_size, mode
    float_by_rule: bool = False  # a hard rule (mixq.core.rules) keeps it float at every group size


@dataclass
class LayerInfo:
    index: int
    kind: str              # attention | ssm | mlp | moe
    parts: list[str]
    cache_slot: int | None
    cache_type: str | None
    params: int = 0
    quantizable_params: int = 0
    tensors: list[str] = field(default_factory=list)


@dataclass
class Anatomy:
    model_type: str
    pattern: str | None
    group_size: int
    layers: list[LayerInfo]
    tensors: list[TensorInfo]
    total_params: int
    quantizable_params: int
    # mlx-lm's compute_bits_per_weight divides by this: it counts leaf modules only, so parameters held
    # directly by a composite module (Mamba's A_log, D, dt_bias) are in its bytes but not its params
    mlx_lm_params: int = 0
    top_k: int = 1         # routed experts per token (1 without experts)

    def cache_slots(self) -> dict[int, int | None]:
        return {l.index: l.cache_slot for l in self.layers}

    def tensor(self, path: str) -> TensorInfo:
        for t in self.tensors:
            if t.path == path:
                return t
        raise KeyError(path)

    def to_dict(self) -> dict:
        return asdict(self)


def _layer_pattern(config: dict) -> str | None:
    cfg = config.get("text_config", config) if "hybrid_override_pattern" not in config else config
    pat = cfg.get("hybrid_override_pattern")
    if pat is not None:
        pat = "".join(pat)
    else:
        types = cfg.get("layers_block_type") or cfg.get("layer_types")
        if types is None:
            return None
        unknown = sorted(set(types) - BLOCK_TYPE_CHARS.keys())
        if unknown:
            raise MixqError(f"unknown layers_block_type entries: {unknown}")
        pat = "".join(BLOCK_TYPE_CHARS[t] for t in types)
    bad = sorted(set(pat) - PATTERN_CHARS.keys())
    if bad:
        raise MixqError(f"hybrid_override_pattern has unknown letters {bad} (expected M, *, -, E)")
    return pat


def _parts_from_modules(layer) -> list[str]:
    parts = []
    for name, m in layer.named_modules():
        cls = type(m).__name__
        low = cls.lower()
        if hasattr(m, "A_log") or "mamba" in low or "gateddelta" in low or "ssm" in low:
            parts.append("ssm")
        elif "attention" in low:
            parts.append("attention")
        elif cls.startswith(("Switch", "QuantizedSwitch")) or "moe" in low or "sparse" in low:
            parts.append("moe")
        elif "mlp" in low or "feedforward" in low:
            parts.append("mlp")
    seen = []
    for p in parts:
        if p not in seen:
            seen.append(p)
    if "moe" in seen and "mlp" in seen:
        seen.remove("mlp")  # shared expert MLP inside a MoE block
    order = ("attention", "ssm", "moe", "mlp")
    return sorted(seen, key=order.index)


def _kind(parts: list[str]) -> str:
    for k in ("attention", "ssm", "moe", "mlp"):
        if k in parts:
            return k
    raise MixqError(f"cannot tell the kind of a layer made of {parts or 'nothing recognisable'}")


def model_layers(model) -> list:
    layers = getattr(model, "layers", None)
    if layers is None:
        inner = getattr(model, "model", None) or getattr(model, "backbone", None)
        layers = getattr(inner, "layers", None)
    if layers is None:
        raise MixqError(f"{type(model).__name__}: no layer list found")
    return list(layers)


def make_cache(model) -> list:
    if hasattr(model, "make_cache"):
        return model.make_cache()
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model=model)


def _cache_map(kinds: list[str], caches: list) -> list[int | None]:
    if len(caches) == len(kinds):
        return list(range(len(kinds)))
    carrying = [i for i, k in enumerate(kinds) if k in ("attention", "ssm")]
    if len(carrying) != len(caches):
        raise MixqError(f"make_cache() returned {len(caches)} caches for {len(carrying)} attention/SSM layers")
    slots: list[int | None] = [None] * len(kinds)
    for slot, i in enumerate(carrying):
        slots[i] = slot
    return slots


def _module_index(model) -> dict:
    return {name: m for name, m in model.named_modules()}


def _tensor_infos(model, group_size: int) -> list[TensorInfo]:
    from mlx.utils import tree_flatten

    modules = _module_index(model)
    out = []
    for path, arr in tree_flatten(model.parameters()):
        module_path, param = path.rsplit(".", 1) if "." in path else ("", path)
        module = modules.get(module_path, model)
        qbits = getattr(module, "bits", None)
        if qbits is not None and param in ("scales", "biases"):
            continue  # folded into the quantized weight's entry
        if qbits is not None and param == "global_scale":
            continue
        shape = list(arr.shape)
        current = None
        if qbits is not None and param == "weight":
            shape[-1] = shape[-1] * 32 // qbits
            current = {"bits": qbits, "group_size": module.group_size, "mode": getattr(module, "mode", "affine")}
        params = 1
        for s in shape:
            params *= s
        reason = float_reason(path, module, module_path, param, len(shape))
        by_rule = reason is not None
        if reason is None and current is None and shape[-1] % group_size:
            reason = f"input width {shape[-1]} not divisible by group size {group_size}"
        m = LAYER_RE.search(path)
        out.append(TensorInfo(
            path=path, module=module_path, module_type=type(module).__name__,
            layer=int(m.group(1)) if m else None, shape=shape, params=params, dtype=str(arr.dtype).split(".")[-1],
            quantizable=reason is None, reason=reason, current=current, float_by_rule=by_rule,
        ))
    return out


def describe(model, config: dict, group_size: int = 64) -> Anatomy:
    """The anatomy of a loaded mlx-lm model. `group_size` decides the width-divisibility rule."""
    from mlx_lm.utils import get_total_parameters

    layers = model_layers(model)
    model_type = config.get("model_type") or config.get("text_config", {}).get("model_type", "?")
    pattern = _layer_pattern(config) if model_type.startswith("nemotron_h") else None
    parts_list = [_parts_from_modules(l) for l in layers]
    if pattern is not None:
        if len(pattern) != len(layers):
            raise MixqError(f"layer pattern has {len(pattern)} letters but the model has {len(layers)} layers")
        kinds = [PATTERN_CHARS[c] for c in pattern]
        for i, (k, l) in enumerate(zip(kinds, layers)):
            built = getattr(l, "block_type", None)
            if built is not None and PATTERN_CHARS.get(built) != k:
                raise MixqError(f"layer {i}: config says {k}, model built {PATTERN_CHARS.get(built)}")
        parts_list = [[k] for k in kinds]
    else:
        kinds = [_kind(p) for p in parts_list]
    caches = make_cache(model)
    slots = _cache_map(kinds, caches)
    infos = [
        LayerInfo(index=i, kind=k, parts=p, cache_slot=s,
                  cache_type=type(caches[s]).__name__ if s is not None else None)
        for i, (k, p, s) in enumerate(zip(kinds, parts_list, slots))
    ]
    tensors = _tensor_infos(model, group_size)
    for t in tensors:
        if t.layer is not None and t.layer < len(infos):
            li = infos[t.layer]
            li.params += t.params
            li.quantizable_params += t.params if t.quantizable else 0
            li.tensors.append(t.path)
    return Anatomy(
        model_type=model_type, pattern=pattern, group_size=group_size, layers=infos, tensors=tensors,
        total_params=sum(t.params for t in tensors),
        quantizable_params=sum(t.params for t in tensors if t.quantizable),
        mlx_lm_params=get_total_parameters(model),
        top_k=int(config.get("num_experts_per_tok") or config.get("text_config", {}).get("num_experts_per_tok") or 1),
    )
