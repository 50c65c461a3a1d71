"""Quantization formats and exact byte accounting, matching what mlx actually stores.

A `Format` is one way to store a weight: affine integer quantization ("4:64" = 4 bits, groups of 64),
one of mlx's microscaled float formats ("mxfp4", "nvfp4", "mxfp8"), or "float" (keep the model's
source dtype). The mixed-precision search prices every candidate format per tensor with
`tensor_bytes`, so the numbers here must equal the `nbytes` of the arrays `mx.quantize` /
`nn.quantize` create (tests check this against mlx and against mlx_lm's bits-per-weight):

  affine   packed uint32 weight (bits/8 bytes per element) + scales + biases, one each per group,
           both in the source dtype (bf16/fp16: 2 bytes, fp32: 4 bytes)
  mxfp4    packed weight (4 bits) + one uint8 (e8m0) scale per 32 elements, no biases
  nvfp4    packed weight (4 bits) + one uint8 (e4m3) scale per 16 elements, no biases
  mxfp8    packed weight (8 bits) + one uint8 (e8m0) scale per 32 elements, no biases

A layer's float bias (if any) is not part of the weight's bytes: it stays in the source dtype whatever
the format. mlx_lm's optional nvfp4 `global_scale` (switch layers only, 4 bytes per expert) is not
modelled; mixq never asks for it.

mlx is imported lazily so this module can be imported before mlx loads (see mixq.core.blas).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from mixq.core.blas import numpy_on_cpu
from mixq.core.errors import MixqError
from mixq.core.fp4 import GROUPS as _FP4_GROUPS, quantize_fp4

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)
DEFAULT_AFFINE_GROUP = 64
# mode -> (bits, group_size, bytes per scale); mlx accepts exactly this one pair per mode.
MICROSCALED = {"mxfp4": (4, 32, 1), "nvfp4": (4, 16, 1), "mxfp8": (8, 32, 1)}
MODES = ("affine", *MICROSCALED, "float")

_ITEMSIZE = {
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "f16": 2,
    "float32": 4, "fp32": 4, "f32": 4,
}


@dataclass(frozen=True, order=False)
class Format:
    """One storage format for a weight. Build with `Format.parse("4:64")` or the constructors."""

    mode: str
    bits: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.mode == "affine":
            if self.bits not in AFFINE_BITS:
                raise MixqError(f"affine bits must be one of {_join(AFFINE_BITS)}, got {self.bits}")
            if self.group_size not in AFFINE_GROUPS:
                raise MixqError(f"affine group size must be one of {_join(AFFINE_GROUPS)}, "
                                f"got {self.group_size}")
        elif self.mode in MICROSCALED:
            bits, group, _ = MICROSCALED[self.mode]
            # Allow Format("mxfp4") as a shorthand; anything else must be mlx's one valid pair.
            if self.bits is None and self.group_size is None:
                object.__setattr__(self, "bits", bits)
                object.__setattr__(self, "group_size", group)
            elif (self.bits, self.group_size) != (bits, group):
                raise MixqError(f"{self.mode} needs bits={bits} and group size {group}, "
                                f"got bits={self.bits} group size {self.group_size}")
        elif self.mode == "float":
            if self.bits is not None or self.group_size is not None:
                raise MixqError("float format takes no bits or group size (it keeps the source dtype)")
        else:
            raise MixqError(f"unknown quantization mode {self.mode!r}; expected one of {', '.join(MODES)}")

    # -- construction and spelling -------------------------------------------------------------
    @classmethod
    def affine(cls, bits: int, group_size: int = DEFAULT_AFFINE_GROUP) -> "Format":
        return cls("affine", bits, group_size)

    @classmethod
    def parse(cls, spec: str) -> "Format":
        """Parse the CLI spelling: "4:64", "4" (group 64), "mxfp4", "nvfp4", "mxfp8", "float"."""
        if not isinstance(spec, str):
            raise MixqError(f"format must be a string, got {spec!r}")
        s = spec.strip().lower()
        if s in MICROSCALED:
            return cls(s)
        if s == "float":
            return cls("float")
        if s in _ITEMSIZE or s in ("f64", "float64", "fp8"):
            raise MixqError(f"bad format {spec!r}: use 'float' to keep a tensor at the model's source dtype")
        parts = s.split(":")
        if parts[0] in MICROSCALED:
            bits, group, _ = MICROSCALED[parts[0]]
            raise MixqError(f"bad format {spec!r}: {parts[0]} always uses {bits} bits in groups of {group}; "
                            f"write just '{parts[0]}'")
        if s.startswith("affine:"):
            parts = parts[1:]
        if 1 <= len(parts) <= 2 and all(p.strip().isdigit() for p in parts):
            bits = int(parts[0])
            group = int(parts[1]) if len(parts) == 2 else DEFAULT_AFFINE_GROUP
            try:
                return cls("affine", bits, group)
            except MixqError as e:
                raise MixqError(f"bad format {spec!r}: {e}") from None
        raise MixqError(f"bad format {spec!r}: expected BITS:GROUP (e.g. 4:64), mxfp4, nvfp4, mxfp8 or float")

    def __str__(self) -> str:
        if self.mode == "affine":
            return f"{self.bits}:{self.group_size}"
        return self.mode

    @property
    def name(self) -> str:
        return str(self)

    @property
    def is_quantized(self) -> bool:
        return self.mode != "float"

    # -- what mlx / mlx-lm want ------------------------------------------------------------------
    def quant_kwargs(self) -> dict[str, Any]:
        """Keyword args for `mx.quantize`, `mx.dequantize`, `nn.quantize` and `Module.to_quantized`."""
        if not self.is_quantized:
            raise ValueError("the float format is not quantized; it has no quantize arguments")
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def config_entry(self) -> dict[str, Any] | bool:
        """The per-path value for config.json "quantization" (what mlx_lm's loader reads back).

        Float paths give False: mlx_lm's loader returns that value from its class predicate, so the
        module stays unquantized (mlx_lm itself just omits such paths; False is equivalent).
        """
        return self.quant_kwargs() if self.is_quantized else False

    @classmethod
    def from_config_entry(cls, entry: Any) -> "Format":
        """Inverse of `config_entry` (a False/None entry means float; mode defaults to affine)."""
        if entry is False or entry is None:
            return cls("float")
        if not isinstance(entry, dict):
            raise MixqError(f"bad quantization config entry {entry!r}")
        return cls(entry.get("mode", "affine"), entry.get("bits"), entry.get("group_size"))


def parse_candidates(spec: str | Iterable[str]) -> list[Format]:
    """"3:32,4:64,mxfp4" (or a list of such strings) -> formats, in order, duplicates dropped."""
    if isinstance(spec, str) and spec.strip() == "all":
        spec = ALL_CANDIDATES_SPEC
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[Format] = []
    for item in items:
        if isinstance(item, Format):
            fmt = item
        elif not str(item).strip():
            continue
        else:
            fmt = Format.parse(str(item))
        if fmt not in out:
            out.append(fmt)
    if not out:
        raise MixqError(f"no quantization formats in {spec!r}")
    return out


# Spread from ~2.5 to 16 bits per weight (bf16 source) so the knapsack has a step at most budgets,
# with both affine and the float4 formats at the ~4.25-4.5 bpw sweet spot, where choices matter most.
# 4:32 (5.0), 3:32 (4.0) and mxfp8 (8.25, coarser than 8:64) are left out to keep measurement cheap.
# "all": every format mlx can store (slower to measure, ~2x the default; finer size/quality steps)
ALL_CANDIDATES_SPEC = ",".join([f"{b}:{g}" for b in AFFINE_BITS for g in AFFINE_GROUPS] + ["mxfp4", "nvfp4", "mxfp8", "float"])
DEFAULT_CANDIDATES: list[Format] = parse_candidates("2:64,3:64,4:128,4:64,mxfp4,nvfp4,5:64,6:64,8:64,float")


# -- byte accounting -----------------------------------------------------------------------------
def dtype_itemsize(dtype: Any) -> int:
    """Bytes per element of a float dtype given as an mlx/numpy dtype or a name ("bfloat16", "f32")."""
    if not isinstance(dtype, str):
        if type(dtype).__module__.startswith("mlx"):
            dtype = str(dtype)  # "mlx.core.bfloat16"
        else:
            try:
                dtype = np.dtype(dtype).name
            except TypeError:
                dtype = str(dtype)
    key = dtype.strip().lower().rsplit(".", 1)[-1]
    if key not in _ITEMSIZE:
        raise MixqError(f"unsupported source dtype {dtype!r}: expected bfloat16, float16 or float32")
    return _ITEMSIZE[key]


def _lead_and_last(shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(int(d) for d in shape)
    if not shape:
        raise ValueError("a scalar has no quantizable last dimension")
    return math.prod(shape[:-1]), shape[-1]


def applicable(shape: Sequence[int], fmt: Format) -> bool:
    """Can mlx store a weight of this shape (2-D Linear/Embedding, 3-D experts) in this format?"""
    if not fmt.is_quantized:
        return True
    shape = tuple(shape)
    return len(shape) >= 2 and shape[-1] > 0 and shape[-1] % fmt.group_size == 0


def tensor_bytes(shape: Sequence[int], fmt: Format, source_dtype: Any) -> int:
    """Exact bytes of every array a quantized layer holds for this weight (bias excluded)."""
    lead, last = _lead_and_last(shape)
    itemsize = dtype_itemsize(source_dtype)
    if not fmt.is_quantized:
        return lead * last * itemsize
    if not applicable(shape, fmt):
        raise MixqError(f"format {fmt} does not apply to shape {tuple(shape)}: "
                        f"last dimension must be a multiple of {fmt.group_size}")
    groups = lead * (last // fmt.group_size)
    # Packed into uint32 words along the last dim; group_size * bits is a multiple of 32 for every
    # valid (bits, group) pair, so a row always fills whole words.
    packed = lead * (last * fmt.bits // 32) * 4
    if fmt.mode == "affine":
        return packed + 2 * groups * itemsize  # scales + biases in the source dtype
    return packed + groups * MICROSCALED[fmt.mode][2]


def bits_per_weight(fmt: Format, source_dtype: Any = "bfloat16") -> float:
    """Storage bits per weight element including scales/biases (e.g. 4:64 from bf16 -> 4.5)."""
    if not fmt.is_quantized:
        return 8.0 * dtype_itemsize(source_dtype)
    return tensor_bytes((1, fmt.group_size), fmt, source_dtype) * 8 / fmt.group_size


# -- quantization ---------------------------------------------------------------------------------
QUANTIZE_CHUNK = 1 << 20  # elements a microscaled format is quantized at a time (see `quantize`)
FP4_MODES = tuple(_FP4_GROUPS)  # quantized in numpy on the CPU


def quantize(w, fmt: Format) -> tuple:
    """`mx.quantize(w, **fmt.quant_kwargs())` as (words, scales, biases or None). Microscaled formats are
    quantized a bounded number of rows at a time: mlx's CPU path for them holds temporaries ~20x the
    float32 size of its input (2 GiB for a 49152 x 576 bf16 nvfp4 table); rows are independent, so the
    result is the same."""
    import mlx.core as mx

    kw = fmt.quant_kwargs()
    cols = int(w.shape[-1])
    rows = 1
    for d in w.shape[:-1]:
        rows *= int(d)
    step = max(1, QUANTIZE_CHUNK // max(cols, 1))
    in_numpy = fmt.mode in FP4_MODES and numpy_on_cpu()
    if fmt.mode == "affine" or (rows <= step and not in_numpy):
        out = mx.quantize(w, **kw)
        return out[0], out[1], (out[2] if len(out) > 2 else None)
    flat = w.reshape(rows, cols)
    parts = []
    for a in range(0, rows, step):
        if in_numpy:   # the same bytes as mlx's CPU path, ~20x faster (see mixq.core.fp4)
            x = flat[a:a + step]
            x = np.array(x) if x.dtype in (mx.float16, mx.float32) else np.array(x.astype(mx.float32))
            part = tuple(mx.array(p) for p in quantize_fp4(x, fmt.mode))
        else:
            part = mx.quantize(flat[a:a + step], **kw)
        mx.eval(*part)
        parts.append(part)
    words, scales = (mx.concatenate([p[j] for p in parts]).reshape(*w.shape[:-1], -1) for j in (0, 1))
    return words, scales, None


DEQUANTIZE_CHUNK = 1 << 22  # elements `dequantize` produces at a time


def dequantize(wq, scales, biases, fmt: Format, dtype=None):
    """`mx.dequantize` of the arrays `quantize` returns, a bounded number of rows at a time: mlx's CPU
    dequantize holds temporaries up to ~8x its float32 output for 3/5/6 bits (2.3 GiB for a 4480 x 15680
    weight at 6:64); rows are independent, so the result is the same."""
    import mlx.core as mx

    dtype = dtype or mx.float32
    kw = fmt.quant_kwargs()
    lead = tuple(wq.shape[:-1])
    rows = 1
    for d in lead:
        rows *= int(d)
    cols = int(scales.shape[-1]) * fmt.group_size
    step = max(1, DEQUANTIZE_CHUNK // max(cols, 1))
    if rows <= step:
        return mx.dequantize(wq, scales, biases, dtype=dtype, **kw)
    flat = [None if a is None else a.reshape(rows, -1) for a in (wq, scales, biases)]
    parts = []
    for a in range(0, rows, step):
        part = mx.dequantize(*(None if x is None else x[a:a + step] for x in flat), dtype=dtype, **kw)
        mx.eval(part)
        parts.append(part)
    return mx.concatenate(parts).reshape(*lead, cols)


# -- fake quantization ---------------------------------------------------------------------------
def quantize_dequantize(w, fmt: Format):
    """Round-trip `w` through the format ("fake quant"); returns float32, same shape as `w`.

    Pass `w` in its source dtype: affine scales and biases are stored (and rounded) in that dtype,
    exactly as the quantized model will hold them.
    """
    import mlx.core as mx

    if not fmt.is_quantized:
        return w.astype(mx.float32)
    if not applicable(w.shape, fmt):
        raise MixqError(f"format {fmt} does not apply to shape {tuple(w.shape)}")
    wq, scales, biases = quantize(w, fmt)
    return dequantize(wq, scales, biases, fmt)


def _join(xs: Iterable[int]) -> str:
    return ", ".join(str(x) for x in xs)
