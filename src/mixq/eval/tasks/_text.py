"""Held-out text as documents, for `perplexity` and `kl`.

The source is `--text FILE` when given, else the held-out text shipped in `mixq/data/heldout.txt` (the last
5 % of every offline corpus file, never seen by training or calibration; see mixq.core.corpus). Perplexity
is lm-eval's `wikitext` task (mixq.eval.lmeval), not this.
Text is cut at line ends into documents of about DOC_CHARS characters; documents from the held-out
text's sections (prose, dictionary, scripture, Python docs, Japanese) are interleaved so that any prefix
of the list (`--limit N`) covers every kind of text.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mixq.core.errors import MixqError
from mixq.core.textdata import HELDOUT_NAME, read_data_text, read_heldout_sections, read_utf8

DOC_CHARS = 4000


def task_data(opts, limit):
    """The text tasks' samples: one document each, the first `limit` of them."""
    from mixq.eval.registry import TaskData

    docs, source, files = documents(opts)
    picked = docs[:limit] if limit else docs
    # the packaged held-out text is real held-out text, not a format sample: never marked sample_data
    return TaskData([{"id": i, "text": t} for i, t in picked], source, files, total=len(docs))


def chunk_lines(text: str, target: int = DOC_CHARS) -> list[str]:
    """Cut at a blank line once `target` characters are reached (at any line end past 2x target)."""
    out, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        size += len(line)
        if (size >= target and not line.strip()) or size >= 2 * target:
            out.append("".join(cur))
            cur, size = [], 0
    if cur:
        out.append("".join(cur))
    return [d.strip("\n") for d in out if d.strip()]


def _interleave(sections: list[tuple[str, list[str]]]) -> list[tuple[str, str]]:
    out = []
    for j in range(max((len(d) for _, d in sections), default=0)):
        out += [(f"{name}-{j}", docs[j]) for name, docs in sections if j < len(docs)]
    return out


def _read(p: Path) -> str:
    """The file's text with line ends made "\\n" (as a text-mode read does)."""
    return read_utf8(p).replace("\r\n", "\n").replace("\r", "\n")


def documents(opts) -> tuple[list[tuple[str, str]], str, dict]:
    """([(doc id, text)], source label, {file: sha256})."""
    if opts.text:
        p = Path(opts.text).expanduser()
        text = _read(p)
        docs = [(f"doc-{i}", d) for i, d in enumerate(chunk_lines(text))]
        source, files = str(p), {p.name: hashlib.sha256(text.encode()).hexdigest()}
    else:
        text = read_data_text(HELDOUT_NAME)
        sections = [(name, chunk_lines(body)) for name, body in read_heldout_sections(text)]
        docs = _interleave(sections)
        source = f"mixq/data/{HELDOUT_NAME}"
        files = {HELDOUT_NAME: hashlib.sha256(text.encode()).hexdigest()}
    if not docs:
        raise MixqError(f"{source}: no text")
    return docs, source, files

