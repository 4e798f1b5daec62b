"""train --init-from: fine-tune a trained checkpoint on new inputs (e.g. a draft on the LLM's own outputs). The
checkpoint fixes the model; the run starts from its weights, with a new optimiser and schedule."""

from __future__ import annotations

import json

import torch
from conftest import error_line
from safetensors.torch import load_file

T = ("--template", "upper: {src}")


def _train(cli, data, out, *extra):
    cli("train", data, "--slm", "tiny-gpt2", *T, "--batch-size", "4", "--micro-batch-size", "4", "--max-steps",
        "3", "--quiet", "--out", out, *extra)
    return out / "final"


def test_a_run_started_from_a_checkpoint_starts_from_its_weights(cli, toy_files, tmp_path):
    """At a learning rate too small to move a float32 weight, one step from the checkpoint leaves its weights
    bit for bit; the same step from the SLM's own weights does not give them."""
    base = _train(cli, toy_files["train"], tmp_path / "base", "--llm", "tiny-llama", "--trim-vocab",
                  "--feature-norm", "standardize", "--lr", "3e-3")
    again = _train(cli, toy_files["train"], tmp_path / "again", "--llm", "tiny-llama", "--init-from", base,
                   "--lr", "1e-30", "--max-steps", "1")
    want, got = load_file(str(base / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert sorted(want) == sorted(got) and "slm_vocab" in got and "projector.feature_scale" in got
    assert all(torch.equal(want[k], got[k]) for k in want)
    fresh = _train(cli, toy_files["train"], tmp_path / "fresh", "--llm", "tiny-llama", "--trim-vocab",
                   "--feature-norm", "standardize", "--lr", "1e-30", "--max-steps", "1")
    fresh_w = load_file(str(fresh / "model.safetensors"))
    assert not torch.equal(fresh_w["projector.0.weight"], got["projector.0.weight"])
    # the checkpoint's model, recorded as the new run's; its manifest names where it started
    assert json.loads((again / "llm2slm.json").read_text())["trim_vocab"] == \
        json.loads((base / "llm2slm.json").read_text())["trim_vocab"]
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert manifest["config"]["init_from"] == str(base)


def test_fine_tuning_a_checkpoint_on_new_targets_learns_them_and_resumes_exactly(cli, toy_files, tmp_path):
    base = _train(cli, toy_files["train"], tmp_path / "base", "--lr", "3e-3")
    # new targets: the prompts themselves reversed, as if an LLM had answered them otherwise
    rows = [json.loads(line) for line in toy_files["train"].read_text().splitlines()]
    new = tmp_path / "new.jsonl"
    new.write_text("".join(json.dumps({**r, "tgt": r["src"][::-1]}) + "\n" for r in rows))
    args = ("--init-from", base, "--lr", "3e-3", "--max-steps", "6", "--save-every", "3")
    whole = _train(cli, new, tmp_path / "whole", *args)
    first = [json.loads(line) for line in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in first if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    cli("train", new, "--slm", "tiny-gpt2", *T, "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "6",
        "--quiet", "--out", tmp_path / "cut", "--init-from", base, "--lr", "3e-3", "--save-every", "3",
        "--stop-after", "3")
    cut = _train(cli, new, tmp_path / "cut", *args, "--resume")
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resuming with another starting checkpoint is another run: refused
    other = _train(cli, toy_files["train"], tmp_path / "other", "--lr", "1e-3")
    line = error_line(cli, "train", new, "--slm", "tiny-gpt2", *T, "--batch-size", "4", "--micro-batch-size", "4",
                      "--max-steps", "6", "--out", tmp_path / "cut", "--init-from", other, "--lr", "3e-3",
                      "--save-every", "3", "--resume")
    assert "starting checkpoint (--init-from)" in line


def test_init_from_refuses_what_the_checkpoint_does_not_fit(cli, toy_files, tmp_path):
    alone = _train(cli, toy_files["train"], tmp_path / "alone", "--lr", "1e-3")
    fused = _train(cli, toy_files["train"], tmp_path / "fused", "--llm", "tiny-llama", "--lr", "1e-3")
    data = toy_files["train"]

    def refused(*extra):
        out = tmp_path / "x"
        line = error_line(cli, "train", data, "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "1",
                          "--out", out, *extra)
        assert not out.exists(), line
        return line

    assert refused("--slm", "tiny-gpt2", *T, "--init-from", alone, "--trim-vocab") == \
        "--trim-vocab builds a new model: with --init-from the checkpoint already fixes it (leave the option out)"
    assert refused("--slm", "tiny-llama", *T, "--init-from", alone) == \
        f"{alone}: --slm 'tiny-llama' differs from the checkpoint's 'tiny-gpt2' (--init-from fixes the model)"
    assert refused("--slm", "tiny-gpt2", *T, "--init-from", alone, "--llm", "tiny-llama") == \
        f"{alone}: the checkpoint was trained without an LLM: leave out --llm"
    assert refused("--slm", "tiny-gpt2", *T, "--init-from", fused) == \
        f"{fused}: the checkpoint was trained with the LLM 'tiny-llama': give --llm"
    layer1 = _train(cli, toy_files["train"], tmp_path / "layer1", "--llm", "tiny-llama", "--layer", "1", "--lr", "1e-3")
    _train(cli, data, tmp_path / "again", "--llm", "tiny-llama", "--init-from", layer1)  # --layer: the checkpoint's
    assert json.loads((tmp_path / "again" / "final" / "llm2slm.json").read_text())["llm"]["layer"] == 1
    assert refused("--slm", "tiny-gpt2", *T, "--init-from", layer1, "--llm", "tiny-llama", "--layer", "2") == \
        f"checkpoint {layer1} was made with LLM 'tiny-llama' (layer 1), but the LLM given is 'tiny-llama' (layer 2)"
    layer3 = _train(cli, toy_files["train"], tmp_path / "layer3", "--llm", "tiny-llama", "--layer", "3", "--lr", "1e-3")
    line = refused("--slm", "tiny-gpt2", *T, "--init-from", layer3, "--llm", "tiny-gpt2")  # --layer not given
    assert line.startswith(f"{layer3}: --llm tiny-gpt2: the --init-from checkpoint reads its LLM at layer 3"), line
    assert refused("--slm", "tiny-gpt2", "--template", "lower: {src}", "--init-from", alone) == \
        f"{alone}: the template 'lower: {{src}}' differs from the checkpoint's 'upper: {{src}}' (--init-from fixes " \
        "the model)"
    (tmp_path / "plain").mkdir()  # (not tmp_path itself: --out x inside an input is refused first)
    assert "must be a checkpoint directory" in refused("--slm", "tiny-gpt2", *T, "--init-from", tmp_path / "plain")
    # a checkpoint whose weights were edited is refused before anything is written
    weights = alone / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    assert "model.safetensors" in refused("--slm", "tiny-gpt2", *T, "--init-from", alone)
