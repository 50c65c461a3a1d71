"""`mixq eval`: load each model once, run every task through the per-sample cache, score, compare.

Roles: `model` (what is judged), `baseline` (what it is compared with: the delta column) and `reference`
(the float model: the KL reference and the base of the Pass/Warn/Fail degradation verdicts). They run in
the order reference, baseline, model; the reference stays loaded (KL needs its logits beside each quant),
every other model is released before the next loads. The reference runs every task but `kl`.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mixq.core.errors import MixqError
from mixq.eval import registry
from mixq.eval.cache import ResultCache, default_dir

ROLES = ("reference", "baseline", "model")


@dataclass
class EvalOptions:
    model: str | None = None
    baseline: str | None = None
    reference: str | None = None
    tasks: str = "capability"
    data_dir: str | None = None
    limit: int | None = None
    kv_config: str | None = None
    server: str | None = None
    server_model: str | None = None     # the model name sent to the server (default: the server's first)
    output: str | None = None
    no_think: bool = False
    chat: bool = True                   # use the chat template for generation tasks when the model has one
    cache_dir: str | None = field(default_factory=lambda: str(default_dir()))
    seed: int = 0
    max_tokens: int | None = None       # override every generation task's token budget
    think_tokens: int = 512             # extra budget for reasoning when thinking is on
    text: str | None = None             # perplexity / kl text file (default: the shipped held-out text)
    seq_len: int | None = None          # perplexity / kl window length (task defaults otherwise)
    timeout: float = 10.0               # humaneval: seconds per program
    progress: bool = True

    def budget(self, answer_tokens: int) -> int:
        """Token budget of a generation: the answer's, plus room for reasoning unless thinking is off."""
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


def open_backend(role: str, name: str | None, opts: EvalOptions):
    if role == "model" and opts.server:
        from mixq.eval.server import ServerBackend

        return ServerBackend(opts.server, model=opts.server_model or name, no_think=opts.no_think, chat=opts.chat)
    from mixq.core.modelio import load
    from mixq.eval.backend import LocalBackend

    lm = load(name)
    kv = opts.kv_config if role == "model" else None
    return LocalBackend(lm, no_think=opts.no_think, kv_config=kv, chat=opts.chat)


def _free() -> None:
    gc.collect()
    try:
        import mlx.core as mx

        mx.clear_cache()
    except Exception:  # pragma: no cover - older mlx
        pass


def run_task(task: registry.Task, backend, reference, opts: EvalOptions, role: str) -> dict:
    limit = opts.limit if opts.limit is not None else task.default_limit
    if limit is not None and limit < 1:
        raise MixqError(f"--limit must be >= 1 (got {limit})")
    data = task.load(opts, limit)
    ident = backend.identity()
    parts = {"task": task.name, "settings": task.settings(opts), "files": data.files,
             "backend": backend.settings(), "model": ident["fingerprint"]}
    if task.needs_reference:
        parts["reference"] = reference.identity()["fingerprint"]
    cache = ResultCache(opts.cache_dir, ident["fingerprint"], task.name, parts)
    todo = [s for s in data.samples if cache.get(s["id"]) is None]
    ctx = TaskContext(backend=backend, reference=reference, opts=opts, role=role)
    t0 = time.perf_counter()
    from tqdm import tqdm

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
    metrics = task.aggregate(records) if records else {}
    return {"metrics": metrics, "n": len(records), "data": data.to_dict(), "cached": len(data.samples) - len(todo),
            "seconds": round(time.perf_counter() - t0, 3), "settings": parts["settings"],
            "cache_file": str(cache.path) if cache.enabled else None, "samples": records}


def run_eval(opts: EvalOptions) -> dict:
    """Evaluate every role on every task; returns the full result document (see mixq.eval.table)."""
    from mixq.eval import table

    tasks = registry.resolve(opts.tasks)
    if opts.model is None and not opts.server:
        raise MixqError("a MODEL (or --server URL) is needed")
    needs_ref = [t.name for t in tasks if t.needs_reference]
    if needs_ref and not opts.reference:
        raise MixqError(f"task {needs_ref[0]} compares against a float model: pass --reference MODEL")
    if opts.server:
        local_only = [t.name for t in tasks if t.needs_logits]
        if local_only:
            raise MixqError(f"task {local_only[0]} needs full next-token distributions: a local model, not --server")
    if opts.kv_config and opts.server:
        raise MixqError("--kv-config applies to a local model; the server has its own cache settings")
    names = {"reference": opts.reference, "baseline": opts.baseline, "model": opts.model}
    roles = [r for r in ROLES if names[r] is not None or (r == "model" and opts.server)]
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    models: dict[str, dict] = {}
    reference = None
    for role in roles:
        _log(opts, f"mixq eval: loading {role} {names[role] or opts.server}")
        backend = open_backend(role, names[role], opts)
        models[role] = backend.identity()
        if role == "reference":
            reference = backend
        results[role] = {}
        for task in tasks:
            if task.needs_reference and role == "reference":
                continue
            if task.needs_reference:
                _check_same_vocab(backend, reference)
            results[role][task.name] = run_task(task, backend, reference, opts, role)
        if role != "reference":
            backend = None
            _free()
    doc = {
        "config": {k: v for k, v in asdict(opts).items()} | {"tasks": [t.name for t in tasks]},
        "versions": _versions(),
        "models": models,
        "results": results,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    doc["summary"] = table.summarize(doc, tasks)
    doc["table"] = table.markdown(doc, tasks)
    return doc


def _check_same_vocab(backend, reference) -> None:
    if backend.vocab_probe() != reference.vocab_probe():
        raise MixqError(f"{backend.identity()['name']} and the reference tokenize differently: "
                        "KL needs the same tokenizer")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import mixq

    out = {"mixq": mixq.__version__}
    for pkg in ("mlx", "mlx-lm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover
            out[pkg] = None
    return out
