"""IFEval's verifiers: one function per instruction id of the official release (25 of them), with the
official checking rules (google-research/instruction_following_eval, reimplemented here).

`check(instruction_id, response, kwargs)` -> bool. An instruction id without a verifier, a missing
argument, an unknown relation or a language that cannot be identified raises `Uncheckable`: an
instruction that cannot be checked is an error, never a pass. `validate` runs the same argument checks
up front so a bad data file fails before any generation.

Language identification uses `langdetect` when it is installed (as the official code does); otherwise a
small built-in identifier: Unicode scripts, the letters that tell Cyrillic and Arabic-script languages
apart, and function-word counts for Latin-script and Devanagari languages. It covers every language code
of the official release; text it cannot place gives None, and a response that is not the asked language
fails.
"""

from __future__ import annotations

import json
import re
import unicodedata


class Uncheckable(ValueError):
    """An instruction that cannot be verified (unknown id, bad arguments, unidentifiable language)."""


RELATIONS = ("less than", "at least")


def _compare(count: int, relation: str, target: int) -> bool:
    if relation == "less than":
        return count < target
    if relation == "at least":
        return count >= target
    raise Uncheckable(f"unknown relation {relation!r} (expected one of {RELATIONS})")


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


_ABBREV = r"(?:Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|vs|etc|e\.g|i\.e|Inc|Ltd|Co|No|Fig)"


def count_sentences(text: str) -> int:
    """Sentences ended by . ! ? (or CJK 。！？), not counting abbreviations, decimals or initials."""
    t = re.sub(r"\b" + _ABBREV + r"\.", lambda m: m.group(0).replace(".", "<prd>"), text)
    t = re.sub(r"(\d)\.(\d)", r"\1<prd>\2", t)
    t = re.sub(r"\b([A-Z])\.(?=\s*[A-Z]\.)", r"\1<prd>", t)
    parts = re.split(r"(?<=[.!?。！？])[\"'”’)]*\s+|(?<=[。！？])", t.strip())
    return len([p for p in parts if re.search(r"\w", p)])


# ------------------------------------------------------------------------------------ language identity

LANGUAGES = ("en", "es", "pt", "ar", "hi", "fr", "ru", "de", "ja", "it", "bn", "uk", "th", "ur", "ta", "te",
             "bg", "ko", "pl", "he", "fa", "vi", "ne", "sw", "kn", "mr", "gu", "pa", "ml", "fi")

_SCRIPTS = [  # (first, last, script)
    (0x0041, 0x024F, "latin"), (0x0370, 0x03FF, "greek"), (0x0400, 0x04FF, "cyrillic"), (0x0590, 0x05FF, "hebrew"),
    (0x0600, 0x06FF, "arabic"), (0x0750, 0x077F, "arabic"), (0x0900, 0x097F, "devanagari"), (0x0980, 0x09FF, "bn"),
    (0x0A00, 0x0A7F, "pa"), (0x0A80, 0x0AFF, "gu"), (0x0B80, 0x0BFF, "ta"), (0x0C00, 0x0C7F, "te"),
    (0x0C80, 0x0CFF, "kn"), (0x0D00, 0x0D7F, "ml"), (0x0E00, 0x0E7F, "th"), (0x1E00, 0x1EFF, "latin"),
    (0x3040, 0x30FF, "kana"), (0x4E00, 0x9FFF, "han"), (0xAC00, 0xD7AF, "ko"), (0x1100, 0x11FF, "ko"),
]

_FUNCTION_WORDS = {
    "en": "the and of to is in that it was for with as on are this be have not you",
    "es": "el la de que y en los las es un una por con para del se no su al lo como",
    "pt": "o a de que e do da em um uma para com não os as por se na no é mais",
    "fr": "le la les de des et est un une que pour dans en du pas qui sur au avec",
    "de": "der die das und ist nicht ein eine zu den mit sich von auf für im dem des",
    "it": "il la di che e un una per non sono del della con è gli le nel si anche",
    "pl": "i w nie na się jest to z że do jak co o ale tak być są od po",
    "vi": "và của là có không một những được các cho trong người này với đã",
    "sw": "na ya wa kwa ni za la katika hii kuwa yake au lakini sana hiyo watu",
    "fi": "ja on ei se että hän oli ovat mutta tai kun myös joka ole mitä niin",
}
_DEVANAGARI_WORDS = {"hi": "है और के की में से को का यह हैं था नहीं",
                     "mr": "आहे आणि या हे ते की आहेत होते व ला ने त्या",
                     "ne": "छ र को मा हो पनि गर्न भएको छन् यो त्यो लागि"}


def _script_counts(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ch in text:
        if not ch.isalpha():
            continue
        cp = ord(ch)
        for lo, hi, name in _SCRIPTS:
            if lo <= cp <= hi:
                counts[name] = counts.get(name, 0) + 1
                break
    return counts


def _word_vote(text: str, table: dict[str, str]) -> str | None:
    words = re.findall(r"\w+", text.lower())
    scores = {lang: sum(1 for w in words if w in set(ws.split())) for lang, ws in table.items()}
    best = max(scores, key=scores.get)
    return best if scores[best] > 0 else None


def detect_language(text: str) -> str | None:
    """An ISO 639-1 code from LANGUAGES (or langdetect's code when it is installed), None if unsure."""
    try:
        import langdetect  # optional, as in the official implementation

        try:
            return langdetect.detect(text)
        except langdetect.LangDetectException:
            return None
    except ImportError:
        pass
    counts = _script_counts(text)
    if not counts:
        return None
    script = max(counts, key=counts.get)
    if script in ("kana", "han"):
        return "ja" if counts.get("kana", 0) else None  # Chinese is not among IFEval's languages
    if script == "cyrillic":
        if re.search(r"[іїєґ]", text, re.I):
            return "uk"
        if re.search(r"[ыэё]", text, re.I):
            return "ru"
        return "bg" if re.search(r"ъ", text, re.I) else "ru"
    if script == "arabic":
        if re.search(r"[ٹڈڑںےۓ]", text):
            return "ur"
        if re.search(r"[پچژگ]", text) or re.search(r"[یک]", text):
            return "fa"
        return "ar"
    if script == "hebrew":
        return "he"
    if script == "devanagari":
        return _word_vote(text, _DEVANAGARI_WORDS) or "hi"
    if script == "latin":
        stripped = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) == "Mn")
        if re.search(r"[ăđơư]", text, re.I) or len(stripped) > 0.15 * counts["latin"]:
            return "vi"
        return _word_vote(text, _FUNCTION_WORDS)
    return script if script in LANGUAGES else None


# ----------------------------------------------------------------------------------------- the checks

def _keywords_existence(r, keywords):
    return all(re.search(re.escape(k), r, flags=re.I) for k in keywords)


def _keywords_frequency(r, keyword, frequency, relation):
    return _compare(len(re.findall(re.escape(keyword), r, flags=re.I)), relation, int(frequency))


def _forbidden_words(r, forbidden_words):
    return not any(re.search(r"\b" + re.escape(w) + r"\b", r, flags=re.I) for w in forbidden_words)


def _letter_frequency(r, letter, let_frequency, let_relation):
    return _compare(r.lower().count(letter.lower()), let_relation, int(let_frequency))


def _response_language(r, language):
    if language not in LANGUAGES:
        raise Uncheckable(f"language {language!r} cannot be identified")
    return detect_language(r) == language


def _number_sentences(r, num_sentences, relation):
    return _compare(count_sentences(r), relation, int(num_sentences))


def _number_paragraphs(r, num_paragraphs):
    paragraphs = re.split(r"\s?\*\*\*\s?", r)
    n = len(paragraphs)
    for i, p in enumerate(paragraphs):
        if not p.strip():
            if i in (0, len(paragraphs) - 1):
                n -= 1
            else:
                return False
    return n == int(num_paragraphs)


def _number_words(r, num_words, relation):
    return _compare(count_words(r), relation, int(num_words))


def _nth_paragraph_first_word(r, num_paragraphs, nth_paragraph, first_word):
    paragraphs = re.split(r"\n\n", r)
    n = sum(1 for p in paragraphs if p.strip())
    nth = int(nth_paragraph)
    if nth < 1 or nth > len(paragraphs):
        return False
    p = paragraphs[nth - 1].strip()
    if not p:
        return False
    word = p.split()[0].strip().lstrip("'").lstrip('"')
    got = ""
    for ch in word:
        if ch in ".,?!'\"":
            break
        got += ch.lower()
    return n == int(num_paragraphs) and got == first_word.lower()


def _number_placeholders(r, num_placeholders):
    return len(re.findall(r"\[.*?\]", r)) >= int(num_placeholders)


def _postscript(r, postscript_marker):
    m = postscript_marker.strip()
    low = r.lower()
    if m == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif m == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(m.lower()) + r".*$"
    return bool(re.findall(pattern, low, flags=re.M))


def _bullet_lists(r, num_bullets):
    stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.M)
    dashes = re.findall(r"^\s*-.*$", r, flags=re.M)
    return len(stars) + len(dashes) == int(num_bullets)


def _constrained_response(r):
    return any(o in r.strip() for o in ("My answer is yes.", "My answer is no.", "My answer is maybe."))


def _highlighted_sections(r, num_highlights):
    single = [h for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double) >= int(num_highlights)


def _multiple_sections(r, section_spliter, num_sections):
    sections = re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", r)
    return len(sections) - 1 >= int(num_sections)


def _json_format(r):
    v = r.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        if v.startswith(prefix):
            v = v[len(prefix):]
            break
    v = v.removesuffix("```").strip()
    try:
        json.loads(v)
    except ValueError:
        return False
    return True


def _title(r):
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r))


def _two_responses(r):
    parts = r.split("******")
    valid = []
    for i, p in enumerate(parts):
        if not p.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            valid.append(p)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def _repeat_prompt(r, prompt_to_repeat):
    return r.strip().lower().startswith(prompt_to_repeat.strip().lower())


def _end_checker(r, end_phrase):
    return r.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def _capital_word_frequency(r, capital_frequency, capital_relation):
    words = re.findall(r"\w+", r)
    return _compare(sum(1 for w in words if w.isupper()), capital_relation, int(capital_frequency))


def _english_capital(r):
    return r.isupper() and detect_language(r) == "en"


def _english_lowercase(r):
    return r.islower() and detect_language(r) == "en"


def _no_comma(r):
    return "," not in r


def _quotation(r):
    v = r.strip()
    return len(v) > 1 and v[0] == '"' and v[-1] == '"'


# instruction id -> (verifier, required kwargs)
CHECKS = {
    "keywords:existence": (_keywords_existence, ("keywords",)),
    "keywords:frequency": (_keywords_frequency, ("keyword", "frequency", "relation")),
    "keywords:forbidden_words": (_forbidden_words, ("forbidden_words",)),
    "keywords:letter_frequency": (_letter_frequency, ("letter", "let_frequency", "let_relation")),
    "language:response_language": (_response_language, ("language",)),
    "length_constraints:number_sentences": (_number_sentences, ("num_sentences", "relation")),
    "length_constraints:number_paragraphs": (_number_paragraphs, ("num_paragraphs",)),
    "length_constraints:number_words": (_number_words, ("num_words", "relation")),
    "length_constraints:nth_paragraph_first_word": (_nth_paragraph_first_word,
                                                    ("num_paragraphs", "nth_paragraph", "first_word")),
    "detectable_content:number_placeholders": (_number_placeholders, ("num_placeholders",)),
    "detectable_content:postscript": (_postscript, ("postscript_marker",)),
    "detectable_format:number_bullet_lists": (_bullet_lists, ("num_bullets",)),
    "detectable_format:constrained_response": (_constrained_response, ()),
    "detectable_format:number_highlighted_sections": (_highlighted_sections, ("num_highlights",)),
    "detectable_format:multiple_sections": (_multiple_sections, ("section_spliter", "num_sections")),
    "detectable_format:json_format": (_json_format, ()),
    "detectable_format:title": (_title, ()),
    "combination:two_responses": (_two_responses, ()),
    "combination:repeat_prompt": (_repeat_prompt, ("prompt_to_repeat",)),
    "startend:end_checker": (_end_checker, ("end_phrase",)),
    "change_case:capital_word_frequency": (_capital_word_frequency, ("capital_frequency", "capital_relation")),
    "change_case:english_capital": (_english_capital, ()),
    "change_case:english_lowercase": (_english_lowercase, ()),
    "punctuation:no_comma": (_no_comma, ()),
    "startend:quotation": (_quotation, ()),
}
_RELATION_ARGS = {"relation", "let_relation", "capital_relation"}


def validate(instruction_id: str, kwargs: dict | None) -> dict:
    """The arguments the verifier takes (None values dropped, as in the Hugging Face copy); raises
    Uncheckable for an unknown id, a missing argument, an unknown relation or language."""
    if instruction_id not in CHECKS:
        raise Uncheckable(f"no verifier for instruction {instruction_id!r}")
    _, needed = CHECKS[instruction_id]
    args = {k: v for k, v in (kwargs or {}).items() if v is not None}
    missing = [k for k in needed if k not in args]
    if missing:
        raise Uncheckable(f"{instruction_id}: missing argument(s) {', '.join(missing)}")
    for k in _RELATION_ARGS & set(needed):
        if args[k] not in RELATIONS:
            raise Uncheckable(f"{instruction_id}: unknown relation {args[k]!r}")
    if instruction_id == "language:response_language" and args["language"] not in LANGUAGES:
        raise Uncheckable(f"{instruction_id}: language {args['language']!r} cannot be identified")
    return {k: args[k] for k in needed}


def check(instruction_id: str, response: str, kwargs: dict | None = None) -> bool:
    fn, _ = CHECKS.get(instruction_id, (None, ()))
    args = validate(instruction_id, kwargs)
    return bool(fn(response, **args))
