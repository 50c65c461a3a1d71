"""Where benchmark data comes from: the official release files in `--data-dir`, or the small format samples
shipped in `mixq/eval/data/`. Never a download.

Every benchmark names the files of its official release (MMLU's `dev/<subject>_dev.csv`, GSM8K's
`test.jsonl`, WikiText-2's `wiki.test.raw`, ...). With `--data-dir DIR` they are looked up in
`DIR/<folder>/` then `DIR/`; a missing file is an error naming the path, never a fallback to other data.
Without `--data-dir` the shipped samples are used (same layout and fields, written for mixq: a format
check, not a score to quote; the results and the table say so).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from pathlib import Path

from mixq.core.errors import MixqError
from mixq.core.textdata import decode_utf8, json_lines

SHIPPED = Path(__file__).resolve().parent / "data"


class Source:
    """The directory a benchmark reads its files from, and what that directory is."""

    def __init__(self, folder: str, data_dir: str | None, markers: list[str], aliases: tuple[str, ...] = ()):
        self.folder = folder
        if data_dir is None:
            self.root = SHIPPED / folder
            self.label = "mixq sample data"
            self.sample = True
        else:
            base = Path(data_dir).expanduser()
            if not base.is_dir():
                raise MixqError(f"--data-dir {data_dir}: not a directory")
            self.root = base
            for sub in (folder, *aliases):
                if (base / sub).is_dir() and any((base / sub / m).exists() for m in markers):
                    self.root = base / sub
                    break
            self.label = str(self.root)
            self.sample = False
        self.hashes: dict[str, str] = {}

    def path(self, name: str, alternatives: tuple[str, ...] = ()) -> Path:
        for n in (name, *alternatives):
            p = self.root / n
            if p.exists():
                return p
        raise MixqError(f"{self.folder}: {self.root / name} not found (the official release's file name)")

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

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

    def digest(self) -> str:
        """One hash over every file read so far (names and contents)."""
        return hashlib.sha256(json.dumps(sorted(self.hashes.items())).encode()).hexdigest()


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
