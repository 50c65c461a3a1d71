"""HumanEval's task functions for lm-eval's `humaneval` / `humaneval_instruct` configs, run through mixq's
sandbox (mixq.eval.sandbox) instead of `evaluate`'s code_eval (which lm-eval's module loads from the hub
at import, and which counts a program that exits 0 as a pass).

`build_predictions*` are lm-eval's filters (the program is the prompt plus the completion). `pass_at_k`
keeps lm-eval's metric name and signature: the reference is the task's `test` followed by
`check(<entry_point>)`; a prediction passes only when that check returned inside the sandbox.
"""

from __future__ import annotations

import math
import re


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def build_predictions_instruct(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return [[doc["prompt"] + (r if r.find("```") == -1 else r[: r.find("```")]) for r in resp]
            for resp, doc in zip(resps, docs)]


def split_reference(reference: str) -> tuple[str, str]:
    """("test code", entry point) from lm-eval's `{test}\\ncheck({entry_point})` target."""
    body, _, last = reference.rstrip().rpartition("\n")
    m = re.fullmatch(r"\s*check\(\s*([A-Za-z_]\w*)\s*\)\s*", last)
    if not m:
        raise ValueError(f"a HumanEval reference must end with check(<entry point>), got {last[-60:]!r}")
    return body, m.group(1)


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of n samples of which c passed (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int | None = None,
              timeout: float = 10.0) -> dict:
    from mixq.eval.sandbox import run_check

    ks = [k] if isinstance(k, int) else list(k or [1])
    scores = {f"pass@{x}": 0.0 for x in ks}
    for ref, programs in zip(references, predictions):
        test, entry = split_reference(ref)
        c = sum(run_check(p, test, entry, timeout=float(timeout)).status == "passed" for p in programs)
        for x in ks:
            scores[f"pass@{x}"] += estimate_pass_at_k(len(programs), c, x) / len(references)
    return scores
