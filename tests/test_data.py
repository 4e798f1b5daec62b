"""Reading examples: every format gives the same examples; bad records are reported with file, line and field."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm2slm_cli.data import Example, Fields, length_sorted_batches, pad, read_examples
from llm2slm_cli.errors import UserError

ROWS = [{"id": "a", "src": "Hello world", "tgt": "Hallo Welt"},
        {"id": "b", "src": "Good morning, Sir", "tgt": "Guten Morgen, mein Herr"}]
EXPECTED = [Example("a", "Hello world", "Hallo Welt"), Example("b", "Good morning, Sir", "Guten Morgen, mein Herr")]


def test_every_format_reads_the_same_examples(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    for name, delim in (("d.csv", ","), ("d.tsv", "\t")):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "src", "tgt"], delimiter=delim)
            w.writeheader()
            w.writerows(ROWS)
    for name in ("d.jsonl", "d.json", "d.parquet", "d.csv", "d.tsv"):
        assert read_examples([tmp_path / name]) == EXPECTED, name
    (tmp_path / "d.en").write_text("Hello world\nGood morning, Sir\n")
    (tmp_path / "d.de").write_text("Hallo Welt\nGuten Morgen, mein Herr\n")
    pairs = read_examples([tmp_path / "d.en", tmp_path / "d.de"])
    assert [(e.id, e.prompt, e.target) for e in pairs] == [("0", "Hello world", "Hallo Welt"),
                                                            ("1", "Good morning, Sir", "Guten Morgen, mein Herr")]


def test_template_and_nested_fields(tmp_path):
    rows = [{"translation": {"en": "Hi", "de": "Hallo"}}]
    (tmp_path / "d.jsonl").write_text(json.dumps(rows[0]) + "\n")
    fields = Fields(prompt="translation.en", target="translation.de", template="translate English to German: "
                                                                                "{translation[en]}")
    assert read_examples([tmp_path / "d.jsonl"], fields) == [Example("0", "translate English to German: Hi",
                                                                      "Hallo")]
    plain = Fields(prompt="translation.en", target="translation.de")
    assert read_examples([tmp_path / "d.jsonl"], plain) == [Example("0", "Hi", "Hallo")]


@pytest.mark.parametrize("content,message", [
    (b'{"src": "a"}\n[1, 2]\n', "line 2: expected a JSON object"),
    (b'{"src": "a"}\n{"src": 3.5}\n{"src": ["x"]}\n', "line 3, field 'src': expected text, got list"),
    (b'{"src": "a", "id": "x"}\n{"src": "b", "id": "x"}\n', "line 2, field 'id': duplicate id 'x'"),
    (b'{"src": "a"}\n{"src": "\xff\xfe"}\n', "line 2: invalid UTF-8"),
    (b'\n\n', "no examples"),
])
def test_bad_records(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        read_examples([path])


def test_line_count_mismatch_and_template_errors(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\n")
    (tmp_path / "a.de").write_text("eins\n")
    with pytest.raises(UserError, match="line count 2 differs from 1"):
        read_examples([tmp_path / "a.en", tmp_path / "a.de"])
    (tmp_path / "d.jsonl").write_text('{"src": "x"}\n')
    with pytest.raises(UserError, match="names no field"):
        read_examples([tmp_path / "d.jsonl"], Fields(template="no fields here"))
    with pytest.raises(UserError, match="field 'article': missing field"):
        read_examples([tmp_path / "d.jsonl"], Fields(template="summarize: {article}"))


def test_csv_errors_name_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,src,tgt\n1,a,b\n2,c,d,extra\n")
    with pytest.raises(UserError, match=r"line 3: 4 values, but the header \(line 1\) has 3 columns"):
        read_examples([path])


def test_pad_and_batches():
    ids, mask = pad([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad([[5, 6, 7], [8]], 0, left=True)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert length_sorted_batches([1, 5, 3, 5], 2) == [[1, 3], [2, 0]]


def test_byte_order_marks_crlf_and_blank_lines_are_tolerated(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "d.jsonl").write_bytes(bom + b"".join(json.dumps(r).encode() + b"\r\n\r\n" for r in ROWS))
    (tmp_path / "d.ndjson").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in ROWS))
    (tmp_path / "d.json").write_bytes(bom + b" \r\n" + json.dumps(ROWS, indent=2).encode())
    (tmp_path / "d.csv").write_bytes(bom + b'id,src,tgt\r\na,Hello world,Hallo Welt\r\n\r\n'
                                     b'b,"Good morning, Sir","Guten Morgen, mein Herr"\r\n')
    for name in ("d.jsonl", "d.ndjson", "d.json", "d.csv"):
        assert read_examples([tmp_path / name]) == EXPECTED, name
    (tmp_path / "d.txt").write_bytes(bom + b"Hello world\r\nGood morning, Sir\r\n")
    assert [e.prompt for e in read_examples([tmp_path / "d.txt"])] == ["Hello world", "Good morning, Sir"]


def test_examples_know_where_they_came_from(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"src": "a"}\n\n{"src": "b"}\n')
    (tmp_path / "d.json").write_text('[{"src": "a"},\n {"src": "b"}]')
    pq.write_table(pa.table({"src": ["a", "b"]}), tmp_path / "d.parquet")
    assert [e.place for e in read_examples([tmp_path / "d.jsonl"])] == ["line 1", "line 3"]
    assert [e.place for e in read_examples([tmp_path / "d.json"])] == ["line 1, row 0", "line 2, row 1"]
    assert [e.place for e in read_examples([tmp_path / "d.parquet"])] == ["row 0", "row 1"]


def test_numbered_ids_that_collide_with_given_ones_say_so(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"src": "a", "id": 1}\n{"src": "b"}\n')
    with pytest.raises(UserError, match=r"line 2, field 'id': duplicate id '1' \(a record without 'id' is "
                                        r"numbered from 0\) \(first at line 1\)"):
        read_examples([path])


def test_error_messages_stay_on_one_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a\\nb": 1, "c\\rd": 2}\n')
    with pytest.raises(UserError) as e:
        read_examples([path])
    assert e.value.message == f"{path}, line 1, field 'src': missing field (the record has: 'a\\nb', 'c\\rd')"
    assert UserError("two\nlines", path="p").message == "p: two lines"


def test_distill_labels_directory(tmp_path):
    from llm2slm_cli import artifacts as A

    labels = tmp_path / "labels"
    labels.mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["p", "q", "r"], "target": ["t", "", None]}),
                   labels / A.LABELS)
    (labels / A.MANIFEST).write_text(json.dumps({"kind": A.KIND_LABELS, "schema_version": A.SCHEMA_VERSION,
                                                 "template": None}))
    assert read_examples([labels]) == [Example("a", "p", "t"), Example("b", "q", ""), Example("c", "r", None)]
    assert read_examples([labels], require_target=True) == [Example("a", "p", "t")]
    pq.write_table(pa.table({"id": ["a", "a"], "prompt": ["p", "q"], "target": ["t", "u"]}), labels / A.LABELS)
    with pytest.raises(UserError, match=r"examples.parquet, row 1, field 'id': duplicate id 'a'"):
        read_examples([labels])
    pq.write_table(pa.table({"id": ["a"], "prompt": ["p"]}), labels / A.LABELS)
    with pytest.raises(UserError, match="examples.parquet: missing column target"):
        read_examples([labels])
