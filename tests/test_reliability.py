"""Nothing silently wrong (issue 15): bad numbers, half precision for T5, messages that name the right option, damaged
model files, options that were ignored, markup that ate user text, data that was dropped or refused, a full disk,
two runs on one output directory, manifests of the wrong shape."""

from __future__ import annotations

import json

import pytest
from conftest import error_line as _error
from conftest import write_jsonl

ROWS = [{"id": "a", "src": "hello there", "tgt": "x"}, {"id": "b", "src": "hi", "tgt": "y"}]



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
    from llm2slm_cli import checkpoint
    from llm2slm_cli.llm2slm import LLMToSLM

    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    msg = _error(cli, "generate", data, "--model", "tiny-t5", "--dtype", "float16", "--out", tmp_path / "g")
    assert "float16 is refused for T5-family models" in msg and "tiny-t5" in msg
    assert not (tmp_path / "g").exists()
    msg = _error(cli, "bench", "--slm", "tiny-t5", "--dtype", "float16", "--out", tmp_path / "b")
    assert "float16 is refused for T5-family models" in msg
    msg = _error(cli, "train", data, "--slm", "tiny-t5", "--mixed-precision", "fp16", "--out", tmp_path / "t")
    assert "float16 is refused" in msg and "--mixed-precision bf16" in msg
    checkpoint.save(LLMToSLM.build("tiny-t5", None), tmp_path / "ckpt")
    msg = _error(cli, "generate", data, "--model", tmp_path / "ckpt", "--dtype", "float16", "--out", tmp_path / "g")
    assert "float16 is refused" in msg and "checkpoint" in msg
    msg = _error(cli, "bench", "--model", f"c={tmp_path / 'ckpt'}", "--dtype", "float16", "--out", tmp_path / "b")
    assert "float16 is refused" in msg and "'c'" in msg
    cli("generate", data, "--model", "tiny-gpt2", "--dtype", "float16", "--out", tmp_path / "ok", "--num-beams", "1",
        "--max-new-tokens", "2", "--quiet")  # GPT2 is fine in float16


def test_train_fp16_from_the_launcher_is_refused_for_t5(monkeypatch, cli, tmp_path):
    """`accelerate launch --mixed_precision fp16` sets ACCELERATE_MIXED_PRECISION: a T5 SLM or LLM is refused from
    its config before anything is loaded or written; a GPT2 SLM with a Llama LLM is not."""
    from llm2slm_cli.config import TrainConfig
    from llm2slm_cli.errors import UserError
    from llm2slm_cli.stages.train import _refuse_float16

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    msg = _error(cli, "train", data, "--slm", "tiny-t5", "--out", tmp_path / "t")
    assert "float16 is refused" in msg and "SLM 'tiny-t5'" in msg and not (tmp_path / "t").exists()
    with pytest.raises(UserError, match="float16 is refused .*LLM 'tiny-t5-large'"):
        _refuse_float16(TrainConfig(inputs=[data], slm="tiny-gpt2", llm="tiny-t5-large", out=tmp_path / "t"))
    _refuse_float16(TrainConfig(inputs=[data], slm="tiny-gpt2", llm="tiny-llama", out=tmp_path / "t"))


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

    from llm2slm_cli import checkpoint
    from llm2slm_cli.config import GenerateConfig
    from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM
    from llm2slm_cli.stages.generate import load_generator

    torch.manual_seed(0)
    checkpoint.save(LLMToSLM.build("tiny-gpt2", FrozenLLM("tiny-llama")), tmp_path / "ckpt")
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


# ------------------------------------------------------------------------------------------------- disk full


def test_atomic_writes_on_a_full_disk_leave_nothing_and_name_the_path(tmp_path, monkeypatch):
    import errno
    import os
    from pathlib import Path

    import pyarrow as pa

    from llm2slm_cli import artifacts as A

    target = tmp_path / "manifest.json"
    target.write_text("the complete earlier file\n")

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # the OS call where a full disk shows (delayed allocation, NFS)
    with pytest.raises(A.DiskFull, match=f"{target}: no space left on device"):
        A.atomic_write_json(target, {"kind": "x"})
    assert target.read_text() == "the complete earlier file\n"  # nothing already written is lost
    monkeypatch.undo()
    import pyarrow.parquet as pq

    def half_then_full(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half")
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(pq, "write_table", half_then_full)
    with pytest.raises(A.DiskFull, match="disk quota exceeded"):
        A.write_parquet(tmp_path / "p.parquet", pa.table({"a": [1]}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # no temporary left


def _tmpfs_available() -> bool:
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True)
    return probe.returncode == 0


A_LOG = "train_log.jsonl"
DRIVER = '''
import collections, contextlib, json, os, shutil, subprocess, sys
from pathlib import Path
from unittest import mock

import torch
from typer.testing import CliRunner

from llm2slm_cli.cli import app

torch.set_num_threads(1)
steps, keep = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
results = []
for step in steps:
    if "mount" in step:  # a small file system of its own for the next run: a real ENOSPC from the kernel
        Path(step["mount"]).mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + step["size"], "tmpfs", step["mount"]], check=True)
    elif "grow" in step:  # space freed
        subprocess.run(["mount", "-o", "remount,size=64m", step["grow"]], check=True)
    else:  # "room": the disk seems to have room when encode checks (another writer fills it during the run)
        usage = collections.namedtuple("usage", "total used free")(1 << 40, 0, 1 << 40)
        with mock.patch("shutil.disk_usage", lambda p: usage) if step.get("room") else contextlib.nullcontext():
            r = CliRunner().invoke(app, step["argv"])
        out = Path(step["out"])
        results.append({"code": r.exit_code, "output": r.output, "exception": repr(r.exception),
                        "exists": out.exists(),
                        "files": sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.is_dir() else []})
        if r.exit_code == 0:
            shutil.copytree(out, keep / out.name)
print("RESULTS" + json.dumps(results))
'''


@pytest.mark.skipif(not _tmpfs_available(), reason="needs unprivileged user namespaces (unshare -rm) to mount a "
                                                   "small tmpfs")
def test_a_full_disk_is_one_line_and_resume_finishes_the_run(cli, tmp_path):
    """encode, generate, train and convert on a real, tiny tmpfs (its kernel's ENOSPC, whatever library writes:
    safetensors, Arrow, torch.save, json): exit 2 with one line naming the path, no temporary left, no manifest; then,
    with space freed, --resume writes exactly what an uninterrupted run writes. encode first refuses at once, from
    the tmpfs's real free space, before it writes anything; its ENOSPC is that of a disk that filled up after the
    check."""
    import os
    import random
    import subprocess
    import sys
    from pathlib import Path

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    rows = [{"id": f"r{i}", "src": " ".join(rng.choices(words, k=rng.randint(3, 12))), "tgt": "x"} for i in range(300)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    encode = ["encode", data, "--model", "tiny-t5", "--shard-size", "40", "--quiet"]
    generate = ["generate", data, "--model", "tiny-gpt2", "--num-beams", "1", "--max-new-tokens", "3",
                "--shard-size", "40", "--quiet"]
    train = ["train", data, "--slm", "tiny-gpt2", "--max-steps", "4", "--batch-size", "8", "--micro-batch-size", "8",
             "--save-every", "2", "--quiet"]
    runs = {"encode": (encode, "256k"), "generate": (generate, "40k"), "train": (train, "1200k")}
    for name, (argv, _) in runs.items():  # the uninterrupted runs, on a disk with room
        cli(*argv, "--out", tmp_path / "ref" / name)
    steps = []
    for name, (argv, size) in runs.items():
        fs, out = mnt / name, mnt / name / name
        argv = [str(a) for a in argv] + ["--out", str(out)]
        first = [{"argv": argv, "out": str(out)}]
        if name == "encode":
            first.append({"argv": argv, "out": str(out), "room": True})
        steps += [{"mount": str(fs), "size": size}, *first, {"grow": str(fs)},
                  {"argv": argv + ["--resume"], "out": str(out)}]
    converted = str(mnt / "convert" / "c")
    steps += [{"mount": str(mnt / "convert"), "size": "300k"},
              {"argv": ["convert", "tiny-gpt2", "--out", converted], "out": converted}]
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    (tmp_path / "driver.py").write_text(DRIVER)
    proc = subprocess.run(["unshare", "-rm", sys.executable, tmp_path / "driver.py", tmp_path / "steps.json",
                           tmp_path / "keep"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": str(Path(__file__).resolve().parents[1])})  # this checkout's code
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    refused = results.pop(0)  # encode's estimate, before anything is written
    lines = [line for line in refused["output"].splitlines() if line.startswith("error: ")]
    assert refused["code"] == 2 and len(lines) == 1 and "Traceback" not in refused["output"], refused
    assert lines[0].startswith(f"error: {mnt / 'encode' / 'encode'}: the features need ") and \
        "without --features encodes each batch on the fly" in lines[0], lines[0]
    assert not refused["exists"], refused["files"]
    failed = [results[0], results[2], results[4], results[6]]
    for (name, _), r in zip([*runs.items(), ("convert", None)], failed):
        assert r["code"] == 2, (name, r)
        lines = [line for line in r["output"].splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in r["output"], (name, r["output"])
        assert "no space left on device" in lines[0] and str(mnt / name) in lines[0], (name, lines[0])
        assert not [f for f in r["files"] if ".tmp" in f] and "manifest.json" not in r["files"], (name, r["files"])
    assert results[6]["files"] == []  # convert: nothing of the model was left in its output directory
    for name, r in zip(runs, [results[1], results[3], results[5]]):
        assert r["code"] == 0, (name, r["output"], r["exception"])
    ref, keep = tmp_path / "ref", tmp_path / "keep"
    for f in sorted((ref / "encode").glob("*.safetensors")) + [ref / "encode" / "index.parquet"]:
        assert (keep / "encode" / f.name).read_bytes() == f.read_bytes(), f.name
    import pyarrow.parquet as pq

    assert pq.read_table(keep / "generate" / "predictions.parquet").equals(
        pq.read_table(ref / "generate" / "predictions.parquet"))
    assert (keep / "train" / "final" / "model.safetensors").read_bytes() == \
        (ref / "train" / "final" / "model.safetensors").read_bytes()
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, (d / "train" / A_LOG).read_text().splitlines())]
              for d in (ref, keep)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


# ------------------------------------------------------------------------------------ two runs on one --out


def test_a_second_process_on_the_same_out_is_refused_and_the_first_finishes(cli, tmp_path):
    """A real second llm2slm process (with --overwrite, which would delete the first one's files, and with
    --resume) is refused at once while the first holds its --out; the first, paused meanwhile, then finishes with
    exactly the files of a run that was alone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rows = [{"id": f"r{i}", "src": "alpha beta gamma " * (1 + i % 5)} for i in range(200)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    argv = [sys.executable, "-m", "llm2slm_cli", "encode", str(data), "--model", "tiny-t5", "--shard-size", "20",
            "--device", "cpu", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out, lock = tmp_path / "f", tmp_path / ".f.lock"
    first = subprocess.Popen([*argv, "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not lock.exists():  # the lock is taken before the LLM is loaded: a wide window
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline, "the first run never took its lock"
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)  # it holds --out, doing nothing, while the others try
    try:
        for extra in (["--overwrite"], ["--resume"], []):
            second = subprocess.run([*argv, "--out", str(out), *extra], env=env, capture_output=True, text=True,
                                    timeout=120)
            assert second.returncode == 2, second.stderr
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0] == (f"error: {out}: another llm2slm process (pid {first.pid}) is "
                                                    "writing this output directory: wait for it to finish, or give "
                                                    "another --out"), second.stderr
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=240) == 0, first.stderr.read()
    assert not lock.exists()  # released with the run
    cli("encode", data, "--model", "tiny-t5", "--shard-size", "20", "--out", tmp_path / "alone", "--quiet")
    for f in sorted((tmp_path / "alone").iterdir()):
        if f.name != "manifest.json":
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "alone").iterdir())
    cli("encode", data, "--model", "tiny-t5", "--shard-size", "20", "--out", out, "--overwrite", "--quiet")


# ------------------------------------------------------------------------------------- manifests of other shapes


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, toy_files):
    """One of each artifact kind a stage reads: features, a checkpoint (with its manifest), predictions, labels."""
    from conftest import Cli

    cli, d = Cli(), tmp_path_factory.mktemp("artifacts")
    cli("encode", toy_files["train"], "--model", "tiny-t5", "--out", d / "features", "--quiet")
    cli("train", toy_files["train"], "--slm", "tiny-gpt2", "--max-steps", "1", "--batch-size", "8",
        "--micro-batch-size", "8", "--out", d / "run", "--quiet")
    cli("generate", toy_files["dev"], "--model", "tiny-gpt2", "--num-beams", "1", "--max-new-tokens", "2", "--out",
        d / "predictions", "--quiet")
    cli("distill-labels", toy_files["train"], "--model", "tiny-gpt2", "--num-beams", "1", "--max-new-tokens", "2",
        "--out", d / "labels", "--quiet")
    return d


def _tamper(artifacts, tmp_path, name: str, file: str, change) -> object:
    import shutil

    shutil.copytree(artifacts / name, tmp_path / name)
    path = tmp_path / name / file
    value = json.loads(path.read_text())
    path.write_text(json.dumps(change(value)))
    return tmp_path / name


def _set(key, value):
    def change(d):
        d = dict(d)
        if value is KeyError:
            d.pop(key)
        else:
            d[key] = value
        return d
    return change


FEATURE_CASES = [
    (lambda m: [m], "the manifest is a list, expected a table"),
    (lambda m: "features", "the manifest is text, expected a table"),
    (_set("llm", "tiny-t5"), "'llm' is text, expected a table"),
    (_set("llm", {"name": "tiny-t5"}), "no 'llm.kind' in it"),
    (_set("shards", {"0": 1}), "'shards' is a table, expected a list"),
    (_set("files", {"index.parquet": "abc"}), "'files.index.parquet' is text, expected a table"),
    (_set("template", 5), "'template' is an integer, expected text or null"),
    (_set("max_length", True), "'max_length' is true/false, expected an integer"),
    (_set("layer", KeyError), "no 'layer' in it"),
]


@pytest.mark.parametrize("change,expected", FEATURE_CASES)
def test_a_features_manifest_of_another_shape_is_one_line(cli, artifacts, toy_files, tmp_path, change, expected):
    features = _tamper(artifacts, tmp_path, "features", "manifest.json", change)
    msg = _error(cli, "train", toy_files["train"], "--llm", "tiny-t5", "--slm", "tiny-gpt2", "--features", features,
                 "--out", tmp_path / "o")
    assert msg.startswith(str(features / "manifest.json")) and expected in msg, msg


CHECKPOINT_CASES = [
    ("llm2slm.json", lambda m: [], "the checkpoint config is a list, expected a table"),
    ("llm2slm.json", lambda m: {}, "no 'version' in the checkpoint config"),
    ("llm2slm.json", _set("llm", "tiny-llama"), "'llm' is text, expected a table or null"),
    ("llm2slm.json", _set("trim_vocab", {"kept": 3}), "no 'trim_vocab.full' in it"),
    ("llm2slm.json", _set("pad_token_id", "0"), "'pad_token_id' is text, expected an integer"),
    ("slm_config.json", lambda m: {}, "the SLM config names no model_type"),
    ("slm_config.json", lambda m: {"model_type": "no-such-model"}, "does not describe a model transformers knows"),
    ("slm_config.json", lambda m: "gpt2", "the SLM config is text, expected a table"),
    ("manifest.json", _set("files", ["model.safetensors"]), "'files' is a list, expected a table of file names"),
    ("manifest.json", _set("files", {"model.safetensors": {"bytes": "12", "sha256": "x"}}),
     "'files.model.safetensors.bytes' is text, expected an integer"),
]


@pytest.mark.parametrize("file,change,expected", CHECKPOINT_CASES)
def test_a_checkpoint_of_another_shape_is_one_line(cli, artifacts, toy_files, tmp_path, file, change, expected):
    run = tmp_path / "run"
    _tamper(artifacts, tmp_path, "run", f"final/{file}", change)
    checkpoint = run / "final"
    msg = _error(cli, "generate", toy_files["dev"], "--model", checkpoint, "--out", tmp_path / "o")
    assert msg.startswith(str(checkpoint / file)) and expected in msg, msg


def test_predictions_and_labels_manifests_of_another_shape_are_one_line(cli, artifacts, toy_files, tmp_path):
    predictions = _tamper(artifacts, tmp_path, "predictions", "manifest.json", _set("files", "predictions.parquet"))
    msg = _error(cli, "eval", predictions, "--out", tmp_path / "e")
    assert "'files' is text, expected a table of file names" in msg, msg
    labels = _tamper(artifacts, tmp_path, "labels", "manifest.json", lambda m: [m])
    msg = _error(cli, "train", labels, "--slm", "tiny-gpt2", "--out", tmp_path / "t")
    assert msg.startswith(str(labels / "manifest.json")) and "the manifest is a list" in msg, msg
