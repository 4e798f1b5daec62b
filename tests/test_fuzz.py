"""Property tests of the input readers: no input, however broken, gives anything but valid examples or a one-line
UserError naming the file; and a stage fed such input either finishes or leaves no output behind.

Deterministic (derandomize, no example database), so a failure here is reproduced by running the test again.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm2slm_cli import artifacts as A
from llm2slm_cli.cli import app
from llm2slm_cli.data import Example, Fields, read_examples
from llm2slm_cli.errors import UserError

pytest.importorskip("hypothesis", reason="needs the 'dev' extra: pip install -e \".[dev]\"")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402 (after the skip: hypothesis is optional)
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(deadline=None, derandomize=True, database=None, max_examples=150,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Pieces of real and broken records of every format, so random files reach past the first check of each reader.
FRAGMENTS = [
    b'{"src": "a"}', b'{"src": "b", "id": 1}', b'{"id": "1", "src": "c", "tgt": "t"}', b'{"src": ""}',
    b'{"src": null}', b'{"src": 3}', b'{"src": [1]}', b'{"src": {"x": 1}}', b'{"src": true}', b'{"src": NaN}',
    b'{"src": 1e400}', b'{"src": "\\ud800"}', b'{"src": "\\u0000"}', b'{"src": "x", "id": ""}', b'{"tgt": "y"}',
    b"[", b"]", b"{", b"}", b",", b":", b'"', b"\n", b"\n", b"\r\n", b"\r", b"\t", b" ", b"\xef\xbb\xbf", b"\xff",
    b"\x00", b"\xc3", b"\xe2\x82", b"\xff\xfe", b"id,src,tgt", b"1,a,b", b"2,,c", b'3,"x', b'4,"y""z",w',
    b"id\tsrc\ttgt", b"5\ta\tb", b"src", b"hello world", b"   ", b"\x1f\x8b", b"PAR1", b"1" * 5000,
    b"[" * 3000,
]
GOOD_LINES = [b'{"src": "hello there", "id": "k1"}', b'{"src": "a", "tgt": "b"}', b'{"id": 7, "src": "seven"}',
              b"id,src,tgt", b"8,eight,acht", b"id\tsrc\ttgt", b"9\tnine\tneun", b"plain text", b""]
chunks = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=6)), max_size=24).map(b"".join)
lines = st.lists(st.one_of(st.sampled_from(GOOD_LINES), st.sampled_from(GOOD_LINES), st.sampled_from(FRAGMENTS)),
                 max_size=6).map(b"\n".join)
fuzz_bytes = st.one_of(chunks, lines)


def _check(examples: list[Example]) -> None:
    """What every stage may rely on in examples that were read without error."""
    assert examples
    assert len({e.id for e in examples}) == len(examples)
    for e in examples:
        for text in (e.id, e.prompt, e.target):
            if text is not None:
                assert isinstance(text, str) and "\0" not in text
                text.encode("utf-8")  # no lone surrogates: tokenizers and Parquet can take it
        assert e.prompt.strip() and e.id.strip()


def _read(inputs: list[Path], **kwargs) -> list[Example] | UserError:
    try:
        examples = read_examples(inputs, **kwargs)
    except UserError as e:
        assert "\n" not in e.message and "\r" not in e.message
        assert any(str(p) in e.message for p in inputs), e.message  # names the file
        event("refused")
        return e
    _check(examples)
    event("read")
    return examples


@FUZZ
@given(data=fuzz_bytes, suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet"]),
       require_target=st.booleans())
def test_any_bytes_give_examples_or_a_user_error(tmp_path, data, suffix, require_target):
    path = tmp_path / f"input{suffix}"
    path.write_bytes(data)
    _read([path], require_target=require_target)


@FUZZ
@given(prompts=fuzz_bytes, targets=fuzz_bytes)
def test_any_line_aligned_pair_gives_examples_or_a_user_error(tmp_path, prompts, targets):
    (tmp_path / "a.src").write_bytes(prompts)
    (tmp_path / "a.tgt").write_bytes(targets)
    result = _read([tmp_path / "a.src", tmp_path / "a.tgt"])
    if not isinstance(result, UserError):
        assert all(e.target and e.target.strip() for e in result)


def _parquet_bytes() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ["a", "b"], "src": ["x", "y"], "tgt": ["1", None]}), buf)
    return buf.getvalue()


VALID_PARQUET = _parquet_bytes()


@FUZZ
@given(cut=st.integers(0, len(VALID_PARQUET)), flips=st.lists(st.tuples(st.integers(0, len(VALID_PARQUET) - 1),
                                                                         st.integers(1, 255)), max_size=3))
def test_damaged_parquet_gives_examples_or_a_user_error(tmp_path, cut, flips):
    data = bytearray(VALID_PARQUET)
    for at, xor in flips:
        data[at] ^= xor
    path = tmp_path / "d.parquet"
    path.write_bytes(bytes(data[:cut] if cut < len(data) else data))
    _read([path])


# --- structured records: valid JSON of every type, checked against what the reader must decide

scalars = st.one_of(st.text(max_size=6), st.sampled_from(["", " ", "\t\n", "\x00", "a\ud800", "1", "x"]),
                    st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none())
values = st.one_of(scalars, st.lists(scalars, max_size=2), st.dictionaries(st.sampled_from(["en", "x"]), scalars,
                                                                          max_size=2))
good_text = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=5)
records = st.lists(st.one_of(
    st.fixed_dictionaries({"src": st.one_of(good_text, values)},
                          optional={"tgt": st.one_of(good_text, values), "id": st.one_of(good_text, values),
                                    "other": values}),
    st.dictionaries(st.sampled_from(["src", "tgt", "id", "other"]), values, max_size=4)), max_size=5)


def _as_text(value) -> str | None:
    """The reader's rule for a text value (None: refused)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    text = str(value)
    if "\0" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return None
    return text


def _expected(recs: list[dict], require_target: bool) -> tuple[list[Example] | None, int | None]:
    """The examples these records must give, or the index of the first record that must be refused."""
    out, seen = [], set()
    for n, rec in enumerate(recs):
        prompt = _as_text(rec.get("src"))
        if "src" not in rec or prompt is None or not prompt.strip():
            return None, n
        target = None
        if "tgt" in rec and rec["tgt"] is not None:
            target = _as_text(rec["tgt"])
            if target is None or (require_target and not target.strip()):
                return None, n
        elif require_target:
            return None, n
        ex_id = str(n)
        if rec.get("id") is not None:
            ex_id = _as_text(rec["id"])
            if ex_id is None or not ex_id.strip():
                return None, n
        if ex_id in seen:
            return None, n
        seen.add(ex_id)
        out.append(Example(ex_id, prompt, target))
    return (out, None) if out else (None, None)


def _not_json(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_not_json(v) for v in value.values())
    return isinstance(value, list) and any(_not_json(v) for v in value)


@FUZZ
@given(recs=records, require_target=st.booleans(), layout=st.sampled_from(["jsonl", "json-lines", "json-array"]))
def test_json_records_of_any_type_are_read_or_refused_at_the_right_line(tmp_path, recs, require_target, layout):
    if layout == "jsonl":
        path, text = tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in recs)
    elif layout == "json-lines":
        path, text = tmp_path / "d.json", "\r\n".join(json.dumps(r) for r in recs)
    else:
        path, text = tmp_path / "d.json", "[\n" + ",\n".join(json.dumps(r) for r in recs) + "\n]\n"
    path.write_text(text)
    expected, bad = _expected(recs, require_target)
    result = _read([path], require_target=require_target)
    if expected is not None:
        assert result == expected
        return
    assert isinstance(result, UserError)
    if bad is None:
        assert "no examples" in result.message
        return
    # NaN and infinities are not JSON: refused where they stand, which may be an earlier record
    first_bad = next((n for n, r in enumerate(recs) if _not_json(r)), bad)
    line = min(bad, first_bad) + (1 if layout != "json-array" else 2)
    assert f", line {line}" in result.message, (result.message, recs)


column_types = st.sampled_from(["string", "int", "float", "bool", "list", "struct", "binary"])


@st.composite
def tables(draw):
    """A table whose columns have one type each (as Parquet has), nulls anywhere."""
    n = draw(st.integers(0, 4))
    columns = {}
    for name in draw(st.lists(st.sampled_from(["src", "tgt", "id", "other"]), unique=True, max_size=4)):
        kind = draw(column_types)
        item = {"string": st.text(max_size=4), "int": st.integers(-2, 2), "float": st.floats(),
                "bool": st.booleans(), "list": st.lists(st.text(max_size=2), max_size=2),
                "struct": st.fixed_dictionaries({"en": st.text(max_size=2)}), "binary": st.binary(max_size=3)}[kind]
        columns[name] = draw(st.lists(st.one_of(st.none(), item), min_size=n, max_size=n))
    return columns


@FUZZ
@given(columns=tables(), require_target=st.booleans(), fmt=st.sampled_from(["parquet", "csv", "tsv"]))
def test_tables_of_any_column_type_are_read_or_refused(tmp_path, columns, require_target, fmt):
    if fmt == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.table(columns) if columns else pa.table({"x": pa.array([], pa.int8())}), path)
    else:
        path = tmp_path / f"d.{fmt}"
        with open(path, "w", newline="", encoding="utf-8", errors="surrogatepass") as f:
            writer = csv.writer(f, delimiter="," if fmt == "csv" else "\t")
            writer.writerow(list(columns))
            writer.writerows(zip(*columns.values()))
    _read([path], require_target=require_target)


@FUZZ
@given(ids=st.lists(st.one_of(st.none(), st.sampled_from(["a", "b", "", "1"])), min_size=1, max_size=4),
       prompts=st.lists(st.one_of(st.none(), st.sampled_from(["p", " ", "q\x00"])), min_size=4, max_size=4),
       targets=st.lists(st.one_of(st.none(), st.sampled_from(["t", ""])), min_size=4, max_size=4),
       require_target=st.booleans(), damage=st.sampled_from([None, "manifest", "kind", "schema", "table"]))
def test_distilled_labels_directories_are_read_or_refused(ids, prompts, targets, require_target, damage):
    with tempfile.TemporaryDirectory() as tmp:
        _labels_case(Path(tmp), ids, prompts, targets, require_target, damage)


def _labels_case(directory: Path, ids, prompts, targets, require_target, damage) -> None:
    n = len(ids)
    table = pa.table({"id": pa.array(ids, pa.string()), "prompt": pa.array(prompts[:n], pa.string()),
                      "target": pa.array(targets[:n], pa.string())})
    if damage == "table":
        (directory / A.LABELS).write_bytes(b"PAR1 not really")
    else:
        pq.write_table(table, directory / A.LABELS)
    manifest = {"kind": A.KIND_LABELS, "schema_version": A.SCHEMA_VERSION, "template": None}
    if damage == "kind":
        manifest["kind"] = A.KIND_FEATURES
    if damage == "schema":
        manifest["schema_version"] = 99
    if damage != "manifest":
        (directory / A.MANIFEST).write_text(json.dumps(manifest))
    result = _read([directory], require_target=require_target)
    if damage is not None:
        assert isinstance(result, UserError)


# --- end to end: the real encode stage on fuzzed files never leaves a half-written output

prompts = st.lists(st.text("ab xyz\u00e9", min_size=1, max_size=14), min_size=1, max_size=4)
encode_inputs = st.one_of(
    st.tuples(lines, st.sampled_from([".jsonl", ".json", ".csv", ".txt"])),
    st.tuples(prompts.map(lambda ps: "\n".join(ps).encode()), st.just(".txt")),
    st.tuples(prompts.map(lambda ps: "".join(json.dumps({"id": i, "src": p}) + "\n" for i, p in enumerate(ps))
                          .encode()), st.just(".jsonl")))


@settings(deadline=None, derandomize=True, database=None, max_examples=25,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=encode_inputs, strict=st.booleans())
def test_encode_on_fuzzed_input_finishes_or_writes_nothing(cli, case, strict):
    data, suffix = case
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / f"input{suffix}", Path(tmp) / "out"
        path.write_bytes(data)
        args = ["encode", str(path), "--model", "tiny-gpt2", "--out", str(out), "--max-length", "8", "--quiet"]
        result = cli.runner.invoke(app, args + (["--strict"] if strict else []), env={"LLM2SLM_CACHE": None})
        assert result.exit_code in (0, 2), (result.output, result.exception)
        event(f"exit code {result.exit_code}")
        if result.exit_code == 0:
            manifest = json.loads((out / A.MANIFEST).read_text())
            assert manifest["kind"] == A.KIND_FEATURES
            assert manifest["counts"]["examples"] == len(read_examples([path], Fields(target=None)))
            assert manifest["counts"]["truncated"] <= manifest["counts"]["examples"]
            assert not (strict and manifest["counts"]["truncated"])
            assert {A.FEATURES_INDEX, A.MANIFEST} <= {p.name for p in out.iterdir()}
        else:
            errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1 and "Traceback" not in result.output, result.output
            assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
