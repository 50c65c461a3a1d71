"""Safetensors shards written tensor by tensor, in any order, with nothing held but the tensor at hand.

Every tensor's name, shape and dtype are known before the first byte is written (mixq sizes everything up
front), so each shard's header, with every offset, is written first and each tensor's bytes go straight
to their place. Shards follow mlx-lm's `save_model`: at most `max_shard_bytes` each (a tensor bigger than
that gets a shard of its own), named `model.safetensors` or `model-0000i-of-0000n.safetensors`, with
`model.safetensors.index.json` and the `{"format": "mlx"}` metadata.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from mixq.core.errors import MixqError

DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4), "uint32": ("U32", 4),
          "uint8": ("U8", 1), "int32": ("I32", 4), "int64": ("I64", 8), "bool": ("BOOL", 1),
          "uint16": ("U16", 2), "int8": ("I8", 1), "float64": ("F64", 8)}
MLX_SHARD_BYTES = 5 << 30  # mlx_lm.utils.MAX_FILE_SIZE_GB


def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


class ShardWriter:
    """`layout`: (name, shape, dtype name) for every tensor, in the order they are placed in the shards."""

    def __init__(self, out_dir: Path, layout: list, *, max_shard_bytes: int = MLX_SHARD_BYTES,
                 total_parameters: int | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        shards: list[list] = []
        size = 0
        for name, shape, dtype in layout:
            if dtype not in DTYPES:
                raise MixqError(f"{name}: cannot write dtype {dtype}")
            nbytes = math.prod(shape) * DTYPES[dtype][1]
            if not shards or size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(int(s) for s in shape), dtype, nbytes))
            size += nbytes
        n = len(shards)
        fmt = "model-{:05d}-of-{:05d}.safetensors" if n > 1 else "model.safetensors"
        self.files: list[Path] = []
        self.where: dict[str, tuple[int, int, int, tuple, str]] = {}  # name -> (shard, offset, nbytes, shape, dtype)
        self._fds: list[int] = []
        self.total = 0
        for si, shard in enumerate(shards):
            header, off = {"__metadata__": {"format": "mlx"}}, 0
            for name, shape, dtype, nbytes in shard:
                header[name] = {"dtype": DTYPES[dtype][0], "shape": list(shape), "data_offsets": [off, off + nbytes]}
                off += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, as safetensors writers do
            path = self.out / fmt.format(si + 1, n)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, struct.pack("<Q", len(raw)) + raw)
            os.ftruncate(fd, 8 + len(raw) + off)
            start = 8 + len(raw)
            for name, shape, dtype, nbytes in shard:
                self.where[name] = (si, start + header[name]["data_offsets"][0], nbytes, shape, dtype)
            self.files.append(path)
            self._fds.append(fd)
            self.total += off
        self.total_parameters = total_parameters
        self.written: set = set()

    def put(self, name: str, array) -> None:
        if name not in self.where:
            raise MixqError(f"{name}: not in the planned layout")
        if name in self.written:
            raise MixqError(f"{name}: written twice")
        si, offset, nbytes, shape, dtype = self.where[name]
        if tuple(array.shape) != shape or _dtype_name(array.dtype) != dtype:
            raise MixqError(f"{name}: planned {dtype}{list(shape)}, got {_dtype_name(array.dtype)}{list(array.shape)}")
        _write_at(self._fds[si], offset, name, array, nbytes)
        self.written.add(name)

    def close(self) -> dict:
        """Check every planned tensor was written, close the files, write the index; returns it."""
        missing = sorted(set(self.where) - self.written)
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        if missing:
            raise MixqError(f"{len(missing)} planned tensors were never written (first: {missing[0]})")
        index = {"metadata": {"total_size": self.total}, "weight_map": {}}
        if self.total_parameters is not None:
            index["metadata"]["total_parameters"] = self.total_parameters
        index["weight_map"] = {k: self.files[self.where[k][0]].name for k in sorted(self.where)}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
        return index

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _write_at(fd: int, offset: int, name: str, array, nbytes: int) -> None:
    """`array`'s bytes at `offset` of the open file `fd`; they must be `nbytes` long."""
    import mlx.core as mx
    import numpy as np

    if _dtype_name(array.dtype) == "bfloat16":
        array = array.view(mx.uint16)  # numpy has no bfloat16: the same bytes
    data = np.ascontiguousarray(np.array(array)).tobytes()
    if len(data) != nbytes:
        raise MixqError(f"{name}: {len(data)} bytes, planned {nbytes}")
    mv, done = memoryview(data), 0
    while done < nbytes:
        done += os.pwrite(fd, mv[done:], offset + done)


def patch(out_dir: Path, arrays: dict) -> None:
    """Overwrite tensors already in a written model's shards, in place: each must keep its name, shape and
    dtype (tuned scales and biases). The shards' headers are read, not rewritten."""
    out_dir = Path(out_dir)
    index = out_dir / "model.safetensors.index.json"
    where = (json.loads(index.read_text())["weight_map"] if index.is_file()
             else {k: "model.safetensors" for k in arrays})
    names = {v: k for k, (v, _) in DTYPES.items()}
    for shard in sorted({where[k] for k in arrays}):
        path = out_dir / shard
        fd = os.open(path, os.O_RDWR)
        try:
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, n, 8))
            for name in (k for k in arrays if where[k] == shard):
                if name not in header:
                    raise MixqError(f"{name}: not in {shard}")
                entry, array = header[name], arrays[name]
                dtype = _dtype_name(array.dtype)
                if names[entry["dtype"]] != dtype or list(array.shape) != entry["shape"]:
                    raise MixqError(f"{name}: written {names[entry['dtype']]}{entry['shape']}, got "
                                    f"{dtype}{list(array.shape)}")
                a, b = entry["data_offsets"]
                _write_at(fd, 8 + n + a, name, array, b - a)
            os.fsync(fd)
        finally:
            os.close(fd)
