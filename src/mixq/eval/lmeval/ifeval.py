"""IFEval's task functions for lm-eval's `ifeval` config, on mixq's verifiers
(mixq.eval.tasks._ifeval_checks): lm-eval's module downloads NLTK data when imported and needs
langdetect, so it cannot run offline. Same metrics, same strict / loose rules (the loose variants drop
the first line, the last line or both, and each with `*` removed), same aggregation.

The local dataset keeps each row's `kwargs` as JSON text (mixq.eval.lmeval.data).
"""

from __future__ import annotations

import json


def loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    base = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return base + [v.replace("*", "") for v in base]


def follows(instruction_id: str, response: str, kwargs: dict, loose: bool = False) -> bool:
    from mixq.eval.tasks._ifeval_checks import check

    variants = loose_variants(response) if loose else [response]
    return any(v.strip() and check(instruction_id, v, kwargs) for v in variants)


def process_results(doc: dict, results: list[str]) -> dict:
    response = results[0]
    kwargs = doc["kwargs"]
    kwargs = json.loads(kwargs) if isinstance(kwargs, str) else kwargs
    ids = doc["instruction_id_list"]
    strict = [follows(i, response, k or {}) for i, k in zip(ids, kwargs)]
    loose = [follows(i, response, k or {}, loose=True) for i, k in zip(ids, kwargs)]
    return {"prompt_level_strict_acc": all(strict), "inst_level_strict_acc": strict,
            "prompt_level_loose_acc": all(loose), "inst_level_loose_acc": loose}


def agg_inst_level_acc(items: list[list[bool]]) -> float:
    flat = [x for item in items for x in item]
    return sum(flat) / len(flat)
