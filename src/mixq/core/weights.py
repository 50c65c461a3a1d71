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
