"""The router adapter against mlx-lm's own nemotron_h expert selection."""

import mlx.core as mx
import numpy as np

from mixq.core import routing
from mixq.core.modelio import load


def _moe_block(path):
    lm = load(path)
    r = lm.runner()
    blocks = [i for i in range(r.num_blocks) if routing.gate(r, i) is not None]
    assert blocks and all(r.layers[i].block_type == "E" for i in blocks)
    assert all(routing.gate(r, i) is None for i in range(r.num_blocks) if i not in blocks)
    i = blocks[0]
    h = mx.random.normal((2, 16, lm.config["hidden_size"]), key=mx.random.key(3))
    return r, i, h


def test_selection_is_mlx_lms(nemotron_moe):
    r, i, h = _moe_block(nemotron_moe)
    g = routing.gate(r, i)
    x = routing.mixer_input(r, i, h)
    inds, _ = g(x)
    s, _ = routing.selection_scores(g, x)
    order = routing.ranked(g, s)
    k = g.top_k
    assert np.array_equal(np.sort(np.array(inds), -1), np.sort(np.array(order[..., :k]), -1))
    m = routing.margin(g, s, order)
    assert m.shape == h.shape[:-1] and (np.array(m) >= 0).all()


def test_flip_delta_is_the_blocks_output_change_when_that_choice_flips(nemotron_moe):
    """Raising the (k+1)-th expert's bias past the margin at one position makes mlx-lm's block take it
    in place of the k-th there: the block output moves by exactly flip_delta at that position."""
    r, i, h = _moe_block(nemotron_moe)
    layer, g = r.layers[i], routing.gate(r, i)
    x = routing.mixer_input(r, i, h)
    s, orig = routing.selection_scores(g, x)
    order = routing.ranked(g, s)
    m = np.array(routing.margin(g, s, order))
    delta = routing.flip_delta(r, i, x, order, orig)
    b, t = np.unravel_index(np.argmin(m), m.shape)
    before = layer(h)
    k = g.top_k
    e = int(order[b, t, k].item())
    bias = g.e_score_correction_bias
    g.e_score_correction_bias = bias + mx.array(np.eye(bias.shape[0], dtype=np.float32)[e] * (m[b, t] + 1e-3))
    try:
        after = layer(h)
    finally:
        g.e_score_correction_bias = bias
    got = (after - before)[b, t]
    assert mx.abs(delta[b, t]).max().item() > 0
    assert mx.allclose(got, delta[b, t], atol=1e-5, rtol=1e-4).item()
