"""MixedKVCache on its own: separate K/V bits, float parts, quantize_after, trim, state, byte accounting."""

import copy

import mixq  # noqa: F401
import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from mixq.core.errors import MixqError
from mixq.kvcache.cache import (FLOAT_BITS, MixedKVCache, effective_group_size, fork, kv_bytes,
                                part_bytes_per_token)


def _kv(b=1, h=2, n=5, d=64, seed=0):
    mx.random.seed(seed)
    return mx.random.normal((b, h, n, d)), mx.random.normal((b, h, n, d))


def _err(a, b):
    return mx.abs(a - b).max().item()


def test_separate_key_and_value_bits():
    k, v = _kv()
    c = MixedKVCache(k_bits=8, v_bits=2, group_size=64)
    K, V = c.update_and_fetch(k, v)
    assert K.shape == k.shape and V.shape == v.shape and K.dtype == k.dtype
    assert _err(K, k) < 0.05 < _err(V, v)  # 8-bit keys close, 2-bit values coarse
    assert not hasattr(c, "bits")  # mlx-lm must take its float attention path


def test_float_part_is_exact_and_matches_kvcache():
    k, v = _kv(n=7)
    c, ref = MixedKVCache(FLOAT_BITS, 4, 64), KVCache()
    for i in range(7):
        K, V = c.update_and_fetch(k[:, :, i:i + 1], v[:, :, i:i + 1])
        RK, _ = ref.update_and_fetch(k[:, :, i:i + 1], v[:, :, i:i + 1])
    assert _err(K, RK) == 0.0 and c.offset == 7 and c.size() == 7


def test_append_matches_one_shot_across_buffer_growth():
    k, v = _kv(n=300)
    one = MixedKVCache(4, 6, 64)
    K1, V1 = one.update_and_fetch(k, v)
    inc = MixedKVCache(4, 6, 64)
    inc.update_and_fetch(k[:, :, :250], v[:, :, :250])
    for i in range(250, 300):
        K2, V2 = inc.update_and_fetch(k[:, :, i:i + 1], v[:, :, i:i + 1])
    assert _err(K1, K2) == 0.0 and _err(V1, V2) == 0.0


def test_quantize_after_keeps_float_then_switches():
    k, v = _kv(n=10)
    c = MixedKVCache(4, 4, 64, quantize_after=8)
    K, _ = c.update_and_fetch(k[:, :, :8], v[:, :, :8])
    assert not c.quantized and _err(K, k[:, :, :8]) == 0.0
    K, _ = c.update_and_fetch(k[:, :, 8:], v[:, :, 8:])
    assert c.quantized and K.shape[2] == 10 and 0 < _err(K, k) < 0.5


def test_small_head_dim_groups_span_heads():
    assert effective_group_size(2, 16, 64) == 32
    assert effective_group_size(2, 32, 64) == 32
    assert effective_group_size(8, 128, 64) == 64
    with pytest.raises(MixqError):
        effective_group_size(1, 16, 64)  # 16 values per token: no supported group
    k, v = _kv(d=16)
    K, V = MixedKVCache(8, 8, 64).update_and_fetch(k, v)
    assert _err(K, k) < 0.05 and _err(V, v) < 0.05


def test_trim_state_roundtrip_and_copy():
    k, v = _kv(n=12)
    c = MixedKVCache(5, 3, 64)
    c.update_and_fetch(k, v)
    assert c.trim(2) == 2 and c.offset == 10
    d = MixedKVCache.from_state(c.state)
    assert (d.k_bits, d.v_bits, d.offset) == (5, 3, 10)
    for a, b in zip(c.keys_and_values(), d.keys_and_values()):
        assert a.shape[2] == 10 and _err(a, b) == 0.0
    e = MixedKVCache.from_state(c.state[:-1], c.state[-1].split(";"))  # two-part convention
    assert _err(e.keys_and_values()[1], d.keys_and_values()[1]) == 0.0
    f = c.copy()
    f.update_and_fetch(k[:, :, :1], v[:, :, :1])
    assert c.offset == 10 and f.offset == 11
    g = copy.deepcopy(c)
    assert g.offset == 10
    empty = MixedKVCache.from_state(MixedKVCache(4, 8).state)
    assert empty.empty() and empty.offset == 0


def test_shape_mismatch_with_config_is_refused():
    k, v = _kv(h=2, d=64)
    c = MixedKVCache(4, 4, 64, expect={"k": [4, 64], "v": [4, 64]})
    with pytest.raises(MixqError, match="expects 4 heads"):
        c.update_and_fetch(k, v)


def test_byte_accounting_matches_storage():
    k, v = _kv(b=1, h=4, n=20, d=64)
    c = MixedKVCache(4, 8, 64)
    c.update_and_fetch(k, v)
    # float32 compute: scales and biases are 32-bit
    want = 20 * (part_bytes_per_token(4, 64, 4, 64, 32) + part_bytes_per_token(4, 64, 8, 64, 32))
    assert c.used_nbytes == want == kv_bytes([c])
    assert c.nbytes >= c.used_nbytes
    assert part_bytes_per_token(4, 64, 4, 64) == 4 * 64 // 2 + 2 * 4 * 2  # 4.5 bits per value at 16-bit scales
    assert part_bytes_per_token(4, 64, FLOAT_BITS, 64) == 4 * 64 * 2


def test_bad_bits_refused():
    with pytest.raises(MixqError):
        MixedKVCache(7, 4)
    with pytest.raises(MixqError):
        MixedKVCache(4, 4, group_size=48)


def test_fork_is_independent():
    k, v = _kv(n=4)
    base = [KVCache(), MixedKVCache(4, 4)]
    for c in base:
        c.update_and_fetch(k, v)
    copies = fork(base)
    for c in copies:
        c.update_and_fetch(k[:, :, :1], v[:, :, :1])
    assert [c.offset for c in base] == [4, 4] and [c.offset for c in copies] == [5, 5]
    assert _err(base[0].keys[..., :4, :], k) == 0.0
