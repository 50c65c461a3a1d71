"""`perplexity`: word and byte perplexity over held-out text with rolling windows (WikiText-2 style).

Each document is BOS + its tokens, scored in windows of `--seq-len` tokens (default 512): the first window
scores every token after BOS, each later one re-reads the previous `seq_len // 2` tokens as context and
scores only the new ones, so every token is scored exactly once, with at least half a window of context.
From the summed negative log-likelihood (nats):

    word_perplexity = exp(NLL / words)     words = whitespace-separated words (lm-eval's WikiText count)
    byte_perplexity = exp(NLL / bytes)     UTF-8 bytes: comparable across tokenizers
    bits_per_byte   = NLL / bytes / ln 2
    token_perplexity = exp(NLL / scored tokens)

Text: see mixq.eval.tasks._text. A sample is one document; `--limit N` takes the first N.
"""

from __future__ import annotations

import math
import re

from mixq.eval.registry import Task, register
from mixq.eval.tasks import _text

DEFAULT_SEQ_LEN = 512


def rolling_windows(n_tokens: int, seq_len: int, overlap: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored target) per window over tokens[0:n_tokens]; targets 1..n-1 once each."""
    if seq_len < 2 or not 0 <= overlap < seq_len:
        raise ValueError("need seq_len >= 2 and 0 <= overlap < seq_len")
    out = []
    pred = 1
    while pred < n_tokens:
        start = 0 if pred == 1 else max(0, pred - max(1, overlap))  # at least the token before
        end = min(n_tokens, start + seq_len)
        out.append((start, end, pred))
        pred = end
    return out


def safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf  # a random-weight model on unspaced text can get there


def word_count(text: str) -> int:
    return len(re.split(r"\s+", text.strip())) if text.strip() else 0


@register
class Perplexity(Task):
    name = "perplexity"
    title = "perplexity"
    metric = "word_perplexity"
    metric_label = "word ppl"
    higher_is_better = False
    percent = False
    verdict = "relative"
    needs_logits = False  # a server can score it through echoed log-probs
    batch_size = 4
    extra = (("byte_perplexity", "byte ppl", False, False), ("bits_per_byte", "bits/byte", False, False))

    def _seq(self, opts) -> int:
        return int(opts.seq_len or DEFAULT_SEQ_LEN)

    def settings(self, opts) -> dict:
        s = self._seq(opts)
        return {"seq_len": s, "overlap": s // 2}

    def load(self, opts, limit):
        return _text.task_data(opts, limit)

    def process(self, samples, ctx):
        be = ctx.backend
        if be.kind != "local":
            return [dict(be.rolling_nll(s["text"]), id=s["id"], words=word_count(s["text"]),
                         bytes=len(s["text"].encode("utf-8"))) for s in samples]
        import mlx.core as mx

        from mixq.core.metrics import token_nll

        seq = self._seq(ctx.opts)
        rows, owners = [], []
        docs = []
        for k, s in enumerate(samples):
            ids = be.bos() + be.encode(s["text"])
            docs.append(ids)
            for start, end, pred in rolling_windows(len(ids), seq, seq // 2):
                rows.append((ids[start:end], pred - start))
                owners.append(k)
        nll = [0.0] * len(samples)
        scored = [0] * len(samples)
        for group in be.batches([r for r, _ in rows]):
            lg = be.logits([rows[g][0] for g in group])
            for b, g in enumerate(group):
                toks, first = rows[g]
                per = token_nll(lg[b:b + 1, :len(toks)], mx.array([toks]))[0]  # targets 1..len-1
                part = per[first - 1:]
                nll[owners[g]] += float(part.sum().item())
                scored[owners[g]] += int(part.shape[0])
        return [{"id": s["id"], "nll": nll[k], "tokens": scored[k], "words": word_count(s["text"]),
                 "bytes": len(s["text"].encode("utf-8"))} for k, s in enumerate(samples)]

    def aggregate(self, records):
        nll = sum(r["nll"] for r in records)
        words = sum(r["words"] for r in records)
        nbytes = sum(r["bytes"] for r in records)
        toks = sum(r["tokens"] for r in records)
        return {
            "word_perplexity": safe_exp(nll / words) if words else None,
            "byte_perplexity": safe_exp(nll / nbytes) if nbytes else None,
            "bits_per_byte": nll / nbytes / math.log(2) if nbytes else None,
            "token_perplexity": safe_exp(nll / toks) if toks else None,
            "nll": nll, "words": words, "bytes": nbytes, "tokens": toks, "documents": len(records),
        }
