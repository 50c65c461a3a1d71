"""The runtime cache inside mlx-lm's generate / stream_generate, and prompt caching."""

import mixq  # noqa: F401
import mlx.core as mx
import pytest
from mlx_lm import generate, stream_generate
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import save_prompt_cache

from mixq.core.modelio import demo_dir, load
from mixq.kvcache import load_prompt_cache, make_cache, uniform_config
from mixq.kvcache.cache import MixedKVCache

PROMPT = "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and"


def _greedy(lm, caches, n=32, prompt=None):
    ids = lm.tokenizer.encode(prompt or PROMPT)
    out = []
    for tok, _ in generate_step(mx.array(ids), lm.model, max_tokens=n, prompt_cache=caches):
        out.append(int(tok))
    return out


def _mixed(lm):
    cfg = uniform_config(lm, 8)
    pattern = [(4, 8), (8, 3), (16, 5), (6, 4)]
    for i, e in enumerate(cfg["layers"]):
        e["k_bits"], e["v_bits"] = pattern[i % len(pattern)]
    return cfg


@pytest.fixture(scope="module", params=["nemotron_dense", "nemotron_moe", "qwen3"])
def lm(request):
    return load(request.getfixturevalue(request.param))


def test_eight_bit_generation_equals_float(lm):
    assert _greedy(lm, make_cache(lm, uniform_config(lm, 8))) == _greedy(lm, make_cache(lm))


def test_mixed_config_generates(lm):
    cfg = _mixed(lm)
    text = generate(lm.model, lm.tokenizer, PROMPT, max_tokens=12, prompt_cache=make_cache(lm, cfg))
    assert isinstance(text, str)
    caches = make_cache(lm, cfg, quantize_after=8)
    pieces = list(stream_generate(lm.model, lm.tokenizer, PROMPT, max_tokens=12, prompt_cache=caches))
    assert 1 <= len(pieces) <= 12
    mixed = [c for c in caches if isinstance(c, MixedKVCache)]
    assert mixed and all(c.quantized or c.k_bits == c.v_bits == 16 for c in mixed)


def test_prompt_cache_save_and_resume(lm, tmp_path):
    cfg = _mixed(lm)
    ids = lm.tokenizer.encode(PROMPT)
    straight = _greedy(lm, make_cache(lm, cfg), n=8)

    caches = make_cache(lm, cfg)
    lm.model(mx.array([ids[:-1]]), cache=caches)  # prefill all but the last prompt token
    mx.eval([c.state for c in caches])
    path = str(tmp_path / "prompt.safetensors")
    save_prompt_cache(path, caches, {"note": "mixq"})
    loaded, meta = load_prompt_cache(path, return_metadata=True)
    assert meta == {"note": "mixq"}
    assert [type(c).__name__ for c in loaded] == [type(c).__name__ for c in caches]
    resumed = [int(t) for t, _ in generate_step(mx.array(ids[-1:]), lm.model, max_tokens=8, prompt_cache=loaded)]
    assert resumed == straight


@pytest.mark.skipif(not (demo_dir("demo") / "config.json").is_file(), reason="demo model not built yet")
def test_demo_eight_bit_equals_float_for_32_greedy_tokens():
    demo = load("demo")
    assert _greedy(demo, make_cache(demo, uniform_config(demo, 8))) == _greedy(demo, make_cache(demo))
