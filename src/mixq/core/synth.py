"""Tiny seeded model directories (random weights, real tokenizer) for tests and quick starts.

Each is a real mlx-lm model dir (config.json, bf16 safetensors, tokenizer files with a chat template
that opens `<think>`), well under 1 MB. Random weights: for structure, not for sensitivity numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

from mixq.core.corpus import sample_text
from mixq.core.errors import MixqError
from mixq.core.tokenizer import BOS, IM_END, train_bpe, write_tokenizer

VOCAB = 512

_NEMOTRON_BASE = {
    "model_type": "nemotron_h",
    "architectures": ["NemotronHForCausalLM"],
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "attention_bias": False,
    "mamba_num_heads": 4,
    "mamba_head_dim": 16,
    "mamba_proj_bias": False,
    "ssm_state_size": 16,
    "conv_kernel": 4,
    "n_groups": 1,
    "mlp_bias": False,
    "layer_norm_epsilon": 1e-5,
    "use_bias": False,
    "use_conv_bias": True,
    "tie_word_embeddings": False,
}

FIXTURES = {
    # all three dense kinds
    "nemotron-dense": {**_NEMOTRON_BASE, "hybrid_override_pattern": "M*-M*-"},
    # MoE and MLP layers between attention layers: cache slots differ from layer indices
    "nemotron-moe": {
        **_NEMOTRON_BASE,
        "hybrid_override_pattern": "M-M*EM*-E",
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "n_shared_experts": 1,
        "moe_shared_expert_intermediate_size": 64,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
    },
    "qwen3": {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
}

_TOKENIZER_CACHE: dict[int, object] = {}


def _tokenizer(vocab: int):
    if vocab not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE[vocab] = train_bpe([sample_text()], vocab_size=vocab)
    return _TOKENIZER_CACHE[vocab]


def router_weight(key: str, names, v):
    """`v`, or in its place a random one for an MoE router's weight (a module with an
    `e_score_correction_bias` beside it): mlx-lm starts routers at zero, so every expert would tie and
    the same top-k take every token."""
    import mlx.core as mx

    if key.endswith(".weight") and key[:-len("weight")] + "e_score_correction_bias" in names:
        return mx.random.normal(v.shape) * v.shape[-1] ** -0.5
    return v


def build_fixture(kind: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write the fixture model `kind` (see FIXTURES) into out_dir; deterministic for a seed."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mixq.core.modelio import check_model_type

    if kind not in FIXTURES:
        raise MixqError(f"unknown fixture {kind!r}; choose from {', '.join(FIXTURES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(VOCAB)
    config = dict(FIXTURES[kind])
    config["bos_token_id"] = tok.token_to_id(BOS)
    config["eos_token_id"] = tok.token_to_id(IM_END)
    config["torch_dtype"] = "bfloat16"

    import importlib

    arch = importlib.import_module(f"mlx_lm.models.{check_model_type(config)}")
    mx.random.seed(seed)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    params = tree_flatten(model.parameters())
    names = {k for k, _ in params}
    weights = {k: v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in ((k, router_weight(k, names, v)) for k, v in params)}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(tok, out)
    return out
