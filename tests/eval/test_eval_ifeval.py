"""IFEval: every verifier on a response that follows and one that does not; uncheckable instructions are
errors; the shipped sample covers every instruction type; strict vs loose scoring."""

import json

import pytest

from mixq.core.errors import MixqError
from mixq.eval.lmeval import data
from mixq.eval.tasks._ifeval_checks import (CHECKS, Uncheckable, check, count_sentences, detect_language,
                                            validate)
from mixq.eval.lmeval.ifeval import agg_inst_level_acc, process_results

LONG = " ".join(["word"] * 60)

# (instruction id, kwargs, follows, does not follow)
CASES = [
    ("keywords:existence", {"keywords": ["practice", "patience"]}, "Practice with patience.", "Just practice."),
    ("keywords:frequency", {"keyword": "light", "relation": "at least", "frequency": 2},
     "Light scatters; blue light more.", "Light scatters."),
    ("keywords:frequency", {"keyword": "light", "relation": "less than", "frequency": 2}, "Light.", "light light"),
    ("keywords:forbidden_words", {"forbidden_words": ["cheap", "plastic"]},
     "A sturdy steel bottle (plasticity aside).", "Not cheap at all."),
    ("keywords:letter_frequency", {"letter": "r", "let_relation": "at least", "let_frequency": 3},
     "Run, Rabbit, run!", "Go now"),
    ("keywords:letter_frequency", {"letter": "z", "let_relation": "less than", "let_frequency": 2}, "zoo", "zizz"),
    ("language:response_language", {"language": "ja"}, "私は秋が一番好きです。紅葉がきれいだからです。",
     "I like autumn best."),
    ("language:response_language", {"language": "de"}, "Ich mag den Herbst, weil die Blätter nicht grün sind.",
     "Me gusta el otoño porque las hojas son de colores."),
    ("language:response_language", {"language": "ru"}, "Мне нравится осень, потому что вы любите её.",
     "Мені подобається осінь, бо листя жовтіє і їжак."),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "Dr. Smith paid 3.5 dollars. That is all.", "One. Two. Three."),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 2},
     "It is blue! Why? Light.", "Only one sentence here."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "One.\n***\nTwo.\n***\nThree.",
     "One.\n***\n\n***\nThree."),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 60}, LONG, "too short"),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 5}, "four words are here",
     "five words are right here"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "meanwhile"},
     "leaves fall.\n\n\"Meanwhile, the wind...\"", "leaves fall.\n\nthen the wind."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Send to [name] at [address].",
     "Send to [name]."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Bye.\n\nP.S. Bring boots.", "Bye. PS boots"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Bye.\nP.P.S more", "Bye.\nP.S. more"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "Tips:\n* one\n* two\n- three",
     "* one\n* two"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes, it is."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*bolts* and **gears**",
     "*bolts* and ** **"),
    ("detectable_format:multiple_sections", {"section_spliter": "Day", "num_sections": 2},
     "Day 1\nhike\nDay 2\nrest", "Day 1\nhike and rest"),
    ("detectable_format:json_format", {}, '```json\n{"mercury": "hot"}\n```', "{mercury: hot}"),
    ("detectable_format:title", {}, "<<The Tired Robot>>\nbeep", "The Tired Robot\nbeep"),
    ("combination:two_responses", {}, "Eggs.\n******\nOats.", "Eggs.\n******\nEggs."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "What is a good name for a grey cat?"},
     "What is a good name for a grey cat? Ash.", "Ash is a good name."),
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     "Water them daily. Is there anything else I can help with?", "Water them daily."),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 3},
     "RUN FAST and NEVER stop", "Run FAST"),
    ("change_case:capital_word_frequency", {"capital_relation": "less than", "capital_frequency": 2},
     "Run FAST", "RUN FAST"),
    ("change_case:english_capital", {}, "WE FIX THE BIKES THAT YOU LOVE.", "We fix the bikes that you love."),
    ("change_case:english_lowercase", {}, "the leaves fall and it is the season of gold.",
     "The leaves fall and it is the season of gold."),
    ("punctuation:no_comma", {}, "Please water the plants.", "Please, water the plants."),
    ("startend:quotation", {}, '  "A lighthouse hums."  ', '"A lighthouse hums.'),
]


@pytest.mark.parametrize("iid,kwargs,good,bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_verifier(iid, kwargs, good, bad):
    assert check(iid, good, kwargs) is True
    assert check(iid, bad, kwargs) is False


def test_every_verifier_has_cases():
    assert {c[0] for c in CASES} == set(CHECKS) and len(CHECKS) == 25


def test_uncheckable_is_an_error():
    with pytest.raises(Uncheckable):
        check("detectable_format:haiku", "anything", {})
    with pytest.raises(Uncheckable):
        validate("keywords:frequency", {"keyword": "x", "frequency": 2})           # no relation
    with pytest.raises(Uncheckable):
        validate("keywords:frequency", {"keyword": "x", "frequency": 2, "relation": "about"})
    with pytest.raises(Uncheckable):
        validate("language:response_language", {"language": "xx"})
    # the Hugging Face copy's None-filled kwargs are fine
    assert validate("punctuation:no_comma", {"num_words": None, "keywords": None}) == {}


def test_sample_file_covers_every_type_and_bad_files_fail(tmp_path):
    ds = data.prepare("google/IFEval", None, tmp_path / "work")
    rows = [json.loads(x) for x in (ds.path / "default" / "train.jsonl").read_text().splitlines()]
    assert {i for r in rows for i in r["instruction_id_list"]} == set(CHECKS)
    d = tmp_path / "ifeval"
    d.mkdir()
    row = {"key": 1, "prompt": "p", "instruction_id_list": ["detectable_format:limerick"], "kwargs": [{}]}
    (d / "input_data.jsonl").write_text(json.dumps(row))
    with pytest.raises(MixqError, match="no verifier"):
        data.prepare("google/IFEval", str(tmp_path), tmp_path / "work")
    row = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []}
    (d / "input_data.jsonl").write_text(json.dumps(row))
    with pytest.raises(MixqError, match="equal length"):
        data.prepare("google/IFEval", str(tmp_path), tmp_path / "work")


def test_strict_and_loose_as_lm_evals_process_results():
    doc = {"instruction_id_list": ["startend:quotation", "punctuation:no_comma"], "kwargs": json.dumps([{}, {}])}
    r = process_results(doc, ['Sure, here it is:\n"Quiet night"'])
    assert r == {"prompt_level_strict_acc": False, "inst_level_strict_acc": [False, False],
                 "prompt_level_loose_acc": True, "inst_level_loose_acc": [True, True]}
    empty = process_results({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, [""])
    assert empty["inst_level_strict_acc"] == [False]  # an empty response follows nothing
    assert agg_inst_level_acc([[True, False], [True]]) == pytest.approx(2 / 3)


def test_helpers():
    assert count_sentences("Mr. Brown paid 2.50 dollars. He left! Did he? Yes") == 4
    assert count_sentences("吾輩は猫である。名前はまだ無い。") == 2
    assert detect_language("Olá, eu não sei se você está em casa com os amigos.") == "pt"
    assert detect_language("Ciao, non so se sono a casa con gli amici della scuola.") == "it"
    assert detect_language("Tôi không biết bạn ở đâu.") == "vi"
    assert detect_language("مرحبا كيف حالك اليوم") == "ar"
    assert detect_language("سلام، حال شما چطور است؟ این کتاب خوب است") == "fa"
    assert detect_language("안녕하세요 반갑습니다") == "ko"
    assert detect_language("12345 !!!") is None
