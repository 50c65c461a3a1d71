"""How much each attention layer's keys and values care about their bit width, measured as served.

For every calibration batch: prefill the prefix once with a float cache; score the continuation with the
float cache (the reference); then for every attention layer, separately for K and for V, and for every
candidate width: copy the prefilled caches, quantize only that layer's K (or V) at that width, score the
continuation (its own keys and values enter that cache quantized, as in decoding) and take the mean KL of
the next-token distribution against the reference. The prefix is prefilled once per batch, so the cost
is 2 + (attention layers x 2 x candidates) continuation forwards: linear in attention layers.
"""

from __future__ import annotations

import math
import time

import numpy as np

from mixq.core.errors import MixqError

METHOD = "kv-prefill-quantize-continue-v1"


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids without special tokens; through the fast backend when there is one (no length warning)."""
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    backend = getattr(inner, "backend_tokenizer", None)
    if backend is not None:
        return list(backend.encode(text, add_special_tokens=False).ids)
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def text_windows(tokenizer, *, n_samples: int, seq_len: int, split: str = "train",
                 corpus_dir=None) -> tuple[np.ndarray, dict]:
    """`n_samples` token windows of `seq_len` from the corpus `split` ("train" or "heldout").

    Windows cycle over the corpus files and are spread evenly through each file's split; deterministic.
    Without a corpus directory the packaged sample text is used (split by the same rule).
    """
    from mixq.core.corpus import find_corpus_dir, load_corpus, sample_text, split_text

    if n_samples < 1 or seq_len < 2:
        raise MixqError(f"need at least 1 sample of at least 2 tokens (got {n_samples} x {seq_len})")
    if split not in ("train", "heldout"):
        raise MixqError(f"unknown split {split!r}")
    try:
        files = load_corpus(find_corpus_dir(corpus_dir))
        texts = [(f.name, getattr(f, split)) for f in files]
        source = {"corpus": str(find_corpus_dir(corpus_dir)), "files": [f.name for f in files],
                  "sha256": {f.name: f.sha256[:16] for f in files}}
    except MixqError:
        if corpus_dir:
            raise
        train, held = split_text(sample_text())
        texts = [("sample", train if split == "train" else held)]
        source = {"corpus": "mixq.data/sample.txt", "files": ["sample"]}
    texts = [(n, t) for n, t in texts if t.strip()]
    if not texts:
        raise MixqError("the corpus has no text in its " + split + " split")
    per_file = math.ceil(n_samples / len(texts))
    rows = []
    for i in range(n_samples):
        name, text = texts[i % len(texts)]
        k = i // len(texts)
        start = int(len(text) * k / per_file)
        rot = text[start:] + "\n" + text[:start]
        width = seq_len * 8
        while True:
            ids = _encode(tokenizer, rot[:width])
            if len(ids) >= seq_len or width >= len(rot):
                break
            width *= 2
        if len(ids) < seq_len:
            raise MixqError(f"{name}: not enough {split} text for a {seq_len}-token window")
        rows.append(ids[:seq_len])
    return np.asarray(rows, dtype=np.int32), {**source, "split": split, "samples": n_samples, "seq_len": seq_len}


def _kl_sums(ref_logits, logits) -> tuple[float, float, int]:
    """(sum, sum of squares, count) of the per-position KL(ref || logits)."""
    from mixq.core.metrics import kl_per_token

    kl = np.asarray(kl_per_token(ref_logits, logits), dtype=np.float64)
    return float(kl.sum()), float((kl * kl).sum()), int(kl.size)


def measure(model, layout: list[dict], tokens, candidates: list[int], *, group_size: int = 64,
            prefix: int | None = None, batch_size: int = 8, progress=None) -> dict:
    """KL per (attention layer, K or V, candidate bits). `layout` from config.attention_layout.

    Returns {"method", "prefix", "continuation", "samples", "forwards", "seconds",
    "layers": [{"layer", "cache_slot", "k": {"bits": kl}, "v": {...}, "se": {"k": {...}, "v": {...}}}]}
    with bits as strings (16 = float = 0) and "se" the standard error of each mean over positions: KL is
    heavy-tailed (on MoE models a small perturbation flips a few routing decisions), so it says how far
    to trust a difference; more --samples shrink it.
    """
    import mlx.core as mx

    from mixq.core.anatomy import make_cache as base_cache
    from mixq.kvcache.cache import FLOAT_BITS, MixedKVCache, fork

    tokens = np.asarray(tokens)
    n, length = tokens.shape
    prefix = length // 2 if prefix is None else int(prefix)
    if not 1 <= prefix < length:
        raise MixqError(f"prefix {prefix} must leave a continuation in {length}-token windows")
    quant = sorted({int(b) for b in candidates if int(b) != FLOAT_BITS})
    sums = {(e["layer"], p, b): [0.0, 0.0, 0] for e in layout for p in "kv" for b in quant}
    forwards, t0 = 0, time.time()
    total = len(layout) * 2 * len(quant)
    for start in range(0, n, batch_size):
        x = mx.array(tokens[start:start + batch_size])
        bs = x.shape[0]
        base = base_cache(model)
        model(x[:, :prefix], cache=base)
        mx.eval([c.state for c in base])
        cont = x[:, prefix:]
        ref = model(cont, cache=fork(base))
        mx.eval(ref)
        forwards += 2
        done = 0
        for e in layout:
            s = e["cache_slot"]
            for part in "kv":
                for b in quant:
                    caches = fork(base)
                    kb, vb = (b, FLOAT_BITS) if part == "k" else (FLOAT_BITS, b)
                    caches[s] = MixedKVCache.from_kv_cache(base[s], kb, vb, group_size)
                    s1, s2, cnt = _kl_sums(ref, model(cont, cache=caches))
                    forwards += 1
                    acc = sums[(e["layer"], part, b)]
                    acc[0] += s1
                    acc[1] += s2
                    acc[2] += cnt
                    done += 1
                    if progress:
                        progress(start + bs, n, done, total)
    layers = []
    for e in layout:
        rec = {"layer": e["layer"], "cache_slot": e["cache_slot"], "se": {}}
        for part in "kv":
            rec[part], rec["se"][part] = {}, {}
            for b in quant:
                s1, s2, cnt = sums[(e["layer"], part, b)]
                mean = max(0.0, s1 / cnt)
                rec[part][str(b)] = _round(mean)
                rec["se"][part][str(b)] = _round(math.sqrt(max(0.0, s2 / cnt - mean * mean) / cnt))
            rec[part][str(FLOAT_BITS)] = 0.0
        layers.append(rec)
    return {"method": METHOD, "prefix": prefix, "continuation": length - prefix, "samples": n,
            "group_size": group_size, "candidates": sorted({int(b) for b in candidates}),
            "forwards": forwards, "seconds": round(time.time() - t0, 3), "layers": layers}


def evaluate(model, kv_config, tokens, *, prefix: int | None = None, batch_size: int = 8,
             quantize_after: int = 0) -> dict:
    """Held-out quality of a config as served: the whole window through make_cache(model, kv_config),
    KL against the float cache on the positions after `prefix` (default: half the window).

    Returns {"kl_mean", "kl_p99", "kl_max", "top1", "positions", "kv_bytes_per_token"} where
    kv_bytes_per_token is what the caches actually held per token (compute dtype).
    """
    import mlx.core as mx

    from mixq.core.metrics import kl_per_token, summarize, top1_agreement
    from mixq.kvcache import make_cache
    from mixq.kvcache.cache import kv_bytes
    from mixq.kvcache.config import unwrap

    net = unwrap(model)[0]
    tokens = np.asarray(tokens)
    n, length = tokens.shape
    prefix = length // 2 if prefix is None else int(prefix)
    if not 0 <= prefix < length:
        raise MixqError(f"prefix {prefix} must leave positions to score in {length}-token windows")
    kls, agree, nbytes, count = [], [], 0, 0
    for start in range(0, n, batch_size):
        x = mx.array(tokens[start:start + batch_size])
        ref = net(x, cache=make_cache(net))[:, prefix:]
        caches = make_cache(model, kv_config, quantize_after=quantize_after)
        out = net(x, cache=caches)[:, prefix:]
        mx.eval(ref, out)
        kls.append(np.asarray(kl_per_token(ref, out)))
        agree.append(top1_agreement(ref, out) * x.shape[0])
        nbytes += kv_bytes(caches)
        count += x.shape[0] * length
    s = summarize(np.concatenate(kls, axis=0))
    return {"kl_mean": _round(s["mean"]), "kl_p99": _round(s["p99"]), "kl_max": _round(s["max"]),
            "top1": _round(sum(agree) / n), "positions": s["n"], "samples": n, "seq_len": length,
            "prefix": prefix, "kv_bytes_per_token": _round(nbytes / count)}
