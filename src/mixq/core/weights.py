"""Weights read from the model's safetensors files when a pass needs them, and let go after.

`mx.load` gives lazy arrays: nothing is read until one is evaluated, and an evaluated array keeps its data
for as long as something refers to it. So a pass that must not hold the whole model asks `LazyWeights` for
*fresh* lazy arrays each time (a header parse per file, no data), evaluates what one block needs, and drops
them. The model's own `sanitize` (mlx-lm's, e.g. stacking Nemotron-H's per-expert weights) is applied to
the fresh arrays, so names and shapes are the ones the built model holds. This is the only place mixq
relies on `Model.sanitize`.
"""

from __future__ import annotations

from pathlib import Path


class LazyWeights:
    def __init__(self, path: Path, model):
        self.path = Path(path)
        self.files = sorted(self.path.glob("model*.safetensors"))
        self.model = model

    def fresh(self, prefix: str = "") -> dict:
        """Unevaluated arrays, by the model's parameter path, of every weight whose path starts with prefix."""
        import mlx.core as mx

        weights: dict = {}
        for f in self.files:
            weights.update(mx.load(str(f)))
        if hasattr(self.model, "sanitize"):
            weights = self.model.sanitize(weights)
        return {k: v for k, v in weights.items() if k.startswith(prefix)} if prefix else weights

    def stored_bytes(self) -> int:
        """Bytes of every weight as stored (from the file headers, nothing read)."""
        return sum(int(v.nbytes) for v in self.fresh().values())

    def file_rows(self, name: str):
        """`name` (a 2-D tensor stored as the model holds it) as `FileRows`, or None when it is not stored so
        (the model's sanitize changes it, or a dtype numpy cannot read)."""
        held = self.fresh().get(name)
        for f in self.files:
            header, data = _header(f)
            entry = header.get(name)
            if entry is None:
                continue
            shape, dtype = tuple(entry["shape"]), entry["dtype"]
            if held is None or len(shape) != 2 or tuple(held.shape) != shape or dtype not in _NUMPY \
                    or str(held.dtype).rsplit(".", 1)[-1] != _NUMPY[dtype][1]:
                return None
            return FileRows(f, data + entry["data_offsets"][0], shape, dtype)
        return None


# safetensors dtype -> (numpy dtype read, mlx dtype it holds)
_NUMPY = {"F32": ("<f4", "float32"), "F16": ("<f2", "float16"), "BF16": ("<u2", "bfloat16")}


def _header(file: Path) -> tuple[dict, int]:
    """A safetensors file's header and the offset its data starts at."""
    import json
    import struct

    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n)), 8 + n


class FileRows:
    """A 2-D tensor read from its safetensors file a block of rows at a time: a 131k-row head compared chunk
    by chunk is never in memory whole (1.1 GiB of bf16 at a 9B model's widths, held through every comparison
    when it was read once)."""

    def __init__(self, file: Path, start: int, shape: tuple, dtype: str):
        self.file, self.start, self.shape, self._dtype = Path(file), start, tuple(shape), dtype

    @property
    def dtype(self):
        import mlx.core as mx

        return getattr(mx, _NUMPY[self._dtype][1])

    @property
    def nbytes(self) -> int:
        import numpy as np

        return self.shape[0] * self.shape[1] * np.dtype(_NUMPY[self._dtype][0]).itemsize

    def rows(self, a: int, b: int):
        """Rows a:b as an mx array of the stored dtype."""
        import mlx.core as mx
        import numpy as np

        a, b = max(0, a), min(b, self.shape[0])
        np_dtype = np.dtype(_NUMPY[self._dtype][0])
        row = self.shape[1] * np_dtype.itemsize
        with open(self.file, "rb") as fh:
            fh.seek(self.start + a * row)
            buf = np.frombuffer(fh.read((b - a) * row), dtype=np_dtype).reshape(b - a, self.shape[1])
        x = mx.array(buf)
        return x.view(mx.bfloat16) if self._dtype == "BF16" else x
