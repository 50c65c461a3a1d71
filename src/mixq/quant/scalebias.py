"""Affine tensors' scales and biases as trainable parameters, the integer codes fixed: what block-wise tuning
(`mixq.quant.tune`) and end-to-end distillation (`mixq.quant.distill`) both optimise.

Each group's scale and bias are relative to the written ones, s0 (1 + a) and b0 + c s0 (a = c = 0 at the
start), so one learning rate fits groups of any magnitude. With `by_bits` the scale's is s0 (1 + 2^(4 - bits) a):
a relative change of the scale moves a weight by a x code x s0, up to a x the group's range (2^bits steps),
while the error it can correct is about a step, so the useful change of `a` halves with every bit (one
learning rate then fits 4- to 8-bit tensors; the bias's c is in steps already). With `cast`, values pass
through the source dtype first: what is measured is what `mlx_lm.load` will read.

The starts are the written arrays themselves (source dtype): `_relative_fn`'s own vector-Jacobian product casts
them again in the backward, so a training step keeps no float32 copy of them (8 bytes a group less).
"""

from __future__ import annotations

from mixq.quant.qweight import QuantizedWeight


def tunable(qs: dict) -> dict:
    """The affine tensors among path -> QuantizedWeight (microscaled formats have no bias to tune)."""
    return {p: q for p, q in qs.items() if q.fmt.mode == "affine" and q.biases is not None}


def codes_of(q: QuantizedWeight):
    """The integer codes of an affine weight (uint8, the weight's shape)."""
    import mlx.core as mx

    ones = mx.ones(q.scales.shape, dtype=mx.float32)
    c = mx.dequantize(q.wq, ones, mx.zeros(q.scales.shape, dtype=mx.float32), dtype=mx.float32,
                      **q.fmt.quant_kwargs())
    return c.astype(mx.uint8)


def _relative_fn():
    """(a, c, written scale, written bias, k) -> (s0 (1 + k a), b0 + c s0) in float32, s0 and b0 the written
    values; the backward recomputes s0 from the written array instead of keeping a float32 copy of it."""
    import mlx.core as mx

    @mx.custom_function
    def relative(a, c, s_src, b_src, k):
        s0 = s_src.astype(mx.float32)
        return s0 * (1.0 + k * a), b_src.astype(mx.float32) + c * s0

    @relative.vjp
    def relative_vjp(primals, cotangents, outputs):
        _, _, s_src, b_src, k = primals
        gs, gb = cotangents
        s0 = s_src.astype(mx.float32)
        # the written arrays and k are constants: their cotangents are never evaluated
        return k * s0 * gs, s0 * gb, mx.zeros_like(s_src), mx.zeros_like(b_src), mx.zeros_like(k)

    return relative


class ScaleBias:
    """`qs`: path -> QuantizedWeight (affine with biases: `tunable`). Holds their codes (when first needed);
    the written scales and biases are the starts."""

    def __init__(self, qs: dict, by_bits: bool = False):
        import mlx.core as mx

        self.qs = qs
        self.k = {p: mx.array(2.0 ** (4 - q.fmt.bits) if by_bits else 1.0) for p, q in qs.items()}
        self._codes = None   # unpacked when first needed: a quantized student never needs them
        self._relative = _relative_fn()

    @property
    def codes(self) -> dict:
        """path -> the integer codes (uint8, a byte a weight)."""
        import mlx.core as mx

        if self._codes is None:
            self._codes = {p: codes_of(q) for p, q in self.qs.items()}
            mx.eval(self._codes)
        return self._codes

    def zeros(self) -> dict:
        """The starting parameters (the written values): path -> {"a", "c"}."""
        import mlx.core as mx

        return {p: {"a": mx.zeros(q.scales.shape), "c": mx.zeros(q.biases.shape)} for p, q in self.qs.items()}

    def values(self, params, cast: bool, paths=None) -> dict:
        """path -> (scale, bias) in float32; `cast`: as the source dtype stores them. `paths`: only these."""
        import mlx.core as mx

        out = {}
        for p in self.qs if paths is None else paths:
            q = self.qs[p]
            s, b = self._relative(params[p]["a"], params[p]["c"], q.scales, q.biases, self.k[p])
            if cast:
                s, b = s.astype(q.scales.dtype).astype(mx.float32), b.astype(q.biases.dtype).astype(mx.float32)
            out[p] = (s, b)
        return out

    def weights(self, params, cast: bool, dtype) -> list:
        """(path, weight in `dtype`) from the codes and the parameters' (scale, bias)."""
        import mlx.core as mx

        out = []
        for p, (s, b) in self.values(params, cast).items():
            codes, group = self.codes[p], self.qs[p].fmt.group_size
            lead = codes.shape[:-1]
            g = codes.astype(mx.float32).reshape(*lead, -1, group)
            out.append((p, (g * s[..., None] + b[..., None]).reshape(*lead, -1).astype(dtype)))
        return out

    def quantized(self, params) -> dict:
        """path -> QuantizedWeight: the written codes with the parameters' values in the source dtype."""
        return self.with_values({p: {"scales": s, "biases": b} for p, (s, b) in self.values(params, cast=True).items()})

    def with_values(self, values: dict) -> dict:
        """path -> QuantizedWeight: the written codes with `values` (path -> {"scales", "biases"}) cast to the
        source dtype (a tuned result as kept, in the bytes it will be written in)."""
        import mlx.core as mx

        out = {}
        for p, v in values.items():
            q = self.qs[p]
            out[p] = QuantizedWeight(fmt=q.fmt, wq=q.wq, scales=v["scales"].astype(q.scales.dtype),
                                     biases=v["biases"].astype(q.biases.dtype), cols=q.cols)
            mx.eval(out[p].scales, out[p].biases)
        return out
