"""HashHop as magic.dev published it (github.com/magicproduct/hash-hop), run as lm-eval tasks.

A prompt is a shuffled list of hash assignments: `n` chains of `hops + 1` random hashes (16 ASCII
letters), written one assignment a line as `A = B`, the last link of each chain quoted (`C = 'D'`), the
number of chains chosen so the prompt fills the size. The completion header follows the publication
(`COMPLETION:\\nHops=k\\n\\nCoT=False\\n\\n`) and then one query, `<first hash> = '`; the model must continue
with the hash `k` assignments on and the closing quote. It is scored without sampling: a query is
correct when greedy decoding gives exactly that target (lm-eval's `acc` of a loglikelihood request: every
target token is the most likely one). Hashes carry no meaning, so nothing can be recalled from training.

Sizes are in tokens of the model's own tokenizer (the prompt with its target fits the size); sizes beyond
the model's context are not run (and the results say so). One task per hop count (`hashhop_hop1` ..
`hashhop_hop4`) under the group `hashhop`, docs cycling through the sizes; everything follows from
`--seed`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import string
from dataclasses import dataclass
from pathlib import Path

from mixq.core.errors import MixqError

HASH_LEN = 16
HOPS = (1, 2, 3, 4)
DEFAULT_SIZES = (2048, 8192, 32768)
DOCS_PER_HOP = 25
ALPHABET = string.ascii_lowercase + string.ascii_uppercase
VERSION = 1


def parse_sizes(spec: str) -> tuple[int, ...]:
    """"2k,8k,32k" or "2048,8192" -> token counts."""
    out = []
    for part in (p.strip().lower() for p in spec.split(",") if p.strip()):
        try:
            n = int(float(part[:-1]) * 1024) if part.endswith("k") else int(part)
        except ValueError:
            raise MixqError(f"--hashhop-sizes: {part!r} is not a size like 2k or 2048") from None
        if n < 256:
            raise MixqError(f"--hashhop-sizes: {part} is too small (at least 256 tokens)")
        out.append(n)
    if not out:
        raise MixqError("--hashhop-sizes: no size given")
    return tuple(sorted(set(out)))


def make_prompt(rng: random.Random, n_chains: int, hops: int) -> tuple[str, str, str]:
    """(the assignment list, one query's first hash, its target `hops` assignments on)."""
    seen: set[str] = set()

    def new() -> str:
        while True:
            h = "".join(rng.choice(ALPHABET) for _ in range(HASH_LEN))
            if h not in seen:
                seen.add(h)
                return h

    chains = [[new() for _ in range(hops + 1)] for _ in range(n_chains)]
    lines = []
    for c in chains:
        for i in range(hops):
            last = i == hops - 1
            lines.append(f"{c[i]} = '{c[i + 1]}'" if last else f"{c[i]} = {c[i + 1]}")
    rng.shuffle(lines)
    q = chains[rng.randrange(n_chains)]
    return "\n".join(lines), q[0], q[hops]


def completion_header(hops: int) -> str:
    return f"COMPLETION:\nHops={hops}\n\nCoT=False\n\n"


@dataclass
class Doc:
    context: str
    target: str
    hops: int
    size: int
    tokens: int


def make_doc(count_tokens, seed: int, hops: int, size: int, index: int) -> Doc:
    """A doc whose context + target is at most `size` tokens (fewer chains until it fits)."""
    rng_seed = f"mixq-hashhop:{seed}:{hops}:{size}:{index}"
    per_chain = (2 * HASH_LEN + 3) * hops
    probe = make_prompt(random.Random(rng_seed + ":probe"), 64, hops)[0]
    chars_per_token = len(probe) / max(1, count_tokens(probe))
    n = max(1, math.ceil(size * chars_per_token / per_chain))
    for _ in range(20):
        prompt, start, target = make_prompt(random.Random(rng_seed), n, hops)
        context = f"{prompt}\n\n{completion_header(hops)}{start} = '"
        tokens = count_tokens(context + target + "'")
        if tokens <= size or n == 1:
            break
        n = max(1, int(n * size / tokens * 0.98))
    if tokens > size:
        raise MixqError(f"hashhop: a {size}-token prompt cannot hold one {hops}-hop chain")
    return Doc(context=context, target=target + "'", hops=hops, size=size, tokens=tokens)


def task_configs(dataset_dir: Path) -> dict[str, dict]:
    """lm-eval configs: one task per hop count and the `hashhop` group."""
    out: dict[str, dict] = {}
    for k in HOPS:
        out[f"hashhop_hop{k}"] = {
            "task": f"hashhop_hop{k}", "task_alias": f"{k}-hop", "dataset_path": str(dataset_dir),
            "dataset_name": f"hop{k}", "test_split": "test", "output_type": "loglikelihood",
            "doc_to_text": "{{context}}", "doc_to_target": "{{target}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": VERSION, "source": "mixq (after magic.dev's HashHop)"},
        }
    out["_group_hashhop"] = {"group": "hashhop", "task": [f"hashhop_hop{k}" for k in HOPS],
                             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
                             "metadata": {"version": VERSION}}
    return out


def prepare(work: Path, count_tokens, tokenizer_id: str, seed: int, sizes: tuple[int, ...],
            docs_per_hop: int = DOCS_PER_HOP) -> Path:
    """Write the generated local dataset (one config per hop count); reused for the same settings."""
    key = hashlib.sha256(json.dumps([VERSION, tokenizer_id, seed, sizes, docs_per_hop]).encode()).hexdigest()[:16]
    root = Path(work) / f"hashhop-{key}"
    if (root / "README.md").is_file():
        return root
    from mixq.eval.lmeval.data import _write

    configs = {}
    for k in HOPS:
        docs = [make_doc(count_tokens, seed, k, sizes[i % len(sizes)], i) for i in range(docs_per_hop)]
        configs[f"hop{k}"] = {"test": [d.__dict__ for d in docs]}
    _write(root, configs)
    return root
