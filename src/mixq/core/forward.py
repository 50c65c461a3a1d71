"""A model run as embed -> blocks -> final norm -> head, so a pass can start at any block.

Sensitivity measurement perturbs one tensor in block i and re-runs only blocks i..N from cached block
inputs; KL evaluation reuses the same pieces. Two families are wired explicitly (nemotron_h, and the
llama-style `model.model.{embed_tokens,layers,norm}` layout most mlx-lm models share); every runner is
checked against the model's own forward at construction, so an architecture that differs is refused
rather than measured wrongly.
"""

from __future__ import annotations

from mixq.core.errors import MixqError


class BlockRunner:
    def __init__(self, model, check: bool = True):
        from mlx_lm.models.base import create_attention_mask, create_ssm_mask

        self.model = model
        self._attn_mask = create_attention_mask
        self._ssm_mask = create_ssm_mask
        if hasattr(model, "backbone") and hasattr(model.backbone, "embeddings"):
            inner = model.backbone
            self.family = "nemotron_h"
            self.embedding = inner.embeddings
            self.final_norm = inner.norm_f
            self.embed_path = "backbone.embeddings"
        elif hasattr(model, "model") and hasattr(model.model, "embed_tokens") and hasattr(model.model, "norm"):
            inner = model.model
            self.family = "llama-like"
            self.embedding = inner.embed_tokens
            self.final_norm = inner.norm
            self.embed_path = "model.embed_tokens"
        else:
            raise MixqError(f"{type(model).__module__}: layer-wise runner does not know this architecture")
        self.layers = list(inner.layers)
        self.tied = not hasattr(model, "lm_head")
        if check:
            self._check()

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    def embed(self, tokens):
        return self.embedding(tokens)

    def block(self, i: int, h):
        layer = self.layers[i]
        if self.family == "nemotron_h":
            kind = layer.block_type
            if kind == "*":
                return layer(h, mask=self._attn_mask(h, None))
            if kind == "M":
                return layer(h, mask=self._ssm_mask(h, None))
            return layer(h)
        return layer(h, self._attn_mask(h, None), None)

    def norm(self, h):
        return self.final_norm(h)

    def project(self, hn):
        if self.tied:
            return self.embedding.as_linear(hn)
        return self.model.lm_head(hn)

    def run(self, tokens=None, *, h=None, start: int = 0):
        """Logits from tokens, or from block `start`'s input `h`."""
        if h is None:
            h = self.embed(tokens)
        for i in range(start, self.num_blocks):
            h = self.block(i, h)
        return self.project(self.norm(h))

    def _check(self):
        import mlx.core as mx

        tokens = mx.array([[(7 * i + 3) % 50 + 1 for i in range(12)]], dtype=mx.int32)
        ours, theirs = self.run(tokens), self.model(tokens)
        err = mx.abs(ours.astype(mx.float32) - theirs.astype(mx.float32)).max().item()
        scale = mx.abs(theirs.astype(mx.float32)).max().item() + 1e-6
        if not err <= 1e-3 * scale:
            raise MixqError(f"layer-wise runner disagrees with the model's forward ({self.family}, err {err:.3g})")
