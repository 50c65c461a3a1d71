"""A model run as embed -> blocks -> final norm -> head, one block resident in the compute dtype at a time.

Weights stay in their stored dtype (bf16 for the models mixq is for); `resident(i)` gives block i's floating
parameters in the compute dtype (float32 on the CPU, where bf16 is slow and bf16 MoE fails) while a pass
runs it, and puts the stored arrays back after, so a pass over a 60 GB model holds one block in float32.
`overrides` replace weights by path for the same span (fake-quantized tensors). The embedding is looked up
in its stored dtype and the lookup cast; the head is run by `mixq.core.head.Head` in vocabulary chunks.

Two families are wired explicitly (nemotron_h, and the llama-style `model.model.{embed_tokens,layers,norm}`
layout most mlx-lm models share); every runner is checked against the model's own forward at construction
(layers evaluated one at a time), so an architecture that differs is refused rather than measured wrongly.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

from mixq.core.errors import MixqError


def layer_container(model) -> tuple:
    """(the module holding the model's `layers`, its embedding's attribute name): the two wired families."""
    if hasattr(model, "backbone") and hasattr(model.backbone, "embeddings"):
        return model.backbone, "embeddings"
    if hasattr(model, "model") and hasattr(model.model, "embed_tokens") and hasattr(model.model, "norm"):
        return model.model, "embed_tokens"
    raise MixqError(f"{type(model).__module__}: layer-wise runner does not know this architecture")


def child(root, path: str):
    """The module at a dotted path (list items by index)."""
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
    return obj


def set_child(root, path: str, value) -> None:
    """Put `value` at a dotted module path."""
    parent_path, _, name = path.rpartition(".")
    parent = child(root, parent_path) if parent_path else root
    if isinstance(parent, list):
        parent[int(name)] = value
    else:
        setattr(parent, name, value)


def layer_proxy(layer, call):
    """A module standing in for `layer` in its model's own forward: `call(layer, *args, **kwargs)` runs it.
    The model's forward reads plain attributes of its layers (block_type, use_sliding, ...): copied."""
    import mlx.nn as nn

    class Proxy(nn.Module):
        def __call__(self, *args, **kwargs):
            return call(layer, *args, **kwargs)

    proxy = Proxy()
    for k, v in vars(layer).items():
        if not k.startswith("_") and isinstance(v, (bool, int, float, str)):
            setattr(proxy, k, v)
    return proxy


@contextmanager
def wrapped_modules(model, make, modules):
    """Inside: each module at a path of `modules` (dotted, from the model's root) replaced by `make(path, it)`;
    yields path -> wrapper. Every module is put back on exit."""
    originals = {m: child(model, m) for m in modules}
    wrappers = {m: make(m, o) for m, o in originals.items()}
    for m, w in wrappers.items():
        set_child(model, m, w)
    try:
        yield wrappers
    finally:
        for m, o in originals.items():
            set_child(model, m, o)


@contextmanager
def wrapped_layers(model, calls: dict):
    """Inside: the model's own forward runs layer i as `calls[i](layer, *args, **kwargs)` (`layer_proxy`),
    the other layers as they are; the model's layer list is restored after."""
    container, _ = layer_container(model)
    saved = container.layers
    container.layers = [layer_proxy(l, calls[i]) if i in calls else l for i, l in enumerate(saved)]
    try:
        yield
    finally:
        container.layers = saved


class BlockRunner:
    """`source` (a `LazyWeights`) with `retain=False`: every block, the embedding and the head are read
    fresh from the files when used and let go after (memory: one block); otherwise the model's own arrays
    are used and, once read, kept (memory: the stored model)."""

    def __init__(self, model, check: bool = True, compute_dtype: str | None = "float32", *, source=None,
                 retain: bool = True):
        import mlx.core as mx
        from mlx_lm.models.base import create_attention_mask, create_ssm_mask

        self.model = model
        self._attn_mask = create_attention_mask
        self._ssm_mask = create_ssm_mask
        self.compute = getattr(mx, compute_dtype) if compute_dtype else None
        self.source, self.retain = source, retain or source is None
        self._held: dict = {}  # prefix -> stored arrays of a module while it is resident
        self._over: dict = {}  # prefix -> overrides of a module while it is resident
        inner, emb_name = layer_container(model)
        self.family = "nemotron_h" if emb_name == "embeddings" else "llama-like"
        top = "backbone" if self.family == "nemotron_h" else "model"
        norm_name = "norm_f" if self.family == "nemotron_h" else "norm"
        self.embedding, self.final_norm = getattr(inner, emb_name), getattr(inner, norm_name)
        self.embed_path, self.layers_path, self.norm_path = f"{top}.{emb_name}", f"{top}.layers", f"{top}.{norm_name}"
        self.layers = list(inner.layers)
        self.tied = not hasattr(model, "lm_head")
        self.head_path = f"{self.embed_path}.weight" if self.tied else "lm_head.weight"
        if check:
            self._check()

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}."

    # -- residency ---------------------------------------------------------------------------------
    def _cast(self, a):
        import mlx.core as mx

        if self.compute is None or not mx.issubdtype(a.dtype, mx.floating) or a.dtype == self.compute:
            return a
        return a.astype(self.compute)

    @contextmanager
    def resident(self, i: int, overrides: dict | None = None):
        """Block i's floats in the compute dtype (and `overrides`, full path -> array) while inside."""
        with self.module_resident(self.layers[i], self.layer_prefix(i), overrides):
            yield

    def stored(self, prefix: str, module=None) -> dict:
        """Arrays in their stored dtype by full path: fresh from the files (streaming) or the model's own."""
        from mlx.utils import tree_flatten

        if prefix in self._held:
            return self._held[prefix]
        if not self.retain:
            return self.source.fresh(prefix)
        if module is None:
            return {k: v for k, v in tree_flatten(self.model.parameters()) if k.startswith(prefix)}
        return {prefix + k: v for k, v in tree_flatten(module.parameters())}

    @contextmanager
    def module_resident(self, module, prefix: str, overrides: dict | None = None):
        from mlx.utils import tree_flatten, tree_unflatten

        own = tree_flatten(module.parameters())
        arrays = self.stored(prefix, module)
        self._held[prefix] = arrays
        self._over[prefix] = overrides or {}
        self._make_resident(module, prefix)
        try:
            yield
        finally:
            self._held.pop(prefix, None)
            self._over.pop(prefix, None)
            if self.retain:
                module.update(tree_unflatten([(k, arrays[prefix + k]) for k, _ in own]))
            else:  # unread arrays again: nothing of this block stays in memory
                fresh = self.source.fresh(prefix)
                module.update(tree_unflatten([(k, fresh[prefix + k]) for k, _ in own]))

    def _make_resident(self, module, prefix: str):
        """The module's parameters as (not yet computed) compute-dtype casts of its held stored arrays, or
        their overrides."""
        from mlx.utils import tree_flatten, tree_unflatten

        arrays, over = self._held[prefix], self._over[prefix]
        module.update(tree_unflatten([(k, over[prefix + k] if prefix + k in over else self._cast(arrays[prefix + k]))
                                      for k, _ in tree_flatten(module.parameters())]))

    def relax(self, i: int):
        """Inside `resident(i)`: let go of block i's weights already computed in the compute dtype; each is
        made again from the stored array only if used (the float pass is done; streams swap their own in)."""
        if self.layer_prefix(i) in self._held:
            self._make_resident(self.layers[i], self.layer_prefix(i))

    @contextmanager
    def swap(self, i: int, overrides: dict):
        """Inside `resident(i)`: the weights in `overrides` (full path -> array) replaced, then put back."""
        from mlx.utils import tree_flatten, tree_unflatten

        if not overrides:
            yield
            return
        layer, prefix = self.layers[i], self.layer_prefix(i)
        own = dict(tree_flatten(layer.parameters()))
        rel = {k[len(prefix):]: v for k, v in overrides.items()}
        layer.update(tree_unflatten(list(rel.items())))
        try:
            yield
        finally:
            layer.update(tree_unflatten([(k, own[k]) for k in rel]))

    # -- pieces ------------------------------------------------------------------------------------
    def embed_table(self):
        return self.stored(self.embed_path + ".", self.embedding)[f"{self.embed_path}.weight"]

    def embed(self, tokens, table=None):
        """Embedding lookup in the stored dtype (or `table`), cast: a 131k-row table is never cast whole."""
        w = self.embed_table() if table is None else table
        return self._cast(w[tokens])

    def block(self, i: int, h):
        from mixq.core.experts import segmented_experts

        layer = self.layers[i]
        with segmented_experts(layer):
            return self._block(layer, h)

    def _block(self, layer, h):
        if self.family == "nemotron_h":
            kind = layer.block_type
            if kind == "*":
                return layer(h, mask=self._attn_mask(h, None))
            if kind == "M":
                return layer(h, mask=self._ssm_mask(h, None))
            return layer(h)
        return layer(h, self._attn_mask(h, None), None)

    def norm(self, h):
        with self.module_resident(self.final_norm, self.norm_path + "."):
            return self.final_norm(h)

    def head(self, overrides: dict | None = None):
        """The output projection as a chunked `Head` (the head weight replaced by `overrides` if given)."""
        from mixq.core.head import Head

        import mlx.core as mx

        over = (overrides or {}).get(self.head_path)
        bias = None
        if not self.tied:
            arrays = self.stored("lm_head.", self.model.lm_head)
            bias = arrays.get("lm_head.bias")
        if over is not None:
            return Head(over, bias=bias, compute=self.compute)
        rows = None if self.retain else self.source.file_rows(self.head_path)
        if rows is not None:   # streaming: each chunk's rows read from the file when used
            return Head(rows, bias=bias, compute=self.compute)
        w = self.head_weight()
        mx.eval(w)  # read once in the stored dtype for every chunk of this head's use
        return Head(w, bias=bias, compute=self.compute)

    def head_weight(self):
        """The head's weight in its stored dtype (lazy: read when evaluated), for rounding it."""
        if self.tied:
            return self.embed_table()
        return self.stored("lm_head.", self.model.lm_head)["lm_head.weight"]

    def run(self, tokens=None, *, h=None, start: int = 0, overrides: dict | None = None):
        """Full logits from tokens, or from block `start`'s input `h` (small inputs: checks and tests)."""
        import mlx.core as mx

        if h is None:
            h = self.embed(tokens, (overrides or {}).get(f"{self.embed_path}.weight"))
        for i in range(start, self.num_blocks):
            with self.resident(i, overrides):
                h = self.block(i, h)
                mx.eval(h)
        return self.head(overrides).logits(self.norm(h))

    def _check(self):
        import mlx.core as mx

        tokens = mx.array([[(7 * i + 3) % 50 + 1 for i in range(12)]], dtype=mx.int32)
        ours = self.run(tokens)
        theirs = self._model_forward(tokens)
        err = mx.abs(ours.astype(mx.float32) - theirs.astype(mx.float32)).max().item()
        scale = mx.abs(theirs.astype(mx.float32)).max().item() + 1e-6
        if not err <= 2e-3 * scale:
            raise MixqError(f"layer-wise runner disagrees with the model's forward ({self.family}, err {err:.3g})")

    def _model_forward(self, tokens):
        """The model's own forward, each layer resident in the compute dtype only while it runs; the
        embedding and head go through our chunked pieces (a 131k-row table is never cast whole)."""
        import mlx.core as mx
        import mlx.nn as nn

        runner, head = self, self.head()

        def resident(i, layer, *args, **kwargs):
            with runner.resident(i):
                out = layer(*args, **kwargs)
                mx.eval(out)
            return out

        class Lookup(nn.Module):
            def __call__(self, x):
                return runner.embed(x)

            def as_linear(self, h):
                return head.logits(h)

        class Project(nn.Module):
            def __call__(self, h):
                return head.logits(h)

        container, emb_name = layer_container(self.model)
        embedding = getattr(container, emb_name)
        setattr(container, emb_name, Lookup())
        lm_head = None if self.tied else self.model.lm_head
        if lm_head is not None:
            self.model.lm_head = Project()
        calls = {i: functools.partial(resident, i) for i in range(len(container.layers))}
        try:
            with wrapped_layers(self.model, calls), self.module_resident(self.final_norm, self.norm_path + "."):
                return self.model(tokens).astype(mx.float32)
        finally:
            setattr(container, emb_name, embedding)
            if lm_head is not None:
                self.model.lm_head = lm_head
