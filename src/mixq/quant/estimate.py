"""The sensitivity estimator: each (tensor, format)'s KL increase from one backward pass, no forward per pair.

For a small weight change dW of a layer y = W x, the KL divergence of the model from itself grows as
    dKL ~ 1/2 E[(g . dW x)^2],   g = d log p(y_label) / d y  with labels drawn from the model,
the Fisher quadratic form (the Fisher of the model's own distribution is the KL's Hessian). mixq evaluates
it per position: the backward sweep gives each layer's input x_t and output gradient g_t at every
calibration position t, and for each candidate format the rounding that will really be written (GPTQ
where used) gives dW; then
    est = 1/(2N) sum_t (g_t . dW x_t)^2
over the N calibration positions (routed experts: over the rows routed to each expert, with its own dW;
embeddings: x_t is the token's one-hot, so dW x_t is the rounded row's error). Cross-position terms of
the Fisher are dropped; the Kronecker-factored form 1/2 tr(G dW A dW^T) and its diagonal-G variant were
measured too and rank the demo models' pairs as well but misprice embeddings by ~1.7x (see the README).
Cost per pair: one matmul of the layer's size over the calibration rows. The head is measured exactly
(a head-only KL costs two head projections).
"""

from __future__ import annotations

from mixq.quant.hessian import switch_rows

ESTIMATOR = "fisher-per-position-v1"


class LayerRows:
    """A block's per-position (input, output-gradient) rows for each of its Linear / SwitchLinear tensors,
    gathered over the calibration batches by the backward sweep."""

    def __init__(self):
        self.x: dict = {}
        self.g: dict = {}
        self.ids: dict = {}

    def add(self, path: str, rec, grad) -> None:
        import mlx.core as mx

        x = rec.last_input
        if rec._experts is None:
            xr, gr = x.reshape(-1, x.shape[-1]), grad.astype(mx.float32).reshape(-1, grad.shape[-1])
            ids = None
        else:
            xr, ids = switch_rows(x, rec.last_indices)
            gr, _ = switch_rows(grad.astype(mx.float32), rec.last_indices)
        self.x.setdefault(path, []).append(xr)
        self.g.setdefault(path, []).append(gr)
        if ids is not None:
            self.ids.setdefault(path, []).append(ids)

    def rows(self, path: str):
        import mlx.core as mx

        x = mx.concatenate(self.x[path])
        g = mx.concatenate(self.g[path])
        ids = mx.concatenate(self.ids[path]) if path in self.ids else None
        return x, g, ids


def linear_estimate(x, g, ids, dW, n_positions: int) -> float:
    """1/(2N) sum over rows of (g . dW x)^2; `ids` routes each row to its expert's slice of dW."""
    import mlx.core as mx

    total = mx.array(0.0)
    step = max(1, (64 << 20) // (4 * max(g.shape[-1], 1)))  # rows per chunk: bounded (rows x out) temporaries
    for a in range(0, x.shape[0], step):
        xs, gs = x[a:a + step], g[a:a + step]
        if ids is None:
            y = xs @ dW.T
        else:
            y = mx.gather_mm(xs[:, None, :], dW.swapaxes(-1, -2), rhs_indices=ids[a:a + step])[:, 0, :]
        total = total + ((y * gs).sum(axis=-1) ** 2).sum()
        mx.eval(total)
    return float(total.item()) / (2 * n_positions)


def embedding_estimate(grads: list, tokens: list, table_rows, q, n_positions: int) -> float:
    """The embedding's rows as looked up at every position: dW x_t = the rounded row's error."""
    import mlx.core as mx

    total = mx.array(0.0)
    for g, x in zip(grads, tokens):
        d = table_rows(x) - q.take(x, mx.float32)
        total = total + ((g * d).sum(axis=-1) ** 2).sum()
        mx.eval(total)
    return float(total.item()) / (2 * n_positions)
