"""Every ablation switch changes the model the way it claims, on shapes and parameters (paper Tables 9 and 11,
Figure 4, the frozen-SLM variant of Table 6). What tests/test_llm2slm.py and tests/test_models.py already show is not
repeated here."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from llm2slm_cli import checkpoint, fingerprints
from llm2slm_cli import loading as M
from llm2slm_cli.data import pad
from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM, parameter_counts
from llm2slm_cli.runtime import tokenize_targets

PROMPTS = ["alpha beta", "a much longer prompt with many more tokens", "gamma"]
TARGETS = ["ALPHA", "LONGER TARGET TEXT", "G"]



def prompts(model: LLMToSLM):
    return pad([model.prompt_tokenizer(p).input_ids for p in PROMPTS], model.prompt_tokenizer.pad_token_id)


def _error(cli, *args) -> str:
    result = cli(*args, code=2)
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


# ------------------------------------------------------------------------------ --slm-layers (paper Figure 4)


@pytest.mark.parametrize("spec,d,removed", [
    ("tiny-gpt2", 1, ("transformer.h.1.",)),
    ("tiny-llama", 2, ("model.layers.2.",)),
    ("tiny-t5-large", 2, ("encoder.block.2.", "decoder.block.2.")),
])
def test_slm_layers_keeps_the_first_d_layers_exactly(spec, d, removed):
    full = M.load_model(spec).state_dict()
    model = LLMToSLM.build(spec, None, slm_layers=d)
    cut = model.slm.state_dict()
    # embeddings, the first d blocks, final norms and head: bitwise the untruncated model's; nothing else left
    assert set(cut) == {k for k in full if not k.startswith(removed)}
    assert all(torch.equal(cut[k], full[k]) for k in cut)
    assert any(k.startswith(removed) for k in full)
    config = model.slm.config
    if config.model_type == "t5":
        assert (config.num_layers, config.num_decoder_layers) == (d, d)
        assert len(model.slm.encoder.block) == len(model.slm.decoder.block) == d
    else:
        assert M.num_layers(config) == d
    assert model.config.slm_layers == d


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-t5-large"])
def test_slm_layers_survive_save_and_load(tmp_path, spec):
    torch.manual_seed(0)
    model = LLMToSLM.build(spec, FrozenLLM("tiny-t5"), slm_layers=1).eval()
    with torch.no_grad():
        for p in model.projector.parameters():
            p.mul_(5)
    ids, mask = prompts(model)
    kw = dict(max_new_tokens=5, min_new_tokens=3, num_beams=2, suppress_tokens=[model.config.pad_token_id])
    before = model.generate(ids, mask, **kw)
    checkpoint.save(model, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "slm_config.json").read_text())
    assert [saved.get(k) for k in ("num_hidden_layers", "num_layers", "num_decoder_layers") if k in saved] \
        in ([1], [1, 1])
    again = checkpoint.load(tmp_path / "ckpt")
    assert again.config == model.config and again.config.slm_layers == 1
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())
    assert again.generate(ids, mask, **kw) == before


def test_slm_layers_through_train_and_its_errors(cli, toy_files, tmp_path):
    run = tmp_path / "run"
    cli("train", toy_files["train"], "--slm", "tiny-gpt2", "--slm-layers", "1", "--out", run, "--batch-size", "8",
        "--micro-batch-size", "8", "--max-steps", "1", "--quiet")
    assert json.loads((run / "final" / "slm_config.json").read_text())["n_layer"] == 1
    weights = load_file(str(run / "final" / "model.safetensors"))
    assert any(k.startswith("slm.transformer.h.0.") for k in weights)
    assert not any(k.startswith("slm.transformer.h.1.") for k in weights)
    cli("generate", toy_files["dev"], "--model", run / "final", "--out", tmp_path / "pred", "--num-beams", "1",
        "--max-new-tokens", "3", "--quiet")
    msg = _error(cli, "train", toy_files["train"], "--slm", "tiny-gpt2", "--slm-layers", "3", "--out",
                 tmp_path / "o")
    assert "--slm-layers 3: the SLM 'tiny-gpt2' has 2 layers" in msg
    assert "must be positive" in _error(cli, "train", toy_files["train"], "--slm", "tiny-gpt2", "--slm-layers", "0",
                                        "--out", tmp_path / "o2")
    # the parameter report sees the cut model
    cut = json.loads(cli("train", toy_files["train"], "--slm", "tiny-t5-large", "--slm-layers", "1", "--out",
                         tmp_path / "o3", "--count-parameters", "--json").output)
    full = json.loads(cli("train", toy_files["train"], "--slm", "tiny-t5-large", "--out", tmp_path / "o3",
                          "--count-parameters", "--json").output)
    one_block = {k: v for k, v in M.load_model("tiny-t5-large").named_parameters()
                 if k.startswith(("encoder.block.1.", "decoder.block.1."))}
    assert full["parameters"] - cut["parameters"] == 2 * sum(p.numel() for p in one_block.values())


# ----------------------------------------------------------------------------------- --fusion (paper Table 11)


def _slm_prompt_input(model: LLMToSLM, ids, mask) -> torch.Tensor:
    """What the SLM receives at the prompt positions (its encoder input, or the prompt part of [P ; E_Y])."""
    seen: list[dict] = []
    hook = model.slm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    target_ids, target_mask = pad(tokenize_targets(model.target_tokenizer, TARGETS, 64), model.config.pad_token_id)
    with torch.no_grad():
        model(ids, mask, target_ids, target_mask)
    hook.remove()
    return seen[0]["inputs_embeds"][:, : ids.shape[1]].clone()


@pytest.mark.parametrize("llm,slm", [("tiny-llama", "tiny-gpt2"), ("tiny-t5-large", "tiny-t5")])
def test_fusion_replace_keeps_the_slm_prompt_embedding_out(llm, slm):
    results = {}
    for fusion in ("add", "replace"):
        torch.manual_seed(0)
        model = LLMToSLM.build(slm, FrozenLLM(llm), fusion=fusion).eval()
        assert not model.config.vocab_adapter  # shared vocabulary: the SLM's own embedding rows are in play
        ids, mask = prompts(model)
        before = _slm_prompt_input(model, ids, mask)
        with torch.no_grad():  # new SLM embedding rows for every prompt token
            rows = model.slm.get_input_embeddings().weight
            rows[ids.unique()] += torch.randn(len(ids.unique()), rows.shape[1])
        results[fusion] = torch.equal(_slm_prompt_input(model, ids, mask), before)
    assert results == {"add": False, "replace": True}


# --------------------------------------------------------------------------- --tokenizer-mode (paper Table 11)


def test_tokenizer_mode_slm_keeps_the_slm_vocabulary():
    llm = FrozenLLM("tiny-bert")  # WordPiece, 193 ids; the SLM is byte-level, 260 ids
    slm_vocab = M.load_config("tiny-gpt2").vocab_size
    own = LLMToSLM.build("tiny-gpt2", llm, tokenizer="slm", fusion="replace")
    assert not own.config.vocab_adapter
    assert own.slm.get_output_embeddings().out_features == slm_vocab == 260
    assert isinstance(own.slm.get_input_embeddings(), torch.nn.Embedding)
    assert own.slm.get_input_embeddings().num_embeddings == slm_vocab
    slm_tok = M.load_tokenizer("tiny-gpt2")
    assert fingerprints.tokenizer_fingerprint(own.target_tokenizer) == fingerprints.tokenizer_fingerprint(slm_tok)
    assert fingerprints.tokenizer_fingerprint(own.prompt_tokenizer) == fingerprints.tokenizer_fingerprint(llm.tokenizer)
    assert tokenize_targets(own.target_tokenizer, TARGETS, 64) == tokenize_targets(slm_tok, TARGETS, 64)
    assert (own.config.eos_token_id, own.config.pad_token_id) == (slm_tok.eos_token_id, slm_tok.pad_token_id)
    # the LLM's vocabulary (default) instead: adapter in, head over the LLM's 193 ids
    shared = LLMToSLM.build("tiny-gpt2", llm)
    assert shared.config.vocab_adapter and shared.slm.get_output_embeddings().out_features == 193
    assert parameter_counts(shared)["trainable_by_part"]["vocab_adapter"] == 48 * 64 + 64 + 64 * 193


# ------------------------------------------------------------------------ --freeze-slm (paper Table 6, ours)


@pytest.mark.parametrize("llm,slm,parts", [("tiny-t5-large", "tiny-t5", {"projector"}),
                                           ("tiny-bert", "tiny-gpt2", {"projector", "vocab_adapter"})])
def test_freeze_slm_trains_only_the_projector_and_adapter(cli, toy_files, tmp_path, llm, slm, parts):
    run = tmp_path / "run"
    cli("train", toy_files["train"], "--llm", llm, "--slm", slm, "--freeze-slm", "--out", run, "--batch-size", "8",
        "--micro-batch-size", "4", "--max-steps", "1", "--lr", "1e-2", "--quiet")
    trained = checkpoint.load(run / "final")
    set_seed(0)  # as train does before building: the same initial projector (and adapter)
    start = dict(LLMToSLM.build(slm, trained.llm).named_parameters())
    counts = json.loads((run / "manifest.json").read_text())["counts"]
    assert set(counts["trainable_by_part"]) == parts
    adapter = set()
    if trained.config.vocab_adapter:
        for module in ("get_input_embeddings", "get_output_embeddings"):
            adapter |= {n for n, p in trained.slm.named_parameters()
                        if any(p is q for q in getattr(trained.slm, module)().parameters())}
    after, before = trained.slm.state_dict(), M.load_model(slm).state_dict()
    slm_own = [k for k in after if k not in adapter and k in before]
    assert slm_own and all(torch.equal(after[k], before[k]) for k in slm_own)  # bitwise the pretrained SLM
    assert set(after) - set(slm_own) == adapter
    trainable = [n for n in start if n.startswith("projector.") or n.removeprefix("slm.") in adapter]
    assert len(trainable) == 4 + len(adapter)  # two Linear layers, and the adapter's projection and head
    after_all = dict(trained.named_parameters())
    assert all(not torch.equal(after_all[n], start[n]) for n in trainable)  # what trains did move
    assert counts["trainable_parameters"] == sum(counts["trainable_by_part"].values())


# ------------------------------------------------------------ --layer k vs all for decoder-only LLMs (paper Table 9)


def test_decoder_only_llm_layer_reaches_the_projector():
    """test_models shows FrozenLLM.encode gives hidden_states[k] or their mean; here: that is what the projector of
    an LLM-to-SLM model is fed, and the choices differ."""
    fed = {}
    for layer in ("1", "3", "all"):
        llm = FrozenLLM("tiny-llama", layer=layer)
        model = LLMToSLM.build("tiny-gpt2", llm).eval()
        ids, mask = prompts(model)
        seen: list[torch.Tensor] = []
        model.projector.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0]))
        _slm_prompt_input(model, ids, mask)
        states = llm.model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        expected = torch.stack(states[1:]).mean(0) if layer == "all" else states[int(layer)]
        valid = mask.bool()
        torch.testing.assert_close(seen[0][valid], expected[valid])
        assert model.config.llm["layer"] == (layer if layer == "all" else int(layer))
        fed[layer] = seen[0][valid]
    assert not torch.allclose(fed["1"], fed["3"]) and not torch.allclose(fed["1"], fed["all"])
