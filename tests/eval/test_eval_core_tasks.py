"""perplexity / kl / hashhop pieces and the verdict rules, on hand-made inputs."""

import math

import pytest

from mixq.eval import registry
from mixq.eval.cache import ResultCache
from mixq.core.errors import MixqError
from mixq.eval.datafiles import parse_jsonl, stratified
from mixq.eval.table import THRESHOLDS, capability, verdict
from mixq.eval.tasks import _text
from mixq.eval.tasks.hashhop import make_sample, normalize
from mixq.eval.tasks.perplexity import Perplexity, rolling_windows, word_count


def test_rolling_windows_score_every_target_once():
    for n, seq, ov in [(1, 8, 4), (2, 8, 4), (8, 8, 4), (9, 8, 4), (100, 16, 8), (37, 5, 0), (50, 10, 9)]:
        scored = []
        for start, end, pred in rolling_windows(n, seq, ov):
            assert end - start <= seq and start <= pred - 1 and (pred == 1 or pred - start >= min(ov, pred - 1))
            scored += list(range(pred, end))
        assert scored == list(range(1, n))


def test_perplexity_aggregate_formulas():
    recs = [{"nll": 10.0, "tokens": 5, "words": 4, "bytes": 20}, {"nll": 6.0, "tokens": 3, "words": 4, "bytes": 12}]
    m = Perplexity().aggregate(recs)
    assert m["word_perplexity"] == pytest.approx(math.exp(16 / 8))
    assert m["byte_perplexity"] == pytest.approx(math.exp(16 / 32))
    assert m["bits_per_byte"] == pytest.approx(16 / 32 / math.log(2))
    assert m["token_perplexity"] == pytest.approx(math.exp(2))
    assert word_count("  a b\n\nc  ") == 3 and word_count("") == 0


def test_rolling_perplexity_matches_one_pass(nemotron_dense):
    """With windows longer than the document the rolling NLL is the plain next-token NLL."""
    import mixq  # noqa: F401
    import mlx.core as mx

    from mixq.core.metrics import token_nll
    from mixq.core.modelio import load
    from mixq.eval.backend import LocalBackend
    from mixq.eval.runner import EvalOptions, TaskContext

    be = LocalBackend(load(nemotron_dense))
    text = "It was a dark and stormy night; the rain fell in torrents.\n" * 3
    ids = be.bos() + be.encode(text)
    whole = float(token_nll(be.logits([ids]), mx.array([ids])).sum().item())
    task = Perplexity()
    for seq in (len(ids) + 5, 16):
        ctx = TaskContext(be, None, EvalOptions(seq_len=seq), "model")
        rec = task.process([{"id": "d", "text": text}], ctx)[0]
        assert rec["tokens"] == len(ids) - 1
        if seq > len(ids):
            assert rec["nll"] == pytest.approx(whole, rel=1e-5)


def test_heldout_documents_interleave_sections():
    class O:
        text = None
        data_dir = None

    docs, source, files = _text.documents(O())
    assert source == "mixq/data/heldout.txt" and "heldout.txt" in files
    first = {d[0].rsplit("-", 1)[0] for d in docs[:5]}
    assert first == {"en_botchan", "en_devils_dictionary", "en_kjv", "en_pydocs_slice", "ja_wagahai"}
    assert len({d[0] for d in docs}) == len(docs)


def test_text_file_reads_like_a_text_mode_read(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes("\ufeffone\r\ntwo\rthree\n".encode("utf-8"))

    class O:
        text, data_dir = str(p), None

    docs, source, files = _text.documents(O())
    assert docs == [("doc-0", "one\ntwo\nthree")] and source == str(p)
    O.text = str(tmp_path / "missing.txt")
    with pytest.raises(MixqError, match="no such file"):
        _text.documents(O())


def test_jsonl_errors_name_the_line():
    assert parse_jsonl('{"a": 1}\n\n{"b": 2}\n', "f") == [{"a": 1}, {"b": 2}]
    assert parse_jsonl('[{"a": 1}]', "f") == [{"a": 1}]  # one JSON array: accepted too
    with pytest.raises(MixqError, match=r"^f: line 2: not valid JSON \("):
        parse_jsonl('{"a": 1}\n{oops\n', "f")
    with pytest.raises(MixqError, match=r"^f: line 2: expected a JSON object$"):
        parse_jsonl("{}\n[1]\n", "f")


def test_hashhop_chains_are_consistent():
    for i, hops in enumerate((1, 2, 3, 4)):
        s = make_sample(0, i, hops)
        edges = dict(line.split(" = ") for line in s["assignments"])
        h = s["start"]
        for _ in range(hops):
            h = edges[h]
        assert h == s["target"] and s["start"] not in edges.values()
        assert make_sample(0, i, hops) == s and make_sample(1, i, hops) != s
    assert normalize("  Answer: `aB3dE9xZ`.") == "aB3dE9xZ"
    assert normalize("<reasoning done>\naB3dE9xZ") == "aB3dE9xZ"
    assert normalize("") == ""


def test_verdict_rules():
    mmlu, ppl, kl = registry.get("hashhop"), registry.get("perplexity"), registry.get("kl")
    assert verdict(mmlu, 60.0, 60.5)["verdict"] == "Pass"
    assert verdict(mmlu, 58.0, 60.5)["verdict"] == "Warn"
    assert verdict(mmlu, 50.0, 60.5)["verdict"] == "Fail"
    assert verdict(mmlu, 70.0, 60.5)["verdict"] == "Pass"   # better than the reference
    assert verdict(mmlu, 60.0, None) is None                # nothing to compare with
    assert verdict(ppl, 10.2, 10.0)["verdict"] == "Pass"
    assert verdict(ppl, 10.8, 10.0)["verdict"] == "Warn"
    assert verdict(ppl, 11.5, 10.0)["verdict"] == "Fail"
    assert verdict(kl, THRESHOLDS["kl"]["pass"], None)["verdict"] == "Pass"
    assert verdict(kl, 0.1, None)["verdict"] == "Warn" and verdict(kl, 0.3, None)["verdict"] == "Fail"


def test_capability_score_mean_and_partial():
    tasks = {t.name: t for t in registry.resolve("capability")}

    def res(v):
        return {"metrics": {tasks_metric: v}}

    results = {}
    for name, t in tasks.items():
        tasks_metric = t.metric
        results[name] = res(0.5 if name != "hashhop" else 0.2)
    c = capability(results, tasks)
    assert c["score"] == pytest.approx((5 * 50 + 20) / 6) and not c["partial"]
    del results["bfcl"]
    c = capability(results, tasks)
    assert c["partial"] and c["missing"] == ["bfcl"] and c["score"] == pytest.approx((4 * 50 + 20) / 5)


def test_registry_resolution():
    assert [t.name for t in registry.resolve("capability")] == list(registry.CAPABILITY)
    assert [t.name for t in registry.resolve("kl,capability,kl")][:2] == ["kl", "mmlu"]
    assert {"perplexity", "kl", "hashhop"} <= set(registry.names())


def test_stratified_sample_covers_groups():
    items = [(g, i) for g, n in (("a", 50), ("b", 30), ("c", 20)) for i in range(n)]
    pick = stratified(items, key=lambda x: x[0], n=10, seed=0)
    counts = {g: sum(1 for x in pick if x[0] == g) for g in "abc"}
    assert counts == {"a": 5, "b": 3, "c": 2}
    assert pick == stratified(items, key=lambda x: x[0], n=10, seed=0)
    assert len(stratified(items, key=lambda x: x[0], n=2, seed=0)) == 2
    small = stratified(items, key=lambda x: x[0], n=4, seed=1)
    assert len(small) == 4 and {x[0] for x in small} == {"a", "b", "c"}
    assert len(stratified(items, key=lambda x: x[0], n=None, seed=0)) == 100


def test_cache_ignores_torn_line(tmp_path):
    c = ResultCache(tmp_path, "f" * 64, "t", {"a": 1})
    c.add([{"id": "x", "v": 1}, {"id": "y", "v": 2}])
    c.path.write_text(c.path.read_text() + '{"id": "z", "v"')
    c2 = ResultCache(tmp_path, "f" * 64, "t", {"a": 1})
    assert set(c2.records) == {"x", "y"}
    c2.add([{"id": "z", "v": 3}])
    assert set(ResultCache(tmp_path, "f" * 64, "t", {"a": 1}).records) == {"x", "y", "z"}
    assert ResultCache(tmp_path, "f" * 64, "t", {"a": 2}).records == {}  # other settings, other file
