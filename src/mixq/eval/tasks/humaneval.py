"""`humaneval`: HumanEval pass@1 (greedy), generated code executed in the sandbox (mixq.eval.sandbox).

File (openai/human-eval, `data/`): `HumanEval.jsonl` or `HumanEval.jsonl.gz`, lines `{"task_id", "prompt",
"canonical_solution", "test", "entry_point"}`. With `--data-dir hf`: `openai_humaneval` through `datasets`.

Prompt: with a chat template, the user asks for the completed function in a ```python block, the prompt
(signature and docstring) quoted; the first Python block of the answer (reasoning stripped) is the code.
If it defines the entry point it is appended after the prompt (so the prompt's imports stay and its
definition wins), otherwise it is taken as the body that continues the prompt. Without a chat template
the raw prompt is continued, stopping at the usual HumanEval stop sequences.

The program - prompt + completion + the task's `test` + `check(entry_point)` - runs in a separate
process with a time limit (`--timeout`, default 10 s), a memory limit, no network and a temporary
working directory; it passes when it exits cleanly. Headline: pass@1.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

from mixq.eval import sandbox
from mixq.eval.backend import GenRequest
from mixq.eval.datafiles import HF, Source, hf_rows, require
from mixq.eval.registry import Task, TaskData, register
from mixq.eval.textproc import extract_code

ANSWER_TOKENS = 512
STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
FIELDS = ("task_id", "prompt", "test", "entry_point")


def chat_prompt(prompt: str) -> str:
    return ("Complete the following Python function. Reply with the complete function, signature included, "
            f"in a single ```python code block.\n\n```python\n{prompt}```")


def program(task: dict, completion: str, chat: bool) -> str:
    if chat:
        code = extract_code(completion)
        if re.search(rf"^\s*def\s+{re.escape(task['entry_point'])}\s*\(", code, flags=re.M):
            body = task["prompt"] + "\n\n" + code
        else:
            body = task["prompt"] + code
    else:
        body = task["prompt"] + completion
    return f"{body}\n\n{task['test']}\n\ncheck({task['entry_point']})\n"


@register
class HumanEval(Task):
    name = "humaneval"
    title = "HumanEval"
    metric = "pass@1"
    metric_label = "pass@1 %"
    batch_size = 8

    def settings(self, opts) -> dict:
        return {"max_tokens": opts.budget(ANSWER_TOKENS), "timeout": opts.timeout}

    def load(self, opts, limit):
        if opts.data_dir == HF:
            rows, label, files, sample = hf_rows("openai_humaneval", None, "test"), "datasets:openai_humaneval", {}, False
        else:
            src = Source("humaneval", opts.data_dir, ["HumanEval.jsonl", "HumanEval.jsonl.gz"])
            rows = src.jsonl("HumanEval.jsonl", ("HumanEval.jsonl.gz",))
            label, files, sample = src.label, src.hashes, src.sample
        items = []
        for n, r in enumerate(rows, 1):
            require(r, FIELDS, f"humaneval HumanEval.jsonl: line {n}")
            items.append({"id": r["task_id"], **{k: r[k] for k in FIELDS}})
        return TaskData(items[:limit] if limit else items, label, files, total=len(items), sample_data=sample)

    def process(self, samples, ctx):
        chat = getattr(ctx.backend, "chat", True)
        budget = ctx.opts.budget(ANSWER_TOKENS)
        reqs = [GenRequest(messages=[{"role": "user", "content": chat_prompt(s["prompt"])}], max_tokens=budget)
                if chat else GenRequest(prompt=s["prompt"], max_tokens=budget, stop=STOPS) for s in samples]
        outs = ctx.backend.generate(reqs)
        progs = [program(s, o.answer, chat) for s, o in zip(samples, outs)]
        workers = max(1, min(len(progs), (os.cpu_count() or 2) // 2))
        with ThreadPoolExecutor(workers) as pool:
            runs = list(pool.map(lambda p: sandbox.run_program(p, timeout=ctx.opts.timeout), progs))
        return [{"id": s["id"], "passed": r.status == "passed", "status": r.status, "detail": r.detail,
                 "completion": o.answer, "finish": o.finish, "netns": r.network_namespace}
                for s, o, r in zip(samples, outs, runs)]

    def aggregate(self, records):
        status: dict[str, int] = {}
        for r in records:
            status[r["status"]] = status.get(r["status"], 0) + 1
        return {"pass@1": sum(r["passed"] for r in records) / len(records), "status": status}
