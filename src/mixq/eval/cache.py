"""Per-sample result cache: an interrupted `mixq eval` resumes where it stopped, and a re-run with the same
settings costs nothing.

One JSON-lines file per (model, task, settings): the key hashes the model's content fingerprint, the
task's settings (shots, lengths, seed, data file hashes...), the backend's settings (thinking, chat
template, kv config) and, for tasks that compare, the reference's fingerprint. Records are appended and
flushed after every batch; a torn last line (killed mid-write) is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CACHE_VERSION = 1


def default_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mixq" / "eval"


def cache_key(parts: dict) -> str:
    blob = json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResultCache:
    def __init__(self, root: str | os.PathLike | None, model_key: str, task: str, parts: dict):
        self.enabled = root is not None
        self.key = cache_key(parts)
        self.path = Path(root or ".") / model_key[:16] / f"{task}-{self.key[:20]}.jsonl"
        self.records: dict[str, dict] = {}
        if self.enabled and self.path.is_file():
            raw = self.path.read_bytes()
            if raw and not raw.endswith(b"\n"):  # drop a torn last line so appends start clean
                raw = raw[: raw.rfind(b"\n") + 1]
                self.path.write_bytes(raw)
            for line in raw.decode("utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a record cut short by an interrupt
                if isinstance(rec, dict) and "id" in rec:
                    self.records[str(rec["id"])] = rec
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            meta = self.path.with_suffix(".key.json")
            if not meta.exists():
                meta.write_text(json.dumps(parts, indent=1, sort_keys=True, default=str) + "\n")

    def get(self, sample_id) -> dict | None:
        return self.records.get(str(sample_id))

    def add(self, records: list[dict]) -> None:
        for r in records:
            self.records[str(r["id"])] = r
        if not self.enabled or not records:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
