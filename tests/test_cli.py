"""The command line: every stage is listed, and user mistakes end in one line and exit code 2."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

STAGES = ["encode", "distill-labels", "train", "generate", "eval", "bench", "convert", "serve", "export"]


def test_help_lists_every_stage(cli):
    out = cli("--help").output
    for stage in STAGES:
        assert stage in out
    for stage in STAGES:
        assert "Usage: llm2slm" in cli(stage, "--help").output


def _error(cli, *args) -> str:
    result = cli(*args, code=2)
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_malformed_json_line_names_file_and_line(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"src": "a", "tgt": "b"}\n{"src": "c", \n')
    msg = _error(cli, "encode", "--model", "tiny-t5", bad, "--out", tmp_path / "o")
    assert f"{bad}, line 2: malformed JSON" in msg


def test_missing_field_names_line_and_field(cli, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"src": "a", "tgt": "b"}, {"text": "c"}])
    msg = _error(cli, "encode", "--model", "tiny-t5", bad, "--out", tmp_path / "o")
    assert f"{bad}, line 2, field 'src': missing field" in msg


def test_empty_prompt(cli, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"src": "a"}, {"src": "ok"}, {"src": "   "}])
    msg = _error(cli, "encode", "--model", "tiny-t5", bad, "--out", tmp_path / "o")
    assert f"{bad}, line 3, field 'src': empty prompt" in msg


def test_missing_target_in_training_data(cli, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"src": "a", "tgt": "b"}, {"src": "c"}])
    msg = _error(cli, "train", bad, "--slm", "tiny-gpt2", "--out", tmp_path / "o")
    assert f"{bad}, line 2, field 'tgt': missing field" in msg


def test_unreadable_file(cli, tmp_path):
    msg = _error(cli, "encode", "--model", "tiny-t5", tmp_path / "nope.jsonl", "--out", tmp_path / "o")
    assert "nope.jsonl: no such file" in msg
    locked = write_jsonl(tmp_path / "locked.jsonl", [{"src": "a"}])
    locked.chmod(0)
    try:
        readable = locked.open("rb")  # root reads anything: then only the missing-file case applies
        readable.close()
    except PermissionError:
        assert "cannot read" in _error(cli, "encode", "--model", "tiny-t5", locked, "--out", tmp_path / "o")


def test_existing_output_directory_is_refused(cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"src": "a"}])
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    msg = _error(cli, "encode", "--model", "tiny-t5", data, "--out", out)
    assert "exists and is not empty" in msg and "--overwrite" in msg
    assert (out / "keep.txt").read_text() == "precious"


def test_unknown_preset_and_bad_option_values(cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"src": "a", "tgt": "b"}])
    assert "unknown preset" in _error(cli, "encode", "--model", "preset:t5-gigantic", data, "--out", tmp_path / "o")
    assert "multiple of --micro-batch-size" in _error(cli, "train", data, "--slm", "tiny-gpt2", "--out",
                                                      tmp_path / "o", "--batch-size", "10",
                                                      "--micro-batch-size", "4")
    assert "needs --fusion replace" in _error(cli, "train", data, "--slm", "tiny-gpt2", "--llm", "tiny-t5",
                                              "--tokenizer-mode", "slm", "--out", tmp_path / "o")


def test_float16_is_refused_for_t5_llms(cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"src": "a"}])
    msg = _error(cli, "encode", "--model", "tiny-t5", data, "--out", tmp_path / "o", "--llm-dtype", "float16")
    assert "float16 is refused for T5-family LLMs" in msg


def test_features_of_another_llm_are_refused(cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"src": "a b", "tgt": "c"}, {"src": "d", "tgt": "e"}])
    cli("encode", "--model", "tiny-t5-large", data, "--out", tmp_path / "f", "--quiet")
    msg = _error(cli, "train", data, "--llm", "tiny-t5", "--slm", "tiny-gpt2", "--features", tmp_path / "f",
                 "--out", tmp_path / "o")
    assert "made with LLM 'tiny-t5-large'" in msg and "'tiny-t5'" in msg
    assert not (tmp_path / "o" / "final").exists()


@pytest.mark.parametrize("argv", [["train", "x.jsonl", "--slm", "tiny-gpt2", "--out", "o", "--features", "f"]])
def test_features_without_llm(cli, tmp_path, argv):
    assert "needs --llm" in _error(cli, *argv)


def test_version(cli):
    assert cli("--version").output.startswith("llm2slm ")


def test_manifest_is_json_with_kind(cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"src": "a"}])
    cli("encode", "--model", "tiny-bert", data, "--out", tmp_path / "f", "--quiet")
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["kind"] == "features" and manifest["llm"]["kind"] == "encoder-only"
