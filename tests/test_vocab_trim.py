"""Vocabulary trimming: an SLM keeps only the embedding and head rows of the tokens its training data uses.

Greedy generation of the trimmed model equals the untrimmed model's whenever the untrimmed one emits only kept
tokens (argmax over a subset that contains the argmax); the id map survives save/load; unkept prompt tokens read as
the unknown token; a trimmed draft still gives the LLM's exact output in speculative decoding."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from llm2slm_cli import checkpoint
from llm2slm_cli.data import pad
from llm2slm_cli.decoding import speculative_generate
from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM

PROMPTS = ["alpha beta", "a longer prompt, with more tokens", "gamma"]
GREEDY = dict(max_new_tokens=12, do_sample=False, num_beams=1)


def _model(slm: str, llm: str | None, fusion: str = "add") -> LLMToSLM:
    torch.manual_seed(0)
    return LLMToSLM.build(slm, FrozenLLM(llm) if llm else None, fusion=fusion).eval()


def _batch(model: LLMToSLM):
    tok = model.prompt_tokenizer
    return pad([tok(p).input_ids for p in PROMPTS], tok.pad_token_id)


def _trimmed(model: LLMToSLM, kept: set[int]) -> LLMToSLM:
    small = copy.deepcopy(model)
    small.__dict__["llm"] = model.llm  # the frozen LLM is shared, not part of the model
    tok = small.target_tokenizer
    small.trim_vocabulary(torch.tensor(sorted(kept)), tok.unk_token_id if tok.unk_token_id is not None
                          else small.config.pad_token_id)
    return small.eval()


@pytest.mark.parametrize("slm,llm,fusion", [("tiny-gpt2", None, "add"), ("tiny-t5", "tiny-t5-large", "add"),
                                            ("tiny-t5", "tiny-t5-large", "replace"), ("tiny-llama", "tiny-llama",
                                                                                      "add")])
def test_trimmed_greedy_generation_equals_untrimmed(slm, llm, fusion):
    model = _model(slm, llm, fusion)
    ids, mask = _batch(model)
    full = model.generate(ids, mask, **GREEDY)
    kept = {int(t) for t in ids[mask.bool()]} | {t for row in full for t in row}
    small = _trimmed(model, kept)
    assert small.config.trim_vocab["kept"] < small.config.trim_vocab["full"]
    assert small.slm.get_input_embeddings().weight.shape[0] == small.config.trim_vocab["kept"]
    # the kept rows are the untrimmed model's, bitwise
    rows = small.slm_vocab
    assert torch.equal(small.slm.get_input_embeddings().weight, model.slm.get_input_embeddings().weight[rows])
    assert small.generate(ids, mask, **GREEDY) == full
    # the training loss sees the same logits restricted to kept tokens: lower or equal (fewer competitors)
    target, target_mask = pad([row + [model.config.eos_token_id] for row in full], model.config.pad_token_id)
    with torch.no_grad():
        big_loss, n = model(ids, mask, target, target_mask)
        small_loss, m = small(ids, mask, target, target_mask)
    assert n == m and small_loss <= big_loss + 1e-4


def test_only_kept_tokens_are_emitted():
    model = _model("tiny-gpt2", None)
    ids, mask = _batch(model)
    full = model.generate(ids, mask, **GREEDY)
    kept = {int(t) for t in ids[mask.bool()]}
    assert {t for row in full for t in row} - kept  # the untrimmed model writes some tokens outside the prompts
    small = _trimmed(model, kept)
    allowed = set(small.slm_vocab.tolist())
    out = small.generate(ids, mask, **GREEDY)
    assert out != full and all(t in allowed for row in out for t in row)


def test_unkept_prompt_tokens_read_as_the_unknown_token():
    model = _model("tiny-gpt2", None)
    ids, mask = _batch(model)
    kept = {int(t) for t in ids[0][mask[0].bool()]}  # only the first prompt's tokens
    small = _trimmed(model, kept)
    unknown = small.config.trim_vocab["unknown"]
    allowed = set(small.slm_vocab.tolist())
    as_unknown = ids.clone()
    outside = mask.bool() & ~torch.isin(ids, small.slm_vocab)
    assert outside.any()
    as_unknown[outside] = unknown
    assert unknown in allowed
    assert small.generate(ids, mask, **GREEDY) == small.generate(as_unknown, mask, **GREEDY)


def test_trimmed_model_survives_save_and_load(tmp_path):
    model = _model("tiny-t5", "tiny-t5-large")
    ids, mask = _batch(model)
    kept = {int(t) for t in ids[mask.bool()]} | set(range(40, 90))
    small = _trimmed(model, kept)
    checkpoint.save(small, tmp_path / "c")
    stored = json.loads((tmp_path / "c" / "llm2slm.json").read_text())["trim_vocab"]
    assert stored == small.config.trim_vocab
    assert torch.equal(load_file(tmp_path / "c" / "model.safetensors")["slm_vocab"], small.slm_vocab)
    again = checkpoint.load(tmp_path / "c")
    assert torch.equal(again.slm_vocab, small.slm_vocab) and torch.equal(again.slm_lookup, small.slm_lookup)
    assert again.generate(ids, mask, **GREEDY) == small.generate(ids, mask, **GREEDY)


def test_trimmed_draft_keeps_speculative_decoding_exact():
    llm = FrozenLLM("tiny-llama")
    torch.manual_seed(0)
    draft = LLMToSLM.build("tiny-llama", llm).eval()
    with torch.no_grad():  # a projector scaled to 0: the draft is the LLM itself, restricted to kept tokens
        draft.projector[2].weight.zero_()
        draft.projector[2].bias.zero_()
    ids, mask = _batch(draft)
    plain = draft.generate(ids, mask, **GREEDY)
    kept = {int(t) for t in ids[mask.bool()]} | {t for row in plain for t in row[:4]}
    small = _trimmed(draft, kept)
    expected, _ = speculative_generate(draft, llm, ids, mask, gamma=3, max_new_tokens=12)
    got, stats = speculative_generate(small, llm, ids, mask, gamma=3, max_new_tokens=12)
    assert got == expected and 0 < stats.acceptance_rate < 1  # some drafts fall outside the kept set


def test_train_trim_vocab_through_the_cli(cli, toy_files, tmp_path):
    run = tmp_path / "run"
    cli("train", toy_files["train"], "--slm", "tiny-gpt2", "--trim-vocab", "--out", run, "--max-steps", "2",
        "--batch-size", "8", "--micro-batch-size", "8", "--quiet")
    config = json.loads((run / "final" / "llm2slm.json").read_text())["trim_vocab"]
    rows = [json.loads(line) for line in toy_files["train"].read_text().splitlines()]
    model = checkpoint.load(run / "final")
    tok = model.target_tokenizer
    used = {t for r in rows for t in tok(r["src"]).input_ids + tok(r["tgt"], add_special_tokens=False).input_ids}
    used |= {tok.eos_token_id, tok.pad_token_id, *tok.all_special_ids}
    assert set(model.slm_vocab.tolist()) == used and config["kept"] == len(used)
    cli("generate", toy_files["dev"], "--model", run / "final", "--out", tmp_path / "p", "--max-new-tokens", "4",
        "--num-beams", "1", "--quiet")


@pytest.mark.parametrize("slm", ["tiny-gpt2", "tiny-t5"])
def test_plain_slm_widens_a_trimmed_vocabulary_back(slm):
    """plain_slm (a draft for transformers' assisted generation) reads and scores the full vocabulary, emits only
    kept tokens, and decodes exactly as the trimmed model does."""
    from llm2slm_cli.decoding import generate_plain, search_from
    from llm2slm_cli.llm2slm import _right_to_left

    model = _model(slm, None)
    ids, mask = _batch(model)
    full = model.generate(ids, mask, **GREEDY)
    kept = {int(t) for t in ids[mask.bool()]} | {t for row in full for t in row}
    small = _trimmed(model, kept)
    plain = small.plain_slm()
    assert plain.get_input_embeddings().weight.shape[0] == small.config.trim_vocab["full"]
    assert plain.get_output_embeddings().weight.shape[0] == small.config.trim_vocab["full"]
    encoder_decoder = small.config.slm_kind == "encoder-decoder"
    a, m = (ids, mask) if encoder_decoder else _right_to_left(ids, mask)
    g = plain.generation_config
    out = generate_plain(plain, a, m, search_from(GREEDY, g, eos=g.eos_token_id, pad=g.pad_token_id, device=None))
    from llm2slm_cli.llm2slm import strip_generated

    assert strip_generated(out, small.config.eos_token_id, small.config.pad_token_id) == small.generate(ids, mask,
                                                                                                        **GREEDY)
    # unkept ids are scored -1e4 below: never emitted
    assert set(torch.unique(out).tolist()) <= set(small.slm_vocab.tolist())
    with pytest.raises(Exception, match="reads the LLM's features"):
        _model("tiny-t5", "tiny-t5-large").plain_slm()


def _varied(model: LLMToSLM) -> LLMToSLM:
    """A fresh tiny T5 greedily writes one token over and over; perturbed weights make it write many, so a trimmed
    model that read the wrong embedding rows would write something else."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.slm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.mark.parametrize("llm", ["tiny-t5-large", None])
def test_trimmed_t5_reads_the_kept_rows_in_encoder_and_decoder(llm, tmp_path):
    """T5's encoder and decoder read the table through their own `embed_tokens` (tied to `shared`): trimming, the
    widening of plain_slm and save/load must all move them with it."""
    from llm2slm_cli.decoding import generate_plain, search_from
    from llm2slm_cli.llm2slm import strip_generated

    model = _varied(_model("tiny-t5", llm))
    ids, mask = _batch(model)
    full = model.generate(ids, mask, **GREEDY)
    assert len({t for row in full for t in row}) >= 8, full  # outputs vary: the comparison below can fail
    kept = {int(t) for t in ids[mask.bool()]} | {t for row in full for t in row}
    small = _trimmed(model, kept)
    slm = small.slm
    assert slm.encoder.embed_tokens.weight is slm.shared.weight
    assert slm.decoder.embed_tokens.weight is slm.shared.weight
    assert slm.shared.weight.shape[0] == small.config.trim_vocab["kept"]
    assert small.generate(ids, mask, **GREEDY) == full
    checkpoint.save(small, tmp_path / "c")
    again = checkpoint.load(tmp_path / "c", llm=model.llm)
    assert again.generate(ids, mask, **GREEDY) == full
    if llm is None:  # widened back to the full vocabulary (a draft for assisted generation): the same tokens
        plain = small.plain_slm()
        assert plain.encoder.embed_tokens.weight is plain.shared.weight
        assert plain.decoder.embed_tokens.weight.shape[0] == small.config.trim_vocab["full"]
        g = plain.generation_config
        out = generate_plain(plain, ids, mask, search_from(GREEDY, g, eos=g.eos_token_id, pad=g.pad_token_id,
                                                           device=None))
        assert strip_generated(out, small.config.eos_token_id, small.config.pad_token_id) == full
