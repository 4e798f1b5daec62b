"""The training data layer (corpus.py): examples read once and tokenized once into Arrow files on `datasets`, cached
by what made them, read memory-mapped; the rows, and so the batches and the weights, are what the list-based path
gave."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_jsonl

from llm2slm_cli import artifacts as A
from llm2slm_cli import corpus, runtime
from llm2slm_cli import loading as M
from llm2slm_cli.batching import TrainPlan
from llm2slm_cli.data import Fields, read_examples
from llm2slm_cli.errors import UserError

FIELDS = Fields(prompt="src", target="tgt", id="id", template="summarize: {src}")


def _rows(n: int) -> list[dict]:
    return [{"id": f"e{i}", "src": "word " * (1 + i % 13) + str(i), "tgt": f"answer {i % 7} " * (1 + i % 3)}
            for i in range(n)]


def _open(path, cache, tok, **kw):
    examples = corpus.open_examples([path], FIELDS, require_target=True, cache=cache,
                                    input_sha=A.input_sha256([path]))
    return examples, corpus.open_tokens(examples, tok, tok, max_length=12, max_target_length=6, **kw)


def test_rows_are_the_tokenization_of_the_list_path_in_input_order(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", _rows(300))
    tok = M.load_tokenizer("tiny-t5")
    examples, tokens = _open(data, tmp_path / "cache", tok)
    listed = read_examples([data], FIELDS, require_target=True)
    prompts, truncated = runtime.tokenize_prompts(tok, [e.prompt for e in listed], 12)
    targets = runtime.tokenize_targets(tok, [e.target for e in listed], 6)
    everything = list(range(len(listed)))
    assert examples.ids(everything) == [e.id for e in listed]
    assert [r.tolist() for r in tokens.rows("prompt_ids", everything)] == prompts
    assert [r.tolist() for r in tokens.rows("target_ids", everything)] == targets
    picked = [299, 3, 0, 150, 3]  # any order, repeats: what a batch asks
    assert [r.tolist() for r in tokens.rows("prompt_ids", picked)] == [prompts[i] for i in picked]
    assert tokens.prompt_lengths.tolist() == [len(p) for p in prompts]
    assert tokens.target_lengths.tolist() == [len(t) for t in targets]
    assert tokens.truncated == sum(truncated) > 0
    assert tokens.rows("prompt_ids", [0])[0].dtype == np.int32


def test_the_same_rows_from_two_tokenizing_processes(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", _rows(250))
    tok = M.load_tokenizer("tiny-gpt2")
    _, one = _open(data, tmp_path / "a", tok, num_proc=1)
    _, two = _open(data, tmp_path / "b", tok, num_proc=2)
    assert sorted(one.record["files"]) == ["tokens.arrow"]
    assert len(two.record["files"]) == 2 and two.record["num_proc"] == 2
    assert one.table.equals(two.table)


def test_a_second_run_reads_nothing_again(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", _rows(50))
    tok = M.load_tokenizer("tiny-gpt2")
    first_examples, first = _open(data, tmp_path / "cache", tok)

    def no_reading(*a, **k):
        raise AssertionError("the input was read again")

    monkeypatch.setattr(corpus, "iter_examples", no_reading)
    monkeypatch.setattr(corpus, "_tokenize", no_reading)
    examples, tokens = _open(data, tmp_path / "cache", tok)
    assert examples.entry == first_examples.entry and tokens.entry == first.entry
    assert tokens.table.equals(first.table)


def test_what_changes_the_rows_changes_the_entry(tmp_path):
    """The input's bytes, the template and the tokenizer's behaviour each make a new entry; tiny-gpt2 and tiny-llama
    share a vocabulary (equal fingerprints) but Llama adds a BOS token: their tokens must not be shared."""
    data = write_jsonl(tmp_path / "d.jsonl", _rows(20))
    gpt2, llama = M.load_tokenizer("tiny-gpt2"), M.load_tokenizer("tiny-llama")
    ex, a = _open(data, tmp_path / "c", gpt2)
    _, b = _open(data, tmp_path / "c", llama)
    assert a.entry != b.entry and b.rows("prompt_ids", [0])[0][0] == llama.bos_token_id != a.rows("prompt_ids",
                                                                                                   [0])[0][0]
    other = corpus.open_examples([data], Fields(prompt="src", target="tgt", id="id", template="{src}"),
                                 require_target=True, cache=tmp_path / "c", input_sha=A.input_sha256([data]))
    assert other.entry != ex.entry
    write_jsonl(data, _rows(21))
    again, _ = _open(data, tmp_path / "c", gpt2)
    assert again.entry != ex.entry and len(again) == 21


def test_a_damaged_entry_is_built_again_with_a_warning(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", _rows(40))
    tok = M.load_tokenizer("tiny-gpt2")
    _, tokens = _open(data, tmp_path / "cache", tok)
    good = tokens.table
    arrow = tokens.entry / "tokens.arrow"
    del tokens, good
    arrow.write_bytes(arrow.read_bytes()[:100])  # cut short
    _, again = _open(data, tmp_path / "cache", tok)
    assert "is damaged" in capsys.readouterr().err
    listed = read_examples([data], FIELDS, require_target=True)
    assert [r.tolist() for r in again.rows("prompt_ids", range(40))] == runtime.tokenize_prompts(
        tok, [e.prompt for e in listed], 12)[0]
    record = json.loads((again.entry / corpus.RECORD).read_text())
    assert record["files"]["tokens.arrow"]["bytes"] == (again.entry / "tokens.arrow").stat().st_size


def test_bad_input_is_refused_as_read_examples_refuses_it_and_nothing_is_cached(tmp_path):
    rows = _rows(30)
    rows[17]["id"] = rows[4]["id"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError) as listed:
        read_examples([data], FIELDS, require_target=True)
    with pytest.raises(UserError) as cached:
        corpus.open_examples([data], FIELDS, require_target=True, cache=tmp_path / "c",
                             input_sha=A.input_sha256([data]))
    assert cached.value.message == listed.value.message and "line 18" in cached.value.message
    assert "duplicate id 'e4'" in cached.value.message
    data.write_text(data.read_text().replace('"tgt": "answer 2 "', '"tgt": null', 1))
    with pytest.raises(UserError, match="line 10, field 'tgt': missing target"):
        corpus.open_examples([data], FIELDS, require_target=True, cache=tmp_path / "c",
                             input_sha=A.input_sha256([data]))
    assert [p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")] == []


def test_train_plan_from_corpus_lengths_is_the_plan_from_lists(tmp_path):
    """The plan (and so every batch) from the Arrow length columns equals the one from Python lists."""
    data = write_jsonl(tmp_path / "d.jsonl", _rows(97))
    tok = M.load_tokenizer("tiny-gpt2")
    _, tokens = _open(data, tmp_path / "c", tok)
    listed = read_examples([data], FIELDS, require_target=True)
    prompts = [len(p) for p in runtime.tokenize_prompts(tok, [e.prompt for e in listed], 12)[0]]
    targets = [len(t) for t in runtime.tokenize_targets(tok, [e.target for e in listed], 6)]
    for bucket in (False, True):
        a = TrainPlan(97, seed=5, batch_size=8, micro_batch_size=3, prompt_lengths=tokens.prompt_lengths,
                      target_lengths=tokens.target_lengths, bucket_by_length=bucket)
        b = TrainPlan(97, seed=5, batch_size=8, micro_batch_size=3, prompt_lengths=prompts, target_lengths=targets,
                      bucket_by_length=bucket)
        for step in range(30):
            pa, pb = a(step), b(step)
            assert (pa.global_batch, pa.global_tokens, pa.micro, pa.weight) == (pb.global_batch, pb.global_tokens,
                                                                                 pb.micro, pb.weight)
            assert type(pa.weight) is float and type(pa.global_tokens) is int


def test_take_reads_chunk_by_chunk_in_the_asked_order():
    """corpus.take (pyarrow's ChunkedArray.take would concatenate every chunk first): the same values, any order,
    repeats, across chunk borders; a row past the end is an IndexError."""
    import pyarrow as pa

    column = pa.chunked_array([pa.array([[i, i + 1] for i in range(k, k + 5)], pa.list_(pa.int32()))
                               for k in range(0, 20, 5)])
    picked = [19, 0, 4, 5, 5, 12, 3, 18]
    assert corpus.take(column, picked).to_pylist() == [column.to_pylist()[i] for i in picked]
    assert corpus.take(column, []).to_pylist() == []
    with pytest.raises(IndexError):
        corpus.take(column, [20])


def test_the_input_hash_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", _rows(10))
    first = corpus.input_sha256([data], tmp_path / "c")
    assert first == A.input_sha256([data])
    real = A.sha256_file

    def not_again(*a, **k):
        raise AssertionError("the input was hashed again")

    monkeypatch.setattr(A, "sha256_file", not_again)
    assert corpus.input_sha256([data], tmp_path / "c") == first
    monkeypatch.setattr(A, "sha256_file", real)
    write_jsonl(data, _rows(11))  # another size and modification time: hashed again
    assert corpus.input_sha256([data], tmp_path / "c") == A.input_sha256([data]) != first
    with pytest.raises(UserError, match="no such file"):
        corpus.input_sha256([tmp_path / "missing.jsonl"], tmp_path / "c")
