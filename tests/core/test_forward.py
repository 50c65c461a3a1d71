"""The block runner on stored-dtype weights, the chunked head, and the streaming shard writer."""

import json

import mlx.core as mx
import numpy as np
import pytest

import mixq.core.head as head_mod
from mixq.core import blas
from mixq.core.head import Head
from mixq.core.modelio import load
from mixq.core.stwriter import ShardWriter

TOKENS = mx.array([[1, 5, 9, 33, 100, 7, 8, 9, 250, 3], [4, 4, 17, 2, 60, 61, 62, 9, 10, 11]], dtype=mx.int32)


@pytest.mark.parametrize("kind", ["nemotron-dense", "nemotron-moe", "qwen3"])
@pytest.mark.parametrize("retain", [True, False])
def test_runner_on_stored_weights_equals_the_float32_model(fixture_models, kind, retain):
    lm = load(fixture_models[kind], compute_dtype=None, lazy=True)
    stored = {str(v.dtype) for v in lm.weights.fresh().values()}
    assert "mlx.core.bfloat16" in stored
    r = lm.runner(retain=retain)
    ref = load(fixture_models[kind]).model(TOKENS)  # every weight cast to float32 up front
    got = r.run(TOKENS)
    assert got.dtype == mx.float32
    assert mx.abs(got - ref).max().item() <= 1e-5 * mx.abs(ref).max().item()
    # the model keeps its stored dtype outside a block's residency
    from mlx.utils import tree_flatten

    assert {str(v.dtype) for _, v in tree_flatten(lm.model.parameters())} == stored


def test_overrides_and_swap_put_weights_back(nemotron_dense):
    lm = load(nemotron_dense, compute_dtype=None, lazy=True)
    r = lm.runner()
    path = r.layer_prefix(1) + "mixer.q_proj.weight"
    before = r.run(TOKENS)
    w = r.stored(r.layer_prefix(1))[path]
    with r.resident(1):
        with r.swap(1, {path: mx.zeros(w.shape)}):
            assert (r.layers[1].mixer.q_proj.weight == 0).all().item()
        assert r.layers[1].mixer.q_proj.weight.dtype == mx.float32
    assert r.layers[1].mixer.q_proj.weight.dtype == w.dtype
    changed = r.run(TOKENS, overrides={path: mx.zeros(w.shape)})
    assert not mx.allclose(changed, before).item()
    assert mx.array_equal(r.run(TOKENS), before).item()


def test_relax_lets_go_of_computed_copies_and_keeps_overrides(nemotron_dense):
    lm = load(nemotron_dense, compute_dtype=None, lazy=True)
    r = lm.runner()
    q_path, k_path = (r.layer_prefix(1) + f"mixer.{n}_proj.weight" for n in ("q", "k"))
    h = r.embed(TOKENS)
    zeros = mx.zeros(r.stored(r.layer_prefix(1))[k_path].shape)
    with r.resident(1, {k_path: zeros}):
        out = r.block(1, h)
        mx.eval(out)
        held = r.layers[1].mixer.q_proj.weight
        r.relax(1)
        # a new (unevaluated) compute-dtype copy of the stored weight; the override stays
        assert r.layers[1].mixer.q_proj.weight is not held
        assert r.layers[1].mixer.q_proj.weight.dtype == mx.float32
        assert r.layers[1].mixer.k_proj.weight is zeros
        assert mx.array_equal(r.block(1, h), out).item()
    assert r.layers[1].mixer.q_proj.weight.dtype == r.stored(r.layer_prefix(1))[q_path].dtype


def _full_stats(logits, targets):
    lse = mx.logsumexp(logits, axis=-1)
    nll = lse - mx.take_along_axis(logits, mx.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return lse, logits.argmax(-1), nll


@pytest.mark.parametrize("numpy_on_cpu", [True, False])
@pytest.mark.parametrize("chunk_bytes", [None, 4096])
def test_chunked_head_matches_full_vocabulary(monkeypatch, chunk_bytes, numpy_on_cpu):
    monkeypatch.setattr(blas, "NUMPY_ON_CPU", numpy_on_cpu)  # the mlx path is what a GPU runs
    if chunk_bytes:
        monkeypatch.setattr(head_mod, "CHUNK_BYTES", chunk_bytes)  # the 256-row minimum: 4 chunks
    rng = np.random.default_rng(0)
    W = mx.array(rng.standard_normal((1000, 64)).astype(np.float32)).astype(mx.bfloat16)
    Wq = W + mx.array(rng.standard_normal((1000, 64)).astype(np.float32) * 0.01).astype(mx.bfloat16)
    hn = mx.array(rng.standard_normal((2, 7, 64)).astype(np.float32))
    hq = hn + mx.array(rng.standard_normal((2, 7, 64)).astype(np.float32) * 0.05)
    targets = mx.array(rng.integers(0, 1000, (2, 7)).astype(np.int32))
    head, qhead = Head(W), Head(Wq)
    assert (len(head.bounds) > 1) == bool(chunk_bytes)
    zp, zq = head.logits(hn), qhead.logits(hq)
    assert mx.allclose(zp, hn @ W.astype(mx.float32).T, atol=1e-4).item()
    ref = head.reference(hn, targets)
    lse, am, nll = _full_stats(zp, targets)
    assert mx.allclose(ref.lse, lse, atol=1e-4).item() and mx.array_equal(ref.argmax, am).item()
    assert mx.allclose(ref.nll, nll, atol=1e-4).item()
    got = qhead.compare(hq, ref, head, targets)
    lp, lq = zp - lse[..., None], zq - mx.logsumexp(zq, axis=-1, keepdims=True)
    kl = (mx.exp(lp) * (lp - lq)).sum(-1)
    assert mx.allclose(got["kl"], kl, rtol=1e-3, atol=1e-5).item()
    assert mx.array_equal(got["same"], zq.argmax(-1) == am).item()
    assert mx.allclose(got["nll"], _full_stats(zq, targets)[2], atol=1e-4).item()
    # the log-likelihood cotangent: (onehot - softmax) @ W
    labels = mx.array(rng.integers(0, 1000, (2, 7)).astype(np.int32))
    fisher = []
    g = head.loglik_cotangent(hn, labels, ref.lse, fisher=fisher)
    direct = mx.grad(lambda h: mx.take_along_axis(nn_log_softmax(h @ W.astype(mx.float32).T), labels[..., None],
                                                  axis=-1).sum())(hn)
    assert mx.allclose(g, direct, atol=1e-4).item()
    # the head's Fisher diagonal over these positions: sum_t p (1 - p) per vocabulary row
    p = mx.softmax(zp, axis=-1).reshape(-1, zp.shape[-1])
    assert len(fisher) == 1 and mx.allclose(fisher[0], (p * (1 - p)).sum(axis=0), rtol=1e-4, atol=1e-6).item()
    # labels drawn with the reference's statistics are the ones `sample` draws with the same key
    both = head.reference(hn, targets, sample_key=mx.random.key(3))
    assert mx.array_equal(both.labels, head.sample(hn, mx.random.key(3))).item()
    assert mx.array_equal(both.lse, ref.lse).item() and mx.array_equal(both.argmax, ref.argmax).item()


def nn_log_softmax(z):
    return z - mx.logsumexp(z, axis=-1, keepdims=True)


def test_label_sampling_follows_the_distribution_and_the_key():
    W = mx.array(np.eye(4, 3, dtype=np.float32)) * mx.array([[3.0], [2.0], [1.0], [0.0]])
    hn = mx.ones((1, 20000, 3))
    head = Head(W)
    a, b, c = head.sample(hn, mx.random.key(1)), head.sample(hn, mx.random.key(1)), head.sample(hn, mx.random.key(2))
    assert mx.array_equal(a, b).item() and not mx.array_equal(a, c).item()
    p = mx.softmax(head.logits(hn)[0, 0]).tolist()
    freq = np.bincount(np.array(a).ravel(), minlength=4) / a.size
    assert np.allclose(freq, p, atol=0.02)


@pytest.mark.parametrize("numpy_on_cpu", [True, False])
def test_label_sampling_over_chunks_follows_the_distribution(monkeypatch, numpy_on_cpu):
    # labels drawn chunk by chunk (a weighted reservoir) have the full softmax's distribution, and the
    # numpy (CPU) and mlx (GPU) paths draw the same labels from the same key
    monkeypatch.setattr(head_mod, "CHUNK_BYTES", 4096)   # 256-row chunks: 4 of them
    rng = np.random.default_rng(0)
    W = mx.array(rng.standard_normal((1000, 16)).astype(np.float32)) * 0.4
    head = Head(W)
    assert len(head.bounds) == 4
    hn = mx.broadcast_to(mx.array(rng.standard_normal((16,)).astype(np.float32)), (1, 30000, 16))
    monkeypatch.setattr(blas, "NUMPY_ON_CPU", numpy_on_cpu)
    a = head.sample(hn, mx.random.key(5))
    monkeypatch.setattr(blas, "NUMPY_ON_CPU", not numpy_on_cpu)
    assert mx.array_equal(a, head.sample(hn, mx.random.key(5))).item()
    p = np.array(mx.softmax(head.logits(hn[:, :1])[0, 0]))
    freq = np.bincount(np.array(a).ravel(), minlength=1000) / a.size
    # mass per chunk and per tenth of the vocabulary within a few standard errors
    for parts in (4, 10):
        got, want = freq.reshape(parts, -1).sum(1), p.reshape(parts, -1).sum(1)
        assert np.all(np.abs(got - want) <= 5 * np.sqrt(want * (1 - want) / a.size) + 1e-3)


def test_shard_writer_places_every_tensor_and_loads(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a.weight": mx.array(rng.standard_normal((64, 32)).astype(np.float32)).astype(mx.bfloat16),
              "a.scales": mx.array(rng.standard_normal((64, 1)).astype(np.float32)).astype(mx.float16),
              "b": mx.arange(300, dtype=mx.uint32), "c": mx.array(rng.standard_normal((3, 5)).astype(np.float32)),
              "d": mx.array([1, 2, 3], dtype=mx.uint8)}
    layout = [(k, v.shape, str(v.dtype).rsplit(".", 1)[-1]) for k, v in arrays.items()]
    w = ShardWriter(tmp_path, layout, max_shard_bytes=2000, total_parameters=7)
    for k in reversed(list(arrays)):  # any order
        w.put(k, arrays[k])
    index = w.close()
    files = sorted(p.name for p in tmp_path.glob("model*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"]) == set(arrays) and index["metadata"]["total_parameters"] == 7
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text()) == index
    got = {}
    for f in files:
        got.update(mx.load(str(tmp_path / f)))
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and mx.array_equal(got[k], v).item()


def test_shard_writer_refuses_what_was_not_planned(tmp_path):
    from mixq.core.errors import MixqError

    w = ShardWriter(tmp_path, [("x", (2, 2), "float32")])
    with pytest.raises(MixqError, match="not in the planned layout"):
        w.put("y", mx.zeros((2, 2)))
    with pytest.raises(MixqError, match="planned float32"):
        w.put("x", mx.zeros((2, 3)))
    with pytest.raises(MixqError, match="never written"):
        w.close()


def test_runner_on_a_llama_reads_its_layer_attributes(tmp_path, qwen3):
    """mlx-lm's llama forward reads plain attributes of its layers (use_sliding): the runner's check passes
    them through, and the streamed run equals the float32 model."""
    import importlib
    import shutil

    from mlx.utils import tree_flatten

    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": True, "rope_theta": 10000.0}
    arch = importlib.import_module("mlx_lm.models.llama")
    mx.random.seed(0)
    model = arch.Model(arch.ModelArgs.from_dict(cfg))
    mx.save_safetensors(str(tmp_path / "model.safetensors"),
                        {k: v.astype(mx.bfloat16) for k, v in tree_flatten(model.parameters())})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for f in qwen3.glob("*.json"):
        if f.name != "config.json":
            shutil.copy(f, tmp_path / f.name)
    lm = load(tmp_path, compute_dtype=None, lazy=True)
    got = lm.runner(retain=False).run(TOKENS)
    ref = load(tmp_path).model(TOKENS)
    assert mx.abs(got - ref).max().item() <= 1e-5 * mx.abs(ref).max().item()


@pytest.mark.parametrize("numpy_on_cpu", [True, False])
def test_tiny_kl_keeps_its_digits(monkeypatch, numpy_on_cpu):
    """A mean KL of ~1e-8 (an 8-bit-sized perturbation) comes out right to 1 % (per position to the float32
    logits' own precision), where a difference of two float32 log-sum-exps is ~40 % off (measured)."""
    monkeypatch.setattr(blas, "NUMPY_ON_CPU", numpy_on_cpu)
    rng = np.random.default_rng(3)
    W = rng.standard_normal((3000, 32)).astype(np.float32)
    dW = rng.standard_normal((3000, 32)).astype(np.float32) * 2e-5
    hn = rng.standard_normal((1, 50, 32)).astype(np.float32) * 3
    head, qhead = Head(mx.array(W)), Head(mx.array(W + dW))
    ref = head.reference(mx.array(hn))
    got = np.array(qhead.compare(mx.array(hn), ref, head)["kl"]).ravel()
    zp, zq = hn[0].astype(np.float64) @ W.astype(np.float64).T, hn[0].astype(np.float64) @ (W + dW).astype(np.float64).T
    lp = zp - np.log(np.exp(zp - zp.max(1, keepdims=True)).sum(1, keepdims=True)) - zp.max(1, keepdims=True)
    lq = zq - np.log(np.exp(zq - zq.max(1, keepdims=True)).sum(1, keepdims=True)) - zq.max(1, keepdims=True)
    want = (np.exp(lp) * (lp - lq)).sum(1)
    assert 1e-9 < want.mean() < 1e-7
    assert np.abs(got - want).max() < 5e-9 and abs(got.mean() / want.mean() - 1) < 0.01


@pytest.mark.parametrize("kind", ["nemotron-dense", "qwen3"])
def test_a_streamed_head_reads_its_rows_from_the_file(fixture_models, kind):
    """Streaming: the head's rows come from the safetensors file a chunk at a time (never the whole table),
    equal to the stored array's rows, in any dtype; a resident runner keeps the array."""
    from mixq.core.weights import FileRows

    lm = load(fixture_models[kind], compute_dtype=None, lazy=True)
    r = lm.runner(retain=False)
    head = r.head()
    assert isinstance(head.weight, FileRows)
    stored = r.head_weight()
    assert head.weight.shape == tuple(stored.shape) and head.weight.dtype == stored.dtype
    for a, b in [(0, 7), (5, 300), (head.vocab - 3, head.vocab + 10)]:
        got = head.weight.rows(a, b)
        assert got.dtype == stored.dtype and mx.array_equal(got, stored[a:b]).item()
    hn = mx.array(np.random.default_rng(0).standard_normal((2, 3, head.dim)).astype(np.float32))
    full = hn @ stored.astype(mx.float32).T
    assert mx.allclose(head.logits(hn), full, atol=1e-5).item()
    assert not isinstance(lm.runner(retain=True).head().weight, FileRows)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_file_rows_of_every_float_dtype_and_shard(tmp_path, dtype):
    from mixq.core.weights import FileRows, _header

    rng = np.random.default_rng(1)
    arrays = {"x.weight": mx.array(rng.standard_normal((40, 24)).astype(np.float32)).astype(getattr(mx, dtype)),
              "y.weight": mx.array(rng.standard_normal((30, 8)).astype(np.float32)).astype(getattr(mx, dtype))}
    layout = [(k, v.shape, dtype) for k, v in arrays.items()]
    w = ShardWriter(tmp_path, layout, max_shard_bytes=500 * 4, total_parameters=1)
    for k, v in arrays.items():
        w.put(k, v)
    w.close()
    for f in sorted(tmp_path.glob("model*.safetensors")):
        header, data = _header(f)
        for name, e in header.items():
            if name == "__metadata__":
                continue
            rows = FileRows(f, data + e["data_offsets"][0], e["shape"], e["dtype"])
            assert mx.array_equal(rows.rows(3, 17), arrays[name][3:17]).item() and rows.nbytes == arrays[name].nbytes


def test_wrapped_layers_runs_the_calls_and_puts_the_layers_back(nemotron_dense):
    from mixq.core.forward import layer_container, wrapped_layers

    model = load(nemotron_dense).model
    layers = list(layer_container(model)[0].layers)
    ref = model(TOKENS)
    seen = []

    def doubled(i, layer, h, *args, **kwargs):
        seen.append(i)
        return layer(h, *args, **kwargs) * 2

    with wrapped_layers(model, {1: lambda layer, h, *a, **k: doubled(1, layer, h, *a, **k)}):
        changed = model(TOKENS)
    assert seen == [1] and not np.allclose(np.array(changed), np.array(ref))
    with pytest.raises(RuntimeError), wrapped_layers(model, {}):
        raise RuntimeError("inside")
    assert layer_container(model)[0].layers == layers
    np.testing.assert_array_equal(np.array(model(TOKENS)), np.array(ref))
