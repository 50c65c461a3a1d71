"""Formats: CLI spelling, mlx/mlx-lm arguments, and byte counts checked against what mlx really stores."""

from __future__ import annotations

import json

import mixq  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_reduce
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.utils import compute_bits_per_weight, get_total_parameters, infer_quant_config

from mixq.core.errors import MixqError
from mixq.core.formats import (
    DEFAULT_CANDIDATES,
    Format,
    applicable,
    bits_per_weight,
    dtype_itemsize,
    parse_candidates,
    quantize_dequantize,
    tensor_bytes,
)

ALL_FORMATS = [Format.affine(b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)] + [
    Format("mxfp4"), Format("nvfp4"), Format("mxfp8"), Format("float")]
DTYPES = [mx.bfloat16, mx.float16, mx.float32]


@pytest.mark.parametrize("spec", ["4:64", "2:32", "3:128", "8:64", "mxfp4", "nvfp4", "mxfp8", "float"])
def test_parse_str_round_trip(spec):
    fmt = Format.parse(spec)
    assert str(fmt) == spec and fmt.name == spec
    assert Format.parse(str(fmt)) == fmt
    assert Format.from_config_entry(fmt.config_entry()) == fmt


def test_parse_shorthands():
    assert Format.parse("4") == Format.affine(4, 64)
    assert Format.parse(" Affine:5:32 ") == Format("affine", 5, 32)
    assert Format.parse("MXFP4") == Format("mxfp4", 4, 32)
    assert Format("nvfp4") == Format("nvfp4", 4, 16)
    assert Format("mxfp8").bits == 8 and Format("mxfp8").group_size == 32


@pytest.mark.parametrize("spec, needle", [
    ("7:64", "bits must be one of 2, 3, 4, 5, 6, 8"),
    ("1:64", "bits must be one of"),
    ("4:48", "group size must be one of 32, 64, 128"),
    ("4:256", "group size must be one of"),
    ("fp4", "expected BITS:GROUP"),
    ("int4", "expected BITS:GROUP"),
    ("", "expected BITS:GROUP"),
    ("4:64:1", "expected BITS:GROUP"),
    ("bf16", "use 'float'"),
    ("f32", "use 'float'"),
    ("mxfp4:16", "write just 'mxfp4'"),
])
def test_parse_errors(spec, needle):
    with pytest.raises(MixqError, match=needle):
        Format.parse(spec)


def test_constructor_validation():
    with pytest.raises(MixqError, match="unknown quantization mode"):
        Format("int8", 8, 64)
    with pytest.raises(MixqError, match="nvfp4 needs bits=4 and group size 16"):
        Format("nvfp4", 4, 32)
    with pytest.raises(MixqError, match="float format takes no bits"):
        Format("float", 16)


def test_parse_candidates():
    got = parse_candidates("3:32, 4:64,6:64,mxfp4,4:64,")
    assert [str(f) for f in got] == ["3:32", "4:64", "6:64", "mxfp4"]
    assert parse_candidates(["4:64", "float"]) == [Format.affine(4, 64), Format("float")]
    with pytest.raises(MixqError, match="bits must be one of"):
        parse_candidates("4:64,9:64")
    with pytest.raises(MixqError, match="no quantization formats"):
        parse_candidates(" , ")


def test_default_candidates_are_sensible():
    names = [str(f) for f in DEFAULT_CANDIDATES]
    assert 8 <= len(names) <= 12 and len(set(names)) == len(names)
    assert "float" in names and "4:64" in names
    bpw = sorted(bits_per_weight(f, "bfloat16") for f in DEFAULT_CANDIDATES)
    assert bpw[0] <= 3.5 and bpw[-1] == 16.0
    # No gap over 2.5 bits between consecutive quantized choices (the knapsack needs steps).
    quantized = [b for b in bpw if b < 16]
    assert max(b - a for a, b in zip(quantized, quantized[1:])) <= 2.5


def test_kwargs_and_config_entries_match_mlx_lm():
    assert Format.parse("4:64").quant_kwargs() == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert Format("mxfp4").config_entry() == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    assert Format("nvfp4").config_entry() == {"group_size": 16, "bits": 4, "mode": "nvfp4"}
    assert Format("mxfp8").config_entry() == {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    assert Format("float").config_entry() is False
    with pytest.raises(ValueError):
        Format("float").quant_kwargs()
    json.dumps([f.config_entry() for f in ALL_FORMATS])
    # mlx-lm's loader recovers exactly our entry from the arrays nn.quantize writes.
    for fmt in ALL_FORMATS:
        if not fmt.is_quantized:
            continue
        lin = nn.Linear(256, 64, bias=False)
        lin.set_dtype(mx.bfloat16)
        q = lin.to_quantized(**fmt.quant_kwargs())
        weights = {f"p.{k}": v for k, v in tree_flatten(q.parameters())}
        assert infer_quant_config("p", lin, weights) == fmt.config_entry()


def test_dtype_itemsize():
    assert dtype_itemsize(mx.bfloat16) == 2 and dtype_itemsize(mx.float32) == 4
    assert dtype_itemsize("bfloat16") == 2 and dtype_itemsize("f32") == 4
    assert dtype_itemsize("mlx.core.float16") == 2
    assert dtype_itemsize(np.float32) == 4 and dtype_itemsize(np.dtype("float16")) == 2
    with pytest.raises(MixqError, match="unsupported source dtype"):
        dtype_itemsize(mx.int8)


def test_applicable():
    assert applicable((64, 96), Format.affine(4, 32))
    assert not applicable((64, 96), Format.affine(4, 64))
    assert applicable((64, 96), Format("mxfp8"))  # 96 = 3 * 32
    assert applicable((64, 48), Format("nvfp4")) and not applicable((64, 48), Format("mxfp4"))
    assert not applicable((256,), Format.affine(4, 64))  # 1-D tensors are never quantized
    assert applicable((7,), Format("float")) and applicable((3, 5, 7), Format("float"))
    with pytest.raises(MixqError, match="does not apply"):
        tensor_bytes((64, 96), Format.affine(4, 64), "bfloat16")


SHAPES = [(256, 256), (64, 384), (3, 32, 128), (100, 64), (2, 2, 16, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_bytes_equal_mx_quantize_nbytes(dtype):
    for shape in SHAPES:
        w = mx.random.normal(shape, key=mx.random.key(0)).astype(dtype)
        for fmt in ALL_FORMATS:
            if not fmt.is_quantized:
                assert tensor_bytes(shape, fmt, dtype) == w.nbytes
                continue
            if not applicable(shape, fmt):
                continue
            arrays = mx.quantize(w, **fmt.quant_kwargs())
            assert tensor_bytes(shape, fmt, dtype) == sum(a.nbytes for a in arrays), (shape, str(fmt), dtype)


def test_bytes_for_256x256_reference_values():
    want = {  # bf16, float32 source
        "2:64": (20480, 24576), "3:64": (28672, 32768), "4:128": (34816, 36864), "4:64": (36864, 40960),
        "4:32": (40960, 49152), "5:64": (45056, 49152), "6:64": (53248, 57344), "8:64": (69632, 73728),
        "mxfp4": (34816, 34816), "nvfp4": (36864, 36864), "mxfp8": (67584, 67584), "float": (131072, 262144),
    }
    for spec, (bf16, f32) in want.items():
        fmt = Format.parse(spec)
        got = (tensor_bytes((256, 256), fmt, mx.bfloat16), tensor_bytes((256, 256), fmt, mx.float32))
        assert got == (bf16, f32), spec
    assert bits_per_weight(Format.parse("4:64")) == 4.5 and bits_per_weight(Format("nvfp4"), "float32") == 4.5


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(96, 128)
        self.q = nn.Linear(128, 128, bias=False)
        self.o = nn.Linear(128, 128, bias=True)
        self.up = nn.Linear(128, 256, bias=False)
        self.down = nn.Linear(256, 128, bias=False)
        self.odd = nn.Linear(96, 64, bias=False)  # 96: only group 32 / nvfp4 / float apply
        self.experts = SwitchLinear(128, 64, 4, bias=False)
        self.norm = nn.RMSNorm(128)
        self.head = nn.Linear(128, 96, bias=False)


PLANS = [
    {"embed": "4:64", "q": "3:32", "o": "mxfp4", "up": "nvfp4", "down": "mxfp8", "odd": "5:32",
     "experts": "2:128", "head": "float"},
    {"embed": "8:64", "q": "float", "o": "6:64", "up": "2:32", "down": "4:128", "odd": "nvfp4",
     "experts": "mxfp4", "head": "6:32"},
]


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32], ids=str)
@pytest.mark.parametrize("plan", PLANS)
def test_mixed_model_bytes_match_mlx_lm_bits_per_weight(dtype, plan):
    model = _Tiny()
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    shapes = {p: m.weight.shape for p, m in model.named_modules() if p in plan}
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    weight_params = sum(int(np.prod(s)) for s in shapes.values())
    other_bytes = (n_params - weight_params) * dtype_itemsize(dtype)  # biases and norms stay float

    def predicate(path, module):
        fmt = Format.parse(plan[path]) if path in plan else Format("float")
        return fmt.config_entry()

    nn.quantize(model, class_predicate=predicate)
    expected = other_bytes + sum(tensor_bytes(shapes[p], Format.parse(f), dtype) for p, f in plan.items())
    actual = tree_reduce(lambda acc, x: acc + x.nbytes if isinstance(x, mx.array) else acc, model, 0)
    assert actual == expected
    assert get_total_parameters(model) == n_params
    assert compute_bits_per_weight(model) == pytest.approx(expected * 8 / n_params, rel=1e-12)


@pytest.mark.parametrize("shape", [(64, 128), (3, 32, 128)])
def test_quantize_dequantize(shape):
    w = (mx.random.normal(shape, key=mx.random.key(1)) * 0.02).astype(mx.bfloat16)
    errs = {}
    for fmt in ALL_FORMATS:
        if not applicable(shape, fmt):
            continue
        out = quantize_dequantize(w, fmt)
        assert out.shape == w.shape and out.dtype == mx.float32
        if fmt.is_quantized:
            ref = mx.dequantize(*mx.quantize(w, **fmt.quant_kwargs()), **fmt.quant_kwargs())
            assert mx.allclose(out, ref.astype(mx.float32), rtol=1e-2, atol=1e-5).item()
        else:
            assert mx.array_equal(out, w.astype(mx.float32)).item()
        errs[str(fmt)] = mx.mean((out - w.astype(mx.float32)) ** 2).item()
    assert errs["float"] == 0.0
    assert errs["2:64"] > errs["3:64"] > errs["4:64"] > errs["6:64"] > errs["8:64"] > 0
    assert errs["4:32"] < errs["4:64"] < errs["4:128"]
    assert errs["mxfp8"] < errs["mxfp4"]


def test_quantize_dequantize_rejects_inapplicable():
    with pytest.raises(MixqError, match="does not apply"):
        quantize_dequantize(mx.zeros((8, 96)), Format.affine(4, 64))


@pytest.mark.parametrize("spec", ["mxfp4", "nvfp4", "mxfp8", "4:64"])
def test_quantize_in_row_chunks_equals_mlx(monkeypatch, spec):
    # microscaled formats are quantized a few rows at a time (mlx's CPU path holds ~20x its input); the
    # words and scales must be exactly mx.quantize's, for stacked experts too
    from mixq.core import formats

    fmt = Format.parse(spec)
    w = mx.random.normal((3, 50, 128), key=mx.random.key(1)).astype(mx.bfloat16)
    monkeypatch.setattr(formats, "QUANTIZE_CHUNK", 7 * 128)  # 7 rows a step: steps cross the expert boundary
    got = formats.quantize(w, fmt)
    want = mx.quantize(w, **fmt.quant_kwargs())
    assert len([a for a in got if a is not None]) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert mx.array_equal(a, b).item()


@pytest.mark.parametrize("spec", ["3:64", "5:32", "6:128", "mxfp4", "nvfp4", "mxfp8"])
def test_dequantize_in_row_chunks_equals_mlx(monkeypatch, spec):
    # mlx's CPU dequantize holds several times its float32 output (3/5/6 bits): done a few rows at a time,
    # the values must be exactly mx.dequantize's, for stacked experts too, in any output dtype
    from mixq.core import formats

    fmt = Format.parse(spec)
    w = mx.random.normal((3, 50, 128), key=mx.random.key(2)).astype(mx.bfloat16)
    q = formats.quantize(w, fmt)
    monkeypatch.setattr(formats, "DEQUANTIZE_CHUNK", 7 * 128)  # 7 rows a step: steps cross the expert boundary
    for dtype in (mx.float32, mx.bfloat16):
        got = formats.dequantize(*q, fmt, dtype)
        want = mx.dequantize(*q, dtype=dtype, **fmt.quant_kwargs())
        assert got.shape == want.shape == w.shape and got.dtype == want.dtype
        assert mx.array_equal(got, want).item()
