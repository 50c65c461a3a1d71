"""`hashhop`: multi-hop recall over shuffled hash-chain assignments, generated locally from a seed.

After magic.dev's HashHop: random hashes that carry no meaning, so the answer cannot be guessed or
remembered from pre-training. Each sample holds CHAINS chains of CHAIN_LEN hashes (a -> b -> c -> ...),
written as `a = b` lines in a shuffled order; the question names a chain's first hash and a hop count
k in 1..4 and asks for the hash k assignments on. Hop counts cycle 1, 2, 3, 4 over the samples (default
40: ten per hop). Scored by exact match on the answer (reasoning stripped; surrounding quotes, backticks,
a final period and an "Answer:" label are ignored), overall and per hop count.
"""

from __future__ import annotations

import random
import re
import string

from mixq.eval.backend import GenRequest
from mixq.eval.registry import Task, TaskData, register

CHAINS = 8
CHAIN_LEN = 5          # hashes per chain: hops 1..4 from the first
HASH_LEN = 8
HOPS = (1, 2, 3, 4)
ALPHABET = string.ascii_letters + string.digits
ANSWER_TOKENS = 24


def make_sample(seed: int, index: int, hops: int, chains: int = CHAINS, chain_len: int = CHAIN_LEN,
                hash_len: int = HASH_LEN) -> dict:
    rng = random.Random(f"mixq-hashhop:{seed}:{index}")
    seen: set[str] = set()

    def new_hash() -> str:
        while True:
            h = "".join(rng.choice(ALPHABET) for _ in range(hash_len))
            if h not in seen:
                seen.add(h)
                return h

    chain_list = [[new_hash() for _ in range(chain_len)] for _ in range(chains)]
    lines = [f"{c[i]} = {c[i + 1]}" for c in chain_list for i in range(chain_len - 1)]
    rng.shuffle(lines)
    q = rng.randrange(chains)
    return {"id": f"hashhop-{index}", "hops": hops, "assignments": lines, "start": chain_list[q][0],
            "target": chain_list[q][hops]}


def prompt(sample: dict) -> str:
    k = sample["hops"]
    return ("Below is a list of assignments of the form `A = B`, in random order. Following an assignment "
            "means going from the hash on its left to the hash on its right.\n\n"
            + "\n".join(sample["assignments"])
            + f"\n\nStart at {sample['start']} and follow {k} assignment{'s' if k > 1 else ''}. "
            "Which hash do you reach? Answer with the hash only.")


def normalize(answer: str) -> str:
    lines = [ln for ln in answer.strip().splitlines() if ln.strip()]
    s = lines[-1].strip() if lines else ""
    s = re.sub(r"^(final answer|answer)\s*[:：]\s*", "", s, flags=re.I)
    return s.strip().strip("`\"'*").rstrip(".").strip().strip("`\"'*")


@register
class HashHop(Task):
    name = "hashhop"
    title = "HashHop"
    metric = "exact_match"
    metric_label = "exact match %"
    default_limit = 40
    batch_size = 8
    extra = tuple((f"hop{k}", f"{k}-hop", True, True) for k in HOPS)

    def settings(self, opts) -> dict:
        return {"seed": opts.seed, "chains": CHAINS, "chain_len": CHAIN_LEN, "hash_len": HASH_LEN,
                "max_tokens": opts.budget(ANSWER_TOKENS)}

    def load(self, opts, limit):
        n = limit or self.default_limit
        samples = [make_sample(opts.seed, i, HOPS[i % len(HOPS)]) for i in range(n)]
        return TaskData(samples, f"generated (seed {opts.seed})", total=n)

    def process(self, samples, ctx):
        reqs = [GenRequest(messages=[{"role": "user", "content": prompt(s)}],
                           max_tokens=ctx.opts.budget(ANSWER_TOKENS)) for s in samples]
        outs = ctx.backend.generate(reqs)
        recs = []
        for s, o in zip(samples, outs):
            got = normalize(o.answer)
            recs.append({"id": s["id"], "hops": s["hops"], "target": s["target"], "answer": got,
                         "output": o.text, "finish": o.finish, "correct": got == s["target"]})
        return recs

    def aggregate(self, records):
        out = {"exact_match": sum(r["correct"] for r in records) / len(records)}
        for k in HOPS:
            rs = [r for r in records if r["hops"] == k]
            out[f"hop{k}"] = sum(r["correct"] for r in rs) / len(rs) if rs else None
        return out
