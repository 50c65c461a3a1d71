"""Official release files -> the local dataset lm-eval's own task configs read.

lm-eval's task configs load their data with `datasets.load_dataset(dataset_path, dataset_name)` from the
Hugging Face hub. mixq never downloads: each benchmark's official files (in `--data-dir`, or the shipped
samples) are read, checked and written as a local dataset directory in the hub repository's layout (a
README.md whose `configs:` name the data files of each config and split, one JSON-lines file per split,
the hub copy's field names), and the task configs' `dataset_path` points there (mixq.eval.lmeval.taskdir).

| lm-eval dataset_path           | official files (DIR/<folder>/)                                  | configs          |
|--------------------------------|-----------------------------------------------------------------|------------------|
| EleutherAI/wikitext_document_level | wiki.test.raw (+ wiki.valid.raw, wiki.train.raw) (wikitext/)| wikitext-2-raw-v1|
| cais/mmlu                      | {dev,val,test}/<subject>_<split>.csv (mmlu/, or mmlu/data/)     | one per subject  |
| openai/gsm8k                   | train.jsonl, test.jsonl (gsm8k/)                                | main             |
| google/IFEval                  | input_data.jsonl (ifeval/)                                      | default          |
| openai/openai_humaneval        | HumanEval.jsonl[.gz] (humaneval/)                               | default          |
| Rakuten/JGLUE                  | train-v1.1.json, valid-v1.1.json (jcommonsenseqa/)              | JCommonsenseQA   |

WikiText pages are cut the way EleutherAI/wikitext_document_level cuts the raw file: a new page starts at
each top-level heading line (` = Title = `); the page keeps its lines exactly, joined by newlines.
Everything is validated here, before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mixq.core.errors import MixqError
from mixq.eval.datafiles import Source, require

VERSION = 1  # of the conversion: part of the local dataset's directory name

Splits = dict[str, list[dict]]          # split -> rows
Configs = dict[str, Splits]             # config name -> splits


@dataclass(frozen=True)
class Family:
    dataset_path: str            # what lm-eval's configs name
    folder: str                  # DIR/<folder>/ in --data-dir
    markers: tuple[str, ...]     # files that identify the folder
    read: Callable[[Source], Configs]
    aliases: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------ wikitext

def wikitext_pages(raw: str) -> list[str]:
    """The raw file cut into pages at top-level headings (` = Title = `, not ` = = Section = = `)."""
    pages, cur = [], []
    for line in raw.split("\n"):
        flat = line.replace("= = =", "===").replace("= =", "==").strip()
        if flat.startswith("= ") and flat.endswith(" ="):
            page = "\n".join(cur)
            if page.strip():
                pages.append(page)
            cur = []
        cur.append(line)
    page = "\n".join(cur)
    if page.strip():
        pages.append(page)
    return pages


def _wikitext(src: Source) -> Configs:
    splits = {}
    for split, name in (("test", "wiki.test.raw"), ("validation", "wiki.valid.raw"), ("train", "wiki.train.raw")):
        if split != "test" and not src.exists(name):
            continue
        pages = wikitext_pages(src.read_text(name))
        if not pages:
            raise MixqError(f"wikitext: {src.root / name} has no text")
        splits[split] = [{"page": p} for p in pages]
    return {"wikitext-2-raw-v1": splits}


# ------------------------------------------------------------------------------------------ mmlu

LETTERS = ("A", "B", "C", "D")


def _mmlu_split(src: Source, prefix: str, split: str, hf_split: str, out: Configs) -> None:
    for f in src.glob(f"{prefix}{split}/*_{split}.csv"):
        subject = f.rsplit("/", 1)[-1][: -len(f"_{split}.csv")]
        rows = []
        for i, r in enumerate(src.csv_rows(f)):
            if not r:
                continue
            if len(r) != 6 or r[5].strip() not in LETTERS:
                raise MixqError(f"mmlu {src.root / f}: row {i + 1}: expected 6 columns (question, A, B, C, D, "
                                f"answer letter), got {r[:6]!r}")
            rows.append({"question": r[0], "subject": subject, "choices": r[1:5],
                         "answer": LETTERS.index(r[5].strip())})
        out.setdefault(subject, {})[hf_split] = rows


def _mmlu(src: Source) -> Configs:
    prefix = "" if (src.root / "test").is_dir() else "data/"
    out: Configs = {}
    for split, hf in (("test", "test"), ("dev", "dev"), ("val", "validation")):
        _mmlu_split(src, prefix, split, hf, out)
    if not any("test" in s for s in out.values()):
        raise MixqError(f"mmlu: no {prefix}test/*_test.csv files in {src.root}")
    for subject, splits in out.items():
        if "test" not in splits:
            continue
        if len(splits.get("dev", [])) < 5:
            raise MixqError(f"mmlu: subject {subject} has {len(splits.get('dev', []))} dev questions; the 5-shot "
                            f"prompt needs {prefix}dev/{subject}_dev.csv with 5")
    return {s: v for s, v in out.items() if "test" in v}


# ------------------------------------------------------------------------------------------ others

def _rows(src: Source, name: str, fields: tuple[str, ...], alternatives: tuple[str, ...] = ()) -> list[dict]:
    rows = src.jsonl(name, alternatives)
    if not rows:
        raise MixqError(f"{src.folder}: {src.root / name} has no rows")
    for i, r in enumerate(rows, 1):
        require(r, fields, f"{src.folder} {name}: line {i}")
    return rows


def gsm8k_gold(answer: str) -> str:
    m = re.search(r"####\s*(\S+)", answer)
    if not m:
        raise MixqError(f"gsm8k: an answer without '#### <number>': {answer[-60:]!r}")
    return m.group(1)


def _gsm8k(src: Source) -> Configs:
    out = {}
    for split in ("train", "test"):
        rows = _rows(src, f"{split}.jsonl", ("question", "answer"))
        for r in rows:
            gsm8k_gold(r["answer"])
        out[split] = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    return {"main": out}


def _ifeval(src: Source) -> Configs:
    from mixq.eval.tasks._ifeval_checks import Uncheckable, validate

    rows = _rows(src, "input_data.jsonl", ("key", "prompt", "instruction_id_list", "kwargs"))
    out = []
    for n, r in enumerate(rows, 1):
        where = f"ifeval input_data.jsonl: line {n} (key {r['key']})"
        ids, kws = list(r["instruction_id_list"]), list(r["kwargs"])
        if len(ids) != len(kws) or not ids:
            raise MixqError(f"{where}: instruction_id_list and kwargs must be non-empty and of equal length")
        try:
            for i, k in zip(ids, kws):
                validate(i, k)
        except Uncheckable as e:
            raise MixqError(f"{where}: {e}") from None
        # the kwargs dicts differ per instruction: kept as JSON text so every row has one schema
        out.append({"key": r["key"], "prompt": r["prompt"], "instruction_id_list": ids,
                    "kwargs": json.dumps(kws)})
    return {"default": {"train": out}}


def _humaneval(src: Source) -> Configs:
    fields = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    rows = _rows(src, "HumanEval.jsonl", fields, ("HumanEval.jsonl.gz",))
    for r in rows:
        if not re.fullmatch(r"[A-Za-z_]\w*", str(r["entry_point"])):
            raise MixqError(f"humaneval {r['task_id']}: entry_point {r['entry_point']!r} is not a Python name")
    return {"default": {"test": [{k: r[k] for k in fields} for r in rows]}}


def _jcommonsenseqa(src: Source) -> Configs:
    fields = ("q_id", "question", "choice0", "choice1", "choice2", "choice3", "choice4", "label")
    out = {}
    for split, name in (("train", "train-v1.1.json"), ("validation", "valid-v1.1.json")):
        rows = _rows(src, name, fields)
        for i, r in enumerate(rows, 1):
            if int(r["label"]) not in range(5):
                raise MixqError(f"jcommonsenseqa {name}: line {i}: label must be 0..4")
        out[split] = [{k: (int(r[k]) if k in ("q_id", "label") else str(r[k])) for k in fields} for r in rows]
    return {"JCommonsenseQA": out}


FAMILIES = {f.dataset_path: f for f in (
    Family("EleutherAI/wikitext_document_level", "wikitext", ("wiki.test.raw",), _wikitext,
           ("wikitext-2-raw", "wikitext-2-raw-v1")),
    Family("cais/mmlu", "mmlu", ("test", "data"), _mmlu),
    Family("openai/gsm8k", "gsm8k", ("test.jsonl",), _gsm8k),
    Family("google/IFEval", "ifeval", ("input_data.jsonl",), _ifeval),
    Family("openai/openai_humaneval", "humaneval", ("HumanEval.jsonl", "HumanEval.jsonl.gz"), _humaneval),
    Family("Rakuten/JGLUE", "jcommonsenseqa", ("valid-v1.1.json",), _jcommonsenseqa),
)}


# ------------------------------------------------------------------------------------------ writing

@dataclass
class LocalDataset:
    dataset_path: str      # the hub id it stands for
    path: Path             # the local directory (dataset_path in the task configs)
    configs: dict[str, dict[str, int]]   # config -> split -> rows
    source: str            # where the official files were read ("mixq sample data" or a directory)
    sample: bool
    files: dict[str, str]  # file -> sha256


def _write(root: Path, configs: Configs) -> None:
    root.mkdir(parents=True, exist_ok=True)
    lines = ["---", "configs:"]
    for name, splits in sorted(configs.items()):
        lines += [f"- config_name: {json.dumps(name)}", "  data_files:"]
        for split, rows in splits.items():
            rel = f"{name}/{split}.jsonl"
            (root / name).mkdir(exist_ok=True)
            (root / rel).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                    encoding="utf-8")
            lines += [f"  - split: {split}", f"    path: {json.dumps(rel)}"]
    lines.append("---")
    # README last: its presence marks a complete directory
    (root / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def prepare(dataset_path: str, data_dir: str | None, work: Path) -> LocalDataset:
    """Read, check and write one benchmark's local dataset (reused when the same files were converted)."""
    fam = FAMILIES.get(dataset_path)
    if fam is None:
        raise MixqError(f"no local data reader for lm-eval dataset {dataset_path!r} (mixq reads: "
                        f"{', '.join(sorted(FAMILIES))})")
    src = Source(fam.folder, data_dir, list(fam.markers), fam.aliases)
    configs = fam.read(src)
    key = hashlib.sha256(f"{VERSION}:{dataset_path}:{src.digest()}".encode()).hexdigest()[:16]
    root = Path(work) / f"{fam.folder}-{key}"
    if not (root / "README.md").is_file():
        _write(root, configs)
    counts = {c: {s: len(rows) for s, rows in splits.items()} for c, splits in configs.items()}
    return LocalDataset(dataset_path, root, counts, src.label, src.sample, dict(src.hashes))
