"""`mixq lm-eval [--data-dir DIR] LM_EVAL_ARGS...`: lm-evaluation-harness's own CLI, with the `mixq` model
registered (`--model mixq --model_args pretrained=DIR,kv_config=F`) and the tasks mixq can feed read from
local files: their configs go into a task directory added as `--include_path` (mixq.eval.lmeval.taskdir),
where they take the place of the built-in tasks of the same names. Every other argument is lm-eval's.

lm-eval 0.4 discovers no models from other packages, so the bare `lm_eval` command cannot know `mixq`;
this command is lm-eval's CLI with it (in Python: `import mixq.eval.lmeval.model` then
`lm_eval.simple_evaluate(model="mixq", ...)`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from mixq.core.errors import MixqError


def add_arguments(p) -> None:
    p.add_argument("--data-dir", help="the benchmarks' official files (as for mixq eval; default: the shipped "
                                      "samples)")
    p.add_argument("--work-dir", help="where converted data and task configs go (default: a temporary directory)")
    p.add_argument("--hashhop-sizes", default="2k,8k,32k", help="HashHop prompt sizes in tokens")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's arguments (e.g. run --model mixq "
                                                                  "--model_args pretrained=demo --tasks wikitext)")


def _value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _pretrained(model_args: str | None) -> str | None:
    for part in (model_args or "").split(","):
        k, _, v = part.partition("=")
        if k.strip() == "pretrained":
            return v.strip()
    return None


def run(args) -> int:
    from mixq.eval.lmeval import run as lmrun
    from mixq.eval.lmeval import taskdir

    argv = list(args.lm_eval_args)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if _value(argv, "--include_path"):
        raise MixqError("--include_path is set by mixq lm-eval (its task directory); drop it")
    lmrun.offline()
    tasks = [t.strip() for t in (_value(argv, "--tasks") or "").split(",") if t.strip()]
    supported = set(taskdir.builtin_index())
    mine = [lmrun.ALIASES.get(t, t) for t in tasks if lmrun.ALIASES.get(t, t) in supported or t == "hashhop"]
    tmp = tempfile.TemporaryDirectory(prefix="mixq-lm-eval-") if not args.work_dir else None
    work = Path(args.work_dir or tmp.name)
    try:
        if mine:
            opts = argparse.Namespace(hashhop_sizes=args.hashhop_sizes, seed=0, num_fewshot=None,
                                      data_dir=args.data_dir, timeout=10.0)
            pre = _pretrained(_value(argv, "--model_args"))
            sizing = lmrun.sizing_for(pre) if "hashhop" in mine and pre else None
            plan = lmrun.prepare(mine, opts, work, sizing, capability=False)
            argv += ["--include_path", str(plan.taskdir.path)]
            argv = [a if a != _value(argv, "--tasks") else ",".join(lmrun.ALIASES.get(t, t) for t in tasks)
                    for a in argv]
        import mixq.eval.lmeval.model  # noqa: F401  (registers the mixq model)
        from lm_eval.__main__ import cli_evaluate

        saved = sys.argv
        sys.argv = ["lm-eval", *argv]
        try:
            cli_evaluate()
        finally:
            sys.argv = saved
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0
