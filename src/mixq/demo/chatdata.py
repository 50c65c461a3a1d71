"""Synthetic chat turns for the demo model, built only from the corpus *train* split.

Every turn is rendered exactly as the shipped chat template renders a conversation
(ChatML, the assistant turn opens `<think>\\n`, or `<think></think>` under `/no_think`), followed by the
assistant's reasoning, `</think>`, the answer and `<|im_end|>`. No mlx import here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mixq.core.tokenizer import IM_END, IM_START, THINK_CLOSE, THINK_OPEN

POS_NAMES = {
    "n": "a noun", "v": "a verb", "v.t": "a transitive verb", "v.i": "an intransitive verb",
    "adj": "an adjective", "adv": "an adverb", "x": "a word", "pp": "a past participle",
    "pro": "a pronoun", "prep": "a preposition", "conj": "a conjunction", "interj": "an interjection",
}

_ENTRY = re.compile(r"^([A-Z][A-Z'\- ]{1,30}[A-Z]), ([a-z.]{1,6})\s+(.*)$")


@dataclass(frozen=True)
class Turn:
    user: str
    think: str  # empty: a /no_think turn
    answer: str
    system: str | None = None


def render_prompt(user: str, system: str | None = None, no_think: bool = False) -> str:
    """What `apply_chat_template(..., add_generation_prompt=True)` renders for one user turn."""
    s = ""
    if system is not None:
        s += f"{IM_START}system\n{system}{IM_END}\n"
    s += f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"
    no_think = no_think or (system is not None and "/no_think" in system)
    return s + (f"{THINK_OPEN}{THINK_CLOSE}" if no_think else f"{THINK_OPEN}\n")


def render_turn(t: Turn) -> str:
    """Prompt plus the assistant's completion, as the model should produce it."""
    no_think = not t.think
    s = render_prompt(t.user, t.system, no_think=no_think)
    if not no_think:
        s += f"{t.think}\n{THINK_CLOSE}\n"
    return s + f"{t.answer}{IM_END}\n"


def _first_sentences(text: str, max_chars: int = 160) -> str:
    text = " ".join(text.split())
    out = ""
    for sent in re.split(r"(?<=[.!?])\s+", text):
        if out and len(out) + len(sent) + 1 > max_chars:
            break
        out = f"{out} {sent}".strip()
    return out[: max_chars * 2]


def devils_entries(text: str) -> list[tuple[str, str, str]]:
    """(word, part of speech, definition) for every Devil's Dictionary entry in the text."""
    entries = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _ENTRY.match(lines[i])
        if not m:
            i += 1
            continue
        word, pos, rest = m.group(1).strip(), m.group(2).strip("."), m.group(3)
        body = [rest]
        i += 1
        while i < len(lines) and lines[i].strip() and not lines[i].startswith("    "):
            body.append(lines[i])
            i += 1
        definition = re.sub(r"\[[^\]]*\]", "", " ".join(body))
        definition = definition.replace("{", "").replace("}", "").replace("_", "")
        definition = _first_sentences(definition)
        if len(definition) >= 8:
            entries.append((word.title(), pos, definition))
    return entries


def devils_turns(text: str) -> list[Turn]:
    turns = []
    for k, (word, pos, definition) in enumerate(devils_entries(text)):
        kind = POS_NAMES.get(pos, "a word")
        q = ["What does the Devil's Dictionary say about {w}?", "Define {w}.",
             "What is {w}, according to Bierce?"][k % 3].format(w=word)
        turns.append(Turn(q, f"{word} is {kind}. Bierce defines it.", definition))
        turns.append(Turn(q, "", definition, system="/no_think"))
    return turns


def kjv_turns(text: str, every: int = 3) -> list[Turn]:
    turns = []
    lines = [ln.strip() for ln in text.splitlines() if 40 <= len(ln.strip()) <= 220]
    for k, verse in enumerate(lines[::every]):
        words = verse.split()
        cut = max(3, len(words) // 3)
        head, tail = " ".join(words[:cut]), " ".join(words[cut:])
        if k % 4 == 3:
            turns.append(Turn(f"Continue the verse: {head}", "", tail, system="/no_think"))
        else:
            turns.append(Turn(f"Continue the verse: {head}", "This is from the King James Bible.", tail))
    return turns


def japanese_turns(text: str) -> list[Turn]:
    sents = [s.strip() + "。" for s in re.split(r"。", text.replace("\n", "").replace("\u3000", ""))]
    sents = [s for s in sents if 6 <= len(s) <= 80]
    turns = []
    for k in range(0, len(sents) - 1, 2):
        if k % 8 == 6:
            turns.append(Turn(f"次の文の続きは？「{sents[k]}」", "", sents[k + 1], system="/no_think"))
        else:
            turns.append(Turn(f"次の文の続きは？「{sents[k]}」", "吾輩は猫であるの一節だ。", sents[k + 1]))
    return turns


def build_turns(train_texts: dict[str, str]) -> list[Turn]:
    """All synthetic turns from the train split of the corpus files (keyed by file stem)."""
    turns: list[Turn] = []
    if "en_devils_dictionary" in train_texts:
        turns += devils_turns(train_texts["en_devils_dictionary"])
    if "en_kjv" in train_texts:
        turns += kjv_turns(train_texts["en_kjv"])
    if "ja_wagahai" in train_texts:
        turns += japanese_turns(train_texts["ja_wagahai"])
    return turns
