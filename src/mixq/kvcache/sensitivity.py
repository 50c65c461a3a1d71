"""How much each attention layer's keys and values care about their bit width, measured as served.

For every calibration batch: prefill the prefix once with a float cache; score the continuation with the
float cache (the reference); then for every attention layer, separately for K and for V, and for every
candidate width: copy the prefilled caches, quantize only that layer's K (or V) at that width, score the
continuation (its own keys and values enter that cache quantized, as in decoding) and take the mean KL of
the next-token distribution against the reference. The prefix is prefilled once per batch, so the cost
is 2 + (attention layers x 2 x candidates) continuation forwards: linear in attention layers. The layers
before the quantized one compute what they did for the reference, so a candidate's forward starts at its
layer from the input the reference pass kept (`forward_equivalents` counts the layers run).
"""

from __future__ import annotations

import functools
import math
import time

import numpy as np

from mixq.core.errors import MixqError

METHOD = "kv-prefill-quantize-continue-v2"   # v2: KL without a difference of log-sum-exps
KEPT_INPUT_BYTES = 512 << 20   # attention layers' inputs kept per batch (a candidate's forward starts there)


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


def _kl_sums(ref_logits, logits, ref_lse) -> tuple[float, float, int]:
    """(sum, sum of squares, count) of the per-position KL(ref || logits); `ref_lse` the reference's
    log-sum-exp, computed once for all the candidates."""
    from mixq.core.metrics import kl_per_token

    kl = np.asarray(kl_per_token(ref_logits, logits, ref_lse=ref_lse), dtype=np.float64)
    return float(kl.sum()), float((kl * kl).sum()), int(kl.size)


def _hidden_bytes(model) -> int:
    """A hidden state's bytes per position as the model's layers pass it on."""
    import mlx.core as mx

    from mixq.core.forward import layer_container

    container, emb = layer_container(model)
    h = getattr(container, emb)(mx.zeros((1, 1), dtype=mx.int32))
    return int(h.shape[-1]) * h.dtype.size


def _kept_inputs(layout: list[dict], nbytes: int) -> set:
    """The attention layers whose input on the continuation is kept, deepest first (their candidates skip
    the most layers), within KEPT_INPUT_BYTES."""
    keep = set()
    for layer in sorted({e["layer"] for e in layout}, reverse=True):
        if layer > 0 and (len(keep) + 1) * nbytes <= KEPT_INPUT_BYTES:
            keep.add(layer)
    return keep


def _layer_count(model) -> int | None:
    """The model's layers, or None for a family the layer runner does not know (whole forwards then)."""
    from mixq.core.forward import layer_container

    try:
        return len(layer_container(model)[0].layers)
    except MixqError:
        return None


def _from_layer(model, tokens, caches, *, first: int = 0, h=None, keep=()):
    """The logits of `tokens` (evaluated) with the model's layers from `first` on, `h` the input of layer
    `first` (the layers before it pass their input on, the last of them `h`), and the inputs of the layers
    in `keep` as they ran: (logits, {layer: input})."""
    import mlx.core as mx

    from mixq.core.forward import wrapped_layers

    inputs: dict = {}

    def kept(i, layer, x, *args, **kwargs):
        inputs[i] = x
        return layer(x, *args, **kwargs)

    calls = {i: functools.partial(kept, i) for i in keep}
    if first:
        calls.update({i: lambda layer, x, *args, **kwargs: x for i in range(first - 1)})
        calls[first - 1] = lambda layer, *args, **kwargs: h
    if not calls:
        logits = model(tokens, cache=caches)
    else:
        with wrapped_layers(model, calls):
            logits = model(tokens, cache=caches)
    mx.eval(logits, list(inputs.values()))
    return logits, inputs


def measure(model, layout: list[dict], tokens, candidates: list[int], *, group_size: int = 64,
            prefix: int | None = None, batch_size: int = 8, progress=None) -> dict:
    """KL per (attention layer, K or V, candidate bits). `layout` from config.attention_layout.

    Returns {"method", "prefix", "continuation", "samples", "forwards", "seconds",
    "layers": [{"layer", "cache_slot", "k": {"bits": kl}, "v": {...}, "se": {"k": {...}, "v": {...}}}]}
    with bits as strings (16 = float = 0) and "se" the standard error of each mean over positions: KL is
    heavy-tailed (on MoE models a small perturbation flips a few routing decisions), so it says how far
    to trust a difference; more --samples shrink it.
    """
    from mixq.core.experts import segmented_experts

    with segmented_experts(model):   # a MoE model's float experts a segment per expert on the CPU
        return _measure(model, layout, tokens, candidates, group_size=group_size, prefix=prefix,
                        batch_size=batch_size, progress=progress)


def _measure(model, layout: list[dict], tokens, candidates: list[int], *, group_size: int, prefix: int | None,
             batch_size: int, progress) -> dict:
    import mlx.core as mx

    from mixq.core.anatomy import make_cache as base_cache
    from mixq.core.metrics import logsumexp
    from mixq.kvcache.cache import FLOAT_BITS, MixedKVCache, fork

    tokens = np.asarray(tokens)
    n, length = tokens.shape
    prefix = length // 2 if prefix is None else int(prefix)
    if not 1 <= prefix < length:
        raise MixqError(f"prefix {prefix} must leave a continuation in {length}-token windows")
    quant = sorted({int(b) for b in candidates if int(b) != FLOAT_BITS})
    sums = {(e["layer"], p, b): [0.0, 0.0, 0] for e in layout for p in "kv" for b in quant}
    forwards, layer_runs, t0 = 0, 0, time.time()
    total = len(layout) * 2 * len(quant)
    n_layers = _layer_count(model)
    per_position = _hidden_bytes(model) if n_layers else 0
    for start in range(0, n, batch_size):
        x = mx.array(tokens[start:start + batch_size])
        bs = x.shape[0]
        base = base_cache(model)
        model(x[:, :prefix], cache=base)
        mx.eval([c.state for c in base])
        cont = x[:, prefix:]
        kept = _kept_inputs(layout, per_position * cont.size) if n_layers else set()
        ref, inputs = _from_layer(model, cont, fork(base), keep=kept)
        ref_lse = logsumexp(ref)
        forwards, layer_runs = forwards + 2, layer_runs + 2 * (n_layers or 1)
        done = 0
        for e in layout:
            s, first = e["cache_slot"], e["layer"] if e["layer"] in inputs else 0
            for part in "kv":
                for b in quant:
                    caches = fork(base)
                    kb, vb = (b, FLOAT_BITS) if part == "k" else (FLOAT_BITS, b)
                    caches[s] = MixedKVCache.from_kv_cache(base[s], kb, vb, group_size)
                    logits, _ = _from_layer(model, cont, caches, first=first, h=inputs.get(first))
                    s1, s2, cnt = _kl_sums(ref, logits, ref_lse)
                    forwards, layer_runs = forwards + 1, layer_runs + (n_layers - first if n_layers else 1)
                    acc = sums[(e["layer"], part, b)]
                    acc[0] += s1
                    acc[1] += s2
                    acc[2] += cnt
                    done += 1
                    if progress:
                        progress(start + bs, n, done, total)
        del inputs
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
            "forward_equivalents": round(layer_runs / (n_layers or 1), 2),
            "group_size": group_size, "candidates": sorted({int(b) for b in candidates}),
            "forwards": forwards, "seconds": round(time.time() - t0, 3), "layers": layers}


def evaluate(model, kv_config, tokens, *, prefix: int | None = None, batch_size: int = 8,
             quantize_after: int = 0) -> dict:
    """Held-out quality of a config as served: the whole window through make_cache(model, kv_config),
    KL against the float cache on the positions after `prefix` (default: half the window).

    Returns {"kl_mean", "kl_p99", "kl_max", "top1", "positions", "kv_bytes_per_token"} where
    kv_bytes_per_token is what the caches actually held per token (compute dtype).
    """
    return evaluate_many(model, [kv_config], tokens, prefix=prefix, batch_size=batch_size,
                         quantize_after=quantize_after)[0]


def evaluate_many(model, kv_configs: list, tokens, *, prefix: int | None = None, batch_size: int = 8,
                  quantize_after: int = 0) -> list[dict]:
    """`evaluate` for each of several configs on the same windows, the float reference run once a batch."""
    import mlx.core as mx

    from mixq.core.experts import segmented_experts
    from mixq.core.metrics import kl_per_token, logsumexp, summarize, top1_agreement
    from mixq.kvcache import make_cache
    from mixq.kvcache.cache import kv_bytes
    from mixq.kvcache.config import unwrap

    net = unwrap(model)[0]
    tokens = np.asarray(tokens)
    n, length = tokens.shape
    prefix = length // 2 if prefix is None else int(prefix)
    if not 0 <= prefix < length:
        raise MixqError(f"prefix {prefix} must leave positions to score in {length}-token windows")
    kls, agree, nbytes = ([[] for _ in kv_configs], [[] for _ in kv_configs], [0] * len(kv_configs))
    count = 0
    with segmented_experts(net):   # a MoE model's float experts a segment per expert on the CPU
        for start in range(0, n, batch_size):
            x = mx.array(tokens[start:start + batch_size])
            ref = net(x, cache=make_cache(net))[:, prefix:]
            mx.eval(ref)
            ref_lse = logsumexp(ref)
            for i, cfg in enumerate(kv_configs):
                caches = make_cache(model, cfg, quantize_after=quantize_after)
                out = net(x, cache=caches)[:, prefix:]
                mx.eval(out)
                kls[i].append(np.asarray(kl_per_token(ref, out, ref_lse=ref_lse)))
                agree[i].append(top1_agreement(ref, out) * x.shape[0])
                nbytes[i] += kv_bytes(caches)
            count += x.shape[0] * length
    results = []
    for k, a, b in zip(kls, agree, nbytes):
        s = summarize(np.concatenate(k, axis=0))
        results.append({"kl_mean": _round(s["mean"]), "kl_p99": _round(s["p99"]), "kl_max": _round(s["max"]),
                    "top1": _round(sum(a) / n), "positions": s["n"], "samples": n, "seq_len": length,
                    "prefix": prefix, "kv_bytes_per_token": _round(b / count)})
    return results
