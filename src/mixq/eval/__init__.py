"""`mixq eval`: lm-evaluation-harness's task definitions on local data, mixq's own tasks where lm-eval has
none, verdicts against the float reference that mean something.

    from mixq.eval.runner import EvalOptions, run_eval
    doc = run_eval(EvalOptions(model="q4-model", reference="demo", tasks="wikitext,mmlu,kl"))
    print(doc["table"])

Pieces: `lmeval` (lm-eval's configs on local files, the `mixq` lm-eval model, servers, HashHop),
`registry` and `tasks/` (mixq's own tasks: bfcl, kl), `backend` (a local model: greedy generation,
logits) and `server` (an OpenAI-compatible server), `backends` (opening a role), `runner` (load each model
once, run, compare), `scores` (headline metric, standard error, n, paired samples), `table` (Capability
Score, verdicts and their thresholds, the markdown table), `results` (lm-eval's result layout and files),
`datafiles` (official files in --data-dir, shipped samples in `data/`), `sandbox` (confined execution of
generated code), `cache` (mixq's per-sample cache), `textproc` (reasoning removal, code and tool calls).

Imports mixq.core and mixq.kvcache only (import-linter contract).
"""
