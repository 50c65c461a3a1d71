"""Sensitivity: one entry per attention layer, K and V apart, linear cost; build writes a full config."""

import json

import mixq  # noqa: F401
import numpy as np
import pytest

from mixq.core.anatomy import describe
from mixq.core.modelio import load
from mixq.kvcache import build_kv_config, load_config, make_cache, uniform_config
from mixq.kvcache.config import attention_layout
from mixq.kvcache.sensitivity import evaluate, measure, text_windows


@pytest.fixture(scope="module")
def moe(nemotron_moe):
    return load(nemotron_moe)


def test_windows_are_deterministic_and_split(moe):
    a, src = text_windows(moe.tokenizer, n_samples=3, seq_len=40)
    b, _ = text_windows(moe.tokenizer, n_samples=3, seq_len=40)
    h, hsrc = text_windows(moe.tokenizer, n_samples=3, seq_len=40, split="heldout")
    assert a.shape == (3, 40) and (a == b).all() and not (a == h).all()
    assert src["split"] == "train" and hsrc["split"] == "heldout"


def test_measure_per_layer_k_and_v(moe):
    anatomy = describe(moe.model, moe.config)
    layout = attention_layout(moe.model, anatomy)
    assert [(e["layer"], e["cache_slot"]) for e in layout] == [(3, 2), (6, 4)]
    tokens, _ = text_windows(moe.tokenizer, n_samples=2, seq_len=48)
    res = measure(moe.model, layout, tokens, [2, 8], group_size=64)
    assert res["forwards"] == 2 + len(layout) * 2 * 2  # prefill + reference + one per measurement
    json.dumps(res)
    for rec in res["layers"]:
        for part in "kv":
            assert set(rec[part]) == {"2", "8", "16"} and rec[part]["16"] == 0.0
            assert rec[part]["2"] > rec[part]["8"] >= 0.0
            assert set(rec["se"][part]) == {"2", "8"} and all(v >= 0 for v in rec["se"][part].values())


def test_build_writes_a_config_that_loads_and_runs(moe, tmp_path):
    out = tmp_path / "kv_config.json"
    res = build_kv_config(moe, target_bits=5.5, candidates="4,8", samples=2, seq_len=48, output=out)
    json.dumps(res)
    cfg = load_config(out)
    assert cfg["achieved_bits"] <= 5.5 and cfg["target_bits"] == 5.5
    assert cfg["model"]["fingerprint"] and cfg["model"]["layer_pattern"] == "M-M*EM*-E"
    assert [(l["layer"], l["cache_slot"]) for l in cfg["layers"]] == [(3, 2), (6, 4)]
    assert all(set(l["sensitivity"]) == {"k", "v", "se"} for l in cfg["layers"])
    assert cfg["predicted_kl"] >= 0 and cfg["measured_kl"]["kl_mean"] >= 0
    make_cache(moe, out)
    tokens, _ = text_windows(moe.tokenizer, n_samples=1, seq_len=32, split="heldout")
    ev = evaluate(moe, cfg, tokens)
    assert ev["positions"] == 16 and 0 <= ev["top1"] <= 1


def test_plain_transformer(qwen3):
    lm = load(qwen3)
    res = build_kv_config(lm, target_bits=6.0, candidates=[4, 8], samples=1, seq_len=32, write=False)
    cfg = res["config"]
    assert [l["cache_slot"] for l in cfg["layers"]] == [0, 1, 2]
    assert np.isfinite(cfg["measured_kl"]["kl_mean"])


def test_a_candidate_forward_from_its_layer_equals_the_whole_forward(moe):
    # the layers before the quantized one are not run again (the reference pass kept their output)
    import mlx.core as mx

    from mixq.core.anatomy import make_cache as base_cache
    from mixq.core.metrics import kl_per_token
    from mixq.kvcache.cache import MixedKVCache, fork

    model = moe.model
    layout = attention_layout(model, describe(model, moe.config))
    tokens, _ = text_windows(moe.tokenizer, n_samples=2, seq_len=48)
    res = measure(model, layout, tokens, [3], group_size=64)
    x = mx.array(tokens)
    base = base_cache(model)
    model(x[:, :24], cache=base)
    ref = model(x[:, 24:], cache=fork(base))
    for e, rec in zip(layout, res["layers"]):
        for part, bits in (("k", (3, 16)), ("v", (16, 3))):
            caches = fork(base)
            caches[e["cache_slot"]] = MixedKVCache.from_kv_cache(base[e["cache_slot"]], *bits, 64)
            whole = float(kl_per_token(ref, model(x[:, 24:], cache=caches)).mean())
            assert rec[part]["3"] == pytest.approx(whole, rel=1e-5) and whole > 0
    n = len(moe.config["hybrid_override_pattern"])
    # prefill + reference, then each candidate from its layer on (layers 3 and 6 of 9)
    assert res["forwards"] == 6 and res["forward_equivalents"] == pytest.approx(2 + 2 * (n - 3) / n + 2 * (n - 6) / n,
                                                                                abs=0.01)


def test_a_family_the_layer_runner_does_not_know_gets_whole_forwards(moe, monkeypatch):
    import mixq.core.forward as forward
    from mixq.core.errors import MixqError

    layout = attention_layout(moe.model, describe(moe.model, moe.config))
    tokens, _ = text_windows(moe.tokenizer, n_samples=2, seq_len=48)
    skipped = measure(moe.model, layout, tokens, [3], group_size=64)

    def unknown(model):
        raise MixqError("unknown family")

    monkeypatch.setattr(forward, "layer_container", unknown)
    whole = measure(moe.model, layout, tokens, [3], group_size=64)
    assert whole["forward_equivalents"] == whole["forwards"] == skipped["forwards"]
    assert [r[p]["3"] for r in whole["layers"] for p in "kv"] == \
        pytest.approx([r[p]["3"] for r in skipped["layers"] for p in "kv"], rel=1e-5)


def test_moe_experts_run_by_segment_with_the_same_kls_and_are_put_back(moe, monkeypatch):
    from mlx_lm.models.switch_layers import SwitchLinear

    from mixq.core import blas
    from mixq.core import experts as experts_mod

    layout = attention_layout(moe.model, describe(moe.model, moe.config))
    tokens, _ = text_windows(moe.tokenizer, n_samples=2, seq_len=48)
    before = [m for _, m in moe.model.named_modules() if type(m) is SwitchLinear]
    calls, real = [], experts_mod.segmented_gather_mm

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(experts_mod, "segmented_gather_mm", counted)
    cfg = uniform_config(moe, 4)
    seg = measure(moe.model, layout, tokens, [4], group_size=64)
    seg_ev = evaluate(moe, cfg, tokens)
    assert calls   # the sorted expert calls took the segmented path
    assert [m for _, m in moe.model.named_modules() if type(m) is SwitchLinear] == before
    n = len(calls)
    monkeypatch.setattr(blas, "NUMPY_ON_CPU", False)   # mlx's gather_mm
    ref = measure(moe.model, layout, tokens, [4], group_size=64)
    ref_ev = evaluate(moe, cfg, tokens)
    assert len(calls) == n
    for a, b in zip(seg["layers"], ref["layers"]):
        for part in "kv":
            assert a[part]["4"] == pytest.approx(b[part]["4"], rel=1e-3, abs=1e-7)
    assert seg_ev["kl_mean"] == pytest.approx(ref_ev["kl_mean"], rel=1e-3, abs=1e-7)
