"""A weight in its written form: packed words, scales (and biases), read back in the compute dtype.

Every pass that runs a quantized tensor (sensitivity, plan evaluation, the written model's check) holds it
packed, as the written model will, and dequantizes only what it runs: a block's tensor whole, an
embedding's looked-up rows, a head's chunk of rows. The values are what mlx's quantized kernels compute
with (up to accumulation order).
"""

from __future__ import annotations

from dataclasses import dataclass

from mixq.core.formats import Format, dequantize, quantize


@dataclass
class QuantizedWeight:
    fmt: Format
    wq: object          # packed uint32 words (rows, ..., cols * bits / 32)
    scales: object
    biases: object | None  # affine only
    cols: int

    @property
    def shape(self) -> tuple:
        return (*self.wq.shape[:-1], self.cols)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.wq, self.scales, self.biases) if a is not None)

    def _deq(self, wq, scales, biases, dtype):
        return dequantize(wq, scales, biases, self.fmt, dtype)

    def full(self, dtype=None):
        return self._deq(self.wq, self.scales, self.biases, dtype)

    def rows(self, a: int, b: int, dtype=None):
        return self._deq(self.wq[a:b], self.scales[a:b], None if self.biases is None else self.biases[a:b], dtype)

    def take(self, ids, dtype=None):
        """Rows `ids` (any int shape) dequantized: an embedding lookup."""
        b = None if self.biases is None else self.biases[ids]
        return self._deq(self.wq[ids], self.scales[ids], b, dtype)

    def arrays(self) -> dict:
        """name -> array as a quantized layer stores them (weight, scales, biases)."""
        out = {"weight": self.wq, "scales": self.scales}
        if self.biases is not None:
            out["biases"] = self.biases
        return out


def round_weight(rounding, path: str, w, fmt: Format) -> QuantizedWeight:
    """`w` (stored dtype) rounded to `fmt` as the convert writes it: GPTQ where `rounding` has a Hessian for
    an affine format, mlx's round-to-nearest otherwise."""
    import mlx.core as mx

    if rounding is not None and rounding.uses_gptq(path, fmt):
        wq, s, b = rounding.quantized(path, w, fmt)
    else:
        wq, s, b = quantize(w, fmt)
    mx.eval(*(a for a in (wq, s, b) if a is not None))
    return QuantizedWeight(fmt=fmt, wq=wq, scales=s, biases=b, cols=int(w.shape[-1]))


def round_weights(rounding, path: str, w, fmts: list) -> dict:
    """`round_weight` for several formats of one tensor (str(format) -> QuantizedWeight): the GPTQ formats
    solved together (`Rounding.quantized_many`), the others with mlx's round-to-nearest."""
    import mlx.core as mx

    out, gptq = {}, []
    for f in fmts:
        if rounding is not None and rounding.uses_gptq(path, f):
            gptq.append(f)
        else:
            out[str(f)] = round_weight(None, path, w, f)
    if gptq:
        solved = rounding.quantized_many(path, w, gptq)  # kept while the cache has room: later sweeps reuse them
        for f in gptq:
            wq, s, b = solved[str(f)]
            mx.eval(wq, s, b)
            out[str(f)] = QuantizedWeight(fmt=f, wq=wq, scales=s, biases=b, cols=int(w.shape[-1]))
    return out
