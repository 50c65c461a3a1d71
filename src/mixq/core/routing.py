"""MoE routing as mlx-lm's nemotron_h selects experts (the one place that reads its router's internals).

A rounding error upstream of a router moves its selection scores; where the last expert chosen and the
first one left out are close, the choice flips and the block's output jumps. The sensitivity estimator
prices that (`mixq.quant.flips`) from what this module gives per position: the selection margin, its
gradient, and the output change a flip would make. Tested against mlx-lm's own selection
(`tests/core/test_routing.py`).
"""

from __future__ import annotations


def gate(runner, i: int):
    """Block i's router (nemotron_h `MoEGate`: sigmoid scores plus a correction bias, top-k), or None."""
    if runner.family != "nemotron_h" or getattr(runner.layers[i], "block_type", None) != "E":
        return None
    g = getattr(runner.layers[i].mixer, "gate", None)
    needed = ("weight", "e_score_correction_bias", "top_k", "n_group", "topk_group", "norm_topk_prob",
              "routed_scaling_factor")
    return g if g is not None and all(hasattr(g, a) for a in needed) else None


def mixer_input(runner, i: int, h):
    """What block i's mixer (and its router) sees: the block's pre-norm of its input."""
    return runner.layers[i].norm(h)


def selection_scores(g, x):
    """The scores top-k is taken over (float32): sigmoid(x W^T) + bias, groups outside the top groups
    zeroed as mlx-lm's `group_expert_select` does; and the sigmoid scores the chosen experts are weighted by."""
    import mlx.core as mx

    orig = mx.sigmoid((x @ g.weight.T).astype(mx.float32))
    s = orig + g.e_score_correction_bias.astype(mx.float32)
    if g.n_group > 1:
        s = mx.unflatten(s, axis=-1, shape=(g.n_group, -1))
        group = mx.topk(s, 2, axis=-1).sum(axis=-1, keepdims=True)
        drop = mx.stop_gradient(mx.argpartition(group, kth=g.n_group - g.topk_group - 1,
                                                axis=-2)[..., :g.n_group - g.topk_group, :])
        s = mx.flatten(mx.put_along_axis(s, drop, mx.array(0.0), axis=-2), -2, -1)
    return s, orig


def ranked(g, x):
    """Indices of the top k + 1 experts by selection score, best first (no gradient)."""
    import mlx.core as mx

    s, _ = selection_scores(g, x)
    return mx.stop_gradient(mx.argsort(-s, axis=-1)[..., :g.top_k + 1])


def margin(g, x, order):
    """Per position: selection score of the k-th expert chosen minus the (k+1)-th's (>= 0 at the float
    weights); differentiable in x, with `order` from `ranked` held fixed."""
    import mlx.core as mx

    s, _ = selection_scores(g, x)
    k = g.top_k
    pair = mx.take_along_axis(s, order[..., k - 1:k + 1], axis=-1)
    return pair[..., 0] - pair[..., 1]


def _routed(mixer, g, x, inds, orig):
    import mlx.core as mx

    w = mx.take_along_axis(orig, inds, axis=-1)
    if g.top_k > 1 and g.norm_topk_prob:
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
    w = w * g.routed_scaling_factor
    if getattr(mixer, "moe_latent_size", None) is not None:
        x = mixer.fc1_latent_proj(x)
    y = (mixer.switch_mlp(x, inds) * w[..., None]).sum(axis=-2)
    return mixer.fc2_latent_proj(y) if getattr(mixer, "moe_latent_size", None) is not None else y


def flip_delta(runner, i: int, x, order):
    """Block i's output change (float32) had its router taken the (k+1)-th expert in place of the k-th at
    every position (the shared experts do not change)."""
    import mlx.core as mx

    g = runner.layers[i].mixer.gate
    mixer = runner.layers[i].mixer
    k = g.top_k
    _, orig = selection_scores(g, x)
    chosen = order[..., :k]
    swapped = mx.concatenate([order[..., :k - 1], order[..., k:k + 1]], axis=-1)
    return (_routed(mixer, g, x, swapped, orig) - _routed(mixer, g, x, chosen, orig)).astype(mx.float32)
