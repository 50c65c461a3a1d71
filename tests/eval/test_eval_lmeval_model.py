"""mixq as an lm-eval model: its log-likelihoods and rolling windows equal a direct forward; `mixq eval`
and lm-eval's own CLI with `--model mixq` give the same numbers; lm-eval's `local-completions` against
`mixq serve` agrees with the local model on the same data."""

import json
import math
from contextlib import contextmanager

import mixq  # noqa: F401
import mlx.core as mx
import pytest
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mixq.cli import main
from mixq.core.modelio import load


@pytest.fixture(scope="module")
def lm(qwen3):
    from mixq.eval.lmeval.model import MixqLM

    return MixqLM(pretrained=str(qwen3))


def _logprobs(model, ids):
    logits = model(mx.array(ids)[None])[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def test_loglikelihood_equals_a_direct_forward(lm):
    pairs = [("Question: what is two and two?\nAnswer:", " four"), ("The capital of France is", " Paris, of course"),
             ("Answer:", " A"), ("Answer:", " B")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        c_ids, k_ids = lm._encode_pair(ctx, cont)  # lm-eval's split
        lp = _logprobs(lm.backend.model, c_ids + k_ids)
        want = sum(lp[len(c_ids) - 1 + j, t].item() for j, t in enumerate(k_ids))
        want_greedy = all(int(lp[len(c_ids) - 1 + j].argmax().item()) == t for j, t in enumerate(k_ids))
        assert ll == pytest.approx(want, abs=1e-4) and greedy == want_greedy


def test_rolling_windows_score_every_token_once(lm):
    text = "Once upon a time there was a small model that read the same text again and again. " * 3
    ids = lm.tok_encode(text)
    full = _logprobs(lm.backend.model, [lm.prefix_token_id] + ids)
    one_pass = sum(full[i, t].item() for i, t in enumerate(ids))
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert got == pytest.approx(one_pass, abs=1e-3)  # the document fits one window
    lm._max_length = 16
    try:
        (short,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    finally:
        lm._max_length = lm._default_max_length()
    want = 0.0
    for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(ids, lm.prefix_token_id, 16, 1)):
        lp = _logprobs(lm.backend.model, ctx + pred)
        want += sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(pred))
    assert short == pytest.approx(want, abs=1e-3) and short != pytest.approx(got, abs=1e-3)


def test_generate_until_is_greedy_and_cut(lm):
    req = Instance("generate_until", {}, ("Once upon a time", {"until": ["\n"], "max_gen_toks": 12}), 0)
    (a,) = lm.generate_until([req])
    (b,) = lm.generate_until([req])
    assert a == b and "\n" not in a


def _run_eval(args, capsys):
    rc = main(["eval", *args, "--quiet", "--no-cache", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)["roles"]["model"]["lm_eval"]["results"]


def _run_lm_eval(model_args, tasks, tmp_path, capsys, extra=()):
    out = tmp_path / "lm-eval-out"
    rc = main(["lm-eval", "run", "--model", model_args[0], "--model_args", model_args[1], "--tasks", tasks,
               "--limit", "3", "--output_path", str(out), *extra])
    capsys.readouterr()
    assert rc == 0
    (results,) = out.rglob("results_*.json")
    return json.loads(results.read_text())["results"]


WINDOW = ["--max-length", "1024"]  # rolling windows of 1024 tokens everywhere (lm-eval's API models: 1026 - 2)


@pytest.fixture(scope="module")
def local(qwen3):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["eval", str(qwen3), "--tasks", "wikitext,mmlu", "--limit", "3", *WINDOW, "--quiet", "--no-cache",
                   "--json"])
    assert rc == 0
    return json.loads(out.getvalue())["roles"]["model"]["lm_eval"]["results"]


def test_mixq_eval_equals_lm_eval_with_the_mixq_model(qwen3, local, tmp_path, capsys):
    mine = local
    theirs = _run_lm_eval(("mixq", f"pretrained={qwen3},max_length=1024"), "wikitext,mmlu", tmp_path, capsys)
    for task, key in (("wikitext", "word_perplexity,none"), ("wikitext", "byte_perplexity,none"),
                      ("mmlu", "acc,none"), ("mmlu_computer_security", "acc,none")):
        assert mine[task][key] == theirs[task][key], (task, key)


@contextmanager
def _serving(path):
    from mixq.serve.app import ServeSettings, create_app
    from mixq.serve.engine import Engine
    from mixq.serve.runner import ServerThread

    loaded = load(str(path))
    engine = Engine(loaded.model, loaded.tokenizer, max_concurrency=2).start()
    try:
        with ServerThread(create_app(engine, ServeSettings(model_id="m", api_key="k"))) as srv:
            yield srv
    finally:
        engine.stop()


def test_local_and_served_agree(qwen3, local, tmp_path, capsys):
    """The same data through the local model, through `mixq eval --server` and through lm-eval's
    local-completions against mixq serve (api key required)."""
    with _serving(qwen3) as srv:
        served = _run_eval(["m", "--server", srv.url, "--api-key", "k", "--tokenizer", str(qwen3),
                            "--tasks", "wikitext,mmlu", "--limit", "3", *WINDOW], capsys)
        import os

        os.environ["OPENAI_API_KEY"] = "k"
        try:
            theirs = _run_lm_eval(("local-completions", f"model=m,base_url={srv.url}/v1/completions,tokenizer={qwen3},"
                                   "tokenizer_backend=huggingface,max_length=1026"), "wikitext,mmlu", tmp_path, capsys)
        finally:
            del os.environ["OPENAI_API_KEY"]
        rc = main(["eval", "m", "--server", srv.url, "--tasks", "mmlu", "--tokenizer", str(qwen3), "--no-cache",
                   "--quiet"])
        assert rc == 2 and "401" in capsys.readouterr().err  # no key, no answers
    for other in (served, theirs):
        assert other["wikitext"]["word_perplexity,none"] == pytest.approx(local["wikitext"]["word_perplexity,none"],
                                                                           rel=0.01)
        assert other["mmlu"]["acc,none"] == pytest.approx(local["mmlu"]["acc,none"], abs=1e-9)
    assert math.isfinite(local["wikitext"]["word_perplexity,none"])
