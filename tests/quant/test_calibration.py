"""Calibration documents, chat rendering, token windows, and the shipped calibration / held-out text
(mixq.quant.calibration and mixq.quant.calibration_build)."""

import json
import re
from importlib import resources
from pathlib import Path

import mixq  # noqa: F401  (fast BLAS before mlx)
import pytest

from mixq.core.errors import MixqError
from mixq.core.tokenizer import THINK_OPEN
from mixq.quant import calibration as C
from mixq.quant import calibration_build as B


@pytest.fixture(scope="module")
def tok(nemotron_dense):
    from mlx_lm import load

    return load(str(nemotron_dense))[1]


@pytest.fixture(scope="module")
def builtin():
    return C.load_documents(None)


def _corpus():
    from mixq.core.corpus import find_corpus_dir

    try:
        return find_corpus_dir()
    except MixqError:
        return None


# ------------------------------------------------------------------------------------------- documents
# (file parsing and its errors: tests/core/test_textdata.py)

def test_load_documents_reads_the_users_file(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "hello world"}\n{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    assert [d["kind"] for d in C.load_documents(p)] == ["text", "chat"]
    with pytest.raises(MixqError, match="no such file"):
        C.load_documents(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------------ rendering

def test_text_render_starts_with_bos(tok):
    ids = C.render({"kind": "text", "text": "hello world"}, tok)
    assert ids[0] == tok.bos_token_id and ids[1:] == list(tok.encode("hello world", add_special_tokens=False))


def test_chat_render_think_once_and_eos_last(tok, builtin):
    chats = [d for d in builtin if d["kind"] == "chat"]
    assert len(chats) >= 50
    for d in chats:
        text = C.render_chat_text(d["messages"], tok)
        assert text.count(THINK_OPEN) == sum(m["role"] == "assistant" for m in d["messages"]) == 1, text
        assert text.endswith(tok.eos_token)
        ids = C.render(d, tok)
        assert ids[-1] == tok.eos_token_id
        assert ids == list(tok.encode(text, add_special_tokens=False))


def test_chat_render_variants(tok):
    user = [{"role": "user", "content": "Define x."}]
    # reasoning in the content: the template's opening <think>\n is not repeated
    t = C.render_chat_text(user + [{"role": "assistant", "content": "<think>\nhmm\n</think>\nX."}], tok)
    assert t.endswith("assistant\n<think>\nhmm\n</think>\nX.<|im_end|>") and t.count(THINK_OPEN) == 1
    # no reasoning: an empty block is closed
    t = C.render_chat_text(user + [{"role": "assistant", "content": "X."}], tok)
    assert t.endswith("<think>\n</think>\nX.<|im_end|>")
    # /no_think: the template renders the closed empty block; reasoning in the content is dropped
    sys_ = [{"role": "system", "content": "/no_think"}]
    t = C.render_chat_text(sys_ + user + [{"role": "assistant", "content": "<think>\nhmm\n</think>\nX."}], tok)
    assert t.endswith("<think></think>X.<|im_end|>") and "hmm" not in t


def test_hf_tokenizer_renders_the_same(tok, nemotron_dense, builtin):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(nemotron_dense))
    for d in builtin[::37]:
        assert C.render(d, hf) == C.render(d, tok)


def test_chat_without_template_or_with_a_failing_one(nemotron_dense):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(nemotron_dense))
    conv = {"kind": "chat", "messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "<think>\nr\n</think>\nyo"}]}
    hf.chat_template = None
    ids = C.render(conv, hf)
    assert ids[0] == hf.bos_token_id and hf.decode(ids[1:]) == "user: hi\nassistant: yo<|im_end|>"
    hf.chat_template = "{{ raise_exception('no assistant turns here') }}"
    with pytest.raises(MixqError, match="no assistant turns here"):
        C.render(conv, hf)


# -------------------------------------------------------------------------------------------- windows

def test_windows_shape_and_determinism(tok, builtin):
    import mlx.core as mx

    a = C.make_windows(builtin, tok, 6, 96, seed=0)
    b = C.make_windows(builtin, tok, 6, 96, seed=0)
    c = C.make_windows(builtin, tok, 6, 96, seed=1)
    assert a.tokens.shape == (6, 96) and a.tokens.dtype == mx.int32
    assert a.sha256 == b.sha256 and (a.tokens == b.tokens).all().item()
    assert a.sha256 != c.sha256 and re.fullmatch(r"[0-9a-f]{64}", a.sha256)
    d = a.to_dict()
    assert d["n"] == 6 and d["seq_len"] == 96 and d["sha256"] == a.sha256 and sum(d["kinds"].values()) == 6 * 96


def test_small_n_covers_every_kind_and_windows_start_documents(tok, builtin):
    w = C.make_windows(builtin, tok, 4, 32, seed=3)
    assert set(w.to_dict()["kinds"]) == {"prose", "code", "ja", "chat"}
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert all(int(r[0]) in (tok.bos_token_id, im_start) for r in w.tokens)


def test_short_documents_are_packed_and_reused(tok):
    docs = [{"kind": "text", "text": "a b c"}, {"kind": "text", "text": "d e f"}]
    w = C.make_windows(docs, tok, 3, 40, seed=0)
    assert w.to_dict()["repeats"] is True and w.to_dict()["documents"] == 2
    assert int((w.tokens[0] == tok.bos_token_id).sum()) > 1  # several documents in one window
    with pytest.raises(MixqError):
        C.make_windows([], tok, 1, 8, seed=0)
    with pytest.raises(MixqError):
        C.make_windows(docs, tok, 0, 8, seed=0)


def test_heldout_windows_from_package(tok, monkeypatch):
    w = C.heldout_windows(tok, 4, 64, use_package=True)
    assert w.to_dict()["source"] == "package:heldout.txt" and w.tokens.shape == (4, 64)
    assert w.sha256 == C.heldout_windows(tok, 4, 64, use_package=True).sha256

    from mixq.core import corpus

    def nowhere(explicit=None):
        raise MixqError("no corpus directory found")

    monkeypatch.setattr(corpus, "find_corpus_dir", nowhere)
    assert C.heldout_windows(tok, 4, 64).to_dict()["source"] == "package:heldout.txt"


def test_explicit_corpus_dir_must_exist(tok, tmp_path):
    with pytest.raises(MixqError, match="not a directory of .txt files"):
        C.heldout_windows(tok, 2, 16, corpus_dir=tmp_path / "nowhere")
    with pytest.raises(MixqError, match="not a directory of .txt files"):
        B.build_heldout(tmp_path, tmp_path / "h.txt")


@pytest.mark.skipif(_corpus() is None, reason="no offline corpus here")
def test_heldout_package_matches_corpus(tok):
    a = C.heldout_windows(tok, 8, 128, corpus_dir=_corpus())
    b = C.heldout_windows(tok, 8, 128, use_package=True)
    assert a.to_dict()["source"].startswith("corpus:")
    assert a.sha256 == b.sha256  # the shipped text is a verbatim prefix of the corpus held-out split


# ------------------------------------------------------------------------------------- shipped files

def _data(name):
    return Path(str(resources.files("mixq.data").joinpath(name)))


def test_builtin_file_has_all_kinds_and_fits(builtin):
    assert _data("calibration.jsonl").stat().st_size <= 400_000
    assert _data("heldout.txt").stat().st_size <= 200_000
    kinds = {}
    for d in builtin:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    assert set(kinds) == {"prose", "code", "ja", "chat"} and min(kinds.values()) >= 50
    for line in _data("calibration.jsonl").read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        assert obj["kind"] in kinds and ("text" in obj) != ("messages" in obj)


def test_heldout_text_not_in_calibration(builtin):
    cal = "\n".join(d.get("text") or "\n".join(m["content"] for m in d["messages"]) for d in builtin)
    sections = C.read_heldout_sections()
    assert {s for s, _ in sections} >= {"en_kjv", "en_botchan", "en_devils_dictionary", "en_pydocs_slice",
                                        "ja_wagahai"}
    checked = 0
    for name, text in sections:
        for i in range(0, len(text) - 80, 997):
            span = text[i:i + 80]
            if sum(ch.isalnum() for ch in span) < 40:
                continue
            checked += 1
            assert span not in cal, (name, span)
    assert checked > 50


@pytest.mark.skipif(_corpus() is None, reason="no offline corpus here")
def test_shipped_files_are_reproducible(tmp_path):
    a = B.build_builtin(_corpus(), tmp_path / "c.jsonl")
    assert a.read_bytes() == _data("calibration.jsonl").read_bytes()
    b = B.build_heldout(_corpus(), tmp_path / "h.txt")
    assert b.read_bytes() == _data("heldout.txt").read_bytes()


def test_regenerate_command_still_answers(tmp_path, capsys):
    """The shipped heldout.txt names `python -m mixq.quant.calibration build-heldout`."""
    assert C.main(["build-heldout", "--corpus", str(tmp_path / "nowhere"), "--out", str(tmp_path / "h.txt")]) == 2
    assert "not a directory of .txt files" in capsys.readouterr().err
