"""lm-eval's own task configs, pointed at local data: a directory of task YAML files for `--include_path`.

For each requested lm-eval task or group, every leaf task's config is copied from lm-eval's YAML (includes
merged, functions unresolved) with one change of data: `dataset_path` becomes the local dataset written by
mixq.eval.lmeval.data. Groups are copied with the members that have data (an MMLU directory with three
subjects gives an `mmlu` group of three; the coverage is reported, never hidden). Functions keep pointing at
lm-eval's task modules, except where those modules cannot run offline and mixq supplies the same function:

* humaneval's `utils` loads `evaluate`'s code_eval from the hub at import: mixq.eval.lmeval.code
  (the same `build_predictions`, and `pass_at_k` through mixq's sandbox);
* ifeval's `utils` downloads NLTK data at import: mixq.eval.lmeval.ifeval (mixq's verifiers).

The same directory serves `mixq eval` (a TaskManager over it alone) and `mixq lm-eval` (lm-eval's CLI with
`--include_path`, where it overrides the built-in tasks of the same names).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from mixq.core.errors import MixqError
from mixq.eval.lmeval import data as localdata

# task directories (under lm_eval/tasks) whose tasks mixq can feed from local files
TASK_DIRS = ("wikitext", "mmlu/default", "gsm8k", "ifeval", "humaneval", "japanese_leaderboard")
# lm-eval task modules replaced by mixq modules (same function names)
REPLACED = {"humaneval.utils": "mixq.eval.lmeval.code", "ifeval.utils": "mixq.eval.lmeval.ifeval"}


class FunctionRef(str):
    """A `!function module.name` reference in a task config."""


@dataclass
class TaskDir:
    path: Path
    names: list[str]                                        # the requested tasks / groups
    datasets: dict[str, localdata.LocalDataset] = field(default_factory=dict)
    coverage: dict[str, tuple[int, int]] = field(default_factory=dict)  # group -> (leaves with data, leaves)
    leaves: dict[str, str] = field(default_factory=dict)   # leaf task -> dataset_path
    notes: list[str] = field(default_factory=list)


def lm_eval_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


_INDEX = None


def builtin_index() -> dict:
    """lm-eval's index (name -> Entry) over TASK_DIRS only (the full index takes ~10 s to build)."""
    global _INDEX
    if _INDEX is None:
        from lm_eval.tasks import TaskManager

        root = lm_eval_root()
        _INDEX = TaskManager(include_path=[str(root / d) for d in TASK_DIRS], include_defaults=False).task_index
    return _INDEX


def supported_names() -> list[str]:
    """lm-eval tasks and groups whose data mixq can read from local files."""
    index = builtin_index()
    ok = []
    for name, entry in index.items():
        kind = entry.kind.name
        if kind in ("TASK", "PY_TASK") and (entry.cfg or {}).get("dataset_path") in localdata.FAMILIES:
            if not name.startswith("mmlu_"):
                ok.append(name)
        elif kind == "GROUP" and name == "mmlu":
            ok.append(name)
    return sorted(ok)


def _function_ref(value: str, root: Path) -> FunctionRef | None:
    """A function reference as lm-eval's unresolved loader leaves it ("<yaml dir>/<module>.<name>")."""
    if not isinstance(value, str) or not value.startswith(str(root)):
        return None
    mod_path, _, name = value.rpartition(".")
    if not name or not Path(mod_path + ".py").is_file():
        return None
    rel = Path(mod_path).relative_to(root).as_posix().replace("/", ".")
    if rel in REPLACED:
        return FunctionRef(f"{REPLACED[rel]}.{name}")
    return FunctionRef(f"lm_eval.tasks.{rel}.{name}")


def _rewrite(obj, root: Path):
    if isinstance(obj, dict):
        return {k: _rewrite(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rewrite(v, root) for v in obj]
    ref = _function_ref(obj, root)
    return ref if ref is not None else obj


def _dump(cfg: dict, path: Path) -> None:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(FunctionRef, lambda d, v: d.represent_scalar("!function", str(v)))
    path.write_text(yaml.dump(cfg, Dumper=Dumper, allow_unicode=True, sort_keys=False), encoding="utf-8")


def _members(cfg: dict) -> list:
    task = cfg.get("task")
    return task if isinstance(task, list) else []


class _Builder:
    def __init__(self, index: dict, data_dir: str | None, work: Path, metric_kwargs: dict | None = None):
        self.index, self.data_dir, self.work = index, data_dir, work
        self.metric_kwargs = metric_kwargs or {}
        self.overrides: dict[str, dict] = {}
        self.root = lm_eval_root()
        self.out: dict[str, dict] = {}      # file stem -> config to write
        self.td = TaskDir(path=work, names=[])

    def dataset(self, dataset_path: str) -> localdata.LocalDataset:
        if dataset_path not in self.td.datasets:
            self.td.datasets[dataset_path] = localdata.prepare(dataset_path, self.data_dir, self.work / "datasets")
        return self.td.datasets[dataset_path]

    def leaf(self, name: str, required: bool, override: dict) -> bool:
        """Copy one task config onto local data; False (or an error if required) when it has none."""
        entry = self.index[name]
        cfg = copy.deepcopy(entry.cfg) | override
        path = cfg.get("dataset_path")
        if path not in localdata.FAMILIES and not required:
            return False
        if path not in localdata.FAMILIES:
            raise MixqError(f"lm-eval task {name} reads {path}; mixq reads local files only for "
                            f"{', '.join(sorted(localdata.FAMILIES))}")
        ds = self.dataset(path)
        config = cfg.get("dataset_name") or "default"
        splits = ds.configs.get(config)
        wanted = [cfg.get(k) for k in ("test_split", "validation_split") if cfg.get(k)]
        if splits is None or not any(s in splits for s in wanted):
            if required:
                raise MixqError(f"lm-eval task {name}: no {config} data in {ds.source} "
                                f"(has: {', '.join(sorted(ds.configs))})")
            return False
        self._unused_splits(name, cfg, splits)
        cfg.pop("include", None)
        cfg["dataset_path"] = str(ds.path)
        cfg.pop("dataset_kwargs", None)
        cfg = _rewrite(cfg, self.root)
        for m in cfg.get("metric_list") or []:
            m.update(self.metric_kwargs.get(str(m.get("metric")), {}))
        self.out[name] = cfg
        self.td.leaves[name] = path
        return True

    def _unused_splits(self, name: str, cfg: dict, splits: dict) -> None:
        """A split the local files lack is dropped from the config only when the task never reads it
        (e.g. WikiText's train split for a 0-shot perplexity); a split it reads is an error."""
        evaluated = cfg.get("test_split") or cfg.get("validation_split")
        shots = cfg.get("num_fewshot") or 0
        fewshot = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split")
        for key in ("training_split", "validation_split", "fewshot_split"):
            split = cfg.get(key)
            if not split or split in splits:
                continue
            samples = (cfg.get("fewshot_config") or {}).get("samples")
            if split == evaluated or (shots and split == fewshot and not samples):
                raise MixqError(f"lm-eval task {name} reads the {split} split, which the local files do not have")
            cfg.pop(key)
            self.td.notes.append(f"{name}: no local {split} split (unused: {key} dropped)")

    def expand(self, name: str, required: bool, override: dict | None = None) -> int:
        """Leaves with data under `name` (writing their configs and the groups'); 0 if none."""
        override = dict(override or {}) | self.overrides.get(name, {})
        entry = self.index.get(name)
        if entry is None:
            raise MixqError(f"unknown lm-eval task {name!r} (mixq runs tasks from lm-eval's {', '.join(TASK_DIRS)})")
        kind = entry.kind.name
        if kind in ("TASK", "PY_TASK"):
            return int(self.leaf(name, required, override))
        if kind == "TAG":
            return sum(self.expand(t, False, override) for t in sorted(entry.tags))
        cfg = copy.deepcopy(entry.cfg)
        kept, total = [], 0
        for member in _members(cfg):
            ref = member if isinstance(member, str) else member.get("task") or member.get("group")
            n = self.expand(ref, False, override)
            total += 1
            if n:
                kept.append(member)
        leaves = self._count_leaves(name)
        have = sum(1 for t in self._leaf_names(name) if t in self.td.leaves)
        self.td.coverage[name] = (have, leaves)
        if not kept:
            if required:
                raise MixqError(f"lm-eval group {name}: none of its {leaves} tasks has data in "
                                f"{self.data_dir or 'the shipped samples'}")
            return 0
        cfg.pop("include", None)
        cfg["task"] = kept
        self.out[f"_group_{name}"] = _rewrite(cfg, self.root)
        return have

    def _leaf_names(self, name: str) -> list[str]:
        entry = self.index.get(name)
        if entry is None:
            return []
        kind = entry.kind.name
        if kind in ("TASK", "PY_TASK"):
            return [name]
        if kind == "TAG":
            return sorted(entry.tags)
        out = []
        for m in _members(entry.cfg):
            out += self._leaf_names(m if isinstance(m, str) else m.get("task") or m.get("group"))
        return out

    def _count_leaves(self, name: str) -> int:
        return len(set(self._leaf_names(name)))


def build(names: list[str], data_dir: str | None, work: Path, extra: dict[str, dict] | None = None,
          overrides: dict[str, dict] | None = None, metric_kwargs: dict[str, dict] | None = None) -> TaskDir:
    """Write the task directory for `names` (lm-eval tasks or groups) under `work`. `extra`: more configs
    written as they are (mixq's own lm-eval-format tasks); `overrides`: config keys set on every leaf under
    a name (e.g. the Capability Score's shots); `metric_kwargs`: arguments added to a function metric."""
    work = Path(work)
    b = _Builder(builtin_index(), data_dir, work, metric_kwargs)
    b.overrides = overrides or {}
    for n in names:
        b.expand(n, required=True)
    b.td.names = list(names)
    configs = dict(b.out) | dict(extra or {})
    key = hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = work / f"tasks-{key}"
    if not path.is_dir():
        tmp = work / f"tasks-{key}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        for stem, cfg in configs.items():
            _dump(cfg, tmp / f"{stem}.yaml")
        tmp.rename(path)
    b.td.path = path
    return b.td
