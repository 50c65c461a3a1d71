"""Sensitivity: one entry per attention layer, K and V apart, linear cost; build writes a full config."""

import json

import mixq  # noqa: F401
import numpy as np
import pytest

from mixq.core.anatomy import describe
from mixq.core.modelio import load
from mixq.kvcache import build_kv_config, load_config, make_cache
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
