"""The sensitivity estimator: each (tensor, format)'s KL increase from one backward pass, no forward per pair.

For a small weight change dW of a layer y = W x, the KL divergence of the model from itself grows as
    dKL ~ 1/(2N) sum_t (g_t . dW x_t)^2,   g_t = d log p(label) / d y_t,  labels drawn from the model,
the Fisher quadratic form over the N calibration positions (the Fisher of the model's own distribution is
the KL's Hessian). Per layer it is taken in its Kronecker-factored form with a diagonal output factor,
    dKL ~ 1/(2N) sum_i G_i (dW A dW^T)_ii / n,   G_i = sum_t g_ti^2,  A = sum_t x_t x_t^T,
over the n rows the layer sees (routed experts: their own rows, G and A per expert), with dW the error
of the rounding that will really be written (GPTQ where used). A is the Gram GPTQ already rounds against;
(dW A dW^T)_ii is formed as dW A (out x in^2) or, where the layer sees fewer rows than it has inputs
(routed experts, very wide inputs), from the rows themselves (rows x in x out). Embeddings are looked up,
not multiplied, so theirs is the per-position form sum_t (g_t . dE[token_t])^2, exact in its cross terms.
The head is measured exactly (a head-only KL costs two head projections).

Measured on the demo models against exact KL, the per-position form and this one rank all pairs alike
(Spearman 0.999 / 0.998); the diagonal-output form misprices whole tensor kinds by a constant (value
projections ~0.6x), which the per-kind calibration on exact points removes (see `mixq.quant.calibpass`),
and it costs in/N of the per-position form without keeping any per-position rows.
"""

from __future__ import annotations

from mixq.quant.hessian import switch_rows

ESTIMATOR = "fisher-kfac-diag-v1"


class FisherStats:
    """Per Linear / SwitchLinear tensor of one block: the output-gradient second moments per channel (per
    expert for routed experts) and, where the estimate is formed from rows, the input rows."""

    def __init__(self, n_positions: int):
        self.n_positions = n_positions
        self.gd: dict = {}      # path -> (out,) or (experts, out)
        self.rows: dict = {}    # path -> list of input rows, when kept

    def add(self, path: str, rec, grad) -> None:
        import mlx.core as mx

        g = grad.astype(mx.float32)
        if rec._experts is None:
            g2 = (g.reshape(-1, g.shape[-1]) ** 2).sum(axis=0)
            if rec.last_input.shape[-1] > self.n_positions:  # wider than the rows it sees: keep the rows
                self.rows.setdefault(path, []).append(rec.last_input.reshape(-1, rec.last_input.shape[-1]))
        else:
            gr, ids = switch_rows(g, rec.last_indices)
            g2 = mx.zeros((rec._experts, gr.shape[-1])).at[ids].add(gr ** 2)
        self.gd[path] = g2 if path not in self.gd else self.gd[path] + g2
        mx.eval(self.gd[path])

    def estimate(self, path: str, H, dW) -> float:
        """1/(2N) sum_i G_i (dW A dW^T)_ii / n for this tensor and the rounding error dW."""
        import mlx.core as mx

        gd = self.gd[path]
        if hasattr(H, "rows"):  # routed experts: their rows, each through its own expert's dW
            ysq = mx.zeros(gd.shape)
            step = max(1, (64 << 20) // (4 * max(dW.shape[-2], 1)))
            for a in range(0, H.rows.shape[0], step):
                ids = H.ids[a:a + step]
                y = mx.gather_mm(H.rows[a:a + step][:, None, :], dW.swapaxes(-1, -2), rhs_indices=ids)[:, 0, :]
                ysq = ysq.at[ids].add(y ** 2)
                mx.eval(ysq)
            counts = mx.zeros((gd.shape[0],)).at[H.ids].add(mx.ones(H.ids.shape))
            total = ((gd * ysq).sum(axis=-1) / mx.maximum(counts, 1.0)).sum()
        elif path in self.rows:
            ysq = mx.zeros((dW.shape[0],))
            for x in self.rows[path]:
                ysq = ysq + ((x @ dW.T) ** 2).sum(axis=0)
            total = (gd * ysq).sum() / self.n_positions
        else:
            ysq = ((dW @ H.astype(mx.float32)) * dW).sum(axis=-1)
            total = (gd * ysq).sum() / self.n_positions
        return float(total.item()) / (2 * self.n_positions)


def embedding_estimate(grads: list, tokens: list, table_rows, q, n_positions: int) -> float:
    """The embedding's rows as looked up at every position: dW x_t = the rounded row's error."""
    import mlx.core as mx

    total = mx.array(0.0)
    for g, x in zip(grads, tokens):
        d = table_rows(x) - q.take(x, mx.float32)
        total = total + ((g * d).sum(axis=-1) ** 2).sum()
        mx.eval(total)
    return float(total.item()) / (2 * n_positions)
