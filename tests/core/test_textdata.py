"""Text files read by calibration and evaluation: documents, JSON lines, UTF-8, the shipped held-out sections."""

from __future__ import annotations

import pytest

from mixq.core import textdata as T
from mixq.core.errors import MixqError


# ------------------------------------------------------------------------------------------- documents

def test_jsonl_parsing(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "hello world"}\n\n{"kind": "code", "text": "x = 1"}\n'
                 '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
                 encoding="utf-8")
    docs = T.read_documents(p)
    assert [d["kind"] for d in docs] == ["text", "code", "chat"]
    assert docs[0]["text"] == "hello world" and docs[2]["messages"][1]["content"] == "yo"


def test_txt_parsing_splits_on_blank_lines_and_merges_short(tmp_path):
    long_par = ("A long paragraph sentence. " * 30).strip()
    p = tmp_path / "c.txt"
    p.write_text(f"short one.\n\nshort two.\n\n{long_par}\n\n{long_par}\n\n\n{long_par}\n", encoding="utf-8")
    docs = T.read_documents(str(p))
    assert all(d["kind"] == "text" for d in docs)
    assert docs[0]["text"].startswith("short one.\n\nshort two.\n\nA long")  # short ones merged forward
    assert len(docs) == 3 and docs[-1]["text"] == long_par


@pytest.mark.parametrize("name,content,needle", [
    ("missing.jsonl", None, "no such file"),
    ("bad.txt", b"caf\xe9 au lait\n", "not UTF-8"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "line 2: not valid JSON"),
    ("neither.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', 'line 2: expected "text" or "messages"'),
    ("notobj.jsonl", b'["text"]\n', "line 1: expected a JSON object"),
    ("badmsg.jsonl", b'{"messages": [{"content": "no role"}]}\n', "line 1: message 1 needs"),
    ("emptymsgs.jsonl", b'{"messages": []}\n', "non-empty list"),
    ("empty.jsonl", b"\n\n", "no documents"),
    ("data.csv", b"a,b\n", ".jsonl or .txt"),
])
def test_bad_files_raise_mixq_error(tmp_path, name, content, needle):
    p = tmp_path / name
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(MixqError) as e:
        T.read_documents(p)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


def test_a_directory_is_not_a_file(tmp_path):
    d = tmp_path / "d.txt"
    d.mkdir()
    with pytest.raises(MixqError, match="not a file"):
        T.read_utf8(d)


# ------------------------------------------------------------------------------------ utf-8, json lines

def test_utf8_drops_bom_keeps_line_ends_and_names_the_bad_byte():
    assert T.decode_utf8("\ufeffa\r\nb".encode("utf-8"), "x") == "a\r\nb"
    with pytest.raises(MixqError, match=r"^f\.txt: not UTF-8 text \(invalid byte at offset 3\)$"):
        T.decode_utf8(b"abc\xff", "f.txt")


def test_json_lines_name_the_line():
    assert list(T.json_lines('{"a": 1}\n\n[2]\n', "f")) == [("f: line 1", {"a": 1}), ("f: line 3", [2])]
    with pytest.raises(MixqError, match=r"^f: line 2: not valid JSON \("):
        list(T.json_lines('1\n{oops\n', "f"))


# ------------------------------------------------------------------------------------ held-out sections

def test_heldout_sections_of_text():
    text = "# comment\n=== mixq-heldout a sha256=00 ===\none\ntwo\n=== mixq-heldout b ===\nthree\n"
    assert T.read_heldout_sections(text) == [("a", "one\ntwo\n"), ("b", "three\n")]


def test_shipped_heldout_sections():
    sections = T.read_heldout_sections()
    assert {s for s, _ in sections} >= {"en_kjv", "en_botchan", "en_devils_dictionary", "en_pydocs_slice",
                                        "ja_wagahai"}
    assert all(body.strip() and body.endswith("\n") for _, body in sections)
    assert T.read_data_text(T.HELDOUT_NAME) == T.data_path(T.HELDOUT_NAME).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------- chunking

def test_chunks_cut_at_paragraphs_and_a_prefix_cuts_the_same():
    text = "".join(f"Paragraph {i} has a sentence or two. It ends here.\n\n" for i in range(40))
    spans = T.chunk_spans(text, 200)
    assert len(spans) > 5 and all(text[a:b].strip() for a, b in spans)
    assert all(text[b - 1] == "\n" for _, b in spans[:-1])
    end = spans[3][1]
    assert T.chunk_spans(text[:end], 200) == spans[:4]
    assert T.chunk_text(text, 200) == [text[a:b].rstrip() for a, b in spans]
