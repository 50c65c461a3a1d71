"""mixq's own tasks, for what lm-eval has no task for (BFCL's AST checker with tools in the chat template,
KL against the float reference): every module under `mixq.eval.tasks` that defines a `Task` subclass with
`@register`, known by its `name`. Everything else `mixq eval` runs is an lm-eval task (mixq.eval.lmeval).

A task is five small steps, so the runner can cache and resume per sample:

* `settings(opts)`: every option that changes a sample's result (part of the result-cache key);
* `load(opts, limit)`: the samples (dicts with a unique "id"), deterministic for the options;
* `process(samples, ctx)`: one record (a JSON-serialisable dict with the sample's "id") per sample;
* `aggregate(records)`: the task's metrics; `metric` names the headline one;
* `per_sample(record)`: the record's value of each metric, for standard errors and paired comparisons.

Tasks import nothing from mlx at module level, so listing tasks is cheap.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from mixq.core.errors import MixqError

_TASKS: dict[str, type["Task"]] = {}
_LOADED = False


class Task:
    name: str = ""
    title: str = ""                # the benchmark's name in the table
    metric: str = "accuracy"       # headline metric key in aggregate()
    metric_label: str = "accuracy"
    higher_is_better: bool = True
    percent: bool = True           # a fraction in [0, 1], shown (and averaged) in percent
    verdict: str = "points"        # how degradation is judged: points | relative | kl (see mixq.eval.table)
    needs_reference: bool = False  # compares against --reference (not run on the reference itself)
    needs_logits: bool = False     # needs full next-token distributions: local models only
    default_limit: int | None = None
    batch_size: int = 8            # samples per process() call (a resume point after each)
    version: str = "1"

    def settings(self, opts) -> dict:
        return {}

    def load(self, opts, limit: int | None) -> "TaskData":
        raise NotImplementedError

    def process(self, samples: list[dict], ctx) -> list[dict]:
        raise NotImplementedError

    def aggregate(self, records: list[dict]) -> dict:
        raise NotImplementedError

    def per_sample(self, record: dict) -> dict:
        raise NotImplementedError


class TaskData:
    """A task's selected samples and where they came from."""

    def __init__(self, samples: list[dict], source: str, files: dict | None = None, total: int | None = None,
                 sample_data: bool = False):
        ids = [s["id"] for s in samples]
        if len(set(ids)) != len(ids):
            raise MixqError(f"{source}: duplicate sample ids")
        self.samples = samples
        self.source = source          # "mixq sample data" / a directory / "datasets:<id>" / "generated"
        self.files = files or {}      # file name -> sha256 (part of the cache key)
        self.total = len(samples) if total is None else total
        self.sample_data = sample_data  # the shipped format samples, not the benchmark

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "files": self.files, "selected": len(self.samples),
                "available": self.total, "sample_data": self.sample_data}


def register(cls: type[Task]) -> type[Task]:
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a task needs a name")
    _TASKS[cls.name] = cls
    return cls


def _discover() -> None:
    global _LOADED
    if _LOADED:
        return
    from mixq.eval import tasks

    for m in pkgutil.iter_modules(tasks.__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"mixq.eval.tasks.{m.name}")
    _LOADED = True


def names() -> list[str]:
    _discover()
    return sorted(_TASKS)


def get(name: str) -> Task:
    _discover()
    if name not in _TASKS:
        raise MixqError(f"unknown task {name!r}")
    return _TASKS[name]()
