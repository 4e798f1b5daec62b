"""Model specs, presets with the published shapes, and the frozen LLM's features."""

from __future__ import annotations

import pytest
import torch

from llm2slm_cli import fingerprints
from llm2slm_cli import loading as M
from llm2slm_cli.errors import UserError
from llm2slm_cli.llm2slm import FrozenLLM


@pytest.mark.parametrize("name,shape", [
    ("t5-small", dict(d_model=512, d_ff=2048, num_layers=6, num_heads=8)),
    ("t5-large", dict(d_model=1024, d_ff=4096, num_layers=24, num_heads=16)),
    ("t5-v1_1-small", dict(d_model=512, d_ff=1024, num_layers=8, num_heads=6, feed_forward_proj="gated-gelu")),
    ("flan-t5-base", dict(d_model=768, d_ff=2048, num_layers=12, num_heads=12, feed_forward_proj="gated-gelu")),
    ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257)),
    ("gpt2-l2", dict(n_embd=768, n_layer=2)),
])
def test_presets_have_published_shapes(name, shape):
    config = M.load_config(f"preset:{name}")
    for key, value in shape.items():
        assert getattr(config, key) == value, (name, key)


def test_t5_small_preset_parameter_count():
    model = M.load_model("preset:t5-small")
    assert sum(p.numel() for p in model.parameters()) == 60_506_624  # the published T5-Small count


def test_resolve():
    assert M.resolve("tiny-t5").kind == "preset"
    assert M.resolve("preset:gpt2").kind == "preset"
    assert M.resolve("google/flan-t5-base").kind == "hub"
    with pytest.raises(UserError, match="unknown preset"):
        M.resolve("preset:nope")
    with pytest.raises(UserError, match="no such GGUF file"):
        M.resolve("missing.gguf")
    with pytest.raises(UserError, match="no such directory"):
        M.resolve("./no/such/dir")
    with pytest.raises(UserError, match="not a model"):
        M.resolve(__file__)  # there, but neither a model directory nor a .gguf file


def test_presets_are_the_same_everywhere():
    a, b = M.load_model("tiny-llama"), M.load_model("tiny-llama")
    assert fingerprints.state_fingerprint(a) == fingerprints.state_fingerprint(b)
    assert fingerprints.state_fingerprint(a) != fingerprints.state_fingerprint(M.load_model("tiny-gpt2"))


def test_model_kinds():
    assert M.model_kind(M.load_config("tiny-t5")) == "encoder-decoder"
    assert M.model_kind(M.load_config("tiny-bert")) == "encoder-only"
    assert M.model_kind(M.load_config("tiny-llama")) == "decoder-only"


def _batch(llm):
    enc = llm.tokenizer(["a short prompt", "a somewhat longer prompt here"], padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("layer", [0, 1, 2, -1])
def test_decoder_only_layer_k_is_that_hidden_state(layer):
    llm = FrozenLLM("tiny-llama", layer=layer)
    ids, mask = _batch(llm)
    full = llm.model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    k = layer if layer >= 0 else len(full) - 1
    h = llm.encode(ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(h[valid], full[k][valid])
    assert not h.requires_grad


def test_decoder_only_all_layers_is_the_mean():
    llm = FrozenLLM("tiny-llama", layer="all")
    ids, mask = _batch(llm)
    full = llm.model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(llm.encode(ids, mask), torch.stack(full[1:]).mean(0))


def test_encoder_features_use_the_attention_mask():
    for spec in ("tiny-t5", "tiny-bert"):
        llm = FrozenLLM(spec)
        ids, mask = _batch(llm)
        alone = llm.encode(ids[:1, : int(mask[0].sum())], mask[:1, : int(mask[0].sum())])
        batched = llm.encode(ids, mask)
        torch.testing.assert_close(batched[0, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-5)


def test_llm_is_frozen_and_bad_layers_refused():
    llm = FrozenLLM("tiny-t5-large")
    assert not llm.model.training and not any(p.requires_grad for p in llm.model.parameters())
    with pytest.raises(UserError, match="has 3 layers"):
        FrozenLLM("tiny-llama", layer=7)
    with pytest.raises(UserError, match="applies to decoder-only"):
        FrozenLLM("tiny-t5", layer=1)
