"""End-to-end quality of a set of formats: KL vs the float model, top-1 agreement and perplexity.

Measured with quantize->dequantize weights in float32 (the CPU-exact stand-in for the quantized kernels),
over fixed windows. The float model's logits are computed once per window set and reused for every plan.
"""

from __future__ import annotations

from mixq.core.formats import Format
from mixq.quant.apply import fake_quantized
from mixq.quant.gptq import RTN, Rounding
from mixq.quant.sensitivity import _round




class Evaluator:
    def __init__(self, model, tokens, source_dtypes: dict, batch_size: int = 8):
        import mlx.core as mx

        self.model, self.tokens, self.source_dtypes, self.bs = model, tokens, source_dtypes, batch_size
        self.ref = []
        for s in range(0, tokens.shape[0], batch_size):
            logits = model(tokens[s:s + batch_size]).astype(mx.float32)
            mx.eval(logits)
            self.ref.append(logits)

    def measure(self, formats: dict[str, Format] | None, desc: str | None = None,
                rounding: Rounding = RTN) -> dict:
        """KL mean / p99 / max, top-1 agreement and perplexity of the model under `formats`.

        `rounding` RTN is what mlx-lm writes (the baselines); mixq's plans pass the convert's rounding."""
        import mlx.core as mx
        import numpy as np
        from tqdm import tqdm

        from mixq.core.metrics import kl_per_token, summarize, token_nll

        kls, same, nll_q, nll_ref = [], [], [], []
        with fake_quantized(self.model, formats or {}, self.source_dtypes, rounding):
            starts = list(range(0, self.tokens.shape[0], self.bs))
            for bi, s in enumerate(tqdm(starts, desc=desc, disable=desc is None, leave=False)):
                x, ref = self.tokens[s:s + self.bs], self.ref[bi]
                logits = self.model(x).astype(mx.float32)
                kls.append(np.array(kl_per_token(ref, logits)).ravel())
                same.append(np.array(logits.argmax(-1) == ref.argmax(-1)).ravel())
                nll_q.append(np.array(token_nll(logits, x)).ravel())
                nll_ref.append(np.array(token_nll(ref, x)).ravel())
        kl = summarize(np.concatenate(kls))
        return {
            "kl_mean": _round(kl["mean"]),
            "kl_p99": _round(kl["p99"]),
            "kl_max": _round(kl["max"]),
            "top1": _round(float(np.concatenate(same).mean())),
            "ppl": _round(float(np.exp(np.concatenate(nll_q).mean()))),
            "float_ppl": _round(float(np.exp(np.concatenate(nll_ref).mean()))),
            "tokens": int(kl["n"]),
        }
