"""`mmlu`: MMLU, 5-shot, letter scoring by log-likelihood (the original paper's / lm-eval's format).

Files (Hendrycks et al.'s release, `data.tar`): `dev/<subject>_dev.csv` and `test/<subject>_test.csv` under
`--data-dir` (or `DIR/mmlu/`, optionally with the tarball's `data/` level): header-less CSV rows
`question, A, B, C, D, answer-letter`. With `--data-dir hf`: `cais/mmlu` (all) through `datasets`.

Prompt: "The following are multiple choice questions (with answers) about <subject>.", then the subject's
first five dev questions with their answers, then the test question ending in "Answer:". The prediction is
the letter among " A", " B", " C", " D" with the highest log-likelihood; no generation, no chat template.
Sample: stratified over subjects in proportion to their size (1000 by default, `--limit`), seeded.
Headline: accuracy over all sampled questions; per-subject accuracy in the metrics.
"""

from __future__ import annotations

from mixq.core.errors import MixqError
from mixq.eval.datafiles import HF, Source, hf_rows, stratified
from mixq.eval.registry import Task, TaskData, register

LETTERS = ("A", "B", "C", "D")
SHOTS = 5


def format_question(q: dict, with_answer: bool) -> str:
    lines = [q["question"].strip()] + [f"{L}. {c}" for L, c in zip(LETTERS, q["choices"])]
    return "\n".join(lines) + "\nAnswer:" + (f" {q['answer']}\n\n" if with_answer else "")


def build_prompt(subject: str, shots: list[dict], q: dict) -> str:
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return head + "".join(format_question(s, True) for s in shots) + format_question(q, False)


def _row(r: list[str], where: str) -> dict:
    if len(r) != 6 or r[5].strip() not in LETTERS:
        raise MixqError(f"{where}: expected 6 columns (question, A, B, C, D, answer letter), got {r[:6]!r}")
    return {"question": r[0], "choices": r[1:5], "answer": r[5].strip()}


def read_split(src: Source, split: str) -> dict[str, list[dict]]:
    prefix = "" if (src.root / split).is_dir() else "data/"
    files = src.glob(f"{prefix}{split}/*_{split}.csv")
    if not files:
        raise MixqError(f"mmlu: no {split}/*_{split}.csv files in {src.root}")
    out = {}
    for f in files:
        subject = f.rsplit("/", 1)[-1][: -len(f"_{split}.csv")]
        out[subject] = [_row(r, f"{src.root / f}: row {i + 1}") for i, r in enumerate(src.csv_rows(f)) if r]
    return out


def _hf(split: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in hf_rows("cais/mmlu", "all", split):
        out.setdefault(r["subject"], []).append(
            {"question": r["question"], "choices": list(r["choices"]), "answer": LETTERS[int(r["answer"])]})
    return out


@register
class MMLU(Task):
    name = "mmlu"
    title = "MMLU"
    metric = "accuracy"
    metric_label = "accuracy % (5-shot)"
    default_limit = 1000
    batch_size = 16

    def settings(self, opts) -> dict:
        return {"shots": SHOTS, "seed": opts.seed}

    def load(self, opts, limit):
        if opts.data_dir == HF:
            dev, test, src = _hf("dev"), _hf("test"), None
            label, files, sample = "datasets:cais/mmlu", {}, False
        else:
            src = Source("mmlu", opts.data_dir, ["dev", "data/dev"])
            dev, test = read_split(src, "dev"), read_split(src, "test")
            label, files, sample = src.label, src.hashes, src.sample
        items = []
        for subject in sorted(test):
            shots = dev.get(subject, [])[:SHOTS]
            if len(shots) < SHOTS:
                raise MixqError(f"mmlu: subject {subject} has {len(shots)} dev questions, {SHOTS} needed")
            for i, q in enumerate(test[subject]):
                items.append({"id": f"{subject}-{i}", "subject": subject, "answer": q["answer"],
                              "prompt": build_prompt(subject, shots, q)})
        total = len(items)
        picked = stratified(items, key=lambda s: s["subject"], n=limit, seed=opts.seed)
        return TaskData(picked, label, files, total=total, sample_data=sample)

    def process(self, samples, ctx):
        pairs = [(s["prompt"], f" {L}") for s in samples for L in LETTERS]
        lls = ctx.backend.loglikelihood(pairs)
        out = []
        for k, s in enumerate(samples):
            scores = lls[4 * k: 4 * k + 4]
            pred = LETTERS[max(range(4), key=lambda j: scores[j])]
            out.append({"id": s["id"], "subject": s["subject"], "answer": s["answer"], "pred": pred,
                        "loglik": [round(x, 5) for x in scores], "correct": pred == s["answer"]})
        return out

    def aggregate(self, records):
        by: dict[str, list[bool]] = {}
        for r in records:
            by.setdefault(r["subject"], []).append(r["correct"])
        return {"accuracy": sum(r["correct"] for r in records) / len(records),
                "subjects": {s: sum(v) / len(v) for s, v in sorted(by.items())},
                "macro_accuracy": sum(sum(v) / len(v) for v in by.values()) / len(by)}
