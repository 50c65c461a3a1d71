"""Routed experts on the CPU, a segment of rows per expert.

mlx-lm's SwitchLinear multiplies the routed rows with `mx.gather_mm`. On the CPU that runs one
matrix-vector product per row, reading the expert's whole matrix each time: a Nemotron-3-Nano-30B-A3B
expert layer (128 x 1856 x 2688) over 2048 x 6 sorted rows took 9.8 s, and its backward 11.7 s, for ~0.5 s
of matmul. SwitchMLP sorts the rows by expert when there are many; `segmented_gather_mm` then multiplies
each expert's rows with one matmul (same values, bit for bit here) and has its own vjp (a slice's vjp
would add a zero array of the whole input per expert). `segmented_experts(module)` has a module's float
SwitchLinear layers computed that way while inside, on the CPU only (`numpy_on_cpu`: tests switch it off to
take the GPU's path); quantized experts and unsorted calls are left to mlx.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from mixq.core.blas import numpy_on_cpu
from mixq.core.forward import set_child


def segmented_gather_mm(x, weight, indices):
    """x (N, 1, in) rows sorted by expert, weight (E, out, in), indices (N,) sorted -> (N, 1, out), equal to
    `mx.gather_mm(x, weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=True)`."""
    import mlx.core as mx

    ids = np.array(indices)   # the segments are read on the host (an evaluation of the router)
    starts = np.searchsorted(ids, np.arange(weight.shape[0] + 1))
    used = [e for e in range(weight.shape[0]) if starts[e + 1] > starts[e]]
    cuts = [int(starts[e]) for e in used[1:]]

    @mx.custom_function
    def product(rows, w):
        return mx.concatenate([r @ w[e].T for r, e in zip(mx.split(rows, cuts, axis=0), used)])

    @product.vjp
    def product_vjp(primals, cotangent, output):
        rows, w = primals
        cs = mx.split(cotangent, cuts, axis=0)
        d_rows = mx.concatenate([c @ w[e] for c, e in zip(cs, used)])
        d_w = mx.zeros_like(w)
        d_w[mx.array(used)] = mx.stack([c.T @ r for c, r in zip(cs, mx.split(rows, cuts, axis=0))])
        return d_rows, d_w

    return product(x[:, 0], weight)[:, None, :]


def sorted_gather_mm(x, weight, indices):
    """`mx.gather_mm(x, weight.swapaxes(-1, -2), rhs_indices=indices)` for rows sorted by expert: by segment
    on the CPU, mlx's kernel elsewhere."""
    import mlx.core as mx

    if numpy_on_cpu():
        return segmented_gather_mm(x, weight, indices)
    return mx.gather_mm(x, weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=True)


def _segmented_class():
    from mlx_lm.models.switch_layers import SwitchLinear

    class Segmented(SwitchLinear):
        """A SwitchLinear's arrays, computed by `segmented_gather_mm` where its rows come sorted."""

        def __init__(self, inner):
            super(SwitchLinear, self).__init__()   # nn.Module's: the arrays are the inner layer's
            for k, v in inner.items():
                self[k] = v

        def __call__(self, x, indices, sorted_indices=False):
            if not (sorted_indices and x.ndim == 3 and x.shape[1] == 1 and indices.ndim == 1):
                return super().__call__(x, indices, sorted_indices=sorted_indices)
            y = segmented_gather_mm(x, self["weight"], indices)
            return y + self["bias"][indices][:, None, :] if "bias" in self else y

    return Segmented


@contextmanager
def segmented_experts(module):
    """Inside: the float SwitchLinear layers under `module` (a block) computed a segment per expert on the
    CPU; put back on exit (their arrays are shared, never copied)."""
    from mlx_lm.models.switch_layers import SwitchLinear

    found = [(p, m) for p, m in module.named_modules() if type(m) is SwitchLinear] if numpy_on_cpu() else []
    if not found:
        yield
        return
    Segmented = _segmented_class()
    for path, m in found:
        set_child(module, path, Segmented(m))
    try:
        yield
    finally:
        for path, m in found:
            set_child(module, path, m)

