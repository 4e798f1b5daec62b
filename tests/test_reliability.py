"""Nothing silently wrong (issue 15): bad numbers, half precision for T5, messages that name the right option, damaged
model files, options that were ignored, markup that ate user text, data that was dropped or refused, a full disk,
two runs on one output directory, manifests of the wrong shape."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

ROWS = [{"id": "a", "src": "hello there", "tgt": "x"}, {"id": "b", "src": "hi", "tgt": "y"}]


def _error(cli, *args) -> str:
    """The one `error:` line of a command that must exit with code 2."""
    result = cli(*args, code=2)
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0].removeprefix("error: ")


# ------------------------------------------------------------------------------------------------- bad numbers

TRAIN = ["train", "d.jsonl", "--slm", "tiny-gpt2", "--out", "o"]
GENERATE = ["generate", "d.jsonl", "--model", "tiny-gpt2", "--out", "o"]
DISTILL = ["distill-labels", "d.jsonl", "--model", "tiny-gpt2", "--out", "o"]


@pytest.mark.parametrize("argv,option,value", [
    (TRAIN, "--lr", "nan"), (TRAIN, "--lr", "inf"), (TRAIN, "--seed", "-1"), (TRAIN, "--max-grad-norm", "-1"),
    (TRAIN, "--warmup-ratio", "nan"), (TRAIN, "--weight-decay", "nan"), (TRAIN, "--weight-decay", "-0.1"),
    (TRAIN, "--max-grad-norm", "nan"), (TRAIN, "--kd-temperature", "inf"),
    (GENERATE, "--length-penalty", "nan"), (GENERATE, "--top-p", "nan"), (GENERATE, "--temperature", "inf"),
    (GENERATE, "--temperature", "nan"), (GENERATE, "--seed", "-1"),
    (DISTILL, "--length-penalty", "-inf"), (DISTILL, "--seed", "-5"),
    (["bench", "--slm", "tiny-gpt2", "--out", "o"], "--seed", "-1"),
    (["eval", "p", "--out", "o"], "--judge-timeout", "nan"),
    (["serve", "--model", "tiny-gpt2"], "--batch-wait-ms", "nan"),
])
def test_non_finite_numbers_and_negative_seeds_are_refused(cli, argv, option, value):
    """NaN passes every range check (`nan <= 0` is False): each option names itself, before any file is read."""
    msg = _error(cli, *argv, option, value)
    assert msg.startswith(f"{option} must be"), msg


def test_a_negative_max_grad_norm_is_refused_and_zero_means_no_clipping():
    from llm2slm_cli.config import TrainConfig
    from llm2slm_cli.errors import UserError

    with pytest.raises(UserError, match="--max-grad-norm must be 0"):
        TrainConfig(inputs=["d.jsonl"], slm="tiny-gpt2", out="o", max_grad_norm=-1.0)
    assert TrainConfig(inputs=["d.jsonl"], slm="tiny-gpt2", out="o", max_grad_norm=0.0).max_grad_norm == 0.0


def test_numbers_are_checked_from_python_too():
    from llm2slm_cli.config import GenerateConfig, TrainConfig
    from llm2slm_cli.errors import UserError

    with pytest.raises(UserError, match="--lr must be a finite number"):
        TrainConfig(inputs=["d.jsonl"], slm="tiny-gpt2", out="o", lr=float("nan"))
    with pytest.raises(UserError, match="--temperature must be a finite number"):
        GenerateConfig(inputs=["d.jsonl"], model="tiny-gpt2", out="o", sample=True, temperature=float("inf"))


# ------------------------------------------------------------------------------------------- float16 and T5


def test_float16_is_refused_for_every_t5_model(cli, tmp_path):
    """LLMs were refused already; a T5 SLM in generate, bench, train --mixed-precision fp16 (also when it comes from
    `accelerate launch --mixed_precision fp16`) and a checkpoint's T5 SLM are refused the same way."""
    from llm2slm_cli.llm2slm import LLMToSLM

    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    msg = _error(cli, "generate", data, "--model", "tiny-t5", "--dtype", "float16", "--out", tmp_path / "g")
    assert "float16 is refused for T5-family models" in msg and "tiny-t5" in msg
    assert not (tmp_path / "g").exists()
    msg = _error(cli, "bench", "--slm", "tiny-t5", "--dtype", "float16", "--out", tmp_path / "b")
    assert "float16 is refused for T5-family models" in msg
    msg = _error(cli, "train", data, "--slm", "tiny-t5", "--mixed-precision", "fp16", "--out", tmp_path / "t")
    assert "float16 is refused" in msg and "--mixed-precision bf16" in msg
    LLMToSLM.build("tiny-t5", None).save_pretrained(tmp_path / "ckpt")
    msg = _error(cli, "generate", data, "--model", tmp_path / "ckpt", "--dtype", "float16", "--out", tmp_path / "g")
    assert "float16 is refused" in msg and "checkpoint" in msg
    msg = _error(cli, "bench", "--model", f"c={tmp_path / 'ckpt'}", "--dtype", "float16", "--out", tmp_path / "b")
    assert "float16 is refused" in msg and "'c'" in msg
    cli("generate", data, "--model", "tiny-gpt2", "--dtype", "float16", "--out", tmp_path / "ok", "--num-beams", "1",
        "--max-new-tokens", "2", "--quiet")  # GPT2 is fine in float16


def test_train_fp16_from_the_launcher_is_refused_for_t5(monkeypatch):
    from llm2slm_cli.config import TrainConfig
    from llm2slm_cli.errors import UserError

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(UserError, match="float16 is refused"):
        TrainConfig(inputs=["d.jsonl"], slm="tiny-t5", out="o")
    TrainConfig(inputs=["d.jsonl"], slm="tiny-gpt2", out="o")


def test_train_mixed_precision_defers_to_accelerate(monkeypatch, toy_files, tmp_path, cli):
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION; our default must not override it."""
    import accelerate

    seen = []

    class Recording(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.mixed_precision)

    from accelerate.state import AcceleratorState

    monkeypatch.setattr(accelerate, "Accelerator", Recording)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    common = ["--slm", "tiny-gpt2", "--max-steps", "1", "--batch-size", "4", "--micro-batch-size", "4", "--quiet"]
    try:
        for name, extra in (("a", []), ("b", ["--mixed-precision", "no"])):
            AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process, as in a launch
            cli("train", toy_files["train"], *common, "--out", tmp_path / name, *extra)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # the other tests' runs start from scratch
    assert seen == ["bf16", "no"]
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["config"]["mixed_precision"] is None


# -------------------------------------------------------------------------------------------------- messages


def test_count_parameters_needs_no_out_and_train_needs_it_otherwise(cli, tmp_path):
    out = cli("train", tmp_path / "absent.jsonl", "--slm", "tiny-gpt2", "--count-parameters", "--json").output
    assert json.loads(out.strip().splitlines()[-1])["parameters"] > 0
    msg = _error(cli, "train", tmp_path / "absent.jsonl", "--slm", "tiny-gpt2")
    assert msg.startswith("--out is required")


def _offline_hub(monkeypatch):
    """A paper-shape preset's tokenizer comes from the hub: here it cannot be had (as offline without a cache)."""
    import transformers

    def refuse(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


def test_a_paper_shape_slm_without_its_tokenizer_names_slm_tokenizer(cli, tmp_path, monkeypatch):
    _offline_hub(monkeypatch)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    msg = _error(cli, "train", data, "--slm", "preset:gpt2-l1", "--out", tmp_path / "o", "--count-parameters")
    assert "pass --slm-tokenizer DIR" in msg, msg


def test_convert_a_preset_without_its_tokenizer_names_no_option_it_lacks(cli, tmp_path, monkeypatch):
    _offline_hub(monkeypatch)
    msg = _error(cli, "convert", "preset:t5-large", "--out", tmp_path / "o")
    assert "--tokenizer" not in msg and "takes no tokenizer option" in msg, msg


@pytest.mark.parametrize("content,expected", [
    (b"\x00" * 16, "not a GGUF file"),
    (b"GGUF\x03" + b"\x00" * 11, "truncated GGUF file: 16 bytes"),
    (b"GGUF\x07\x00\x00\x00" + b"\x00" * 16, "GGUF version 7 is not supported"),
    (b"GGUF\x03\x00\x00\x00" + b"\x05" + b"\x00" * 7 + b"\x07" + b"\x00" * 7 + b"\x01" * 40, "cannot read this GGUF"),
])
@pytest.mark.parametrize("stage", ["convert", "generate"])
def test_a_damaged_gguf_file_is_one_line(cli, tmp_path, content, expected, stage):
    model = tmp_path / "m.gguf"
    model.write_bytes(content)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    argv = ["convert", model] if stage == "convert" else ["generate", data, "--model", model]
    msg = _error(cli, *argv, "--out", tmp_path / "o")
    assert msg.startswith(str(model)) and expected in msg, msg


# ------------------------------------------------------------------------------- options that were ignored


def test_generate_dtype_is_honoured_for_checkpoints(cli, tmp_path):
    import pyarrow.parquet as pq
    import torch

    from llm2slm_cli.config import GenerateConfig
    from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM
    from llm2slm_cli.stages.generate import load_generator

    torch.manual_seed(0)
    LLMToSLM.build("tiny-gpt2", FrozenLLM("tiny-llama")).save_pretrained(tmp_path / "ckpt")
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    config = GenerateConfig(inputs=[data], model=str(tmp_path / "ckpt"), out=tmp_path / "p", dtype="bfloat16")
    model = load_generator(config, "cpu")[0]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    cli("generate", data, "--model", tmp_path / "ckpt", "--dtype", "bfloat16", "--num-beams", "1",
        "--max-new-tokens", "3", "--out", tmp_path / "p", "--quiet")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["config"]["dtype"] == "bfloat16"
    assert pq.read_table(tmp_path / "p" / "predictions.parquet").num_rows == 2


# ------------------------------------------------------------------------------------------- markup ate text


def test_bracketed_labels_and_paths_are_printed_as_given(cli, tmp_path):
    """rich reads [word] as a markup tag and drops it: 'LLM [transformers]' became a second 'LLM' row and
    runs/exp[lr] became runs/exp."""
    out = tmp_path / "exp[lr]"
    result = cli("bench", "--llm", "tiny-llama", "--compare", "--prompt-length", "4", "--new-tokens", "2",
                 "--repeats", "1", "--warmup", "0", "--no-flops", "--out", out)
    rows = [line for line in result.output.splitlines() if "LLM" in line and "│" in line]
    assert any("LLM [transformers]" in line for line in rows), result.output
    assert f"-> {out}" in result.output.replace("\n", ""), result.output


def test_say_and_eval_print_user_strings_verbatim(capsys, tmp_path):
    from llm2slm_cli import runtime

    runtime.say("wrote runs/exp[lr] and [bold]x[/bold]")
    assert "wrote runs/exp[lr] and [bold]x[/bold]" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- data


def test_one_null_target_keeps_the_other_references(cli, tmp_path):
    import pyarrow.parquet as pq

    rows = [{"id": "a", "src": "hello", "tgt": "x"}, {"id": "b", "src": "hi", "tgt": None},
            {"id": "c", "src": "hey", "tgt": "z"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cli("generate", data, "--model", "tiny-gpt2", "--num-beams", "1", "--max-new-tokens", "2", "--out",
        tmp_path / "p", "--quiet")
    table = pq.read_table(tmp_path / "p" / "predictions.parquet")
    assert dict(zip(table["id"].to_pylist(), table["reference"].to_pylist())) == {"a": "x", "b": None, "c": "z"}
    msg = _error(cli, "eval", tmp_path / "p", "--out", tmp_path / "e")  # eval says which one it cannot score
    assert "prediction id 'b' has no reference" in msg


def _saved_datasets(tmp_path):
    import datasets

    rows = {"id": ["a", "b", "c"], "translation": [{"en": "one", "de": "eins"}, {"en": "two", "de": "zwei"},
                                                  {"en": "three", "de": "drei"}]}
    ds = datasets.Dataset.from_dict(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds, "test": ds.select([2])}).save_to_disk(str(tmp_path / "dd"))
    return ds


def test_datasets_directories_splits_and_arrow_files_are_read(tmp_path):
    from llm2slm_cli.data import Fields, read_examples

    _saved_datasets(tmp_path)
    fields = Fields(prompt="translation.en", target="translation.de")
    want = [("a", "one", "eins"), ("b", "two", "zwei"), ("c", "three", "drei")]
    got = lambda spec: [(e.id, e.prompt, e.target) for e in read_examples([spec], fields)]  # noqa: E731
    assert got(str(tmp_path / "ds")) == want
    assert got(f"{tmp_path / 'dd'}:train") == want and got(f"{tmp_path / 'dd'}:test") == want[2:]
    arrow = sorted((tmp_path / "ds").glob("*.arrow"))
    assert len(arrow) == 1 and got(str(arrow[0])) == want
    from llm2slm_cli.errors import UserError

    with pytest.raises(UserError, match=r"a DatasetDict with splits train, test: name one as .*dd:SPLIT"):
        read_examples([str(tmp_path / "dd")], fields)
    with pytest.raises(UserError, match=r"no split 'dev' \(the splits: train, test\)"):
        read_examples([f"{tmp_path / 'dd'}:dev"], fields)
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="not a readable Arrow file"):
        read_examples([str(bad)], fields)


def test_a_datasets_split_through_the_cli_has_its_own_fingerprint(cli, tmp_path):
    _saved_datasets(tmp_path)
    for split in ("train", "test"):
        cli("encode", f"{tmp_path / 'dd'}:{split}", "--model", "tiny-t5", "--prompt-field", "translation.en",
            "--out", tmp_path / split, "--quiet")
    manifests = [json.loads((tmp_path / s / "manifest.json").read_text()) for s in ("train", "test")]
    assert [m["counts"]["examples"] for m in manifests] == [3, 1]
    assert manifests[0]["input_sha256"] != manifests[1]["input_sha256"]


def test_templates_take_the_field_options_syntax(tmp_path):
    from llm2slm_cli.data import Fields, read_examples

    data = write_jsonl(tmp_path / "d.jsonl", [{"translation": {"en": "one", "de": "eins"}, "n": 3, "l": ["x"]}])
    dotted = read_examples([data], Fields(template="translate: {translation.en} ({n:02d}, {l[0]})"))
    brackets = read_examples([data], Fields(template="translate: {translation[en]} ({n:02d}, {l.0})"))
    assert dotted[0].prompt == brackets[0].prompt == "translate: one (03, x)"
    from llm2slm_cli.errors import UserError

    with pytest.raises(UserError, match=r"line 1, field 'translation.fr': missing field"):
        read_examples([data], Fields(template="{translation.fr}"))
    with pytest.raises(UserError, match=r"field 'translation': expected text for the template, got dict"):
        read_examples([data], Fields(template="{translation}"))
