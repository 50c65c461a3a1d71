"""mmlu / jcommonsenseqa / gsm8k: prompt formats, data files in the official layouts, scorers on
correct, incorrect and malformed answers (through a scripted backend), and a real run on a fixture."""

import json

import pytest

from mixq.core.errors import MixqError
from mixq.eval import registry
from mixq.eval.backend import GenResult
from mixq.eval.runner import EvalOptions, run_task
from mixq.eval.tasks import gsm8k, jcommonsenseqa, mmlu


class Scripted:
    """A backend answering from functions of the prompt: loglik(context, continuation), gen(request)."""

    kind = "scripted"
    chat = True

    def __init__(self, loglik=None, gen=None):
        self._ll, self._gen = loglik, gen

    def identity(self):
        return {"name": "scripted", "fingerprint": "0" * 64, "size_bytes": 0}

    def settings(self):
        return {}

    def loglikelihood(self, pairs):
        return [self._ll(c, k) for c, k in pairs]

    def generate(self, reqs):
        out = []
        for r in reqs:
            text = self._gen(r)
            out.append(GenResult(text=text, reasoning="", answer=text, tokens=1, finish="stop"))
        return out


def _run(name, backend, **kw):
    return run_task(registry.get(name), backend, None, EvalOptions(cache_dir=None, progress=False, **kw), "model")


def test_mmlu_prompt_format():
    q = {"question": "What is 2+2?", "choices": ["3", "4", "5", "6"], "answer": "B"}
    p = mmlu.build_prompt("elementary_mathematics", [q], q)
    assert p == ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
                 "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
                 "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")


def test_mmlu_scoring_and_stratified_sample():
    # an oracle that prefers the right letter: every subject right; a constant one: only the "A" answers
    def oracle_for(data):
        answers = {s["prompt"]: s["answer"] for s in data.samples}
        return lambda c, k: 0.0 if k.strip() == answers[c] else -5.0

    data = registry.get("mmlu").load(EvalOptions(), None)
    res = _run("mmlu", Scripted(loglik=oracle_for(data)))
    assert res["metrics"]["accuracy"] == 1.0 and set(res["metrics"]["subjects"]) == {
        "computer_security", "elementary_mathematics", "high_school_geography"}
    res = _run("mmlu", Scripted(loglik=lambda c, k: 0.0 if k == " A" else -1.0))
    truth = [s["answer"] for s in data.samples]
    assert res["metrics"]["accuracy"] == pytest.approx(truth.count("A") / len(truth))
    assert res["data"]["sample_data"] and res["n"] == 12
    three = _run("mmlu", Scripted(loglik=lambda c, k: 0.0), limit=3)
    assert sorted(r["subject"] for r in three["samples"]) == [
        "computer_security", "elementary_mathematics", "high_school_geography"]
    # ties go to the first letter, deterministically
    assert all(r["pred"] == "A" for r in three["samples"])


def test_mmlu_official_layout_and_bad_rows(tmp_path):
    root = tmp_path / "mmlu" / "data"
    (root / "dev").mkdir(parents=True)
    (root / "test").mkdir()
    dev = "".join(f'"Q{i}, with comma?",a,b,c,d,A\n' for i in range(5))
    (root / "dev" / "anatomy_dev.csv").write_text(dev)
    (root / "test" / "anatomy_test.csv").write_text('"T1?",w,x,y,z,D\n')
    data = registry.get("mmlu").load(EvalOptions(data_dir=str(tmp_path)), None)
    assert [s["answer"] for s in data.samples] == ["D"] and not data.sample_data
    assert "Q0, with comma?\nA. a" in data.samples[0]["prompt"]
    (root / "test" / "anatomy_test.csv").write_text('"T1?",w,x,y,z,E\n')
    with pytest.raises(MixqError, match="answer letter"):
        registry.get("mmlu").load(EvalOptions(data_dir=str(tmp_path)), None)
    (root / "dev" / "anatomy_dev.csv").write_text(dev.split("\n", 1)[1])
    (root / "test" / "anatomy_test.csv").write_text('"T1?",w,x,y,z,D\n')
    with pytest.raises(MixqError, match="5 needed"):
        registry.get("mmlu").load(EvalOptions(data_dir=str(tmp_path)), None)


def test_jcommonsenseqa_prompt_and_scoring(tmp_path):
    r = {"q_id": 7, "question": "空を飛ぶのは？", "choice0": "鳥", "choice1": "魚", "choice2": "石",
         "choice3": "机", "choice4": "靴", "label": 0}
    assert jcommonsenseqa.format_question(r) == "質問：空を飛ぶのは？\n選択肢：0.鳥,1.魚,2.石,3.机,4.靴\n回答："
    assert jcommonsenseqa.build_prompt([r], r).startswith(jcommonsenseqa.format_question(r) + "鳥\n\n質問：")
    data = registry.get("jcommonsenseqa").load(EvalOptions(), None)
    gold = {s["prompt"]: s["choices"][s["label"]] for s in data.samples}
    res = _run("jcommonsenseqa", Scripted(loglik=lambda c, k: -1.0 if k == gold[c] else -9.0))
    assert res["metrics"] == {"accuracy": 1.0, "acc_norm": 1.0}
    # length normalisation can disagree with the raw sum: a long choice with a higher total
    res = _run("jcommonsenseqa", Scripted(loglik=lambda c, k: -2.0 * len(k) + (0.5 if k == gold[c] else 0)))
    assert res["metrics"]["acc_norm"] == 1.0
    d = tmp_path / "jcommonsenseqa"
    d.mkdir()
    (d / "train-v1.1.json").write_text("\n".join(json.dumps(r, ensure_ascii=False) for _ in range(3)))
    (d / "valid-v1.1.json").write_text(json.dumps({**r, "label": 5}, ensure_ascii=False))
    with pytest.raises(MixqError, match="label must be 0..4"):
        registry.get("jcommonsenseqa").load(EvalOptions(data_dir=str(tmp_path)), None)
    (d / "valid-v1.1.json").write_text(json.dumps({"q_id": 1, "question": "x"}))
    with pytest.raises(MixqError, match="missing field"):
        registry.get("jcommonsenseqa").load(EvalOptions(data_dir=str(tmp_path)), None)


def test_gsm8k_extraction_cases():
    assert gsm8k.gold("a <<2*3=6>>6\n#### 1,050") == "1050"
    assert gsm8k.clean("x = <<2*3=6>>6 eggs") == "x = 6 eggs"
    ok = gsm8k.score("3 boxes of 12 is 36, minus 9 is 27.\n#### 27", "27")
    assert ok == {"strict": "27", "flexible": "27", "strict_correct": True, "flexible_correct": True}
    prose = gsm8k.score("So she has 27 pencils.", "27")       # right number, wrong format
    assert not prose["strict_correct"] and prose["flexible_correct"]
    wrong = gsm8k.score("#### 28", "27")
    assert not wrong["strict_correct"] and not wrong["flexible_correct"]
    junk = gsm8k.score("I don't know", "27")                   # malformed: nothing to extract
    assert junk["strict"] is None and junk["flexible"] is None
    money = gsm8k.score("Total: $1,050.00", "1050")
    assert money["flexible_correct"]
    with pytest.raises(MixqError):
        gsm8k.gold("no final line")


def test_gsm8k_prompts_and_pipeline():
    data = registry.get("gsm8k").load(EvalOptions(), None)
    s = data.samples[0]
    msgs = gsm8k.chat_messages(s["shots"], s["question"])
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert "<<" not in msgs[2]["content"] and msgs[2]["content"].endswith("#### 12")
    plain = gsm8k.plain_prompt(s["shots"], s["question"])
    assert plain.count("Question:") == 4 and plain.endswith("Answer:")
    golds = {x["question"]: x["gold"] for x in data.samples}
    res = _run("gsm8k", Scripted(gen=lambda r: f"Thus.\n#### {golds[r.messages[-1]['content']]}"))
    assert res["metrics"] == {"exact_match_flexible": 1.0, "exact_match_strict": 1.0}
    backend = Scripted(gen=lambda r: "the answer is " + golds[r.prompt.rsplit("Question: ", 1)[1][:-8]])
    backend.chat = False
    res = _run("gsm8k", backend)
    assert res["metrics"] == {"exact_match_flexible": 1.0, "exact_match_strict": 0.0}


def test_loglikelihood_paths_agree(nemotron_moe):
    """The one-forward path for single-token continuations equals the general path and the logits."""
    import mixq  # noqa: F401
    import mlx.core as mx

    from mixq.core.metrics import log_probs
    from mixq.core.modelio import load
    from mixq.eval.backend import LocalBackend

    be = LocalBackend(load(nemotron_moe))
    ctx = "The following are questions.\nAnswer:"
    pairs = [(ctx, " A"), (ctx, " B"), ("Other context", " and a longer continuation")]
    got = be.loglikelihood(pairs)
    for (c, k), v in zip(pairs, got):
        cids, kids = be.continuation_ids(c, k)
        lg = log_probs(be.logits([cids + kids])[0])
        want = sum(float(lg[len(cids) - 1 + j, t].item()) for j, t in enumerate(kids))
        assert v == pytest.approx(want, abs=1e-4)
    assert len(be.continuation_ids(ctx, " A")[1]) == 1


def test_choice_and_math_tasks_run_on_a_fixture(qwen3, capsys):
    from mixq.cli import main

    rc = main(["eval", str(qwen3), "--tasks", "mmlu,jcommonsenseqa,gsm8k", "--limit", "2", "--max-tokens", "4",
               "--no-cache", "--quiet", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    res = doc["results"]["model"]
    assert res["mmlu"]["n"] == 2 and 0 <= res["mmlu"]["metrics"]["accuracy"] <= 1
    assert res["jcommonsenseqa"]["n"] == 2 and len(res["jcommonsenseqa"]["samples"][0]["loglik"]) == 5
    assert all(r["finish"] in ("stop", "length") for r in res["gsm8k"]["samples"])
    assert doc["summary"]["capability"]["model"]["present"] == ["gsm8k", "mmlu"]
