"""Calibration documents, held-out text, and fixed-length token windows over them.

Documents are the built-in mix (`mixq/data/calibration.jsonl`) or the user's .jsonl / .txt file (read by
mixq.core.textdata); held-out documents come from the corpus held-out split or the shipped
`mixq/data/heldout.txt`. What the shipped files hold, and how they are regenerated
(`python -m mixq.quant.calibration build-builtin` / `build-heldout`), is mixq.quant.calibration_build.

Windows: every window starts at a document start (BOS for text documents, the chat template's first token
for chat ones); a document shorter than the window is followed by the next document in the order, a
longer one is cut. The order interleaves kinds (prose, code, ja, chat, ...) so even a handful of windows
covers every kind; within a kind documents are shuffled by the seed. When the documents run out the order
starts again (reshuffled); `to_dict()["repeats"]` then says so. Held-out windows take the documents in
order (no seed) and `to_dict()["source"]` says which held-out text was used.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx
import numpy as np

from mixq.core.errors import MixqError
from mixq.core.textdata import HELDOUT_NAME, parse_documents, read_data_text, read_documents
from mixq.core.textdata import read_heldout_sections  # also imported from here (tests/demo)
from mixq.core.tokenizer import THINK_CLOSE, THINK_OPEN
from mixq.quant.calibration_build import BUILTIN_NAME, heldout_documents_from, resolve_corpus_dir
from mixq.quant.calibration_build import main  # `python -m mixq.quant.calibration build-builtin | build-heldout`

KIND_ORDER = ("prose", "code", "ja", "chat")


# ------------------------------------------------------------------------------------------- documents

def load_documents(path: str | os.PathLike | None = None) -> list[dict]:
    """Calibration documents: None -> the built-in mix; a .jsonl of {"text"} / {"messages"} lines; a .txt
    (documents split on blank lines, short paragraphs merged to about 512 characters).

    Each document is {"kind": str, "text": str} or {"kind": str, "messages": [...]}. Any problem with the
    file raises MixqError with one line saying what and where.
    """
    if path is None:
        return parse_documents(read_data_text(BUILTIN_NAME), f"mixq/data/{BUILTIN_NAME}")
    return read_documents(path)


# ----------------------------------------------------------------------------------------------- render

def _has_chat_template(tokenizer) -> bool:
    has = getattr(tokenizer, "has_chat_template", None)
    if isinstance(has, bool):
        return has
    return bool(getattr(tokenizer, "chat_template", None))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def render_chat_text(messages: list[dict], tokenizer) -> str:
    """A conversation as the model sees it: the chat template up to the last assistant turn, then that
    turn's content (reasoning included) and the eos token.

    The generation prompt may already open the reasoning block (`<think>\\n`): a leading `<think>` in the
    content is then dropped so it appears once; content with no reasoning gets an empty block closed. Under
    a prompt that renders a closed empty block (`/no_think`) any reasoning in the content is dropped.
    Earlier assistant turns are rendered by the template (which may strip their reasoning, as at
    inference). Only the last assistant turn's `content` is appended (not its tool calls). A conversation
    not ending in an assistant turn is rendered by the template alone. Without a chat template the turns
    are written as plain "role: content" lines.
    """
    eos = getattr(tokenizer, "eos_token", None) or ""
    if not _has_chat_template(tokenizer):
        lines = []
        for m in messages:
            c = m.get("content") or ""
            if m["role"] == "assistant" and THINK_CLOSE in c:
                c = c.split(THINK_CLOSE)[-1].lstrip()
            lines.append(f"{m['role']}: {c}")
        return "\n".join(lines) + eos
    last = messages[-1]
    try:
        if last["role"] != "assistant":
            return tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja errors: a template that rejects these roles / this order
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MixqError(f"the chat template cannot render a calibration conversation: {first}") from e
    content = last.get("content") or ""
    tail = prompt.rstrip()
    if tail.endswith(THINK_OPEN + THINK_CLOSE):
        body = content.split(THINK_CLOSE, 1)[1].lstrip() if THINK_CLOSE in content else content
    elif tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE):
        body = content
        if body.lstrip().startswith(THINK_OPEN):
            body = body.lstrip()[len(THINK_OPEN):]
            if prompt.endswith("\n") and body.startswith("\n"):
                body = body[1:]
        elif THINK_CLOSE not in body:
            body = f"{THINK_CLOSE}\n{body}"
    else:
        body = content
    return prompt + body + eos


def render(doc: dict, tokenizer) -> list[int]:
    """Token ids of one document: text -> BOS (when the tokenizer has a bos_token) + encode(text); chat ->
    render_chat_text encoded without adding special tokens (BOS only if the template writes it; with no
    chat template the plain transcript is treated like text). `tokenizer` is mlx-lm's TokenizerWrapper or a
    Hugging Face tokenizer."""
    bos = _bos_id(tokenizer)
    if "messages" in doc:
        ids = _encode(tokenizer, render_chat_text(doc["messages"], tokenizer))
        if _has_chat_template(tokenizer) or bos is None:
            return ids  # the template decides whether a conversation starts with BOS
        return [bos] + ids
    return ([bos] if bos is not None else []) + _encode(tokenizer, doc["text"])


def _bos_id(tokenizer) -> int | None:
    if getattr(tokenizer, "bos_token", None) is None:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos) if bos is not None else None


# ---------------------------------------------------------------------------------------------- windows

@dataclass
class Windows:
    """n fixed-length token windows (int32, (n, seq_len)) and where they came from."""

    tokens: mx.array
    sha256: str
    seq_len: int
    seed: int | None
    source: str
    kinds: dict[str, int] = field(default_factory=dict)  # tokens per document kind
    documents: int = 0  # distinct documents used
    repeats: bool = False  # some document was used more than once

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    def to_dict(self) -> dict:
        return {"n": self.n, "seq_len": self.seq_len, "seed": self.seed, "source": self.source,
                "kinds": dict(self.kinds), "documents": self.documents, "repeats": self.repeats,
                "sha256": self.sha256}


def _kind_groups(docs: list[dict]) -> list[list[int]]:
    kinds = sorted({d.get("kind", "text") for d in docs},
                   key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k))
    return [[i for i, d in enumerate(docs) if d.get("kind", "text") == k] for k in kinds]


def _round_robin(groups: list[list[int]]) -> list[int]:
    out = []
    for j in range(max((len(g) for g in groups), default=0)):
        out += [g[j] for g in groups if j < len(g)]
    return out


def _order(docs: list[dict], rng: random.Random | None) -> Iterator[tuple[int, int]]:
    """Endless (doc index, epoch): kinds interleaved; shuffled within kind by rng, or (rng None) sources
    interleaved within a kind in document order."""
    groups = _kind_groups(docs)
    epoch = 0
    while True:
        per_kind = []
        for g in groups:
            if rng is not None:
                g = list(g)
                rng.shuffle(g)
            else:
                srcs: dict[str, list[int]] = {}
                for i in g:
                    srcs.setdefault(docs[i].get("source", ""), []).append(i)
                g = _round_robin(list(srcs.values()))
            per_kind.append(g)
        for i in _round_robin(per_kind):
            yield i, epoch
        epoch += 1


def _windows(docs: list[dict], tokenizer, n_samples: int, seq_len: int, seed: int | None,
             source: str, shuffle: bool) -> Windows:
    if not docs:
        raise MixqError("no calibration documents")
    if int(n_samples) < 1:
        raise MixqError(f"n_samples must be >= 1 (got {n_samples})")
    if int(seq_len) < 2:
        raise MixqError(f"seq_len must be >= 2 (got {seq_len})")
    n_samples, seq_len = int(n_samples), int(seq_len)
    order = _order(docs, random.Random(seed) if shuffle else None)
    cache: dict[int, list[int]] = {}
    out = np.zeros((n_samples, seq_len), dtype=np.int32)
    kinds: Counter = Counter()
    used: set[int] = set()
    repeats = False
    for w in range(n_samples):
        row: list[int] = []
        empty = 0
        while len(row) < seq_len:
            i, epoch = next(order)
            if i not in cache:
                cache[i] = render(docs[i], tokenizer)
            ids = cache[i]
            if not ids:
                empty += 1
                if empty > len(docs):
                    raise MixqError("no calibration document renders to any tokens")
                continue
            repeats |= epoch > 0
            used.add(i)
            take = ids[: seq_len - len(row)]
            row += take
            kinds[docs[i].get("kind", "text")] += len(take)
        out[w] = row
    h = hashlib.sha256(json.dumps({"n": n_samples, "seq_len": seq_len, "seed": seed}, sort_keys=True).encode())
    h.update(out.astype("<i4").tobytes())
    return Windows(tokens=mx.array(out), sha256=h.hexdigest(), seq_len=seq_len, seed=seed, source=source,
                   kinds=dict(sorted(kinds.items())), documents=len(used), repeats=repeats)


def make_windows(docs: list[dict], tokenizer, n_samples: int, seq_len: int, seed: int = 0, *,
                 source: str = "documents") -> Windows:
    """n_samples windows of seq_len tokens from docs (see the module docstring); deterministic for the seed."""
    return _windows(docs, tokenizer, n_samples, seq_len, seed, source, shuffle=True)


def calibration_windows(path: str | os.PathLike | None, tokenizer, n_samples: int, seq_len: int,
                        seed: int = 0) -> Windows:
    """load_documents(path) then make_windows, with the source recorded ("builtin" or the path)."""
    return make_windows(load_documents(path), tokenizer, n_samples, seq_len, seed,
                        source="builtin" if path is None else str(path))


def heldout_documents(corpus_dir: str | os.PathLike | None = None, *,
                      use_package: bool = False) -> tuple[list[dict], str]:
    """Held-out documents and their source: the corpus held-out split when a corpus dir is found (an
    explicit corpus_dir must exist), else, or with use_package, the shipped heldout.txt."""
    from mixq.core.corpus import load_corpus

    d = None
    if not use_package:
        try:
            d = resolve_corpus_dir(corpus_dir)
        except MixqError:
            if corpus_dir is not None:
                raise
    if d is not None:
        files = load_corpus(d)
        return heldout_documents_from([(f.name, f.heldout) for f in files]), f"corpus:{d}"
    return heldout_documents_from(read_heldout_sections()), f"package:{HELDOUT_NAME}"


def heldout_windows(tokenizer, n_samples: int, seq_len: int, corpus_dir: str | os.PathLike | None = None, *,
                    use_package: bool = False) -> Windows:
    """Deterministic windows over held-out text (never calibration text); to_dict()["source"] says which
    ("corpus:DIR" or "package:heldout.txt"). Documents are taken in order, kinds and corpus files
    interleaved, no shuffling (seed is None)."""
    docs, source = heldout_documents(corpus_dir, use_package=use_package)
    return _windows(docs, tokenizer, n_samples, seq_len, None, source, shuffle=False)


if __name__ == "__main__":
    raise SystemExit(main())
