"""The shipped demo models: loadable by mlx-lm, the promised architecture, trained for real, reproducible."""

from __future__ import annotations

import json
import math

import mixq  # noqa: F401  (fast BLAS before mlx)
import pytest

from mixq.core.corpus import CorpusFile, find_corpus_dir, load_corpus, sample_text, split_text
from mixq.core.errors import MixqError
from mixq.demo import model_names, model_path

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

NAMES = ["demo", "demo-moe"]


@pytest.fixture(scope="module")
def loaded():
    from mlx_lm import load

    out = {}
    for name in NAMES:
        model, tok = load(str(model_path(name)))
        model.set_dtype(mx.float32)
        out[name] = (model, tok)
    return out


def _config(name):
    return json.loads((model_path(name) / "config.json").read_text())


def test_model_path_names():
    assert model_names() == NAMES
    assert model_path("demo").name == "demo"
    assert model_path("demo-moe").name == "demo_moe"
    assert model_path("demo_moe") == model_path("demo-moe")
    with pytest.raises(KeyError):
        model_path("nope")


def test_shipped_files_and_size():
    total = 0
    for name in NAMES:
        d = model_path(name)
        for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]:
            assert (d / f).is_file(), f"{d / f} missing"
        total += sum(p.stat().st_size for p in d.iterdir() if p.is_file())
        w = mx.load(str(d / "model.safetensors"))
        dtypes = {k: v.dtype for k, v in w.items()}
        assert dtypes["lm_head.weight"] == mx.bfloat16
        assert all(v == mx.bfloat16 for k, v in dtypes.items() if "A_log" not in k and "e_score" not in k)
    assert total <= 25 * 2**20


def test_config_patterns():
    dense, moe = _config("demo"), _config("demo-moe")
    for cfg in (dense, moe):
        assert cfg["model_type"] == "nemotron_h"
        assert cfg["architectures"] == ["NemotronHForCausalLM"]
        assert isinstance(cfg["hybrid_override_pattern"], str)
        assert cfg["tie_word_embeddings"] is False
        assert cfg["num_hidden_layers"] == len(cfg["hybrid_override_pattern"])
    p = dense["hybrid_override_pattern"]
    assert set(p) == {"M", "*", "-"} and len(p) >= 8 and p.count("*") >= 2
    p = moe["hybrid_override_pattern"]
    assert set(p) == {"M", "*", "E"} and len(p) >= 6
    # cache slots (M and * layers only) differ from layer indices after the first E layer
    slots = [i for i, c in enumerate(p) if c in "M*"]
    assert slots != list(range(len(slots)))
    first_e = p.index("E")
    assert "*" in p[:first_e] and "*" in p[first_e:]
    assert moe["num_experts_per_tok"] == 2 and moe["n_routed_experts"] >= 4 and moe["n_shared_experts"] == 1


def test_models_load_with_mlx_lm(loaded):
    from mlx_lm.models.switch_layers import SwitchLinear

    n_params = {}
    for name, (model, tok) in loaded.items():
        assert tok.eos_token == "<|im_end|>"
        assert model.layers[0].block_type == "M"
        # every quantizable weight's input width admits group sizes 32, 64 and 128
        for path, m in model.named_modules():
            if isinstance(m, (nn.Linear, SwitchLinear, nn.Embedding)):
                assert m.weight.shape[-1] % 128 == 0, path
        n_params[name] = sum(v.size for _, v in tree_flatten(model.parameters()))
        logits = model(mx.array([[1, 2, 3, 4]]))
        assert logits.shape == (1, 4, _config(name)["vocab_size"])
    assert 3e6 <= n_params["demo"] <= 6.5e6
    assert 1e6 <= n_params["demo-moe"] <= 3.5e6


def test_chat_template_matches_training_render(loaded):
    from mixq.demo.chatdata import render_prompt

    _, tok = loaded["demo"]
    q = "Define Love."
    think = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
    assert think == render_prompt(q)
    assert think.endswith("<|im_start|>assistant\n<think>\n")
    msgs = [{"role": "system", "content": "/no_think"}, {"role": "user", "content": q}]
    no_think = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert no_think == render_prompt(q, system="/no_think")
    assert no_think.endswith("<think></think>")


def test_generation_closes_think_block_and_stops(loaded):
    from mixq.demo.check import generate_one, think_ok

    for name in NAMES:
        model, tok = loaded[name]
        msgs = [{"role": "user", "content": "What does the Devil's Dictionary say about Abasement?"}]
        text, reason = generate_one(model, tok, msgs, max_tokens=96)
        assert think_ok(text, reason), (name, text, reason)


def _tiny_data(tok_vocab=384):
    from mixq.core.tokenizer import train_bpe
    from mixq.demo.train import build_data

    train, held = split_text(sample_text(), 0.2)
    tok = train_bpe([train], tok_vocab)
    f = CorpusFile("sample", None, "", train, held)
    return tok, build_data(tok, [f], with_chat=False)


def test_short_training_is_deterministic():
    from mixq.demo.train import full_config, train

    tok, data = _tiny_data()
    cfg = full_config({
        "model_type": "nemotron_h", "hybrid_override_pattern": "M*E-", "hidden_size": 128,
        "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
        "attention_bias": False, "mamba_num_heads": 4, "mamba_head_dim": 32, "mamba_proj_bias": False,
        "ssm_state_size": 16, "conv_kernel": 4, "n_groups": 1, "mlp_bias": False, "layer_norm_epsilon": 1e-5,
        "use_bias": False, "use_conv_bias": True, "max_position_embeddings": 512, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 128, "n_shared_experts": 1,
        "moe_shared_expert_intermediate_size": 128, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
        "routed_scaling_factor": 1.0, "tie_word_embeddings": False,
    }, tok)
    kw = dict(steps=6, batch=4, seq_len=32, lr=3e-3, seed=3, log_every=2, verbose=False)
    _, curve_a, losses_a = train(cfg, data, **kw)
    _, curve_b, losses_b = train(cfg, data, **kw)
    assert losses_a == losses_b
    assert curve_a == curve_b
    assert losses_a[-1] < losses_a[0]
    _, _, losses_c = train(cfg, data, **{**kw, "seed": 4})
    assert losses_c != losses_a


def test_heldout_perplexity_far_below_unigram(loaded):
    from mixq.demo.train import encode, heldout_windows, perplexity, unigram_perplexity

    try:
        files = load_corpus(find_corpus_dir())
    except MixqError:
        # no corpus beside the checkout: the package ships held-out slices and training-side sample text
        from mixq.core.corpus import CorpusFile, sample_text
        from mixq.quant.calibration import read_heldout_sections

        files = [CorpusFile(name, None, "", sample_text(), text) for name, text in read_heldout_sections()]
    from tokenizers import Tokenizer

    bpe = Tokenizer.from_file(str(model_path("demo") / "tokenizer.json"))
    windows = {k: v[:3] for k, v in heldout_windows(bpe, files, 128).items()}
    train_tokens = [encode(bpe, f.train[:400_000]) for f in files]
    uni = unigram_perplexity(train_tokens, windows, bpe.get_vocab_size())["all"]
    for name in NAMES:
        model, _ = loaded[name]
        ppl = perplexity(model, windows)["all"]
        assert math.isfinite(ppl)
        assert ppl < 0.3 * uni, (name, ppl, uni)
