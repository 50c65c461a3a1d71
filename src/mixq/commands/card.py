"""`mixq card MODEL_DIR [--base BASE_MODEL]`: write a Hugging Face style README.md from the model's result
files (convert, eval, bench, kv-cache), leaving out and naming whatever was not measured."""

from __future__ import annotations

import json

from mixq.report.card import make_card


def add_arguments(p) -> None:
    p.add_argument("model_dir", help="a model directory written by `mixq convert`")
    p.add_argument("--base", help="the base model (hub id or local dir): license and base_model come from its card "
                                  "(default: the model convert started from)")
    p.add_argument("--repo-id", help="the name used in the title and snippets (default: the directory name)")
    p.add_argument("--eval", action="append", default=[], metavar="FILE",
                   help="an eval result JSON kept outside MODEL_DIR/mixq/ (repeatable)")
    p.add_argument("--force", action="store_true", help="replace a README.md that `mixq card` did not write")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")


def run(args) -> int:
    res = make_card(args.model_dir, base=args.base, repo_id=args.repo_id, evals=args.eval, force=args.force)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"wrote   {res['readme']}")
    if res["plot"]:
        print(f"plot    {res['plot']}")
    print(f"base    {res['base_model'] or '(unknown)'}, license {res['license'] or '(not found)'}")
    for line in res["left_out"]:
        print(f"missing {line}")
    return 0
