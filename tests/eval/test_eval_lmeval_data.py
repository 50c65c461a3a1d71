"""Official files -> the local datasets lm-eval's own configs read; the task directory: lm-eval's configs
with only the data source changed, groups cut to the subtasks with data, no fallback to other data."""

import gzip
import json

import pytest
import yaml

from mixq.core.errors import MixqError
from mixq.eval.lmeval import data, hashhop, taskdir


def test_wikitext_pages_cut_at_top_level_headings():
    raw = " \n = First = \n \n text one \n = = Section = = \n more \n \n = Second = \n \n text two \n"
    pages = data.wikitext_pages(raw)
    assert len(pages) == 2
    assert pages[0] == " = First = \n \n text one \n = = Section = = \n more \n "
    assert pages[1].startswith(" = Second = ") and "text two" in pages[1]
    assert "".join(p + "\n" for p in pages).replace(" \n", "").strip()  # nothing but text


def _mmlu(root, dev_rows=5):
    (root / "mmlu" / "data" / "dev").mkdir(parents=True)
    (root / "mmlu" / "data" / "test").mkdir()
    (root / "mmlu" / "data" / "dev" / "anatomy_dev.csv").write_text(
        "".join(f'"Q{i}, with comma?",a,b,c,d,A\n' for i in range(dev_rows)))
    (root / "mmlu" / "data" / "test" / "anatomy_test.csv").write_text('"T1?",w,x,y,z,D\n"T2?",w,x,y,z,B\n')


def test_official_layouts_convert_to_hub_fields(tmp_path):
    _mmlu(tmp_path)
    ds = data.prepare("cais/mmlu", str(tmp_path), tmp_path / "work")
    assert ds.configs == {"anatomy": {"test": 2, "dev": 5}} and not ds.sample
    rows = [json.loads(x) for x in (ds.path / "anatomy" / "test.jsonl").read_text().splitlines()]
    assert rows[0] == {"question": "T1?", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": 3}
    (tmp_path / "humaneval").mkdir()
    row = {"task_id": "T/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
           "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    (tmp_path / "humaneval" / "HumanEval.jsonl.gz").write_bytes(gzip.compress((json.dumps(row) + "\n").encode()))
    ds = data.prepare("openai/openai_humaneval", str(tmp_path), tmp_path / "work")
    assert ds.configs == {"default": {"test": 1}}
    same = data.prepare("openai/openai_humaneval", str(tmp_path), tmp_path / "work")
    assert same.path == ds.path  # content-addressed: converted once


@pytest.mark.parametrize("case,match", [
    ("no_wikitext", "wiki.test.raw not found"),
    ("bad_letter", "answer letter"),
    ("few_dev", "needs .*anatomy_dev.csv with 5"),
    ("gsm8k_no_train", "train.jsonl not found"),
    ("gsm8k_no_answer", "####"),
    ("ifeval_unknown", "ifeval"),
    ("not_a_dir", "not a directory"),
])
def test_bad_data_is_one_clear_error(tmp_path, case, match):
    path = {"no_wikitext": "EleutherAI/wikitext_document_level", "bad_letter": "cais/mmlu", "few_dev": "cais/mmlu",
            "gsm8k_no_train": "openai/gsm8k", "gsm8k_no_answer": "openai/gsm8k", "ifeval_unknown": "google/IFEval",
            "not_a_dir": "openai/gsm8k"}[case]
    root = tmp_path / "d"
    root.mkdir()
    if case == "bad_letter":
        _mmlu(root)
        (root / "mmlu" / "data" / "test" / "anatomy_test.csv").write_text('"T1?",w,x,y,z,E\n')
    if case == "few_dev":
        _mmlu(root, dev_rows=4)
    if case.startswith("gsm8k"):
        (root / "gsm8k").mkdir()
        (root / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "3"}) + "\n")
        if case == "gsm8k_no_answer":
            (root / "gsm8k" / "train.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 3"}) + "\n")
    if case == "ifeval_unknown":
        (root / "ifeval").mkdir()
        (root / "ifeval" / "input_data.jsonl").write_text(json.dumps(
            {"key": 1, "prompt": "p", "instruction_id_list": ["no:such_check"], "kwargs": [{}]}) + "\n")
    with pytest.raises(MixqError, match=match):
        data.prepare(path, str(root / "missing" if case == "not_a_dir" else root), tmp_path / "work")


def test_taskdir_keeps_lm_evals_configs_and_cuts_groups(tmp_path):
    td = taskdir.build(["mmlu", "humaneval", "ifeval", "wikitext"], None, tmp_path,
                       overrides={"mmlu": {"num_fewshot": 5}},
                       metric_kwargs={"mixq.eval.lmeval.code.pass_at_k": {"timeout": 3.0}})
    files = {p.name for p in td.path.iterdir()}
    assert {"_group_mmlu.yaml", "mmlu_anatomy.yaml"} - files == {"mmlu_anatomy.yaml"}  # no data: not written
    assert td.coverage["mmlu"] == (3, 57)
    builtin = taskdir.builtin_index()
    for name in ("mmlu_computer_security", "wikitext"):
        mine = yaml.safe_load((td.path / f"{name}.yaml").read_text().replace("!function ", ""))
        mine = {k: v for k, v in mine.items() if not str(v).startswith("lm_eval.tasks.")}
        theirs = builtin[name].cfg
        changed = {k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)}
        assert changed <= {"dataset_path", "num_fewshot", "include", "doc_to_target", "process_results",
                           "training_split", "validation_split"}, changed
        assert mine["dataset_path"].startswith(str(tmp_path))
    text = (td.path / "humaneval.yaml").read_text().replace("'", "")
    assert "!function mixq.eval.lmeval.code.pass_at_k" in text and "timeout: 3.0" in text
    assert "!function mixq.eval.lmeval.code.build_predictions" in text
    assert "!function mixq.eval.lmeval.ifeval.process_results" in (td.path / "ifeval.yaml").read_text().replace("'", "")
    assert "!function lm_eval.tasks.wikitext.preprocess_wikitext.process_results" in \
        (td.path / "wikitext.yaml").read_text().replace("'", "")
    with pytest.raises(MixqError, match="no anatomy data"):
        taskdir.build(["mmlu_anatomy"], None, tmp_path)
    with pytest.raises(MixqError, match="unknown lm-eval task"):
        taskdir.build(["hellaswag"], None, tmp_path)
    with pytest.raises(MixqError, match="wiki.test.raw not found"):
        taskdir.build(["wikitext"], str(tmp_path), tmp_path / "w2")  # a data dir without it: no fallback


def test_hashhop_as_published():
    import random

    prompt, start, target = hashhop.make_prompt(random.Random(0), 6, 3)
    lines = prompt.split("\n")
    assert len(lines) == 18 and all(len(x.split(" = ")) == 2 for x in lines)
    edges = {a: b.strip("'") for a, b in (x.split(" = ") for x in lines)}
    h = start
    for _ in range(3):
        h = edges[h]
    assert h == target and len(target) == 16 and target.isalpha()
    assert sum(x.endswith("'") for x in lines) == 6  # the chains' last links are quoted
    count = lambda s: len(s) // 3  # noqa: E731
    doc = hashhop.make_doc(count, 0, 2, 1000, 0)
    assert doc.tokens <= 1000 and doc.tokens > 800 and doc.target.endswith("'")
    assert doc.context.endswith(f"\n\nCOMPLETION:\nHops=2\n\nCoT=False\n\n{doc.context.rsplit(chr(10), 1)[1]}")
    assert doc == hashhop.make_doc(count, 0, 2, 1000, 0) and doc != hashhop.make_doc(count, 1, 2, 1000, 0)
    assert hashhop.parse_sizes("2k, 8192") == (2048, 8192)
    with pytest.raises(MixqError):
        hashhop.parse_sizes("tiny")
