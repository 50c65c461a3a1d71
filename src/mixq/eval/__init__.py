"""`mixq eval`: benchmark a model against a baseline and the float reference, offline-capable.

    from mixq.eval.runner import EvalOptions, run_eval
    doc = run_eval(EvalOptions(model="q4-model", baseline="q4-uniform", reference="demo",
                               tasks="perplexity,kl,hashhop"))
    print(doc["table"])

Pieces: `registry` (tasks by name; `tasks/<name>.py` each register one), `backend` (a local model:
greedy generation, log-likelihoods, logits) and `server` (an OpenAI-compatible server), `cache`
(per-sample results, so interrupted runs resume), `runner` (load each model once, run, compare),
`table` (Capability Score, Pass/Warn/Fail verdicts and their thresholds, the markdown table),
`datafiles` (official files in --data-dir, shipped samples in `data/`), `sandbox` (confined execution of
generated code), `textproc` (reasoning removal and answer extraction).

Imports mixq.core and mixq.kvcache only (import-linter contract).
"""
