"""Running lm-eval's tasks for `mixq eval`: the plan (which tasks, their local data, the shots the
Capability Score fixes), checked before any model loads, and one role's evaluation through lm-eval's
own evaluator (`simple_evaluate`), with lm-eval's request cache keyed by the model's content.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mixq.core.errors import MixqError

# names mixq also accepts for lm-eval's tasks
ALIASES = {"jcommonsenseqa": "ja_leaderboard_jcommonsenseqa", "perplexity": "wikitext"}
# the shots of the card's Capability Score where lm-eval's config says otherwise (MMLU 0, GSM8K-CoT 8)
CAPABILITY_SHOTS = {"mmlu": 5, "gsm8k_cot": 3}
BOOTSTRAP_ITERS = 1000


def offline() -> None:
    """Local files only: no hub lookups by datasets or huggingface_hub, whatever the environment says."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True


@dataclass
class Sizing:
    """The tokenizer HashHop sizes its prompts with, and that model's context length."""
    count_tokens: object
    ident: str
    context: int


@dataclass
class Plan:
    names: list[str]                      # lm-eval tasks / groups to run, in order
    taskdir: object | None = None         # mixq.eval.lmeval.taskdir.TaskDir
    shots: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    loglikelihood: bool = False           # some task scores log-likelihoods (servers need a tokenizer)

    def to_dict(self) -> dict:
        td = self.taskdir
        data = {}
        if td is not None:
            for path, ds in td.datasets.items():
                data[path] = {"source": ds.source, "sample_data": ds.sample, "local_dataset": str(ds.path),
                              "configs": ds.configs, "files": ds.files}
        return {"tasks": self.names, "task_dir": str(td.path) if td else None, "shots": self.shots,
                "data": data, "coverage": {k: list(v) for k, v in (td.coverage if td else {}).items()},
                "notes": self.notes + (list(td.notes) if td else [])}


def sizing_for(spec: str) -> Sizing:
    """HashHop's sizing from a local model's tokenizer and config (no weights loaded)."""
    from transformers import AutoTokenizer

    from mixq.core.modelio import read_config, resolve_model

    path = resolve_model(spec)
    tok = AutoTokenizer.from_pretrained(str(path), model_max_length=1 << 30)  # counting, not running
    cfg = read_config(path)
    ctx = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
    ctx = int(ctx or getattr(tok, "model_max_length", 0) or 2048)
    ident = hashlib.sha256((path / "tokenizer.json").read_bytes() if (path / "tokenizer.json").is_file()
                           else str(path).encode()).hexdigest()[:16]
    return Sizing(lambda s: len(tok.encode(s, add_special_tokens=False)), ident, ctx)


def prepare(names: list[str], opts, work: Path, sizing: Sizing | None, capability: bool) -> Plan:
    """Convert and check every task's data, write the task directory; nothing loads a model."""
    from mixq.eval.lmeval import hashhop, taskdir

    offline()
    plan = Plan(names=list(names))
    extra: dict[str, dict] = {}
    if "hashhop" in names:
        if sizing is None:
            raise MixqError("hashhop sizes its prompts in tokens: give a local model or --tokenizer")
        sizes = hashhop.parse_sizes(opts.hashhop_sizes)
        fits = tuple(s for s in sizes if s <= sizing.context)
        if not fits:
            raise MixqError(f"hashhop: every size ({opts.hashhop_sizes}) is beyond the model's "
                            f"{sizing.context}-token context")
        if len(fits) < len(sizes):
            plan.notes.append("hashhop: sizes " + ", ".join(str(s) for s in sizes if s not in fits)
                              + f" not run (beyond the model's {sizing.context}-token context)")
        root = hashhop.prepare(work / "datasets", sizing.count_tokens, sizing.ident, opts.seed, fits)
        extra = hashhop.task_configs(root)
        plan.notes.append(f"hashhop: sizes {', '.join(str(s) for s in fits)} tokens, seed {opts.seed}")
    if capability and opts.num_fewshot is None:
        plan.shots = {n: s for n, s in CAPABILITY_SHOTS.items() if n in names}
    lm_names = [n for n in names if n != "hashhop"]
    overrides = {n: {"num_fewshot": s} for n, s in plan.shots.items()}
    timeout = {"timeout": float(opts.timeout)}
    plan.taskdir = taskdir.build(lm_names, opts.data_dir, work, extra=extra, overrides=overrides,
                                 metric_kwargs={"mixq.eval.lmeval.code.pass_at_k": timeout})
    loaded = load_tasks(plan)  # every config builds and every dataset loads before a model does
    plan.loglikelihood = any(t.get_config("output_type") != "generate_until" for t in loaded["tasks"].values())
    return plan


def task_manager(plan: Plan):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(plan.taskdir.path), include_defaults=False)


def load_tasks(plan: Plan) -> dict:
    try:
        return task_manager(plan).load(plan.names)
    except MixqError:
        raise
    except Exception as e:  # a config lm-eval rejects, data it cannot read
        raise MixqError(f"lm-eval could not load the tasks: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def evaluate(lm, plan: Plan, opts, cache_db: str | None) -> dict:
    """lm-eval's simple_evaluate on this plan; its result dict (samples included)."""
    import lm_eval

    gen = {"max_gen_toks": int(opts.max_tokens)} if opts.max_tokens else None
    seed = int(opts.seed)
    try:
        res = _simple_evaluate(lm_eval, lm, plan, opts, cache_db, gen, seed)
    except MixqError:
        raise
    except Exception as e:  # a server that refuses or fails, a task lm-eval cannot run: one line for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MixqError(f"lm-eval failed: {type(e).__name__}: {msg[:300]}") from e
    if res is None:
        raise MixqError("lm-eval returned no results")
    return res


def _simple_evaluate(lm_eval, lm, plan, opts, cache_db, gen, seed):
    return lm_eval.simple_evaluate(
        model=lm, tasks=plan.names, task_manager=task_manager(plan), num_fewshot=opts.num_fewshot,
        limit=opts.limit, use_cache=cache_db, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=True,
        apply_chat_template=bool(opts.apply_chat_template), fewshot_as_multiturn=bool(opts.apply_chat_template),
        gen_kwargs=gen, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, confirm_run_unsafe_code=True)


def cache_db(cache_dir: str | None, identity: dict, settings: dict) -> str | None:
    """lm-eval's request cache for this model and backend settings (lm-eval keys requests by content only)."""
    if not cache_dir:
        return None
    key = hashlib.sha256(json.dumps([identity.get("fingerprint"), settings], sort_keys=True,
                                    default=str).encode()).hexdigest()[:20]
    root = Path(cache_dir) / "lm-eval"
    root.mkdir(parents=True, exist_ok=True)
    return str(root / key)
