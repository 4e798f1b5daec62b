"""Faults: a stage killed with SIGKILL mid-run and resumed with --resume writes what an uninterrupted run writes;
Ctrl-C stops cleanly; a damaged shard is named; out-of-memory in generate halves the batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_jsonl

from llm2slm_cli import generation

LLM2SLM = [sys.executable, "-m", "llm2slm_cli"]


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """Enough prompts, in shards of 2, that a run is still busy when its first shard lands."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"]
    rows = [{"id": f"m{i}", "src": " ".join(words[(i * 5 + j) % 7] for j in range(1 + i % 9)),
             "tgt": "ab" * (1 + i % 3)} for i in range(120)]
    return write_jsonl(tmp_path_factory.mktemp("faults") / "many.jsonl", rows)


def start(*args: object) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*LLM2SLM, *map(str, args), "--device", "cpu", "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, directory: Path, pattern: str, count: int = 1, timeout: float = 240) -> None:
    """Until `count` files matching `pattern` exist in `directory` (the run is under way)."""
    deadline = time.monotonic() + timeout
    while len(list(directory.glob(pattern))) < count:
        if proc.poll() is not None:
            raise AssertionError(f"finished (exit {proc.returncode}) before it could be interrupted:\n"
                                 f"{proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run to write its first shard")
        time.sleep(0.01)


def kill_midway(args: list[object], out: Path, pattern: str, count: int = 1) -> None:
    proc = start(*args, "--out", out)
    wait_for(proc, out, pattern, count)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists(), "the run had already finished: the test proves nothing"


def same_files(a: Path, b: Path, skip: tuple[str, ...] = ("manifest.json",)) -> None:
    names = sorted(p.name for p in a.iterdir() if p.name not in skip)
    assert names == sorted(p.name for p in b.iterdir() if p.name not in skip)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_encode_killed_then_resumed(cli, many, tmp_path):
    args = ["encode", many, "--model", "tiny-t5", "--shard-size", "2", "--batch-size", "2"]
    cli(*args, "--out", tmp_path / "straight", "--quiet")
    kill_midway(args, tmp_path / "killed", "index-*.parquet", count=3)
    cli(*args, "--out", tmp_path / "killed", "--resume", "--quiet")
    same_files(tmp_path / "straight", tmp_path / "killed")
    assert not list((tmp_path / "killed").glob(".*")), "plan and temporary files are cleaned up"


def test_distill_killed_then_resumed(cli, many, tmp_path):
    args = ["distill-labels", many, "--model", "tiny-llama", "--template", "upper: {src}", "--sample", "--seed",
            "5", "--max-new-tokens", "4", "--shard-size", "2", "--batch-size", "2"]
    cli(*args, "--out", tmp_path / "straight", "--quiet")
    kill_midway(args, tmp_path / "killed", "examples-*.parquet", count=2)
    cli(*args, "--out", tmp_path / "killed", "--resume", "--quiet")
    same_files(tmp_path / "straight", tmp_path / "killed")


def test_generate_killed_then_resumed(cli, many, tmp_path):
    args = ["generate", many, "--model", "tiny-llama", "--template", "upper: {src}", "--sample", "--seed", "5",
            "--max-new-tokens", "4", "--shard-size", "2", "--batch-size", "2"]
    cli(*args, "--out", tmp_path / "straight", "--quiet")
    kill_midway(args, tmp_path / "killed", "predictions-*.parquet", count=2)
    cli(*args, "--out", tmp_path / "killed", "--resume", "--quiet")
    same_files(tmp_path / "straight", tmp_path / "killed")


def test_train_killed_then_resumed(cli, many, tmp_path):
    args = ["train", many, "--slm", "tiny-gpt2", "--batch-size", "4", "--micro-batch-size", "2", "--max-steps",
            "40", "--save-every", "2", "--lr", "3e-3"]
    cli(*args, "--out", tmp_path / "straight", "--quiet")
    kill_midway(args, tmp_path / "killed", "step-*", count=2)
    cli(*args, "--out", tmp_path / "killed", "--resume", "--quiet")
    a, b = (Path(tmp_path / d) for d in ("straight", "killed"))
    assert (a / "final" / "model.safetensors").read_bytes() == (b / "final" / "model.safetensors").read_bytes()
    steps = [[{k: v for k, v in json.loads(line).items() if k != "examples_per_second"}
              for line in (d / "train_log.jsonl").read_text().splitlines()] for d in (a, b)]
    assert steps[0] == steps[1] and len(steps[0]) == 40


def test_ctrl_c_stops_after_the_batch_and_resume_finishes(cli, many, tmp_path):
    args = ["encode", many, "--model", "tiny-t5", "--shard-size", "2", "--batch-size", "2"]
    out = tmp_path / "interrupted"
    proc = start(*args, "--out", out)
    wait_for(proc, out, "index-*.parquet", count=2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists()
    for part in out.glob("index-*.parquet"):  # every shard on disk is complete and readable
        k = int(part.stem.split("-")[1])
        assert pq.read_table(part).num_rows == 2
        assert (out / f"features-{k:05d}.safetensors").is_file()
    cli(*args, "--out", out, "--resume", "--quiet")
    cli(*args, "--out", tmp_path / "straight", "--quiet")
    same_files(tmp_path / "straight", out)


def test_ctrl_c_in_train_writes_a_checkpoint(cli, many, tmp_path):
    args = ["train", many, "--slm", "tiny-gpt2", "--batch-size", "4", "--micro-batch-size", "2", "--max-steps",
            "400"]
    out = tmp_path / "t"
    proc = start(*args, "--out", out)
    wait_for(proc, out, "train_log.jsonl")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    saved = sorted(out.glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "trainer_state.json").is_file() and "continue with --resume" in err
    step = json.loads((saved[0] / "trainer_state.json").read_text())["step"]
    assert len((out / "train_log.jsonl").read_text().splitlines()) == step


def test_damaged_shard_is_named(cli, toy_files, tmp_path):
    cli("encode", toy_files["train"], "--model", "tiny-t5", "--out", tmp_path / "f", "--shard-size", "8", "--quiet")
    shard = tmp_path / "f" / "features-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in the values: same size, so only the checksum can tell
    shard.write_bytes(bytes(data))
    train = ["train", toy_files["train"], "--slm", "tiny-gpt2", "--llm", "tiny-t5", "--features", tmp_path / "f",
             "--max-steps", "1"]
    result = cli(*train, "--out", tmp_path / "t", code=2)
    assert "features-00001.safetensors: feature shard is damaged: its sha256 differs" in result.output
    shard.write_bytes(bytes(data[:-100]))  # truncated
    result = cli(*train, "--out", tmp_path / "t", "--overwrite", code=2)
    assert "features-00001.safetensors: feature shard is damaged (truncated or overwritten)" in result.output


def test_damaged_predictions_and_checkpoint_are_named(cli, toy_files, tmp_path):
    cli("train", toy_files["train"], "--slm", "tiny-gpt2", "--out", tmp_path / "t", "--max-steps", "1", "--quiet")
    weights = tmp_path / "t" / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    result = cli("generate", toy_files["dev"], "--model", tmp_path / "t" / "final", "--out", tmp_path / "g", code=2)
    assert "model.safetensors: checkpoint weights file is damaged" in result.output
    cli("generate", toy_files["dev"], "--model", "tiny-gpt2", "--out", tmp_path / "p", "--max-new-tokens", "2",
        "--quiet")
    predictions = tmp_path / "p" / "predictions.parquet"
    predictions.write_bytes(predictions.read_bytes()[:-1] + b"X")
    result = cli("eval", tmp_path / "p", "--out", tmp_path / "e", code=2)
    assert "predictions.parquet: predictions file is damaged" in result.output


def test_out_of_memory_halves_the_batch(cli, toy_files, tmp_path, monkeypatch):
    """A device that cannot hold more than 2 prompts at once: the run goes on with batches of 2, and gives what
    --batch-size 2 gives."""
    args = ["generate", toy_files["train"], "--model", "tiny-llama", "--max-new-tokens", "3", "--quiet"]
    cli(*args, "--batch-size", "2", "--out", tmp_path / "two")
    real = generation.PlainModel.generate

    def small_device(self, prompt_ids, prompt_mask, **kw):
        if prompt_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, prompt_ids, prompt_mask, **kw)

    monkeypatch.setattr(generation.PlainModel, "generate", small_device)
    result = cli(*args, "--batch-size", "8", "--out", tmp_path / "eight")
    assert "out of memory with a batch of 8: continuing with batches of 4" in result.output
    assert "out of memory with a batch of 4: continuing with batches of 2" in result.output
    same_files(tmp_path / "two", tmp_path / "eight")
    manifest = json.loads((tmp_path / "eight" / "manifest.json").read_text())
    assert manifest["batch_size_reductions"] == [4, 2]


def test_feature_cache_reuses_what_was_encoded(cli, toy_files, tmp_path, monkeypatch):
    from llm2slm_cli.llm2slm import FrozenLLM

    cache = tmp_path / "cache"
    args = ["encode", toy_files["train"], "--model", "tiny-llama", "--layer", "1", "--quiet"]
    cli(*args, "--out", tmp_path / "a", "--cache", cache)
    entries = [p for p in cache.iterdir()]
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()
    first = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert first["cache"] == {"key": entries[0].name, "hit": False}

    def no_forward(*a, **k):
        raise AssertionError("the LLM ran although the features were cached")

    monkeypatch.setattr(FrozenLLM, "encode", no_forward)
    monkeypatch.setenv("LLM2SLM_CACHE", str(cache))  # the option's environment variable
    cli(*args, "--out", tmp_path / "b")
    same_files(tmp_path / "a", tmp_path / "b")
    shard = "features-00000.safetensors"
    assert (tmp_path / "b" / shard).stat().st_ino == (entries[0] / shard).stat().st_ino  # linked, not copied
    second = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert second["cache"]["hit"] is True and second["config"]["out"] == str(tmp_path / "b")
    assert second["shards"] == first["shards"]
    with pytest.raises(AssertionError, match="the LLM ran"):  # another layer is another feature set
        cli("encode", toy_files["train"], "--model", "tiny-llama", "--layer", "2", "--out", tmp_path / "c",
            "--quiet")
    monkeypatch.undo()
    # the linked features train like any others
    cli("train", toy_files["train"], "--slm", "tiny-gpt2", "--llm", "tiny-llama", "--features", tmp_path / "b",
        "--out", tmp_path / "t", "--max-steps", "1", "--quiet")


def test_damaged_labels_are_named(cli, toy_files, tmp_path):
    cli("distill-labels", toy_files["train"], "--model", "tiny-llama", "--out", tmp_path / "l", "--num-beams", "1",
        "--max-new-tokens", "3", "--quiet")
    labels = tmp_path / "l" / "examples.parquet"
    labels.write_bytes(labels.read_bytes() + b"\0")
    result = cli("train", tmp_path / "l", "--slm", "tiny-gpt2", "--out", tmp_path / "t", "--max-steps", "1", code=2)
    assert "examples.parquet: labels file is damaged (truncated or overwritten)" in result.output
