"""`train --streaming`: the stream's order is a pure function of (seed, buffer), its state round-trips exactly at any
position, a stopped and resumed run equals the uninterrupted one (weights, log), features are used and checked, and
what a stream cannot do is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import error_line, same_weights_and_log, write_jsonl
from safetensors.torch import load_file

from llm2slm_cli.data import Fields, read_examples
from llm2slm_cli.streaming import ExampleStream

FIELDS = Fields(prompt="src", target="tgt", id="id")
ARGS = ["--slm", "tiny-gpt2", "--streaming", "--shuffle-buffer", "5", "--batch-size", "4", "--micro-batch-size", "2",
        "--max-steps", "9", "--lr", "3e-3", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """13 examples of varied lengths: batches of 4 end each epoch with a short one (4, 4, 4, 1)."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    rows = [{"id": f"s{i}", "src": " ".join(words[(i * 5 + j) % 6] for j in range(1 + i % 5)),
             "tgt": "xy" * (1 + i % 3)} for i in range(13)]
    return write_jsonl(tmp_path_factory.mktemp("stream") / "train.jsonl", rows)


def _drain(stream: ExampleStream, batches: int, size: int = 4) -> list[tuple[int, list[str]]]:
    out = []
    for _ in range(batches):
        epoch, examples = stream.next_batch(size)
        out.append((epoch, [e.id for e in examples]))
    return out


def test_each_epoch_is_a_seeded_permutation_of_the_input_with_a_short_last_batch(corpus):
    batches = _drain(ExampleStream([corpus], FIELDS, seed=3, buffer_size=5), 8)
    ids = [e.id for e in read_examples([corpus], FIELDS)]
    assert [len(b) for _, b in batches] == [4, 4, 4, 1] * 2
    assert [e for e, _ in batches] == [0] * 4 + [1] * 4
    first, second = (sum((b for _, b in batches[k: k + 4]), []) for k in (0, 4))
    assert sorted(first) == sorted(second) == sorted(ids)
    assert first != ids and first != second  # shuffled, and anew each epoch
    assert _drain(ExampleStream([corpus], FIELDS, seed=3, buffer_size=5), 8) == batches  # same seed, same order
    assert _drain(ExampleStream([corpus], FIELDS, seed=4, buffer_size=5), 8) != batches


def test_a_buffer_of_one_keeps_the_input_order(corpus):
    batches = _drain(ExampleStream([corpus], FIELDS, seed=0, buffer_size=1), 4)
    assert sum((b for _, b in batches), []) == [e.id for e in read_examples([corpus], FIELDS)]


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 4, 5, 7])
def test_the_state_resumes_exactly_at_every_position(corpus, cut):
    """Through JSON, as a checkpoint stores it; positions inside the first fill, mid-epoch, at an epoch's end (3:
    the input read to its end, the buffer still full) and in the second epoch."""
    straight = _drain(ExampleStream([corpus], FIELDS, seed=1, buffer_size=5), 10)
    stream = ExampleStream([corpus], FIELDS, seed=1, buffer_size=5)
    before = _drain(stream, cut)
    state = json.loads(json.dumps(stream.state_dict()))
    after = _drain(ExampleStream([corpus], FIELDS, seed=1, buffer_size=5, state=state), 10 - cut)
    assert before + after == straight


def test_a_state_of_another_seed_or_buffer_is_refused(corpus):
    stream = ExampleStream([corpus], FIELDS, seed=1, buffer_size=5)
    _drain(stream, 2)
    for seed, size in ((2, 5), (1, 6)):
        with pytest.raises(Exception, match="another --seed or --shuffle-buffer"):
            ExampleStream([corpus], FIELDS, seed=seed, buffer_size=size, state=stream.state_dict())


def test_parquet_streams_a_record_batch_at_a_time_with_the_same_examples(corpus, tmp_path, monkeypatch):
    from llm2slm_cli import data

    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    monkeypatch.setattr(data, "TABLE_BATCH", 3)
    streamed = list(data.iter_examples([path], FIELDS, streaming=True))
    assert streamed == read_examples([path], FIELDS)
    assert [e.place for e in streamed] == [f"row {i}" for i in range(13)]
    assert [e.id for e in streamed] == [r["id"] for r in rows]


def test_a_stopped_and_resumed_streaming_run_equals_the_uninterrupted_one(cli, corpus, tmp_path):
    cli("train", corpus, *ARGS, "--save-every", "3", "--out", tmp_path / "straight")
    run = tmp_path / "run"
    cli("train", corpus, *ARGS, "--save-every", "3", "--stop-after", "5", "--out", run)
    assert sorted(p.name for p in run.iterdir()) == ["step-000003", "step-000005", "train_log.jsonl"]
    state = json.loads((run / "step-000005" / "stream_state.json").read_text())
    assert (state["epoch"], len(state["buffer"])) == (1, 5)  # step 5 is the first of the second epoch
    assert "stream_state.json" in json.loads((run / "step-000005" / "manifest.json").read_text())["files"]
    cli("train", corpus, *ARGS, "--save-every", "3", "--out", run, "--resume")
    straight = same_weights_and_log(tmp_path / "straight", run)
    assert [r["epoch"] for r in straight] == [0] * 4 + [1] * 4 + [2]
    assert straight[-1]["loss"] < straight[0]["loss"]  # it learned: the runs are not trivially equal


def test_streaming_with_stored_features_checks_each_prompt(cli, corpus, tmp_path):
    cli("encode", corpus, "--model", "tiny-t5", "--prompt-field", "src", "--out", tmp_path / "f", "--quiet")
    options = ["--llm", "tiny-t5", "--features", tmp_path / "f", "--prompt-field", "src", "--target-field", "tgt"]
    cli("train", corpus, *ARGS, *options, "--out", tmp_path / "t")
    assert len((tmp_path / "t" / "train_log.jsonl").read_text().splitlines()) == 9
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "s0", "src": "not the encoded prompt", "tgt": "xy"}])
    msg = error_line(cli, "train", other, *ARGS, *options, "--out", tmp_path / "t2")
    assert msg == (f"training example 's0': its prompt differs from the one encoded in {tmp_path / 'f'} (another "
                   "file, template or --max-length?)"), msg


@pytest.mark.parametrize("extra, message", [
    (["--max-steps", "0"], "--max-steps must be positive"),
    (["--trim-vocab"], "--trim-vocab reads every training example before the first step: not with --streaming"),
    (["--bucket-by-length"], "--bucket-by-length reads every training example before the first step: not with "
                             "--streaming"),
    (["--num-workers", "2"], "--num-workers is for examples in the data cache: with --streaming a thread of the "
                             "training process prepares the batches ahead"),
    (["--shuffle-buffer", "0"], "--shuffle-buffer must be positive"),
])
def test_what_a_stream_cannot_do_is_refused_in_one_line(cli, corpus, tmp_path, extra, message):
    msg = error_line(cli, "train", corpus, *ARGS, *extra, "--out", tmp_path / "t")
    assert message in msg, msg
    assert not (tmp_path / "t").exists()


def test_streaming_needs_max_steps(cli, corpus, tmp_path):
    args = [a for a in ARGS if a not in ("--max-steps", "9")]
    msg = error_line(cli, "train", corpus, *args, "--out", tmp_path / "t")
    assert msg == "--streaming needs --max-steps: a stream's length is not known before it is read", msg


def test_a_bad_record_far_into_the_stream_keeps_the_checkpoints_written_before_it(cli, corpus, tmp_path):
    lines = corpus.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:12]) + '\n{"id": "s12", "src": "late", "tgt": }\n')
    run = tmp_path / "run"
    msg = error_line(cli, "train", bad, *ARGS, "--shuffle-buffer", "1", "--save-every", "1", "--out", run)
    assert msg.startswith(f"{bad}, line 13: malformed JSON"), msg
    assert (run / "step-000002").is_dir() and not (run / "final").exists()


@pytest.mark.parametrize("kind", ["jsonl-no-ids", "text", "pairs", "csv", "parquet"])
def test_skipping_gives_the_rest_of_the_input_with_its_numbering_and_places(corpus, tmp_path, kind):
    """What a resume reads: iter_examples(skip=k) is the input's examples from the k-th on, the same ids (numbered
    from 0 where records have none), places and texts, whether lines are passed over unparsed or read."""
    from llm2slm_cli.data import iter_examples

    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    fields = Fields(prompt="src", target="tgt", id=None)
    if kind == "jsonl-no-ids":
        inputs = [write_jsonl(tmp_path / "t.jsonl", [{"src": r["src"], "tgt": r["tgt"]} for r in rows])]
        (tmp_path / "t.jsonl").write_text("\n" + (tmp_path / "t.jsonl").read_text().replace("\n", "\n\n", 3))
    elif kind == "text":
        (tmp_path / "t.txt").write_text("".join(r["src"] + "\n" for r in rows))
        inputs, fields = [tmp_path / "t.txt"], Fields(prompt="src", target=None, id=None)
    elif kind == "pairs":
        (tmp_path / "t.en").write_text("".join(r["src"] + "\n" for r in rows))
        (tmp_path / "t.de").write_text("".join(r["tgt"] + "\n" for r in rows))
        inputs = [tmp_path / "t.en", tmp_path / "t.de"]
    elif kind == "csv":
        (tmp_path / "t.csv").write_text("src,tgt\n" + "".join(f"{r['src']},{r['tgt']}\n" for r in rows))
        inputs = [tmp_path / "t.csv"]
    else:
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
        inputs = [tmp_path / "t.parquet"]
    everything = list(iter_examples(inputs, fields, streaming=True))
    assert len(everything) == 13
    for k in (1, 5, 12, 13):
        assert list(iter_examples(inputs, fields, streaming=True, skip=k)) == everything[k:], k


def test_feature_statistics_come_from_the_first_examples_of_the_input_as_without_streaming(cli, corpus, tmp_path):
    """--feature-norm standardize reads the first examples in the input's order, not the stream's: the projector's
    fixed statistics equal a run without --streaming's, whatever the shuffle."""
    # more examples than the statistics read (512), so the stream's first ones are another set than the input's
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"]
    big = write_jsonl(tmp_path / "big.jsonl", [{"src": " ".join(words[(i * 3 + j) % 7] for j in range(1 + i % 6)),
                                                "tgt": "xy"} for i in range(600)])
    options = ["--llm", "tiny-t5", "--prompt-field", "src", "--target-field", "tgt", "--feature-norm", "standardize",
               "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "1", "--quiet"]
    cli("train", big, "--slm", "tiny-gpt2", *options, "--out", tmp_path / "plain")
    cli("train", big, "--slm", "tiny-gpt2", *options, "--streaming", "--shuffle-buffer", "300", "--out",
        tmp_path / "streamed")
    a, b = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("plain", "streamed"))
    for name in ("projector.feature_shift", "projector.feature_scale"):
        assert (a[name] == b[name]).all() and a[name].abs().sum() > 0, name
