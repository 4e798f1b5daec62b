"""The method itself: fusion at prompt positions only, loss on targets only, padding-independent generation,
the vocabulary adapter, and exact save/load."""

from __future__ import annotations

import pytest
import torch

from llm2slm_cli import checkpoint
from llm2slm_cli.data import pad
from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM
from llm2slm_cli.runtime import tokenize_targets

PROMPTS = ["alpha beta", "a much longer prompt with many more tokens", "gamma"]
TARGETS = ["ALPHA", "LONGER TARGET TEXT", "G"]


def build(llm_spec: str | None, slm_spec: str, **kw) -> LLMToSLM:
    torch.manual_seed(0)
    llm = FrozenLLM(llm_spec) if llm_spec else None
    model = LLMToSLM.build(slm_spec, llm, **kw).eval()
    with torch.no_grad():  # a fresh projector is near zero in effect; make it matter for the tests
        if model.has_llm:
            for p in model.projector.parameters():
                p.mul_(5)
    return model


def batch(model: LLMToSLM):
    ids = [model.prompt_tokenizer(p).input_ids for p in PROMPTS]
    targets = tokenize_targets(model.target_tokenizer, TARGETS, 64)
    prompt_ids, prompt_mask = pad(ids, model.prompt_tokenizer.pad_token_id)
    target_ids, target_mask = pad(targets, model.config.pad_token_id)
    return prompt_ids, prompt_mask, target_ids, target_mask


def capture_slm_inputs(model: LLMToSLM) -> list[dict]:
    seen: list[dict] = []
    model.slm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    return seen


def test_decoder_only_features_only_at_prompt_positions():
    model = build("tiny-t5-large", "tiny-gpt2")
    prompt_ids, prompt_mask, target_ids, target_mask = batch(model)
    seen = capture_slm_inputs(model)
    model(prompt_ids, prompt_mask, target_ids, target_mask)
    x = seen[0]["inputs_embeds"]
    embed = model.slm.get_input_embeddings()
    m = prompt_ids.shape[1]
    # target positions: plain token embeddings, exactly
    torch.testing.assert_close(x[:, m:], embed(target_ids), rtol=0, atol=0)
    # prompt positions (left-padded): Z + E_X at real tokens, zero at padding
    z = model.projector(model.llm.encode(prompt_ids, prompt_mask))
    for i in range(len(PROMPTS)):
        n = int(prompt_mask[i].sum())
        expected = z[i, :n] + embed(prompt_ids[i, :n])
        torch.testing.assert_close(x[i, m - n: m], expected)
        assert torch.all(x[i, : m - n] == 0)
        assert not torch.allclose(expected, embed(prompt_ids[i, :n]))  # the features did change the input


def test_encoder_decoder_features_go_to_the_encoder_only():
    model = build("tiny-t5-large", "tiny-t5")
    prompt_ids, prompt_mask, target_ids, target_mask = batch(model)
    seen = capture_slm_inputs(model)
    model(prompt_ids, prompt_mask, target_ids, target_mask)
    z = model.projector(model.llm.encode(prompt_ids, prompt_mask))
    expected = (z + model.slm.get_input_embeddings()(prompt_ids)) * prompt_mask.unsqueeze(-1)
    torch.testing.assert_close(seen[0]["inputs_embeds"], expected)
    assert seen[0]["decoder_input_ids"][:, 0].eq(model.config.decoder_start_token_id).all()
    torch.testing.assert_close(seen[0]["decoder_input_ids"][:, 1:], target_ids[:, :-1], rtol=0, atol=0)


@pytest.mark.parametrize("slm", ["tiny-gpt2", "tiny-t5"])
def test_loss_covers_target_tokens_only(slm):
    from llm2slm_cli.decoding import Search, start

    model = build("tiny-t5-large", slm)
    prompt_ids, prompt_mask, target_ids, target_mask = batch(model)
    loss, tokens = model(prompt_ids, prompt_mask, target_ids, target_mask)
    assert int(tokens) == sum(len(t) for t in tokenize_targets(model.target_tokenizer, TARGETS, 64))
    # The same sum, one example at a time: padding does not contribute. And each example's loss is exactly the
    # target tokens' negative log-likelihood as generation scores them (the decoding loop's own prompt pass and
    # cache, token by token): prompt positions add nothing, no target token is missed or shifted.
    per_example = scored = 0.0
    c = model.config
    with torch.no_grad():
        for i in range(len(PROMPTS)):
            n, t = int(prompt_mask[i].sum()), int(target_mask[i].sum())
            ids, mask, target = prompt_ids[i: i + 1, :n], prompt_mask[i: i + 1, :n], target_ids[i: i + 1, :t]
            s, _ = model(ids, mask, target, target_mask[i: i + 1, :t])
            per_example += float(s)
            search = Search(max_new_tokens=t, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
            step, logits = start(model.slm, mask, search, inputs_embeds=model.prompt_embeddings(ids, mask),
                                 decoder_start=c.decoder_start_token_id)
            nll = 0.0
            for j in range(t):
                nll -= float(torch.log_softmax(logits.float(), -1)[0, target[0, j]])
                logits = step.feed(target[:, j: j + 1])[:, -1]
            assert float(s) == pytest.approx(nll, rel=1e-4), i
            scored += nll
    assert float(loss.detach()) == pytest.approx(per_example, rel=1e-5)
    assert per_example == pytest.approx(scored, rel=1e-4)


@pytest.mark.parametrize("llm,slm", [("tiny-t5-large", "tiny-gpt2"), ("tiny-bert", "tiny-gpt2"),
                                     ("tiny-t5-large", "tiny-t5"), (None, "tiny-gpt2")])
@pytest.mark.parametrize("beams", [1, 3])
def test_batched_generation_equals_one_by_one(llm, slm, beams, decode_calls):
    model = build(llm, slm)
    prompt_ids, prompt_mask, _, _ = batch(model)
    # fresh weights: keep the end and padding tokens out so every row has tokens to compare
    kw = dict(max_new_tokens=6, min_new_tokens=3, num_beams=beams, do_sample=False,
              suppress_tokens=[model.config.pad_token_id])
    together = model.generate(prompt_ids, prompt_mask, **kw)
    alone = []
    for i in range(len(PROMPTS)):
        n = int(prompt_mask[i].sum())
        alone += model.generate(prompt_ids[i: i + 1, :n], prompt_mask[i: i + 1, :n], **kw)
    assert together == alone
    assert all(len(t) >= 3 for t in together)
    assert len(decode_calls) == 1 + len(PROMPTS)  # our decoding loop, not transformers' generate


def test_vocabulary_adapter_only_when_vocabularies_differ():
    same = build("tiny-t5-large", "tiny-t5")
    assert not same.config.vocab_adapter
    assert same.slm.get_output_embeddings().out_features == 260
    differ = build("tiny-bert", "tiny-gpt2")  # WordPiece LLM vocabulary (193), byte-level SLM (260)
    assert differ.config.vocab_adapter
    emb = differ.slm.get_input_embeddings()
    assert emb.proj.in_features == 48 and emb.proj.out_features == 64 and emb.num_embeddings == 193
    assert differ.slm.get_output_embeddings().weight.shape == (193, 64)
    assert "llm_rows" not in " ".join(differ.state_dict())  # the LLM's rows are never part of the checkpoint
    own = build("tiny-llama", "tiny-gpt2", tokenizer="slm", fusion="replace")
    assert not own.config.vocab_adapter and own.target_tokenizer is not own.prompt_tokenizer


def test_fusion_replace_ignores_slm_prompt_embeddings():
    model = build("tiny-t5-large", "tiny-gpt2", fusion="replace")
    prompt_ids, prompt_mask, _, _ = batch(model)
    z = model.projector(model.llm.encode(prompt_ids, prompt_mask)) * prompt_mask.unsqueeze(-1)
    torch.testing.assert_close(model.prompt_embeddings(prompt_ids, prompt_mask), z)


@pytest.mark.parametrize("llm,slm,kw", [("tiny-t5-large", "tiny-gpt2", {}), ("tiny-bert", "tiny-t5", {}),
                                        ("tiny-llama", "tiny-gpt2", {"tokenizer": "slm", "fusion": "replace"}),
                                        (None, "tiny-t5", {})])
def test_save_and_reload_generates_the_same_tokens(tmp_path, llm, slm, kw, decode_calls):
    model = build(llm, slm, **kw)
    prompt_ids, prompt_mask, _, _ = batch(model)
    before = model.generate(prompt_ids, prompt_mask, max_new_tokens=8, min_new_tokens=4, num_beams=2,
                            suppress_tokens=[model.config.pad_token_id])
    checkpoint.save(model, tmp_path / "ckpt")
    again = checkpoint.load(tmp_path / "ckpt")
    assert again.config == model.config
    assert again.generate(prompt_ids, prompt_mask, max_new_tokens=8, min_new_tokens=4, num_beams=2,
                            suppress_tokens=[model.config.pad_token_id]) == before
    assert len(decode_calls) == 2
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(again.state_dict().items())):
        assert k == k2 and torch.equal(a, b)
