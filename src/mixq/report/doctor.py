"""`mixq doctor`: find what makes a converted model fail in other runtimes, and (with --fix) repair it.

What: runs the checks in mixq.report.checks over config.json, the tokenizer files and the weight headers,
for the runtimes asked for. With `fix=True` every fixable finding is applied to an in-memory copy, the
files that change are first copied to MODEL/mixq/doctor-backup/<time>/ and then rewritten, the checks run
again on the written files, and stock `mlx_lm.load` must still read the model (if it cannot, the backup is
restored and the run fails). kv_config.json and mixq/bench.json, bound to the old fingerprint (which
covers config.json), are re-bound, since the weights did not change.

Why this shape: the edits are small and mechanical, but they touch files other tools read, so they are
made only when a check says so, compared as JSON (a second run finds nothing and writes nothing), and
always recoverable from the backup.
"""

from __future__ import annotations

import copy
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mixq.core.errors import MixqError
from mixq.report.checks import RUNTIMES, TEMPLATE_FILES, State, run_checks

# files that name the model by fingerprint (config.json is part of it) and are re-bound after a fix
BOUND_FILES = ("kv_config.json", "mixq/bench.json")

__all__ = ["RUNTIMES", "doctor", "exit_code", "read_state", "base_files"]


# -- reading -------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MixqError(f"{path}: not readable JSON ({str(e).splitlines()[0]})") from e


def base_files(base: str | None) -> dict:
    """tokenizer_config.json and chat template files of the base model (a local dir or a hub id)."""
    if not base:
        return {}
    names = ("tokenizer_config.json", *TEMPLATE_FILES)
    path = Path(base).expanduser()
    if path.is_dir():
        return {n: (path / n).read_text(encoding="utf-8") for n in names if (path / n).is_file()}
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise MixqError(f"--base {base}: not a local directory, and huggingface_hub is not installed") from e
    out, failure = {}, None
    for n in names:
        try:
            out[n] = Path(hf_hub_download(repo_id=base, filename=n)).read_text(encoding="utf-8")
        except Exception as e:  # not in the repo (fine), or offline / no such repo / gated
            if type(e).__name__ not in ("RemoteEntryNotFoundError", "EntryNotFoundError"):
                failure = failure or (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    if failure and "tokenizer_config.json" not in out:
        raise MixqError(f"--base {base}: cannot read its tokenizer files ({failure})")
    return out


def read_state(model_dir: Path, base: str | dict | None = None) -> State:
    """The files doctor reads; `base` is a base model name or the files already read from it."""
    if not (model_dir / "config.json").is_file():
        raise MixqError(f"{model_dir}: no config.json")
    config = _read_json(model_dir / "config.json")
    if not isinstance(config, dict):
        raise MixqError(f"{model_dir / 'config.json'}: expected a JSON object")
    tc = model_dir / "tokenizer_config.json"
    tok = _read_json(tc) if tc.is_file() else None
    templates = {n: (model_dir / n).read_text(encoding="utf-8") for n in TEMPLATE_FILES if (model_dir / n).is_file()}
    return State(path=model_dir, config=config, tok_config=tok, templates=templates,
                 has_tokenizer_json=(model_dir / "tokenizer.json").is_file(),
                 base=base if isinstance(base, dict) else base_files(base))


# -- writing -------------------------------------------------------------------------------------------
def _files(s: State) -> dict[str, str]:
    """The text of every file the fixes may change, as this state would write it."""
    out = {"config.json": json.dumps(s.config, indent=4) + "\n"}
    if s.tok_config is not None:
        out["tokenizer_config.json"] = json.dumps(s.tok_config, indent=2, ensure_ascii=False) + "\n"
    out.update(s.templates)
    return out


def _changed(before: State, after: State) -> dict[str, str]:
    """Files whose content differs (JSON compared as data, so formatting alone never rewrites a file)."""
    old, new = _files(before), _files(after)

    def same(name: str) -> bool:
        if name not in old:
            return False
        return old[name] == new[name] or (name.endswith(".json") and json.loads(old[name]) == json.loads(new[name]))
    return {name: text for name, text in new.items() if not same(name)}


def _backup(model_dir: Path, names: list[str]) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    root = model_dir / "mixq" / "doctor-backup"
    dest, i = root / stamp, 1
    while dest.exists():
        i += 1
        dest = root / f"{stamp}-{i}"
    dest.mkdir(parents=True)
    for n in names:
        if (model_dir / n).is_file():
            (dest / n).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(model_dir / n, dest / n)
    return dest


def _restore(model_dir: Path, backup: Path, names: list[str]) -> None:
    for n in names:
        if (backup / n).is_file():
            shutil.copy2(backup / n, model_dir / n)
        elif (model_dir / n).is_file():
            (model_dir / n).unlink()  # it did not exist before


def _rebind(model_dir: Path, names: list[str], old_fp: str, new_fp: str) -> dict[str, str]:
    """Point files bound to the old fingerprint at the new one: the fixes change metadata, not weights, so a
    kv config stays valid (mixq.kvcache refuses another fingerprint) and bench results still describe it."""
    out = {}
    for n in names:
        doc = json.loads((model_dir / n).read_text(encoding="utf-8"))
        holders = [doc.get("model")] if n == "kv_config.json" else \
            [b.get("model") for b in doc.get("benchmarks", []) if isinstance(b, dict)]
        hit = False
        for h in holders:
            if isinstance(h, dict) and h.get("fingerprint") == old_fp:
                h["fingerprint"], hit = new_fp, True
        if hit:
            (model_dir / n).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            out[n] = ""
    return out


def _loads(model_dir: Path) -> str | None:
    """None when stock mlx_lm.load reads the model (lazily), else the first line of its error."""
    from mlx_lm import load as lm_load

    try:
        lm_load(path_or_hf_repo=str(model_dir), lazy=True)
        return None
    except Exception as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def doctor(model_dir: str | Path, *, fix: bool = False, runtimes: tuple | list | None = None,
           base: str | None = None) -> dict:
    """Check (and with fix, repair) a model directory; returns findings, remaining problems and the backup."""
    from mixq.core.modelio import fingerprint

    d = Path(model_dir).expanduser()
    if not d.is_dir():
        raise MixqError(f"{model_dir}: no such model directory")
    targets = tuple(runtimes or RUNTIMES)
    bad = [r for r in targets if r not in RUNTIMES]
    if bad:
        raise MixqError(f"unknown runtime {bad[0]!r}; choose from {', '.join(RUNTIMES)}")
    state = read_state(d, base)
    findings = run_checks(state, targets)
    result = {"path": str(d), "runtimes": list(targets), "findings": findings, "changed_files": [],
              "backup": None, "loads_with_mlx_lm": None}
    fixable = [f for f in findings if f.fixable]
    if fix and fixable:
        before = copy.deepcopy(state)
        for f in fixable:
            f.apply(state)
            f.fixed = True
        changed = _changed(before, state)
        if changed:
            bound = [n for n in BOUND_FILES if (d / n).is_file()]
            names = sorted(changed) + bound
            old_fp = fingerprint(d) if any(d.glob("model*.safetensors")) else None
            backup = _backup(d, names)
            for name, text in changed.items():
                (d / name).write_text(text, encoding="utf-8")
            if old_fp:
                changed.update(_rebind(d, bound, old_fp, fingerprint(d)))
            err = _loads(d)
            if err is not None:
                _restore(d, backup, names)
                raise MixqError(f"after the fixes mlx_lm.load cannot read {d} ({err}); restored from {backup}")
            result.update(changed_files=sorted(changed), backup=str(backup), loads_with_mlx_lm=True)
        state = read_state(d, state.base)
    result["remaining"] = [f for f in run_checks(state, targets)] if fix else [f for f in findings]
    return result


def exit_code(result: dict) -> int:
    """0 when nothing at error or warning level remains, else 1."""
    return 1 if any(f.severity in ("error", "warning") for f in result["remaining"]) else 0
