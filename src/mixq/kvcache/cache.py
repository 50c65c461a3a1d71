"""A KV cache with its own bit width for keys and for values, for mlx-lm models.

`MixedKVCache` stores keys and values quantized (affine, `mx.quantize`) with separate bit widths, or
float (bits 16 = kept float). It hands attention *dequantized* keys and values and has no `bits`
attribute, so mlx-lm's attention takes its ordinary float path: that is what lets K and V differ
(mlx-lm's fused quantized attention takes one width for both), and it works for every attention that
accepts a KVCache, attention sinks included. The numbers are the ones a fused kernel computes up to
accumulation order; the memory held between steps is the quantized storage (`nbytes`).

Layout: quantized parts are stored per token as one row of `heads * head_dim` values, grouped along that
row. When the group size divides head_dim (the usual case) the groups are exactly mlx-lm's per-head
groups; when head_dim is smaller than every supported group size (tiny models: 16), a group spans whole
heads of the same token instead of failing.

`quantize_after=N` keeps the cache float until it holds at least N tokens, then quantizes it in place
(as mlx-lm's `quantized_kv_start` does); 0 quantizes from the first token.

Prompt caching: `state` is a flat tuple of arrays followed by one metadata string, so mlx-lm's
`save_prompt_cache` writes it as is; `load_prompt_cache` here reads files holding these caches (mlx-lm's
own loader only knows its own classes). `meta_state` / `from_state(state, meta_state)` follow mlx-lm's
newer two-part convention as well.
"""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
from mlx_lm.models import cache as lm_cache

from mixq.core.errors import MixqError

FLOAT_BITS = 16                       # "bits" of a part that stays float
QUANT_BITS = (2, 3, 4, 5, 6, 8)       # what mx.quantize supports in affine mode
GROUP_SIZES = (32, 64, 128)
ALL_BITS = QUANT_BITS + (FLOAT_BITS,)
META_TAG = "mixq-kv1"


def effective_group_size(heads: int, head_dim: int, group_size: int) -> int:
    """The group size actually used for a part of `heads` x `head_dim` values per token.

    The largest supported size <= `group_size` that divides head_dim (groups never straddle heads);
    else the smallest supported size that divides heads * head_dim (a group spans whole heads).
    """
    if group_size not in GROUP_SIZES:
        raise MixqError(f"group size {group_size} not supported (choose from {', '.join(map(str, GROUP_SIZES))})")
    for g in sorted((g for g in GROUP_SIZES if g <= group_size), reverse=True):
        if head_dim % g == 0:
            return g
    width = heads * head_dim
    for g in GROUP_SIZES:
        if width % g == 0 and g % head_dim == 0:
            return g
    raise MixqError(f"cannot quantize a KV cache of {heads} heads x {head_dim} dims: no supported group size "
                    f"({', '.join(map(str, GROUP_SIZES))}) fits")


def part_bytes_per_token(heads: int, head_dim: int, bits: int, group_size: int, scale_bits: int = 16) -> int:
    """Bytes one token costs in one part (K or V): packed values plus a scale and a bias per group.

    bits 16 is the float part at 16 bits per value. Scales and biases are counted at `scale_bits` each
    (16: the model served in bf16/fp16; mlx stores them in the cached tensors' dtype).
    """
    width = heads * head_dim
    if bits == FLOAT_BITS:
        return width * scale_bits // 8
    g = effective_group_size(heads, head_dim, group_size)
    return width * bits // 8 + 2 * (width // g) * scale_bits // 8


def _check_bits(name: str, bits: int) -> int:
    if bits is None:
        return FLOAT_BITS
    if isinstance(bits, bool) or int(bits) != bits or int(bits) not in ALL_BITS:
        raise MixqError(f"{name} = {bits!r}: choose from {', '.join(map(str, ALL_BITS))} (16 = float)")
    return int(bits)


class _Part:
    """One of keys / values: float (B, H, cap, D) or quantized rows (B, cap, H*D) packed + scales + biases."""

    step = 256

    def __init__(self, bits: int, group_size: int):
        self.bits = bits                  # target width once quantized
        self.group_size = group_size      # requested; the effective one is fixed when dims are known
        self.quantized = False            # current storage mode
        self.data: list | None = None     # [array] when float, [w, scales, biases] when quantized
        self.heads = self.dim = None
        self.g = None

    # -- shape bookkeeping
    def _learn(self, x) -> None:
        _, h, _, d = x.shape
        if self.heads is None:
            self.heads, self.dim = int(h), int(d)
        elif (self.heads, self.dim) != (h, d):
            raise MixqError(f"KV cache part expects {self.heads} heads x {self.dim} dims, got {h} x {d}")
        if self.g is None and self.bits != FLOAT_BITS:
            self.g = effective_group_size(self.heads, self.dim, self.group_size)

    def _rows(self, x):
        b, h, n, d = x.shape
        return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)

    def _unrows(self, r):
        b, n, _ = r.shape
        return r.reshape(b, n, self.heads, self.dim).transpose(0, 2, 1, 3)

    def _axis(self) -> int:
        return 1 if self.quantized else 2

    def capacity(self) -> int:
        return 0 if self.data is None else self.data[0].shape[self._axis()]

    def _slice(self, a, n: int):
        return a[:, :n] if self.quantized else a[..., :n, :]

    # -- operations
    def append(self, x, prev: int) -> None:
        self._learn(x)
        n = x.shape[2]
        new = list(mx.quantize(self._rows(x), group_size=self.g, bits=self.bits)) if self.quantized else [x]
        if self.data is None or prev + n > self.capacity():
            steps = (self.step + n - 1) // self.step * self.step
            if self.data is None:
                self.data = [mx.zeros(_grow_shape(a, steps, self._axis()), a.dtype) for a in new]
            else:
                if prev % self.step != 0:
                    self.data = [self._slice(a, prev) for a in self.data]
                self.data = [mx.concatenate([a, mx.zeros(_grow_shape(a, steps, self._axis()), a.dtype)],
                                            axis=self._axis()) for a in self.data]
        for a, v in zip(self.data, new):
            if self.quantized:
                a[:, prev:prev + n] = v
            else:
                a[..., prev:prev + n, :] = v

    def fetch(self, offset: int):
        if self.quantized:
            w, s, b = (self._slice(a, offset) for a in self.data)
            return self._unrows(mx.dequantize(w, s, b, group_size=self.g, bits=self.bits))
        a = self.data[0]
        return a if offset == a.shape[2] else a[..., :offset, :]

    def quantize_now(self, offset: int) -> None:
        """Switch to quantized storage (no-op for a float part), converting what is held."""
        if self.quantized or self.bits == FLOAT_BITS:
            return
        self.quantized = True
        if self.data is None or offset == 0:
            self.data = None
            return
        x = self.data[0][..., :offset, :]
        self.data = list(mx.quantize(self._rows(x), group_size=self.g, bits=self.bits))

    def arrays(self, offset: int) -> list:
        if self.data is None or offset == 0:
            return []
        return [self._slice(a, offset) for a in self.data]

    def used_nbytes(self, offset: int) -> int:
        return sum(a.nbytes for a in self.arrays(offset))

    def nbytes(self) -> int:
        return 0 if self.data is None else sum(a.nbytes for a in self.data)

    def meta(self) -> str:
        return f"{self.bits},{self.group_size},{int(self.quantized)},{self.heads or 0},{self.dim or 0},{self.g or 0}"

    @classmethod
    def from_meta(cls, text: str) -> "_Part":
        bits, group, quantized, heads, dim, g = (int(x) for x in text.split(","))
        p = cls(bits, group)
        p.quantized = bool(quantized)
        p.heads, p.dim, p.g = (heads or None), (dim or None), (g or None)
        return p

    def n_arrays(self) -> int:
        return 3 if self.quantized else 1


def _grow_shape(a, steps: int, axis: int) -> tuple:
    shape = list(a.shape)
    shape[axis] = steps
    return tuple(shape)


class MixedKVCache(lm_cache._BaseCache):
    """KV cache with separate key and value bit widths (16 = float) and a shared group size."""

    def __init__(self, k_bits: int = 8, v_bits: int = 8, group_size: int = 64, quantize_after: int = 0,
                 *, expect: dict | None = None):
        self.k_bits = _check_bits("k_bits", k_bits)
        self.v_bits = _check_bits("v_bits", v_bits)
        if group_size not in GROUP_SIZES:
            raise MixqError(f"group size {group_size} not supported (choose from {', '.join(map(str, GROUP_SIZES))})")
        if int(quantize_after) < 0:
            raise MixqError(f"quantize_after must be >= 0, got {quantize_after}")
        self.group_size = group_size
        self.quantize_after = int(quantize_after)
        self.offset = 0
        self._k = _Part(self.k_bits, group_size)
        self._v = _Part(self.v_bits, group_size)
        if expect:  # shapes a kv_config recorded: a mismatch is a config for another model
            self._k.heads, self._k.dim = expect["k"]
            self._v.heads, self._v.dim = expect["v"]

    # ---- the mlx-lm cache protocol
    @property
    def quantized(self) -> bool:
        """Whether the storage has switched to quantized (stays False for a 16/16 cache)."""
        return self._k.quantized or self._v.quantized

    def update_and_fetch(self, keys, values):
        if self.offset >= self.quantize_after:
            self._k.quantize_now(self.offset)
            self._v.quantize_now(self.offset)
        prev = self.offset
        self._k.append(keys, prev)
        self._v.append(values, prev)
        self.offset += keys.shape[2]
        return self._k.fetch(self.offset), self._v.fetch(self.offset)

    def keys_and_values(self):
        return self._k.fetch(self.offset), self._v.fetch(self.offset)

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self._k.data is None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def make_mask(self, *args, **kwargs):
        return lm_cache.create_attention_mask(*args, offset=self.offset, **kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes held (allocated buffers, as mlx-lm's caches count)."""
        return self._k.nbytes() + self._v.nbytes()

    @property
    def used_nbytes(self) -> int:
        """Bytes of the `offset` tokens actually cached."""
        return self._k.used_nbytes(self.offset) + self._v.used_nbytes(self.offset)

    # ---- prompt caching
    @property
    def meta_state(self) -> tuple[str, ...]:
        return (META_TAG, str(self.offset), str(self.quantize_after), str(self.group_size),
                self._k.meta(), self._v.meta())

    @meta_state.setter
    def meta_state(self, v) -> None:
        v = tuple(str(x) for x in v)
        if len(v) != 6 or v[0] != META_TAG:
            raise MixqError(f"not a {META_TAG} cache state: {v[:1]}")
        self.offset, self.quantize_after, self.group_size = int(v[1]), int(v[2]), int(v[3])
        self._k, self._v = _Part.from_meta(v[4]), _Part.from_meta(v[5])
        self.k_bits, self.v_bits = self._k.bits, self._v.bits

    @property
    def state(self):
        """(*key arrays, *value arrays, meta): arrays trimmed to `offset`, meta one string."""
        return (*self._k.arrays(self.offset), *self._v.arrays(self.offset), ";".join(self.meta_state))

    @state.setter
    def state(self, v) -> None:
        v = list(v)
        if v and isinstance(v[-1], str):
            self.meta_state = v.pop().split(";")
        elif not hasattr(self, "_k"):
            raise MixqError("MixedKVCache state needs its metadata (pass meta_state)")
        self._set_arrays(v)

    def _set_arrays(self, arrays: list) -> None:
        if not arrays:
            self._k.data = self._v.data = None
            self.offset = 0
            return
        nk = self._k.n_arrays()
        if len(arrays) != nk + self._v.n_arrays():
            raise MixqError(f"MixedKVCache state has {len(arrays)} arrays, metadata expects "
                            f"{nk + self._v.n_arrays()}")
        self._k.data, self._v.data = list(arrays[:nk]), list(arrays[nk:])

    @classmethod
    def from_state(cls, state, meta_state=None):
        obj = cls.__new__(cls)
        if meta_state is not None:
            obj.meta_state = meta_state
            state = [a for a in state if not isinstance(a, str)]
        obj.state = state
        return obj

    # ---- helpers
    @classmethod
    def from_kv_cache(cls, c, k_bits: int, v_bits: int, group_size: int = 64, quantize_after: int = 0):
        """A mixed cache holding a float KVCache's tokens (quantized now if offset >= quantize_after)."""
        m = cls(k_bits, v_bits, group_size, quantize_after)
        if c.keys is not None and c.offset > 0:
            m._k.data = [c.keys[..., :c.offset, :]]
            m._v.data = [c.values[..., :c.offset, :]]
            m._k._learn(c.keys)
            m._v._learn(c.values)
            m.offset = c.offset
            if m.offset >= m.quantize_after:
                m._k.quantize_now(m.offset)
                m._v.quantize_now(m.offset)
        return m

    def copy(self) -> "MixedKVCache":
        """An independent cache with the same contents (arrays are shared until either one grows)."""
        new = copy.copy(self)
        new._k, new._v = copy.copy(self._k), copy.copy(self._v)
        new._k.data = self._k.arrays(self.offset) or None
        new._v.data = self._v.arrays(self.offset) or None
        return new

    def __repr__(self) -> str:
        return (f"MixedKVCache(k_bits={self.k_bits}, v_bits={self.v_bits}, group_size={self.group_size}, "
                f"offset={self.offset}, quantized={self.quantized})")


def fork(caches: list) -> list:
    """Independent copies of a cache list (float KV, Mamba state, mixed), sharing arrays until written."""
    out = []
    for c in caches:
        if type(c) is lm_cache.KVCache:
            n = lm_cache.KVCache()
            if c.keys is not None:
                n.keys, n.values = c.keys[..., :c.offset, :], c.values[..., :c.offset, :]
            n.offset = c.offset
        elif type(c) is lm_cache.ArraysCache:
            n = lm_cache.ArraysCache(len(c.cache))
            n.cache, n.left_padding, n.lengths = list(c.cache), c.left_padding, c.lengths
        elif isinstance(c, MixedKVCache):
            n = c.copy()
        else:
            n = copy.deepcopy(c)
        out.append(n)
    return out


def kv_bytes(caches: list) -> int:
    """Bytes of the cached tokens in every KV cache of a list (float KVCache or MixedKVCache)."""
    total = 0
    for c in caches:
        if isinstance(c, MixedKVCache):
            total += c.used_nbytes
        elif type(c) is lm_cache.KVCache and c.keys is not None:
            total += c.keys[..., :c.offset, :].nbytes + c.values[..., :c.offset, :].nbytes
        elif type(c) is lm_cache.QuantizedKVCache and c.keys is not None:
            total += sum(a[..., :c.offset, :].nbytes for a in (*c.keys, *c.values))
    return total


_CLASSES: dict[str, Any] = {"MixedKVCache": MixedKVCache}


def save_prompt_cache(file_name: str, cache: list, metadata: dict[str, str] | None = None) -> None:
    """mlx-lm's save_prompt_cache (these caches' state is already in the form it writes)."""
    lm_cache.save_prompt_cache(file_name, cache, metadata)


def load_prompt_cache(file_name: str, return_metadata: bool = False):
    """Read a prompt cache written by save_prompt_cache, MixedKVCache slots included."""
    from mlx.utils import tree_unflatten

    arrays, cache_metadata = mx.load(file_name, return_metadata=True)
    metadata, classes, scalars = tree_unflatten(list(cache_metadata.items()))
    for pos, kind in scalars[1:]:
        a = arrays[pos]
        if kind == "scalar":
            arrays[pos] = a.item()
        elif kind == "string":
            arrays[pos] = "".join(chr(i) for i in a.tolist())
        elif kind == "none":
            arrays[pos] = None
        else:
            raise MixqError(f"{file_name}: unknown prompt-cache scalar kind {kind!r}")
    states = tree_unflatten(list(arrays.items()))
    out = []
    for i, name in enumerate(classes):
        cls = _CLASSES.get(name) or getattr(lm_cache, name, None)
        if cls is None:
            raise MixqError(f"{file_name}: unknown cache class {name!r}")
        state = states[i] if isinstance(states, list) and i < len(states) else []
        out.append(cls.from_state(state))
    return (out, metadata) if return_metadata else out
