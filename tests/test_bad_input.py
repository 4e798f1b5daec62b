"""Bad input at the command line: exit code 2 and one line naming the place (file, line or row, field), before any
output is written; and stages refuse artifacts whose manifests do not fit their configuration."""

from __future__ import annotations

import gzip
import io
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import error_line as _error
from conftest import write_jsonl

from llm2slm_cli import artifacts as A

ROWS = [{"id": "a", "src": "hello there", "tgt": "x"}, {"id": "b", "src": "hi", "tgt": "y"}]



def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _bad_utf8_column() -> pa.Table:
    offsets = pa.py_buffer(b"\x00\x00\x00\x00\x02\x00\x00\x00")
    return pa.table({"src": pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(b"a\xff")])})


# (file name, contents, what the message must say after "error: <path>")
READER_CASES = [
    ("d.jsonl", b'{"src": "a"}\n{"src": "b",\n', ", line 2: malformed JSON (Expecting property name"),
    ("d.jsonl", b'{"src": "a"}\n{"src": ["b"]}\n', ", line 2, field 'src': expected text, got list"),
    ("d.jsonl", b'{"src": "a"}\n\n{"src": null}\n', ", line 3, field 'src': expected text, got null"),
    ("d.jsonl", b'{"src": " \\t "}\n', ", line 1, field 'src': empty prompt"),
    ("d.jsonl", b'{"src": "a"}\n{"src": "b\xff"}\n', ", line 2: invalid UTF-8 at column 11 (byte 0xff)"),
    ("d.jsonl", b'{"src": "a", "id": 1}\n{"src": "b", "id": "1"}\n',
     ", line 2, field 'id': duplicate id '1' (first at line 1)"),
    ("d.jsonl", b'{"src": "a", "id": ""}\n', ", line 1, field 'id': empty id"),
    ("d.jsonl", b'{"src": "a\\ud800"}\n', ", line 1, field 'src': invalid Unicode: a lone surrogate U+D800"),
    ("d.jsonl", b'{"src": NaN}\n', ", line 1: malformed JSON (NaN is not JSON)"),
    ("d.jsonl", b'{"text": "a"}\n', ", line 1, field 'src': missing field (the record has: text)"),
    ("d.jsonl", b"", ": no examples"),
    ("d.json", b'[\n  {"src": "a"},\n  {"src": "b", "id": 2},\n  {"src": true}\n]\n',
     ", line 4, row 2, field 'src': expected text, got bool"),
    ("d.json", b'[{"src": "a"}, 3]', ", line 1, row 1: expected a JSON object, got number"),
    ("d.json", b'{\n  "src": "a"\n}\n', ": one JSON object over several lines"),
    ("d.csv", b"id,src\n1,a\n2,b,c\n", ", line 3: 3 values, but the header (line 1) has 2 columns"),
    ("d.csv", b'id,src\n1,"a\n2,b\n', ", line 2: malformed CSV (a quoted value that never closes)"),
    ("d.csv", b"id,src\n1,\n", ", line 2, field 'src': empty prompt"),
    ("d.csv", b"\xef\xbb\xbfid,src\n1,ok\n2,\xc3(\n", ", line 3: invalid UTF-8 at column 3 (byte 0xc3)"),
    ("d.tsv", b"id\tsrc\n7\ta\n7\tb\n", ", line 3, field 'id': duplicate id '7' (first at line 2)"),
    ("d.txt", b"a\nb\x00c\n", ", line 2: NUL byte"),
    ("d.txt", "a\n".encode("utf-16"), ": UTF-16 text: convert it to UTF-8"),
    ("d.txt", gzip.compress(b"a\n"), ": this is gzip-compressed, not text"),
    ("d.parquet", _parquet(pa.table({"src": ["a", None]})), ", row 1, field 'src': expected text, got null"),
    ("d.parquet", _parquet(pa.table({"src": [{"en": "a"}]})), ", row 0, field 'src': expected text, got dict"),
    ("d.parquet", _parquet(pa.table({"src": ["a", "b"], "id": [1, 1]})),
     ", row 1, field 'id': duplicate id '1' (first at row 0)"),
    ("d.parquet", _parquet(_bad_utf8_column()), ", row 0, field 'src': invalid UTF-8"),
    ("d.parquet", b"PAR1 this is not parquet", ": not a readable Parquet file"),
]


@pytest.mark.parametrize("name,content,message", READER_CASES,
                         ids=[f"{n}-{m.split(':')[-1].strip()[:24]}" for n, _, m in READER_CASES])
def test_bad_records_name_file_line_and_field(cli, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "out"
    msg = _error(cli, "encode", path, "--model", "tiny-gpt2", "--out", out, "--quiet")
    assert msg.startswith(f"{path}{message}"), msg
    assert not out.exists()  # refused before anything was written


def test_line_aligned_files_must_match(cli, tmp_path):
    src, tgt = tmp_path / "a.en", tmp_path / "a.de"
    src.write_text("one\ntwo\nthree\n")
    tgt.write_text("eins\nzwei\n")
    msg = _error(cli, "encode", src, tgt, "--model", "tiny-gpt2", "--out", tmp_path / "o")
    assert msg.startswith(f"{src}: line count 3 differs from 2 in {tgt}") and "line 3" in msg, msg
    tgt.write_text("eins\n\ndrei\n")
    msg = _error(cli, "encode", src, tgt, "--model", "tiny-gpt2", "--out", tmp_path / "o")
    assert msg == f"{tgt}, line 2: empty target"


def test_training_and_reference_files_need_targets(cli, tmp_path, built):
    bad = write_jsonl(tmp_path / "t.jsonl", [{"src": "a", "tgt": "b"}, {"src": "c", "tgt": None}])
    msg = _error(cli, "eval", built["predictions"], "--refs", bad, "--out", tmp_path / "e")
    assert msg == f"{bad}, line 2, field 'tgt': missing target (null)"
    bad = write_jsonl(tmp_path / "u.jsonl", [{"src": "a", "tgt": "b"}, {"src": "c", "tgt": "  "}])
    msg = _error(cli, "train", bad, "--slm", "tiny-gpt2", "--out", tmp_path / "o", "--max-steps", "1")
    assert msg == f"{bad}, line 2, field 'tgt': empty target"
    assert not (tmp_path / "o").exists()  # refused before anything was written or loaded


@pytest.mark.parametrize("stage", ["generate", "distill-labels"])
def test_generating_stages_refuse_bad_input_before_writing(cli, tmp_path, stage):
    bad = tmp_path / "d.jsonl"
    bad.write_bytes(b'{"src": "a"}\n{"src": 3}\n{"src": [1]}\n')
    msg = _error(cli, stage, bad, "--model", "tiny-llama", "--out", tmp_path / "o", "--max-new-tokens", "2")
    assert msg == f"{bad}, line 3, field 'src': expected text, got list"
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    long = write_jsonl(tmp_path / "l.jsonl", ROWS)
    msg = _error(cli, stage, long, "--model", "tiny-llama", "--out", tmp_path / "p", "--max-new-tokens", "2",
                 "--max-length", "8", "--strict")
    assert msg.startswith(f"{long}, line 1, example 'a': prompt has 12 tokens, over --max-length 8"), msg


def test_over_long_prompt_with_strict_is_refused_and_counted_without(cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)  # "hello there": 11 byte tokens, "hi": 2
    out = tmp_path / "strict"
    msg = _error(cli, "encode", data, "--model", "tiny-gpt2", "--out", out, "--max-length", "8", "--strict",
                 "--quiet")
    assert msg.startswith(f"{data}, line 1, example 'a': prompt has 11 tokens, over --max-length 8"), msg
    assert not out.exists() or not any(out.iterdir())
    cli("encode", data, "--model", "tiny-gpt2", "--out", tmp_path / "f", "--max-length", "8", "--quiet")
    manifest = json.loads((tmp_path / "f" / A.MANIFEST).read_text())
    assert manifest["counts"]["truncated"] == 1 and manifest["counts"]["examples"] == 2
    index = pq.read_table(tmp_path / "f" / A.FEATURES_INDEX).to_pydict()
    assert index["truncated"] == [True, False] and index["length"] == [8, 2]


# --- artifacts that do not fit


@pytest.fixture(scope="module")
def built(cli, tmp_path_factory):
    """Features (tiny-t5), a training run with an LLM-to-SLM checkpoint, and its predictions."""
    d = tmp_path_factory.mktemp("artifacts")
    data = write_jsonl(d / "d.jsonl", ROWS)
    cli("encode", data, "--model", "tiny-t5", "--out", d / "features", "--quiet")
    cli("train", data, "--slm", "tiny-gpt2", "--llm", "tiny-t5", "--features", d / "features", "--out", d / "run",
        "--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "2", "--quiet")
    cli("generate", data, "--model", d / "run" / "final", "--out", d / "predictions", "--max-new-tokens", "2",
        "--quiet")
    return {"data": data, "features": d / "features", "run": d / "run", "checkpoint": d / "run" / "final",
            "predictions": d / "predictions"}


def _edited(src, dst, path: str, edit) -> None:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / path).read_text())
    edit(manifest)
    (dst / path).write_text(json.dumps(manifest))


@pytest.mark.parametrize("key,value", [("fingerprint", "0" * 64), ("tokenizer_fingerprint", "0" * 64),
                                       ("d_model", 7)])
def test_train_refuses_features_of_another_llm(cli, tmp_path, built, key, value):
    """Same LLM name, other weights (another seed), tokenizer or dimension: the manifest tells."""
    features = tmp_path / "features"
    _edited(built["features"], features, A.MANIFEST, lambda m: m["llm"].update({key: value}))
    msg = _error(cli, "train", built["data"], "--slm", "tiny-gpt2", "--llm", "tiny-t5", "--features", features,
                 "--out", tmp_path / "o", "--max-steps", "1")
    assert msg.startswith(f"training features {features} was made with LLM 'tiny-t5' ({key} "), msg
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_train_refuses_features_of_another_schema_or_kind(cli, tmp_path, built):
    features = tmp_path / "features"
    _edited(built["features"], features, A.MANIFEST, lambda m: m.update(schema_version=99))
    args = ["train", built["data"], "--slm", "tiny-gpt2", "--llm", "tiny-t5", "--out", tmp_path / "o",
            "--max-steps", "1"]
    msg = _error(cli, *args, "--features", features)
    assert msg == f"{features / A.MANIFEST}: schema version 99 is not supported (this tool reads version 1)"
    msg = _error(cli, *args, "--features", built["predictions"])
    assert msg == f"{built['predictions']}: is a 'predictions' artifact, expected 'features'"


def test_train_refuses_labels_directories_that_do_not_fit(cli, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    pq.write_table(pa.table({"id": ["a"], "prompt": ["p"], "target": ["t"]}), labels / A.LABELS)
    args = ["train", labels, "--slm", "tiny-gpt2", "--out", tmp_path / "o", "--max-steps", "1"]
    assert _error(cli, *args).startswith(f"{labels}: a directory without {A.MANIFEST}")
    (labels / A.MANIFEST).write_text(json.dumps({"kind": A.KIND_LABELS, "schema_version": 99, "template": None}))
    assert _error(cli, *args) == f"{labels / A.MANIFEST}: schema version 99 is not supported (this tool reads " \
                                 "version 1)"
    (labels / A.MANIFEST).write_text(json.dumps({"kind": A.KIND_FEATURES, "schema_version": A.SCHEMA_VERSION}))
    assert _error(cli, *args) == f"{labels}: is a 'features' artifact, expected 'labels'"


@pytest.mark.parametrize("what", ["features", "run", "predictions"])
def test_generate_refuses_a_directory_that_is_no_model(cli, tmp_path, built, what):
    msg = _error(cli, "generate", built["data"], "--model", built[what], "--out", tmp_path / "o",
                 "--max-new-tokens", "2")
    assert msg.startswith(f"{built[what]}: "), msg


@pytest.mark.parametrize("what,kind", [("features", "features"), ("checkpoint", "checkpoint"),
                                       ("run", "training")])
def test_eval_refuses_another_artifact_kind(cli, tmp_path, built, what, kind):
    msg = _error(cli, "eval", built[what], "--out", tmp_path / "e")
    assert msg == f"{built[what]}: is a '{kind}' artifact, expected 'predictions'"
    assert not (tmp_path / "e").exists()


def test_eval_refuses_predictions_without_manifest(cli, tmp_path, built):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(built["predictions"] / A.PREDICTIONS, bare / A.PREDICTIONS)
    msg = _error(cli, "eval", bare, "--out", tmp_path / "e")
    assert msg.startswith(f"{bare}: no {A.MANIFEST}"), msg


def test_generate_refuses_a_checkpoint_of_another_schema(cli, tmp_path, built):
    checkpoint = tmp_path / "final"
    _edited(built["checkpoint"], checkpoint, A.MANIFEST, lambda m: m.update(schema_version=99))
    msg = _error(cli, "generate", built["data"], "--model", checkpoint, "--out", tmp_path / "o",
                 "--max-new-tokens", "2")
    assert "schema version 99" in msg


def test_generate_refuses_a_damaged_checkpoint_config(cli, tmp_path, built):
    checkpoint = tmp_path / "final"
    shutil.copytree(built["checkpoint"], checkpoint)
    (checkpoint / A.MODEL_CONFIG).write_text("{not json")
    msg = _error(cli, "generate", built["data"], "--model", checkpoint, "--out", tmp_path / "o",
                 "--max-new-tokens", "2")
    assert msg.startswith(f"{checkpoint / A.MODEL_CONFIG}: ")
