"""Where benchmark data comes from: the official files in `--data-dir`, the small format samples shipped
in `mixq/eval/data/`, or (optionally, with a network) the `datasets` library.

Every task names the files of its official release (e.g. MMLU's `dev/<subject>_dev.csv`, GSM8K's
`test.jsonl`, BFCL's `BFCL_v3_simple.json`). With `--data-dir DIR` they are looked up in `DIR/<task>/`
then `DIR/`; a missing file is an error naming the path, never a silent fallback. Without `--data-dir`
the shipped samples are used (same layout, same fields, written for mixq: a format check, not a score
to quote; results say so). `--data-dir hf` loads through `datasets` (not a dependency: an error if absent).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import random
from pathlib import Path

from mixq.core.errors import MixqError
from mixq.core.textdata import decode_utf8, json_lines

SHIPPED = Path(__file__).resolve().parent / "data"
HF = "hf"


class Source:
    """The directory a task reads its files from, and what that directory is."""

    def __init__(self, task: str, data_dir: str | None, files: list[str]):
        self.task = task
        if data_dir is None:
            self.root = SHIPPED / task
            self.label = "mixq sample data"
            self.sample = True
        else:
            base = Path(data_dir).expanduser()
            if not base.is_dir():
                raise MixqError(f"--data-dir {data_dir}: not a directory")
            sub = base / task
            self.root = sub if sub.is_dir() and any((sub / f).exists() for f in files) else base
            self.label = str(self.root)
            self.sample = False
        self.hashes: dict[str, str] = {}

    def path(self, name: str, alternatives: tuple[str, ...] = ()) -> Path:
        for n in (name, *alternatives):
            p = self.root / n
            if p.exists():
                return p
        raise MixqError(f"{self.task}: {self.root / name} not found (the official release's file name)")

    def read_text(self, name: str, alternatives: tuple[str, ...] = ()) -> str:
        p = self.path(name, alternatives)
        raw = p.read_bytes()
        self.hashes[str(p.relative_to(self.root))] = hashlib.sha256(raw).hexdigest()
        if p.suffix == ".gz":
            raw = gzip.decompress(raw)
        return decode_utf8(raw, p)

    def jsonl(self, name: str, alternatives: tuple[str, ...] = ()) -> list[dict]:
        return parse_jsonl(self.read_text(name, alternatives), str(self.root / name))

    def csv_rows(self, name: str) -> list[list[str]]:
        return list(csv.reader(io.StringIO(self.read_text(name))))

    def glob(self, pattern: str) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.glob(pattern))


def parse_jsonl(text: str, where: str) -> list[dict]:
    """JSON lines; a file holding one JSON array is accepted too (some mirrors ship that)."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise MixqError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not all(isinstance(d, dict) for d in data):
            raise MixqError(f"{where}: expected an array of objects")
        return data
    out = []
    for at, obj in json_lines(text, where):
        if not isinstance(obj, dict):
            raise MixqError(f"{at}: expected a JSON object")
        out.append(obj)
    return out


def require(row: dict, fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise MixqError(f"{where}: missing field(s) {', '.join(missing)} (found: {', '.join(map(str, row))})")


def hf_rows(dataset: str, config: str | None, split: str) -> list[dict]:
    """Rows through the `datasets` library (optional: needs the package and a network)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise MixqError("--data-dir hf needs the `datasets` package (pip install datasets) and a network; "
                        "or download the official files and pass --data-dir DIR") from None
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # offline, renamed dataset, auth
        raise MixqError(f"datasets could not load {dataset} ({config}, {split}): {str(e).splitlines()[0]}") from e
    return [dict(r) for r in ds]


def stratified(items: list, key, n: int | None, seed: int) -> list:
    """A seeded sample of n items spread over the groups `key` defines, in proportion to group size
    (every group gets at least one when n allows); n None or >= len(items): all of them, grouped order."""
    groups: dict = {}
    for it in items:
        groups.setdefault(key(it), []).append(it)
    names = sorted(groups)
    if n is None or n >= len(items):
        return [it for g in names for it in groups[g]]
    rng = random.Random(f"mixq-eval-stratified:{seed}")
    for g in names:
        rng.shuffle(groups[g])
    total = len(items)
    quota = {g: (n * len(groups[g])) // total for g in names}
    if n >= len(names):
        for g in names:
            quota[g] = max(1, quota[g])
    # hand out what rounding left (or take back the minimum-one excess) by largest remainder
    order = sorted(names, key=lambda g: (-((n * len(groups[g])) % total), g))
    left = n - sum(quota.values())
    i = 0
    while left != 0 and order:
        g = order[i % len(order)]
        if left > 0 and quota[g] < len(groups[g]):
            quota[g] += 1
            left -= 1
        elif left < 0 and quota[g] > 1:
            quota[g] -= 1
            left += 1
        i += 1
        if i > 10 * len(order) * max(1, abs(left)):
            break
    out = []
    for g in names:
        out += groups[g][: quota[g]]
    return out
