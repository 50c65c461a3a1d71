"""`ifeval`: instruction following with verifiable instructions (Zhou et al., 2023).

File (google-research/instruction_following_eval): `input_data.jsonl`, lines `{"key", "prompt",
"instruction_id_list", "kwargs"}` (kwargs: one dict per instruction; None values, as in the Hugging Face
copy, are ignored). With `--data-dir hf`: `google/IFEval` through `datasets`.

Every instruction is validated when the data loads (mixq.eval.tasks._ifeval_checks): an id without a
verifier or with arguments it cannot check stops the run before generation; it is never scored as a pass.
The prompt is the user turn; the response (reasoning stripped) is checked:

* strict: the response as is;
* loose: passes if any of the official variants passes (first line removed, last line removed, both,
  and each of those with `*` removed).

Headline: prompt-level strict accuracy (every instruction of the prompt followed); instruction-level
strict, prompt-level loose and instruction-level loose are reported beside it.
"""

from __future__ import annotations

from mixq.core.errors import MixqError
from mixq.eval.backend import GenRequest
from mixq.eval.datafiles import HF, Source, hf_rows, require
from mixq.eval.registry import Task, TaskData, register
from mixq.eval.tasks._ifeval_checks import Uncheckable, check, validate

ANSWER_TOKENS = 768


def loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    base = [response, first, last, both]
    return base + [v.replace("*", "") for v in base]


def follows(instruction_id: str, response: str, kwargs: dict, loose: bool = False) -> bool:
    variants = loose_variants(response) if loose else [response]
    return any(v.strip() and check(instruction_id, v, kwargs) for v in variants)


def score(response: str, ids: list[str], kwargs: list[dict]) -> dict:
    strict = [follows(i, response, k) for i, k in zip(ids, kwargs)]
    loose = [follows(i, response, k, loose=True) for i, k in zip(ids, kwargs)]
    return {"strict": strict, "loose": loose, "prompt_strict": all(strict), "prompt_loose": all(loose)}


@register
class IFEval(Task):
    name = "ifeval"
    title = "IFEval"
    metric = "prompt_strict"
    metric_label = "prompt-level strict %"
    batch_size = 8
    extra = (("instruction_strict", "instruction-level strict %", True, True),
             ("prompt_loose", "prompt-level loose %", True, True),
             ("instruction_loose", "instruction-level loose %", True, True))

    def settings(self, opts) -> dict:
        return {"max_tokens": opts.budget(ANSWER_TOKENS)}

    def load(self, opts, limit):
        if opts.data_dir == HF:
            rows, label, files, sample = hf_rows("google/IFEval", None, "train"), "datasets:google/IFEval", {}, False
        else:
            src = Source("ifeval", opts.data_dir, ["input_data.jsonl"])
            rows = src.jsonl("input_data.jsonl")
            label, files, sample = src.label, src.hashes, src.sample
        items = []
        for n, r in enumerate(rows, 1):
            where = f"ifeval input_data.jsonl: line {n}"
            require(r, ("key", "prompt", "instruction_id_list", "kwargs"), where)
            ids, kws = list(r["instruction_id_list"]), list(r["kwargs"])
            if len(ids) != len(kws) or not ids:
                raise MixqError(f"{where}: instruction_id_list and kwargs must be non-empty and of equal length")
            try:
                kws = [validate(i, k) for i, k in zip(ids, kws)]
            except Uncheckable as e:
                raise MixqError(f"{where} (key {r['key']}): {e}") from None
            items.append({"id": f"key-{r['key']}", "prompt": r["prompt"], "ids": ids, "kwargs": kws})
        return TaskData(items[:limit] if limit else items, label, files, total=len(items), sample_data=sample)

    def process(self, samples, ctx):
        reqs = [GenRequest(messages=[{"role": "user", "content": s["prompt"]}],
                           max_tokens=ctx.opts.budget(ANSWER_TOKENS)) for s in samples]
        outs = ctx.backend.generate(reqs)
        return [{"id": s["id"], "instructions": s["ids"], **score(o.answer, s["ids"], s["kwargs"]),
                 "response": o.answer, "finish": o.finish} for s, o in zip(samples, outs)]

    def aggregate(self, records):
        n = len(records)
        strict = [x for r in records for x in r["strict"]]
        loose = [x for r in records for x in r["loose"]]
        by_type: dict[str, list[bool]] = {}
        for r in records:
            for i, ok in zip(r["instructions"], r["strict"]):
                by_type.setdefault(i, []).append(ok)
        return {"prompt_strict": sum(r["prompt_strict"] for r in records) / n,
                "instruction_strict": sum(strict) / len(strict),
                "prompt_loose": sum(r["prompt_loose"] for r in records) / n,
                "instruction_loose": sum(loose) / len(loose),
                "by_instruction": {k: sum(v) / len(v) for k, v in sorted(by_type.items())}}
