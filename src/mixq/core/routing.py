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


def ranked(g, s):
    """Indices of the top k + 1 experts by selection score `s` (from `selection_scores`), best first (no
    gradient)."""
    import mlx.core as mx

    return mx.stop_gradient(mx.argsort(-s, axis=-1)[..., :g.top_k + 1])


def margin(g, s, order):
    """Per position: selection score of the k-th expert chosen minus the (k+1)-th's (>= 0 at the float
    weights); differentiable in the scores `s`, with `order` from `ranked` held fixed."""
    import mlx.core as mx

    k = g.top_k
    pair = mx.take_along_axis(s, order[..., k - 1:k + 1], axis=-1)
    return pair[..., 0] - pair[..., 1]


def flip_delta(runner, i: int, x, order, orig):
    """Block i's output change (float32) had its router taken the (k+1)-th expert in place of the k-th at
    every position (the shared experts do not change). `orig`: the sigmoid scores of `selection_scores`.
    The k + 1 experts of `order` run once; the two choices weight them, each with one left out."""
    import mlx.core as mx

    mixer = runner.layers[i].mixer
    g, k = mixer.gate, mixer.gate.top_k
    latent = getattr(mixer, "moe_latent_size", None) is not None
    top = order[..., :k + 1]
    ys = mixer.switch_mlp(mixer.fc1_latent_proj(x) if latent else x, top)   # (..., k + 1, d)
    w = mx.take_along_axis(orig, top, axis=-1)

    def routed(mask):
        wm = w * mx.array(mask, dtype=w.dtype)
        if k > 1 and g.norm_topk_prob:
            wm = wm / (wm.sum(axis=-1, keepdims=True) + 1e-20)
        y = (ys * (wm * g.routed_scaling_factor)[..., None]).sum(axis=-2)
        return mixer.fc2_latent_proj(y) if latent else y

    chosen, swapped = [1.0] * k + [0.0], [1.0] * (k - 1) + [0.0, 1.0]
    return (routed(swapped) - routed(chosen)).astype(mx.float32)
