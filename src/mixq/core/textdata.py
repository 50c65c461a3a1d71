"""Reading text mixq is given or ships: UTF-8 files, JSON lines, documents, and the packaged held-out text.

Calibration (mixq.quant) and evaluation (mixq.eval) read the same kinds of files but may not import each
other, so the readers live here, once, with their one-line MixqError messages (what and where: path, line).

* `read_utf8` / `decode_utf8`: text from a file or bytes (a BOM is dropped; line ends kept as they are).
* `json_lines`: the parsed value of each non-blank line of a JSON-lines text, named by line number.
* `read_documents` / `parse_documents`: documents `{"kind", "text"}` or `{"kind", "messages"}` from a
  `.jsonl` file (one object a line) or a `.txt` file (cut at blank lines into chunks of about 512 chars).
* `read_heldout_sections`: (corpus file name, text) for each section of the shipped `mixq/data/heldout.txt`
  (written by mixq.quant.calibration_build; one section per offline corpus file, see mixq.core.corpus).
"""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from mixq.core.errors import MixqError

HELDOUT_NAME = "heldout.txt"
HELDOUT_HEADER = re.compile(r"^=== mixq-heldout (\S+)(?: [^\n]*)? ===$", re.M)
TXT_TARGET_CHARS = 512

_SENTENCE_END = tuple('.!?:;。」』）)"\'”’')


# ------------------------------------------------------------------------------------------- files

def data_path(name: str) -> Path:
    """A file shipped in mixq/data."""
    return Path(str(resources.files("mixq.data").joinpath(name)))


def read_data_text(name: str) -> str:
    return resources.files("mixq.data").joinpath(name).read_text(encoding="utf-8")


def decode_utf8(raw: bytes, where: str | os.PathLike) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MixqError(f"{where}: not UTF-8 text (invalid byte at offset {e.start})") from None


def read_utf8(p: Path) -> str:
    if not p.exists():
        raise MixqError(f"{p}: no such file")
    if not p.is_file():
        raise MixqError(f"{p}: not a file")
    return decode_utf8(p.read_bytes(), p)


def json_lines(text: str, where: str) -> Iterator[tuple[str, Any]]:
    """("WHERE: line N", parsed value) for each non-blank line."""
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MixqError(f"{where}: line {i}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield f"{where}: line {i}", obj


def read_heldout_sections(text: str | None = None) -> list[tuple[str, str]]:
    """(corpus file name, held-out text) for each section of the shipped heldout.txt (or of `text`)."""
    if text is None:
        text = read_data_text(HELDOUT_NAME)
    heads = list(HELDOUT_HEADER.finditer(text))
    out = []
    for i, m in enumerate(heads):
        start = m.end() + 1
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        out.append((m.group(1), text[start:end]))
    return out


# --------------------------------------------------------------------------------------- text cutting

def chunk_spans(text: str, target: int | Any) -> list[tuple[int, int]]:
    """Cut text at line ends into (start, end) spans of about `target` characters.

    A chunk ends at the first paragraph break (blank line) once it holds `target` characters, else at the
    first sentence end past 1.5x target, else at any line end past 3x target. Greedy and forward-looking
    by one line only, so cutting a prefix that ends at a chunk boundary gives the same chunks.
    `target` may be a callable returning the target for each new chunk (for varied sizes).
    """
    next_target = target if callable(target) else (lambda: target)
    lines = text.splitlines(keepends=True)
    spans: list[tuple[int, int]] = []
    pos, start, size, goal = 0, None, 0, 0
    for i, line in enumerate(lines):
        end = pos + len(line)
        blank = not line.strip()
        if start is None:
            if not blank:
                start, size, goal = pos, 0, next_target()
        if start is not None:
            size += len(line.strip())
            nxt_blank = i + 1 >= len(lines) or not lines[i + 1].strip()
            s = line.rstrip()
            if (size >= goal and nxt_blank) or (size >= 1.5 * goal and s.endswith(_SENTENCE_END)) \
                    or size >= 3 * goal:
                spans.append((start, end))
                start = None
        pos = end
    if start is not None:
        spans.append((start, len(text)))
    return spans


def chunk_text(text: str, target: int | Any) -> list[str]:
    return [t for t in (text[a:b].rstrip() for a, b in chunk_spans(text, target)) if t]


# ------------------------------------------------------------------------------------------ documents

def document(obj: Any, where: str) -> dict:
    """One document from a parsed JSON value: {"kind", "text"} (kind default "text") or {"kind", "messages"}
    (kind default "chat")."""
    if not isinstance(obj, dict):
        raise MixqError(f"{where}: expected a JSON object with \"text\" or \"messages\"")
    kind = obj.get("kind")
    if kind is not None and not isinstance(kind, str):
        raise MixqError(f"{where}: \"kind\" must be a string")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise MixqError(f"{where}: \"messages\" must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content", ""), (str, type(None))):
                raise MixqError(f"{where}: message {j + 1} needs a string \"role\" and a string \"content\"")
        return {"kind": kind or "chat", "messages": msgs}
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise MixqError(f"{where}: \"text\" must be a non-empty string")
        return {"kind": kind or "text", "text": obj["text"]}
    raise MixqError(f"{where}: expected \"text\" or \"messages\" (found keys: {', '.join(map(str, obj)) or 'none'})")


def parse_documents(text: str, where: str) -> list[dict]:
    """The documents of a JSON-lines text, one object a line."""
    return [document(obj, at) for at, obj in json_lines(text, where)]


def read_documents(path: str | os.PathLike) -> list[dict]:
    """Documents from a .jsonl of {"text"} / {"messages"} lines or a .txt (split at blank lines, short
    paragraphs merged to about TXT_TARGET_CHARS characters); no documents is an error."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise MixqError(f"{p}: calibration data must be a .jsonl or .txt file")
    text = read_utf8(p)
    docs = parse_documents(text, str(p)) if suffix == ".jsonl" else \
        [{"kind": "text", "text": t} for t in chunk_text(text, TXT_TARGET_CHARS)]
    if not docs:
        raise MixqError(f"{p}: no documents")
    return docs
