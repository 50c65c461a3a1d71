"""Writing a plan: the quantized model's exact tensor layout up front, then tensor by tensor into shards.

The layout (every array's name, shape and dtype, as `nn.quantize` would build them) follows from the plan
alone, so the shards' headers are written before any tensor is rounded, and each rounded tensor goes to
disk as soon as the sweep that rounds it has it (no second copy of the model, no second load). config.json
records each quantized module in mlx-lm's per-path "quantization" entries, so stock `mlx_lm.load` rebuilds
exactly the planned layers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mixq.core.formats import Format
from mixq.core.stwriter import MLX_SHARD_BYTES, ShardWriter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


def quantized_layout(path: str, shape, fmt: Format, src_dtype: str) -> list:
    """(name, shape, dtype) of the arrays a quantized layer holds for weight `path` (module.weight)."""
    module = path.rsplit(".", 1)[0]
    lead, cols = tuple(shape[:-1]), int(shape[-1])
    out = [(f"{module}.weight", (*lead, cols * fmt.bits // 32), "uint32")]
    groups = (*lead, cols // fmt.group_size)
    if fmt.mode == "affine":
        out += [(f"{module}.scales", groups, src_dtype), (f"{module}.biases", groups, src_dtype)]
    else:
        out.append((f"{module}.scales", groups, "uint8"))
    return out


def model_layout(anatomy, formats: dict, source_dtypes: dict) -> list:
    """Every array of the written model: quantized tensors as their packed arrays, the rest as stored."""
    layout = []
    for t in anatomy.tensors:
        fmt = formats.get(t.path)
        src = source_dtypes.get(t.path, t.dtype)
        if fmt is not None and fmt.is_quantized:
            layout += quantized_layout(t.path, t.shape, fmt, src)
        else:
            layout.append((t.path, tuple(t.shape), src))
    return layout


def quantization_config(config: dict, formats: dict, anatomy) -> dict:
    """config.json with mlx-lm's per-path "quantization" entries for the quantized modules."""
    modules = {t.path: t.module for t in anatomy.tensors}
    entries = {modules[p]: f.config_entry() for p, f in formats.items() if f.is_quantized}
    out = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    quant = {"group_size": 64, "bits": 4, "mode": "affine", **dict(sorted(entries.items()))}
    out["quantization"] = quant
    out["quantization_config"] = quant
    return out


class PlanWriter:
    """Receives the plan's rounded tensors (any order) and the untouched ones; closes into a model dir."""

    def __init__(self, out_dir: Path, anatomy, formats: dict, source_dtypes: dict, *,
                 max_shard_bytes: int = MLX_SHARD_BYTES):
        self.out = Path(out_dir)
        self.formats = {p: f for p, f in formats.items() if f.is_quantized}
        self.layout = model_layout(anatomy, self.formats, source_dtypes)
        self.writer = ShardWriter(self.out, self.layout, max_shard_bytes=max_shard_bytes,
                                  total_parameters=anatomy.mlx_lm_params)
        self.plain = [t.path for t in anatomy.tensors if t.path not in self.formats]

    def put_quantized(self, path: str, q) -> None:
        module = path.rsplit(".", 1)[0]
        if path not in self.formats or q.fmt != self.formats[path]:
            return  # another stream's rounding of this tensor
        for name, arr in q.arrays().items():
            self.writer.put(f"{module}.{name}", arr)

    def put_plain(self, name: str, array) -> None:
        if name not in self.writer.written:
            self.writer.put(name, array)

    def missing_plain(self) -> list:
        return [p for p in self.plain if p not in self.writer.written]

    @property
    def bytes(self) -> int:
        return self.writer.total

    def close(self, config: dict, src_dir: Path) -> None:
        from mlx_lm.utils import save_config

        self.writer.close()
        save_config(config=dict(config), config_path=self.out / "config.json")
        for name in TOKENIZER_FILES:
            if (Path(src_dir) / name).is_file():
                shutil.copy2(Path(src_dir) / name, self.out / name)

    def abort(self) -> None:
        self.writer.abort()
