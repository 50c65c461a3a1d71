"""What makes `--distill` resumable: the float model's targets and each finished epoch's state (parameters,
Adam's moments and step, the best epoch's scales and biases, the batch order's random state, the records), kept in
the convert's work dir under a key of the settings, the windows and the written scales and biases. A run
that finds a matching state skips the targets' float forwards and the epochs already done, and ends with
the same values as one never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

STATE_FORMAT = 2   # 2: the best epoch kept as its source-dtype scales and biases (1: its parameters)
SEP = "|"   # tensor paths hold dots: the flattened names join levels with this instead


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested dict of arrays -> {"a|b|c": array}."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{SEP}{k}" if prefix else str(k)
        out.update(flat(v, name) if isinstance(v, dict) else {name: v})
    return out


def unflat(arrays: dict) -> dict:
    out: dict = {}
    for name, v in arrays.items():
        *lead, last = name.split(SEP)
        d = out
        for k in lead:
            d = d.setdefault(k, {})
        d[last] = v
    return out


def state_key(settings: dict, train, valid, quantized: dict) -> str:
    """sha256 over the settings, the windows and every tuned tensor's format, shape, scales and biases."""
    import mlx.core as mx
    import numpy as np

    h = hashlib.sha256(json.dumps({**settings, "state_format": STATE_FORMAT}, sort_keys=True).encode())
    for a in (train, valid):
        h.update(np.ascontiguousarray(np.asarray(a, dtype=np.int64)).tobytes())
    for p in sorted(quantized):
        q = quantized[p]
        h.update(f"{p} {q.fmt} {tuple(q.scales.shape)}".encode())
        for a in (q.scales, q.biases):
            h.update(np.asarray(a.astype(mx.float32)).tobytes())
    return h.hexdigest()


class DistillState:
    """`folder` None: nothing kept (a run that cannot resume)."""

    def __init__(self, folder: Path | None, key: str):
        self.dir, self.key = (Path(folder) if folder is not None else None), key
        self.meta = {}
        if self.dir is not None and (self.dir / "state.json").is_file():
            meta = json.loads((self.dir / "state.json").read_text())
            self.meta = meta if meta.get("key") == key else {}

    def _save(self, name: str, arrays: dict) -> None:
        import mlx.core as mx

        tmp = self.dir / f".{name}.tmp.safetensors"
        mx.save_safetensors(str(tmp), arrays)
        os.replace(tmp, self.dir / f"{name}.safetensors")

    def _write_meta(self) -> None:
        tmp = self.dir / ".state.json.tmp"
        tmp.write_text(json.dumps(self.meta, sort_keys=True))
        os.replace(tmp, self.dir / "state.json")

    def targets(self) -> dict | None:
        import mlx.core as mx

        if not self.meta.get("targets"):
            return None
        return unflat(mx.load(str(self.dir / "targets.safetensors")))

    def save_targets(self, arrays: dict) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = {"key": self.key}   # a new key's targets: no epoch of an old run applies
        self._write_meta()
        self._save("targets", flat(arrays))
        self.meta["targets"] = True
        self._write_meta()

    def epoch(self) -> tuple[dict, dict] | None:
        """(the last finished epoch's record: epochs, start, best, rng; its arrays) or None."""
        import mlx.core as mx

        if not self.meta.get("epoch"):
            return None
        return self.meta["epoch"], unflat(mx.load(str(self.dir / "epoch.safetensors")))

    def save_epoch(self, record: dict, arrays: dict) -> None:
        if self.dir is None:
            return
        self._save("epoch", flat(arrays))
        self.meta["epoch"] = record
        self._write_meta()
