"""Several processes (`accelerate launch`, gloo on CPU) give what one process gives: encode's features bitwise,
generate's and distill-labels' outputs exactly, train's loss curve and weights within float tolerance."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ACCELERATE = Path(sys.executable).parent / "accelerate"
CPU_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "multi-gpu" / "cpu-two-processes.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: object, processes: int = 2, config: Path | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N -m llm2slm_cli ...` (or `accelerate launch --config_file
    CONFIG -m llm2slm_cli ...`): torchrun underneath; with --device cpu the processes talk through gloo."""
    if shutil.which(str(ACCELERATE)) is None:
        pytest.skip("the accelerate launcher is not installed beside this python")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    how = ["--config_file", str(config)] if config is not None else [
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    cmd = [str(ACCELERATE), "launch", *how, "-m", "llm2slm_cli", *map(str, args), "--device", "cpu", "--quiet"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """25 prompts of varied length: uneven shards, and a last training batch smaller than the process count."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    rows = [{"id": f"e{i}", "src": " ".join(words[(i * 7 + j) % 6] for j in range(1 + i % 7)),
             "tgt": "xy" * (1 + i % 4)} for i in range(25)]
    return write_jsonl(tmp_path_factory.mktemp("mp") / "d.jsonl", rows)


def test_encode_two_processes_bitwise_equal(cli, prompts, tmp_path):
    options = ["--model", "tiny-t5", "--shard-size", "7", "--batch-size", "3"]
    cli("encode", prompts, *options, "--out", tmp_path / "one", "--device", "cpu", "--quiet")
    launch("encode", prompts, *options, "--out", tmp_path / "two")
    one, two = (sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("one", "two"))
    assert one == two == ["features-00000.safetensors", "features-00001.safetensors", "features-00002.safetensors",
                          "features-00003.safetensors", "index.parquet", "manifest.json"]
    for name in one[:-1]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert m1["shards"] == m2["shards"] and m1["counts"] == m2["counts"]
    assert (m1["processes"], m2["processes"]) == (1, 2)


def test_encode_with_the_recipe_cpu_config_equals_one_process(cli, prompts, tmp_path):
    """recipes/multi-gpu/cpu-two-processes.yaml, launched as its README says, starts two processes (the manifest
    says so) that write one process's files."""
    options = ["--model", "tiny-t5-large", "--shard-size", "7"]
    cli("encode", prompts, *options, "--out", tmp_path / "one", "--device", "cpu", "--quiet")
    launch("encode", prompts, *options, "--out", tmp_path / "two", config=CPU_RECIPE)
    one, two = (sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("one", "two"))
    assert one == two and len(one) == 6 and one[-1] == "manifest.json"
    for name in one[:-1]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert (m1["processes"], m2["processes"]) == (1, 2) and m1["estimate"] == m2["estimate"]


def test_generate_and_distill_two_processes_equal(cli, prompts, tmp_path):
    # nucleus sampling: equal only if every shard draws from its own seed, whichever process runs it
    gen = ["--model", "tiny-llama", "--template", "upper: {src}", "--sample", "--top-p", "0.9", "--seed", "3",
           "--max-new-tokens", "6", "--shard-size", "6", "--batch-size", "4"]
    cli("generate", prompts, *gen, "--out", tmp_path / "g1", "--device", "cpu", "--quiet")
    launch("generate", prompts, *gen, "--out", tmp_path / "g2")
    g1, g2 = (pq.read_table(tmp_path / d / "predictions.parquet").to_pylist() for d in ("g1", "g2"))
    assert len(g1) == 25 and g1 == g2
    assert [r["id"] for r in g1] == [f"e{i}" for i in range(25)]  # input order

    dist = ["--model", "tiny-llama", "--template", "upper: {src}", "--num-beams", "2", "--max-new-tokens", "5",
            "--shard-size", "10", "--batch-size", "4"]
    cli("distill-labels", prompts, *dist, "--out", tmp_path / "d1", "--device", "cpu", "--quiet")
    launch("distill-labels", prompts, *dist, "--out", tmp_path / "d2")
    d1, d2 = (pq.read_table(tmp_path / d / "examples.parquet").to_pylist() for d in ("d1", "d2"))
    assert len(d1) == 25 and d1 == d2


def test_train_two_processes_same_loss_curve(cli, prompts, tmp_path):
    cli("encode", prompts, "--model", "tiny-t5", "--out", tmp_path / "f", "--device", "cpu", "--quiet")
    # 25 examples in batches of 8: step 4 has one example, so one process has none and must still join in
    options = ["--slm", "tiny-gpt2", "--llm", "tiny-t5", "--features", tmp_path / "f", "--batch-size", "8",
               "--micro-batch-size", "2", "--max-steps", "8", "--lr", "3e-3"]
    cli("train", prompts, *options, "--out", tmp_path / "t1", "--device", "cpu", "--quiet")
    launch("train", prompts, *options, "--out", tmp_path / "t2")
    logs = [[json.loads(line) for line in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
            for d in ("t1", "t2")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == list(range(1, 9))
    assert [r["tokens"] for r in logs[0]] == [r["tokens"] for r in logs[1]]
    for a, b in zip(*logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
    assert logs[0][-1]["loss"] < logs[0][0]["loss"] - 0.5  # it learned something: the curves are not flat
    w1, w2 = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("t1", "t2"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


def test_train_streaming_two_processes_same_batches_and_loss_curve(cli, prompts, tmp_path):
    """--streaming: every process draws the same stream and keeps its share of each global batch, so two processes
    train on one process's batches (same target tokens a step) with its loss curve; a stream resumed in two processes
    continues exactly."""
    options = ["--slm", "tiny-gpt2", "--streaming", "--shuffle-buffer", "6", "--batch-size", "8",
               "--micro-batch-size", "2", "--max-steps", "8", "--lr", "3e-3", "--save-every", "4"]
    cli("train", prompts, *options, "--out", tmp_path / "t1", "--device", "cpu", "--quiet")
    launch("train", prompts, *options, "--stop-after", "4", "--out", tmp_path / "t2")
    launch("train", prompts, *options, "--out", tmp_path / "t2", "--resume")
    logs = [[json.loads(line) for line in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
            for d in ("t1", "t2")]
    assert [r["step"] for r in logs[1]] == list(range(1, 9))
    assert [r["tokens"] for r in logs[0]] == [r["tokens"] for r in logs[1]]
    for a, b in zip(*logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
    w1, w2 = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("t1", "t2"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
