"""Acceptance: on a hybrid whose cache slots are not layer indices, every layer's bits land on the cache
the layer actually uses; configs for other models are refused."""

import json

import mixq  # noqa: F401
import mlx.core as mx
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache

from mixq.core.errors import MixqError
from mixq.core.modelio import load
from mixq.kvcache import load_config, make_cache, uniform_config
from mixq.kvcache.cache import MixedKVCache


@pytest.fixture(scope="module")
def moe(nemotron_moe):
    return load(nemotron_moe)


def _config(lm, bits_by_layer):
    cfg = uniform_config(lm, 8)
    for e in cfg["layers"]:
        e["k_bits"], e["v_bits"] = bits_by_layer[e["layer"]]
    return cfg


class _Spy:
    """Stands in for one layer of the model and records the cache object it is handed."""

    def __init__(self, layer, index, seen):
        self.layer, self.index, self.seen = layer, index, seen
        self.block_type = layer.block_type

    def __call__(self, x, mask=None, cache=None):
        self.seen[self.index] = cache
        return self.layer(x, mask=mask, cache=cache)


def test_bits_land_on_the_layers_own_cache_slot(moe):
    # pattern M-M*EM*-E: attention layers 3 and 6 use cache slots 2 and 4
    cfg = _config(moe, {3: (8, 4), 6: (5, 16)})
    assert {e["layer"]: e["cache_slot"] for e in cfg["layers"]} == {3: 2, 6: 4}
    caches = make_cache(moe, cfg)
    assert [type(c).__name__ for c in caches] == ["ArraysCache", "ArraysCache", "MixedKVCache",
                                                  "ArraysCache", "MixedKVCache"]
    assert (caches[2].k_bits, caches[2].v_bits) == (8, 4)
    assert (caches[4].k_bits, caches[4].v_bits) == (5, 16)

    layers = moe.model.backbone.layers
    seen = {}
    try:
        moe.model.backbone.layers = [_Spy(l, i, seen) for i, l in enumerate(layers)]
        moe.model(mx.array([[5, 6, 7, 8]]), cache=caches)
    finally:
        moe.model.backbone.layers = layers
    assert seen[3] is caches[2] and (seen[3].k_bits, seen[3].v_bits) == (8, 4)
    assert seen[6] is caches[4] and (seen[6].k_bits, seen[6].v_bits) == (5, 16)
    assert all(isinstance(seen[i], ArraysCache) for i in (0, 2, 5))
    assert all(seen[i] is None for i in (1, 4, 7, 8))
    assert caches[2].offset == caches[4].offset == 4


def test_no_config_gives_the_models_float_cache(moe):
    caches = make_cache(moe)
    assert [type(c) for c in caches] == [ArraysCache, ArraysCache, KVCache, ArraysCache, KVCache]


def test_config_for_another_model_is_refused(moe, nemotron_dense, tmp_path):
    dense = load(nemotron_dense)
    cfg = uniform_config(dense, 4)
    path = tmp_path / "kv_config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(MixqError, match="made for another model"):
        make_cache(moe, path)
    with pytest.raises(MixqError, match="made for another model"):
        make_cache(moe.model, cfg)  # a bare model: structure alone already differs


def test_same_structure_different_weights_is_refused_by_fingerprint(moe):
    cfg = uniform_config(moe, 4)
    cfg["model"]["fingerprint"] = "0" * 64
    with pytest.raises(MixqError, match="fingerprint"):
        make_cache(moe, cfg)
    make_cache(moe.model, cfg)  # a bare model carries no path: structure is what can be checked


def test_moved_slot_is_refused(moe):
    cfg = uniform_config(moe, 4)
    cfg["layers"][0]["cache_slot"] = 3  # points at a Mamba slot
    with pytest.raises(MixqError, match="cache slot"):
        make_cache(moe, cfg)


def test_bad_files_are_refused(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{nope")
    with pytest.raises(MixqError, match="not valid JSON"):
        load_config(p)
    p.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(MixqError, match="not a mixq kv config"):
        load_config(p)
    with pytest.raises(MixqError, match="no such"):
        load_config(tmp_path / "missing.json")


def test_newer_version_is_refused(moe):
    cfg = uniform_config(moe, 4)
    cfg["version"] = 99
    with pytest.raises(MixqError, match="newer mixq"):
        make_cache(moe, cfg)
