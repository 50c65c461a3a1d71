"""`gsm8k`: grade-school math word problems, 3-shot chain of thought, greedy, two answer extractions.

Files (openai/grade-school-math, `grade_school_math/data/`): `train.jsonl` (the shots: its first three)
and `test.jsonl`, each line `{"question", "answer"}` where the answer is worked reasoning (with `<<a*b=c>>`
calculator annotations) ending in `#### <number>`. With `--data-dir hf`: `openai/gsm8k` (main).

Prompt: with a chat template, the shots are earlier turns of the conversation (question as the user,
worked answer, annotations removed, as the assistant) after a system instruction to end with
`#### <number>`; without one, "Question: ...\\nAnswer: ..." blocks, generation stopping at the next
"Question:". Reasoning is stripped before extraction. Scores:

* strict: the number after `#### ` (GSM8K's own format; anything else is wrong);
* flexible: the last number in the answer (lm-eval's flexible-extract) - the headline, so a model that
  answers correctly in prose is not failed on format.

Numbers compare after removing `$`, `,` and a trailing period ("1,050." == "1050").
"""

from __future__ import annotations

import re

from mixq.core.errors import MixqError
from mixq.eval.backend import GenRequest
from mixq.eval.datafiles import HF, Source, hf_rows, require
from mixq.eval.registry import Task, TaskData, register
from mixq.eval.textproc import flexible_answer, normalize_number, strict_answer

SHOTS = 3
ANSWER_TOKENS = 384
SYSTEM = ("Solve the math word problem. Reason step by step, then give the final answer on its own line "
          "as '#### <number>'.")


def clean(answer: str) -> str:
    return re.sub(r"<<[^<>]*>>", "", answer).strip()


def gold(answer: str) -> str:
    g = normalize_number(answer.split("####")[-1]) if "####" in answer else None
    if g is None:
        raise MixqError(f"gsm8k: an answer without '#### <number>': {answer[-60:]!r}")
    return g


def chat_messages(shots: list[dict], question: str) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}]
    for s in shots:
        msgs += [{"role": "user", "content": s["question"]}, {"role": "assistant", "content": clean(s["answer"])}]
    return msgs + [{"role": "user", "content": question}]


def plain_prompt(shots: list[dict], question: str) -> str:
    body = "".join(f"Question: {s['question']}\nAnswer: {clean(s['answer'])}\n\n" for s in shots)
    return body + f"Question: {question}\nAnswer:"


def score(output: str, gold_answer: str) -> dict:
    s, f = strict_answer(output), flexible_answer(output)
    return {"strict": s, "flexible": f, "strict_correct": s == gold_answer, "flexible_correct": f == gold_answer}


@register
class GSM8K(Task):
    name = "gsm8k"
    title = "GSM8K"
    metric = "exact_match_flexible"
    metric_label = "exact match % (3-shot CoT, flexible)"
    batch_size = 8
    extra = (("exact_match_strict", "strict (#### n)", True, True),)

    def settings(self, opts) -> dict:
        return {"shots": SHOTS, "max_tokens": opts.budget(ANSWER_TOKENS)}

    def load(self, opts, limit):
        if opts.data_dir == HF:
            train, test = hf_rows("openai/gsm8k", "main", "train"), hf_rows("openai/gsm8k", "main", "test")
            label, files, sample = "datasets:openai/gsm8k", {}, False
        else:
            src = Source("gsm8k", opts.data_dir, ["test.jsonl"])
            train, test = src.jsonl("train.jsonl"), src.jsonl("test.jsonl")
            label, files, sample = src.label, src.hashes, src.sample
        for where, rows in (("train.jsonl", train), ("test.jsonl", test)):
            for i, r in enumerate(rows):
                require(r, ("question", "answer"), f"gsm8k {where}: line {i + 1}")
        if len(train) < SHOTS:
            raise MixqError(f"gsm8k: {SHOTS} train problems needed for the shots")
        shots = [{"question": r["question"], "answer": r["answer"]} for r in train[:SHOTS]]
        items = [{"id": f"test-{i}", "question": r["question"], "gold": gold(r["answer"]), "shots": shots}
                 for i, r in enumerate(test)]
        return TaskData(items[:limit] if limit else items, label, files, total=len(items), sample_data=sample)

    def process(self, samples, ctx):
        budget = ctx.opts.budget(ANSWER_TOKENS)
        chat = getattr(ctx.backend, "chat", True)
        reqs = [GenRequest(messages=chat_messages(s["shots"], s["question"]), max_tokens=budget) if chat else
                GenRequest(prompt=plain_prompt(s["shots"], s["question"]), max_tokens=budget,
                           stop=["Question:", "\n\n\n"]) for s in samples]
        outs = ctx.backend.generate(reqs)
        return [{"id": s["id"], "gold": s["gold"], **score(o.answer, s["gold"]), "output": o.text,
                 "finish": o.finish} for s, o in zip(samples, outs)]

    def aggregate(self, records):
        n = len(records)
        return {"exact_match_flexible": sum(r["flexible_correct"] for r in records) / n,
                "exact_match_strict": sum(r["strict_correct"] for r in records) / n}
