"""`mixq doctor MODEL_DIR [--fix] [--for RUNTIME] [--base BASE_MODEL]`: find what breaks a converted model in
mlx-lm, LM Studio or transformers, print each finding with its severity and fix, and with --fix repair what
can be repaired in the files (backup kept; a second run changes nothing). See mixq.report.doctor."""

from __future__ import annotations

import json

from mixq.report.doctor import RUNTIMES, doctor, exit_code


def add_arguments(p) -> None:
    p.add_argument("model_dir", help="a converted model directory")
    p.add_argument("--fix", action="store_true",
                   help="apply the fixes (changed files are first copied to MODEL_DIR/mixq/doctor-backup/)")
    p.add_argument("--for", dest="runtimes", action="append", choices=RUNTIMES,
                   help="only what matters to this runtime (repeatable; default: all of them)")
    p.add_argument("--base", help="the base model (local dir or hub id): restores its tokenizer class and chat template")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    res = doctor(args.model_dir, fix=args.fix, runtimes=args.runtimes, base=args.base)
    code = exit_code(res)
    if args.json:
        out = {**res, "findings": [f.to_dict() for f in res["findings"]],
               "remaining": [f.to_dict() for f in res["remaining"]], "exit_code": code}
        print(json.dumps(out, indent=2))
        return code
    print(f"{res['path']}  (for {', '.join(res['runtimes'])})")
    if not res["findings"]:
        print("no problems found")
        return code
    for f in res["findings"]:
        state = "fixed" if f.fixed else "fixable with --fix" if f.fixable else "not fixable here"
        print(f"\n{f.severity.upper():<7} {f.check}  [{', '.join(f.runtimes)}]  ({state})")
        print(f"  {f.message}")
        print(f"  fix: {f.fix}")
    if res["changed_files"]:
        print(f"\nchanged {', '.join(res['changed_files'])}; backup in {res['backup']}; mlx_lm.load reads the result")
    left = [f for f in res["remaining"] if f.severity in ("error", "warning")]
    if args.fix:
        print(f"\n{len(left)} problem(s) remain" + (" (not fixable in the files)" if left else ""))
    return code
