"""`jcommonsenseqa`: JGLUE's JCommonsenseQA, 3-shot multiple choice over five answers, by log-likelihood.

Files (JGLUE v1.1, `datasets/jcommonsenseqa-v1.1/`): `train-v1.1.json` (shots) and `valid-v1.1.json` (the
evaluated split; JGLUE's test split is not public), JSON lines with `q_id, question, choice0..choice4,
label`. With `--data-dir hf`: `shunk031/JGLUE` (JCommonsenseQA) through `datasets`.

Prompt (JP LM Evaluation Harness style): per question
    質問：<question>\\n選択肢：0.<c0>,1.<c1>,2.<c2>,3.<c3>,4.<c4>\\n回答：<answer text>
three train questions with their answers, then the evaluated one. Each choice's text is scored as the
continuation; `accuracy` takes the highest summed log-likelihood, `acc_norm` divides it by the choice's
length in characters first (longer answers are not penalised for being long).
"""

from __future__ import annotations

from mixq.core.errors import MixqError
from mixq.eval.datafiles import HF, Source, hf_rows, require
from mixq.eval.registry import Task, TaskData, register

SHOTS = 3
FIELDS = ("q_id", "question", "choice0", "choice1", "choice2", "choice3", "choice4", "label")


def choices(r: dict) -> list[str]:
    return [str(r[f"choice{i}"]) for i in range(5)]


def format_question(r: dict) -> str:
    opts = ",".join(f"{i}.{c}" for i, c in enumerate(choices(r)))
    return f"質問：{r['question']}\n選択肢：{opts}\n回答："


def build_prompt(shots: list[dict], r: dict) -> str:
    return "".join(format_question(s) + choices(s)[int(s["label"])] + "\n\n" for s in shots) + format_question(r)


@register
class JCommonsenseQA(Task):
    name = "jcommonsenseqa"
    title = "JCommonsenseQA"
    metric = "accuracy"
    metric_label = "accuracy % (3-shot)"
    batch_size = 16
    extra = (("acc_norm", "acc_norm %", True, True),)

    def settings(self, opts) -> dict:
        return {"shots": SHOTS}

    def load(self, opts, limit):
        if opts.data_dir == HF:
            train = hf_rows("shunk031/JGLUE", "JCommonsenseQA", "train")
            valid = hf_rows("shunk031/JGLUE", "JCommonsenseQA", "validation")
            label, files, sample = "datasets:shunk031/JGLUE", {}, False
        else:
            src = Source("jcommonsenseqa", opts.data_dir, ["valid-v1.1.json"])
            train, valid = src.jsonl("train-v1.1.json"), src.jsonl("valid-v1.1.json")
            label, files, sample = src.label, src.hashes, src.sample
        for where, rows in (("train-v1.1.json", train), ("valid-v1.1.json", valid)):
            for i, r in enumerate(rows):
                require(r, FIELDS, f"jcommonsenseqa {where}: line {i + 1}")
                if int(r["label"]) not in range(5):
                    raise MixqError(f"jcommonsenseqa {where}: line {i + 1}: label must be 0..4")
        if len(train) < SHOTS:
            raise MixqError(f"jcommonsenseqa: {SHOTS} train questions needed for the shots")
        shots = train[:SHOTS]
        items = [{"id": f"q{r['q_id']}", "label": int(r["label"]), "choices": choices(r),
                  "prompt": build_prompt(shots, r)} for r in valid]
        return TaskData(items[:limit] if limit else items, label, files, total=len(items), sample_data=sample)

    def process(self, samples, ctx):
        pairs = [(s["prompt"], c) for s in samples for c in s["choices"]]
        lls = ctx.backend.loglikelihood(pairs)
        out = []
        for k, s in enumerate(samples):
            ll = lls[5 * k: 5 * k + 5]
            norm = [x / max(1, len(c)) for x, c in zip(ll, s["choices"])]
            pred = max(range(5), key=lambda j: ll[j])
            pred_norm = max(range(5), key=lambda j: norm[j])
            out.append({"id": s["id"], "label": s["label"], "pred": pred, "pred_norm": pred_norm,
                        "loglik": [round(x, 5) for x in ll], "correct": pred == s["label"],
                        "correct_norm": pred_norm == s["label"]})
        return out

    def aggregate(self, records):
        n = len(records)
        return {"accuracy": sum(r["correct"] for r in records) / n,
                "acc_norm": sum(r["correct_norm"] for r in records) / n}
