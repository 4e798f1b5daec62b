"""train --dropout P: every dropout of the SLM set to P while training (none while generating)."""

from __future__ import annotations

import json

import torch
from conftest import error_line
from safetensors.torch import load_file

from llm2slm_cli import loading as M
from llm2slm_cli import surgery

T = ("--template", "upper: {src}")


def _rates(model) -> list[float]:
    """Every dropout rate a transformers model reads: its nn.Dropout layers and its attention layers' floats."""
    rates = []
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            rates.append(module.p)
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, attr, None), float):
                rates.append(getattr(module, attr))
    return rates


def test_set_dropout_reaches_every_dropout_of_each_slm_family():
    # gpt2: residual, embedding and attention nn.Dropout layers; t5: nn.Dropout and its attention's float;
    # llama: only the attention float
    for preset, at_least in (("tiny-gpt2", 1 + 2 * 3), ("tiny-t5", 2 * (2 + 2 * 3) + 2), ("tiny-llama", 3)):
        model = M.load_model(f"preset:{preset}", role="SLM")
        assert set(_rates(model)) <= {0.0}
        n = surgery.set_dropout(model, 0.25)
        assert n >= at_least and n == len(_rates(model)), preset
        assert set(_rates(model)) == {0.25}, preset


def _train(cli, data, out, *extra):
    cli("train", data, "--slm", "tiny-gpt2", *T, "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "4",
        "--lr", "3e-3", "--quiet", "--out", out, *extra)
    return out


def _losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


def test_dropout_zero_trains_bitwise_as_unset_and_dropout_changes_training(cli, toy_files, tmp_path):
    plain = _train(cli, toy_files["train"], tmp_path / "plain")
    zero = _train(cli, toy_files["train"], tmp_path / "zero", "--dropout", "0")
    a, b = load_file(str(plain / "final" / "model.safetensors")), load_file(str(zero / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    dropped = _train(cli, toy_files["train"], tmp_path / "dropped", "--dropout", "0.3")
    assert _losses(dropped)[0] != _losses(plain)[0]  # the same first batch and weights: only dropout differs
    assert json.loads((dropped / "manifest.json").read_text())["config"]["dropout"] == 0.3
    # the checkpoint is the SLM's own architecture: it loads without dropout, and generation is deterministic
    from llm2slm_cli import checkpoint

    model = checkpoint.load(dropped / "final")
    assert set(_rates(model.slm)) <= {0.0}


def test_bad_dropout_and_a_resume_with_another_dropout_are_refused(cli, toy_files, tmp_path):
    assert "--dropout must be in [0, 1)" in error_line(
        cli, "train", toy_files["train"], "--slm", "tiny-gpt2", "--dropout", "1", "--out", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    cli("train", toy_files["train"], "--slm", "tiny-gpt2", *T, "--batch-size", "4", "--micro-batch-size", "4",
        "--max-steps", "4", "--save-every", "2", "--stop-after", "2", "--dropout", "0.1", "--quiet",
        "--out", tmp_path / "cut")
    line = error_line(cli, "train", toy_files["train"], "--slm", "tiny-gpt2", *T, "--batch-size", "4",
                      "--micro-batch-size", "4", "--max-steps", "4", "--save-every", "2", "--dropout", "0.2",
                      "--quiet", "--out", tmp_path / "cut", "--resume")
    assert "--dropout 0.2 (the interrupted run's: 0.1)" in line
