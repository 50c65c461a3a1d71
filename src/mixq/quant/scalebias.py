"""Affine tensors' scales and biases as trainable parameters, the integer codes fixed: what block-wise tuning
(`mixq.quant.tune`) and end-to-end distillation (`mixq.quant.distill`) both optimise.

Each group's scale and bias are relative to the written ones, s0 (1 + a) and b0 + c s0 (a = c = 0 at the
start), so one learning rate fits groups of any magnitude. With `by_bits` the scale's is s0 (1 + 2^(4 - bits) a):
a relative change of the scale moves a weight by a x code x s0, up to a x the group's range (2^bits steps),
while the error it can correct is about a step, so the useful change of `a` halves with every bit (one
learning rate then fits 4- to 8-bit tensors; the bias's c is in steps already). With `cast`, values pass
through the source dtype first: what is measured is what `mlx_lm.load` will read.
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


class ScaleBias:
    """`qs`: path -> QuantizedWeight (affine with biases: `tunable`). Holds their codes and starting values."""

    def __init__(self, qs: dict, by_bits: bool = False):
        import mlx.core as mx

        self.qs = qs
        self.k = {p: 2.0 ** (4 - q.fmt.bits) if by_bits else 1.0 for p, q in qs.items()}
        self._codes = None   # unpacked when first needed: a quantized student never needs them
        self.s0 = {p: q.scales.astype(mx.float32) for p, q in qs.items()}
        self.b0 = {p: q.biases.astype(mx.float32) for p, q in qs.items()}
        mx.eval(self.s0, self.b0)

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

        return {p: {"a": mx.zeros(self.s0[p].shape), "c": mx.zeros(self.b0[p].shape)} for p in self.qs}

    def values(self, params, cast: bool) -> dict:
        """path -> (scale, bias) in float32; `cast`: as the source dtype stores them."""
        import mlx.core as mx

        out = {}
        for p, q in self.qs.items():
            s = self.s0[p] * (1.0 + self.k[p] * params[p]["a"])
            b = self.b0[p] + params[p]["c"] * self.s0[p]
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
        import mlx.core as mx

        out = {}
        for p, (s, b) in self.values(params, cast=True).items():
            q = self.qs[p]
            out[p] = QuantizedWeight(fmt=q.fmt, wq=q.wq, scales=s.astype(q.scales.dtype),
                                     biases=b.astype(q.biases.dtype), cols=q.cols)
            mx.eval(out[p].scales, out[p].biases)
        return out
