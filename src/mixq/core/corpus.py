"""Where offline text comes from, and the fixed held-out split that training and calibration never see.

Every corpus file is split by lines: the last HOLDOUT_FRACTION of its lines is held out.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mixq.core.errors import MixqError

HOLDOUT_FRACTION = 0.05


@dataclass(frozen=True)
class CorpusFile:
    name: str
    path: Path
    sha256: str
    train: str
    heldout: str


def find_corpus_dir(explicit: str | os.PathLike | None = None) -> Path:
    """An explicit dir, else $MIXQ_CORPUS, else a `shared/corpus` beside the working tree."""
    if explicit:
        if Path(explicit).is_dir() and any(Path(explicit).glob("*.txt")):
            return Path(explicit)
        raise MixqError(f"{explicit}: not a directory of .txt files")
    candidates = []
    if os.environ.get("MIXQ_CORPUS"):
        candidates.append(Path(os.environ["MIXQ_CORPUS"]))
    here = Path(__file__).resolve()
    for base in [Path.cwd(), *Path.cwd().parents, *here.parents]:
        candidates.append(base / "shared" / "corpus")
        candidates.append(base.parent / "shared" / "corpus")
    for c in candidates:
        if c.is_dir() and any(c.glob("*.txt")):
            return c
    raise MixqError("no corpus directory found: pass one or set MIXQ_CORPUS")


def split_text(text: str, holdout: float = HOLDOUT_FRACTION) -> tuple[str, str]:
    lines = text.splitlines(keepends=True)
    cut = len(lines) - max(1, int(round(len(lines) * holdout)))
    return "".join(lines[:cut]), "".join(lines[cut:])


def load_corpus(corpus_dir: str | os.PathLike, holdout: float = HOLDOUT_FRACTION) -> list[CorpusFile]:
    """Every *.txt in the directory (sorted), split into train and held-out parts."""
    files = []
    for p in sorted(Path(corpus_dir).glob("*.txt")):
        raw = p.read_bytes()
        train, held = split_text(raw.decode("utf-8"), holdout)
        files.append(CorpusFile(p.stem, p, hashlib.sha256(raw).hexdigest(), train, held))
    if not files:
        raise MixqError(f"{corpus_dir}: no .txt files")
    return files


def sample_text() -> str:
    """A small mixed English/Japanese/code text shipped with the package (training-side text only)."""
    return resources.files("mixq.data").joinpath("sample.txt").read_text(encoding="utf-8")
