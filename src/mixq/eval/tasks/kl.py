"""`kl`: how far a quant's next-token distributions are from the float reference's, on held-out text.

One window per held-out document (mixq.eval.tasks._text): BOS + its first `--seq-len - 1` tokens
(default 256 in all). Both models read the same tokens; at every position KL(p_ref || p_quant) and
whether the two argmax tokens agree are recorded (mixq.core.metrics), so the aggregate is exact over all
positions: mean, median, p99 and max KL in nats, top-1 agreement, and both models' perplexity on the
windows. Default 32 windows (`--limit`). Needs `--reference` (same tokenizer) and local models.
"""

from __future__ import annotations

import math

from mixq.eval.registry import Task, register
from mixq.eval.tasks import _text

DEFAULT_SEQ_LEN = 256


@register
class KL(Task):
    name = "kl"
    title = "KL vs reference"
    metric = "kl_mean"
    metric_label = "KL mean"
    higher_is_better = False
    percent = False
    verdict = "kl"
    needs_reference = True
    needs_logits = True
    default_limit = 32
    batch_size = 8
    extra = (("kl_median", "KL median", False, False), ("kl_p99", "KL p99", False, False),
             ("top1", "top-1 agreement %", True, True))

    def _seq(self, opts) -> int:
        return int(opts.seq_len or DEFAULT_SEQ_LEN)

    def settings(self, opts) -> dict:
        return {"seq_len": self._seq(opts)}

    def load(self, opts, limit):
        return _text.task_data(opts, limit)

    def process(self, samples, ctx):
        import mlx.core as mx
        import numpy as np

        from mixq.core.metrics import kl_per_token, token_nll

        be, ref = ctx.backend, ctx.reference
        seq = self._seq(ctx.opts)
        rows = [(be.bos() + be.encode(s["text"]))[:seq] for s in samples]
        out: list[dict | None] = [None] * len(samples)
        for group in be.batches(rows):
            batch = [rows[g] for g in group]
            q, p = be.logits(batch), ref.logits(batch)
            if q.shape[-1] != p.shape[-1]:
                n = min(q.shape[-1], p.shape[-1])  # padded embedding rows beyond the tokenizer: compare the rest
                q, p = q[..., :n], p[..., :n]
            for b, g in enumerate(group):
                n = len(rows[g])
                kl = np.array(kl_per_token(p[b:b + 1, :n], q[b:b + 1, :n]))[0]
                same = np.array(mx.argmax(p[b, :n], axis=-1) == mx.argmax(q[b, :n], axis=-1))
                toks = mx.array([rows[g]])
                nll_q = float(token_nll(q[b:b + 1, :n], toks).sum().item()) if n > 1 else 0.0
                nll_p = float(token_nll(p[b:b + 1, :n], toks).sum().item()) if n > 1 else 0.0
                out[g] = {"id": samples[g]["id"], "kl": [float(f"{x:.6g}") for x in kl.tolist()],
                          "top1": int(same.sum()), "positions": n, "nll": nll_q, "ref_nll": nll_p,
                          "targets": n - 1}
        return out  # type: ignore[return-value]

    def aggregate(self, records):
        import numpy as np

        kl = np.concatenate([np.asarray(r["kl"], dtype=np.float64) for r in records])
        pos = sum(r["positions"] for r in records)
        tg = sum(r["targets"] for r in records)
        return {
            "kl_mean": float(kl.mean()), "kl_median": float(np.percentile(kl, 50)),
            "kl_p99": float(np.percentile(kl, 99)), "kl_max": float(kl.max()),
            "top1": sum(r["top1"] for r in records) / pos,
            "ppl": math.exp(sum(r["nll"] for r in records) / tg) if tg else None,
            "ref_ppl": math.exp(sum(r["ref_nll"] for r in records) / tg) if tg else None,
            "positions": pos, "windows": len(records),
        }

    def per_sample(self, record):
        return {"kl_mean": [sum(record["kl"]), record["positions"]],
                "top1": record["top1"] / max(1, record["positions"])}
