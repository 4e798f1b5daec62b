"""train --feature-norm standardize: the projector shifts and scales each LLM feature channel by fixed statistics of
the training prompts (saved with the checkpoint), a reparametrisation of the paper's first Linear."""

from __future__ import annotations

import pytest
import torch
from conftest import error_line
from safetensors.torch import load_file

from llm2slm_cli import checkpoint
from llm2slm_cli.llm2slm import Projector


def test_standardising_equals_the_paper_projector_with_the_statistics_folded_into_its_first_linear():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(300, 8, generator=g) * torch.tensor([1, 1, 1, 500, 1, 1, 2, 0.1]) + 7
    norm = Projector(8, 4, "standardize")
    norm.set_feature_statistics(rows)
    assert torch.allclose(norm.feature_shift, rows.double().mean(0).float())
    assert torch.allclose(norm.feature_scale, rows.double().std(0).float())
    plain = Projector(8, 4)
    plain.load_state_dict({k: v for k, v in norm.state_dict().items() if not k.startswith("feature_")})
    with torch.no_grad():  # W ((x - m) / s) + b = (W / s) x + (b - W (m / s))
        plain[0].weight.div_(norm.feature_scale)
        plain[0].bias.sub_(plain[0].weight @ norm.feature_shift)
    x = torch.randn(5, 8, generator=g) * 50
    assert torch.allclose(norm(x), plain(x), atol=1e-4)
    with pytest.raises(Exception, match="--feature-norm must be none or standardize"):
        Projector(8, 4, "layer")


def _train(cli, toy_files, out, *extra, **kw):
    cli("train", toy_files["train"], "--llm", "tiny-llama", "--slm", "tiny-gpt2", "--template", "upper: {src}",
        "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "3", "--lr", "3e-3", "--quiet", "--out", out,
        *extra)
    return out / "final"


def test_train_stores_the_statistics_of_the_training_features_and_they_survive_save_and_load(cli, toy_files,
                                                                                             tmp_path):
    feats = tmp_path / "feats"
    cli("encode", toy_files["train"], "--model", "tiny-llama", "--template", "upper: {src}", "--out", feats,
        "--quiet")
    final = _train(cli, toy_files, tmp_path / "run", "--features", feats, "--feature-norm", "standardize")
    weights = load_file(str(final / "model.safetensors"))
    from llm2slm_cli.features import FeatureStore

    store = FeatureStore(feats)
    rows = torch.cat([store.features(i).float() for i in store._row]).double()
    assert torch.allclose(weights["projector.feature_shift"], rows.mean(0).float(), atol=1e-5)
    assert torch.allclose(weights["projector.feature_scale"], rows.std(0).float(), atol=1e-5)
    model = checkpoint.load(final)
    assert model.config.feature_norm == "standardize"
    assert torch.equal(model.projector.feature_scale, weights["projector.feature_scale"])
    # the same statistics on the fly (the LLM's own features, nothing stored)
    fly = _train(cli, toy_files, tmp_path / "fly", "--feature-norm", "standardize")
    assert torch.allclose(load_file(str(fly / "model.safetensors"))["projector.feature_shift"],
                          weights["projector.feature_shift"], atol=2e-3)  # stored features are float16
    # the loaded projector applies them: its output is the paper's projector on the standardised features
    x = rows[:7].float()
    z = (x - weights["projector.feature_shift"]) / weights["projector.feature_scale"]
    want = torch.relu(z @ weights["projector.0.weight"].T + weights["projector.0.bias"])
    want = want @ weights["projector.2.weight"].T + weights["projector.2.bias"]
    with torch.no_grad():
        assert torch.allclose(model.projector(x), want, atol=1e-4)
        plain = Projector(x.shape[1], want.shape[1])
        plain.load_state_dict({k.removeprefix("projector."): v for k, v in weights.items()
                               if k.startswith("projector.") and "feature_" not in k})
        assert not torch.allclose(plain(x), want, atol=1e-2)  # without the statistics it is another function


def test_feature_norm_without_an_llm_is_refused(cli, toy_files, tmp_path):
    line = error_line(cli, "train", toy_files["train"], "--slm", "tiny-gpt2", "--feature-norm", "standardize",
                      "--out", tmp_path / "x")
    assert line == "--feature-norm applies to LLM-to-SLM (--llm): the SLM alone has no projector"
    assert not (tmp_path / "x").exists()
