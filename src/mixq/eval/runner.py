"""`mixq eval`: check every task's data, then evaluate each model once, compare.

Roles: `model` (what is judged), `baseline` (compared with it) and `reference` (the float model: the KL
reference and the base of the verdicts). Each is a local model or an OpenAI-compatible server (an http(s)
URL). They run in the order reference, baseline, model; a local reference stays loaded when KL needs its
logits, every other model is released before the next loads.

lm-eval's tasks (mmlu, gsm8k_cot, ifeval, humaneval, wikitext, ja_leaderboard_jcommonsenseqa, hashhop...)
run through lm-eval's evaluator on lm-eval's configs (mixq.eval.lmeval); mixq's own tasks (bfcl, kl)
through mixq.eval.registry. Both report in lm-eval's result layout (mixq.eval.results).
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mixq.core.errors import MixqError
from mixq.eval import registry, results, scores, table
from mixq.eval.cache import default_dir

ROLES = ("reference", "baseline", "model")


@dataclass
class EvalOptions:
    model: str | None = None
    baseline: str | None = None
    reference: str | None = None
    tasks: str = "capability"
    data_dir: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    apply_chat_template: bool = False
    kv_config: str | None = None
    server: str | None = None           # the model role as a server (same as a URL as MODEL)
    server_model: str | None = None     # the model name sent to servers (default: the server's first)
    api_key: str | None = None
    tokenizer: str | None = None        # tokenizer for servers' log-likelihood tasks and HashHop's sizes
    output: str | None = None
    no_think: bool = False
    cache_dir: str | None = field(default_factory=lambda: str(default_dir()))
    seed: int = 0
    max_tokens: int | None = None       # generation budget of every generation task (task defaults otherwise)
    max_length: int | None = None       # lm-eval's max_length: context and rolling-window length
    think_tokens: int = 512             # bfcl: extra budget for reasoning when thinking is on
    text: str | None = None             # kl text file (default: the shipped held-out text)
    seq_len: int | None = None          # kl window length
    timeout: float = 10.0               # humaneval: seconds per program
    hashhop_sizes: str = "2k,8k,32k"
    thresholds: str | None = None
    progress: bool = True

    def budget(self, answer_tokens: int) -> int:
        if self.max_tokens is not None:
            return self.max_tokens
        return answer_tokens + (0 if self.no_think else self.think_tokens)


@dataclass
class TaskContext:
    backend: Any
    reference: Any
    opts: EvalOptions
    role: str


def _log(opts: EvalOptions, msg: str) -> None:
    if opts.progress:
        print(msg, file=sys.stderr, flush=True)


def is_url(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(("http://", "https://"))


def role_specs(opts: EvalOptions) -> dict[str, str]:
    specs = {"reference": opts.reference, "baseline": opts.baseline, "model": opts.server or opts.model}
    return {r: specs[r] for r in ROLES if specs[r]}


def resolve_tasks(spec: str, chat: bool) -> tuple[list[str], bool]:
    """(task names in order, whether the Capability Score's set was asked for)."""
    out: list[str] = []
    capability = False
    for item in (i.strip() for i in spec.split(",")):
        if not item:
            continue
        if item == "capability":
            capability = True
            names = ["humaneval_instruct" if (t == "humaneval" and chat) else t for t in scores.CAPABILITY]
        else:
            from mixq.eval.lmeval.run import ALIASES

            names = [ALIASES.get(item, item)]
        out += [n for n in names if n not in out]
    if not out:
        raise MixqError("no tasks given")
    return out, capability


def _sizing(opts: EvalOptions, specs: dict[str, str]):
    from mixq.eval.lmeval.run import sizing_for

    local = [s for s in specs.values() if not is_url(s)]
    source = opts.tokenizer or (local[0] if local else None)
    return sizing_for(source) if source else None


def _check(opts: EvalOptions, names: list[str], specs: dict[str, str]) -> None:
    if not specs.get("model"):
        raise MixqError("a MODEL (or --server URL) is needed")
    if "kl" in names:
        if "reference" not in specs:
            raise MixqError("task kl compares against a float model: pass --reference MODEL")
        if any(is_url(s) for s in specs.values()):
            raise MixqError("task kl needs full next-token distributions: local models, not servers")
    if opts.kv_config and is_url(specs["model"]):
        raise MixqError("--kv-config applies to a local model; the server has its own cache settings")
    if opts.kv_config:  # a config for another model is refused before anything loads
        from mixq.core.modelio import fingerprint, resolve_model
        from mixq.kvcache import load_config

        made = load_config(opts.kv_config)["model"]
        fp, here = made.get("fingerprint"), fingerprint(resolve_model(specs["model"]))
        if fp and fp != here:
            raise MixqError(f"--kv-config {opts.kv_config} was made for another model: fingerprint {fp[:12]} there, "
                            f"{here[:12]} here")
    if any(n.startswith("humaneval") for n in names):
        from mixq.eval.sandbox import confinement

        if confinement() == "none":
            raise MixqError("humaneval: this machine cannot confine generated code (needs Linux seccomp on "
                            "x86_64 / aarch64, or a non-root user for RLIMIT_NPROC)")


def run_eval(opts: EvalOptions) -> dict:
    """Evaluate every role on every task; the comparison document (see mixq.eval.table)."""
    specs = role_specs(opts)
    if not opts.progress:
        _quiet()
    names, capability = resolve_tasks(opts.tasks, opts.apply_chat_template)
    native = [n for n in names if n in registry.names()]
    lm_names = [n for n in names if n not in native]
    _check(opts, names, specs)
    thresholds = table.parse_thresholds(opts.thresholds)
    work_tmp = None if opts.cache_dir else tempfile.TemporaryDirectory(prefix="mixq-eval-")
    work = Path(opts.cache_dir) / "work" if opts.cache_dir else Path(work_tmp.name)
    try:
        plan = None
        if lm_names:
            from mixq.eval.lmeval import run as lmrun

            sizing = _sizing(opts, specs) if "hashhop" in lm_names else None
            plan = lmrun.prepare(lm_names, opts, work, sizing, capability)
        native_data = {n: registry.get(n).load(opts, opts.limit) for n in native}  # checked before models
        t0 = time.perf_counter()
        roles = _run_roles(opts, specs, plan, native, native_data)
    finally:
        if work_tmp is not None:
            work_tmp.cleanup()
    doc = results.document(opts, names, roles, plan, native_data)
    doc["seconds"] = round(time.perf_counter() - t0, 3)
    doc["thresholds"] = thresholds
    doc["capability"] = capability
    doc["config"] = asdict(opts) | {"api_key": "***" if opts.api_key else None}
    table.summarize(doc, thresholds)
    doc["table"] = table.markdown(doc)
    if opts.output:
        results.write(doc, opts.output)
    return doc


def _run_roles(opts, specs, plan, native, native_data) -> dict:
    from mixq.eval import backends

    out: dict[str, dict] = {}
    reference = None
    for role, spec in specs.items():
        _log(opts, f"mixq eval: {role}: {spec}")
        be = backends.open_backend(role, spec, opts)
        if role == "reference":
            reference = be
        entry = {"model": be.identity(), "lm_eval": {}}
        if plan is not None:
            lm = backends.lm_eval_model(be, spec, opts, plan.loglikelihood)
            entry["lm_eval"] = _lm_eval(lm, be, plan, opts)
        for name in native:
            task = registry.get(name)
            if task.needs_reference and role == "reference":
                continue
            rec = run_task(task, be, reference, opts, role, native_data[name])
            results.add_native(entry["lm_eval"], task, rec)
        out[role] = entry
        if role != "reference" or "kl" not in native:
            be = None
            if role == "reference":
                reference = None
            _free()
    return out


def _lm_eval(lm, be, plan, opts) -> dict:
    from mixq.eval.lmeval import run as lmrun

    db = lmrun.cache_db(opts.cache_dir, be.identity(), be.settings() | {"max_length": getattr(lm, "max_length", None)})
    return lmrun.evaluate(lm, plan, opts, db)


def _quiet() -> None:
    import logging
    import os

    os.environ["TQDM_DISABLE"] = "1"
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()


def _free() -> None:
    gc.collect()
    try:
        import mlx.core as mx

        mx.clear_cache()
    except Exception:  # pragma: no cover - older mlx
        pass


def run_task(task: registry.Task, backend, reference, opts: EvalOptions, role: str, data) -> dict:
    """One of mixq's own tasks through the per-sample cache (an interrupted run resumes)."""
    from tqdm import tqdm

    from mixq.eval.cache import ResultCache

    ident = backend.identity()
    parts = {"task": task.name, "settings": task.settings(opts), "files": data.files,
             "backend": backend.settings(), "model": ident["fingerprint"]}
    if task.needs_reference:
        if backend.vocab_probe() != reference.vocab_probe():
            raise MixqError(f"{ident['name']} and the reference tokenize differently: KL needs the same tokenizer")
        parts["reference"] = reference.identity()["fingerprint"]
    cache = ResultCache(opts.cache_dir, ident["fingerprint"], task.name, parts)
    todo = [s for s in data.samples if cache.get(s["id"]) is None]
    ctx = TaskContext(backend=backend, reference=reference, opts=opts, role=role)
    bar = tqdm(total=len(data.samples), initial=len(data.samples) - len(todo), desc=f"{role}: {task.name}",
               disable=not opts.progress, leave=False, file=sys.stderr)
    try:
        for s in range(0, len(todo), max(1, task.batch_size)):
            chunk = todo[s:s + task.batch_size]
            recs = task.process(chunk, ctx)
            if [r["id"] for r in recs] != [c["id"] for c in chunk]:
                raise AssertionError(f"{task.name}: process() must return one record per sample, in order")
            cache.add(recs)
            bar.update(len(chunk))
    finally:
        bar.close()
    records = [cache.get(s["id"]) for s in data.samples]
    return {"metrics": task.aggregate(records) if records else {}, "n": len(records), "data": data.to_dict(),
            "cached": len(data.samples) - len(todo), "settings": parts["settings"], "samples": records}
