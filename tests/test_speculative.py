"""Speculative decoding with an LLM-to-SLM draft: greedy output is the LLM's own, token for token, for batches of
different prompt lengths; sampled output follows the LLM's distribution."""

from __future__ import annotations

import pytest
import torch

from llm2slm_cli.data import pad
from llm2slm_cli.decoding import _process, speculative_generate
from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM, _right_to_left, strip_generated

PROMPTS = ["alpha beta", "a much longer prompt with many more tokens", "gamma", "x"]


def llm_greedy(llm: FrozenLLM, ids, mask, n: int, suppress: list[int]) -> list[list[int]]:
    """The LLM's own greedy decoding with transformers' generate."""
    tok = llm.tokenizer
    kw = dict(max_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id,
              eos_token_id=tok.eos_token_id, suppress_tokens=suppress or None)
    with torch.inference_mode():
        if llm.kind == "encoder-decoder":
            out = llm.model.generate(input_ids=ids, attention_mask=mask, **kw)[:, 1:]
        else:
            left, left_mask = _right_to_left(ids, mask)
            out = llm.model.generate(input_ids=left, attention_mask=left_mask, **kw)[:, left.shape[1]:]
    return strip_generated(out, tok.eos_token_id, tok.pad_token_id)


def draft_for(llm: FrozenLLM, slm: str, scale: float) -> LLMToSLM:
    """An LLM-to-SLM draft; with the LLM's own preset as SLM and the projector scaled to 0 it is the LLM itself
    (every draft accepted), small scales give partial agreement, other SLMs little."""
    torch.manual_seed(0)
    draft = LLMToSLM.build(slm, llm).eval()
    with torch.no_grad():
        draft.projector[2].weight.mul_(scale)
        draft.projector[2].bias.mul_(scale)
    return draft


def batch(llm: FrozenLLM):
    return pad([llm.tokenizer(p).input_ids for p in PROMPTS], llm.tokenizer.pad_token_id)


@pytest.mark.parametrize("llm_spec,slm,scale", [
    ("tiny-llama", "tiny-llama", 0.0), ("tiny-llama", "tiny-llama", 0.05), ("tiny-llama", "tiny-gpt2", 1.0),
    ("tiny-t5-large", "tiny-t5-large", 0.0), ("tiny-t5-large", "tiny-t5", 1.0), ("tiny-t5-large", "tiny-gpt2", 1.0),
])
@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_speculative_equals_the_llms_greedy_output(llm_spec, slm, scale, gamma):
    llm = FrozenLLM(llm_spec)
    draft = draft_for(llm, slm, scale)
    ids, mask = batch(llm)
    tok = llm.tokenizer
    for suppress in ([tok.eos_token_id, tok.pad_token_id], []):  # full-length rows, and rows that stop early
        expected = llm_greedy(llm, ids, mask, 20, suppress)
        got, stats = speculative_generate(draft, llm, ids, mask, gamma=gamma, max_new_tokens=20,
                                          suppress_tokens=suppress)
        assert got == expected
        assert 0 <= stats.acceptance_rate <= 1 and stats.tokens_per_llm_call >= 1
    if scale == 0.0:  # the draft is the LLM: every draft is accepted, gamma + 1 tokens per LLM call
        assert stats.acceptance_rate == 1.0
        assert stats.rounds == -(-20 // (gamma + 1)) or not suppress
    one_by_one = [speculative_generate(draft, llm, ids[i:i + 1, : int(mask[i].sum())],
                                       mask[i:i + 1, : int(mask[i].sum())], gamma=gamma, max_new_tokens=20)[0][0]
                  for i in range(len(PROMPTS))]
    assert one_by_one == llm_greedy(llm, ids, mask, 20, [])


def test_the_llm_prompt_pass_serves_the_draft():
    """For a decoder-only LLM the draft's features come from the verifier's own prefill pass: with the LLM's
    features and the draft's trained layer they must equal FrozenLLM.encode's, or drafts would be built on other
    inputs than in training."""
    llm = FrozenLLM("tiny-llama", layer=2)
    draft = draft_for(llm, "tiny-gpt2", 1.0)
    ids, mask = batch(llm)
    seen = []
    original = draft.prompt_embeddings
    draft.prompt_embeddings = lambda i, m, f=None: seen.append(f) or original(i, m, f)
    speculative_generate(draft, llm, ids, mask, gamma=2, max_new_tokens=3)
    expected = llm.encode(ids, mask)
    for i in range(len(PROMPTS)):
        n = int(mask[i].sum())
        torch.testing.assert_close(seen[0][i, :n], expected[i, :n], atol=1e-5, rtol=1e-5)


def chi_square_ok(sample: torch.Tensor, p: torch.Tensor) -> bool:
    """Pearson's chi-square goodness of fit, categories with expected count < 5 pooled; accept unless the statistic
    is more than 5 standard deviations above its mean under the null (df), a test that a wrong distribution fails
    (see test_the_check_rejects_a_wrong_distribution) and the right one passes for any seed."""
    n = sample.numel()
    counts = torch.bincount(sample, minlength=p.shape[0]).double()
    expected = p.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    return stat < df + 5 * (2 * df) ** 0.5 and float(counts[p == 0].sum()) == 0.0


def transformers_probs(llm: FrozenLLM, ids: torch.Tensor, temperature: float, top_p: float, banned: list[int]
                       ) -> torch.Tensor:
    """The next-token distributions transformers' generate samples from after `ids` (unpadded rows of one length),
    with its own processors and defaults."""
    tok = llm.tokenizer
    with torch.inference_mode():
        out = llm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=temperature, top_p=top_p, suppress_tokens=banned, max_new_tokens=1,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, output_scores=True,
                                 return_dict_in_generate=True)
    return torch.softmax(out.scores[0].float(), -1)


def sharp_llm() -> FrozenLLM:
    """A fresh tiny Llama's next-token distribution is close to uniform over 260 tokens, where 2,000 samples say
    little; a sharper head (logits x 8) gives the test a distribution with real structure."""
    llm = FrozenLLM("tiny-llama")
    with torch.no_grad():
        llm.model.lm_head.weight.mul_(8)
    return llm


def test_the_check_rejects_a_wrong_distribution():
    llm = sharp_llm()
    with torch.inference_mode():
        p = _process(llm.model(torch.tensor([llm.tokenizer("the cat").input_ids])).logits[0, -1], 1.0, 1.0, [])
    g = torch.Generator().manual_seed(0)
    right = torch.multinomial(p, 2000, replacement=True, generator=g)
    wrong = torch.multinomial(_process(torch.log(p) * 0.8, 1.0, 1.0, []), 2000, replacement=True, generator=g)
    assert chi_square_ok(right, p) and not chi_square_ok(wrong, p)


@pytest.mark.parametrize("scale", [0.0, 1.0])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_sampling_follows_the_llms_distribution(scale, temperature, top_p):
    """2,000 samples of the first two tokens after one prompt; their frequencies must fit the distributions the
    LLM's own sampling draws from (transformers' generate: temperature, its default top-k of 50, top-p): token 1
    directly, token 2 as a marginal over token 1. The draft is the LLM itself (scale 0: every draft accepted, bonus
    tokens) or another model (rejections and residuals)."""
    llm = sharp_llm()
    draft = draft_for(llm, "tiny-llama" if scale == 0.0 else "tiny-gpt2", scale)
    if scale == 0.0:
        with torch.no_grad():
            draft.slm.lm_head.weight.mul_(8)
    tok = llm.tokenizer
    n = 2000
    prompt = tok("the cat").input_ids
    ids = torch.tensor([prompt] * n)
    mask = torch.ones_like(ids)
    banned = [tok.eos_token_id, tok.pad_token_id]
    out, stats = speculative_generate(draft, llm, ids, mask, gamma=2, max_new_tokens=2, do_sample=True,
                                      temperature=temperature, top_p=top_p, suppress_tokens=banned,
                                      generator=torch.Generator().manual_seed(1234))
    first = torch.tensor([o[0] for o in out])
    second = torch.tensor([o[1] for o in out])
    p1 = transformers_probs(llm, torch.tensor([prompt]), temperature, top_p, banned)[0]
    support = p1.nonzero().squeeze(1)
    assert len(support) <= 50  # the LLM's top-k applies (a third of the mass lies outside its top 50 tokens)
    follow = torch.cat([torch.tensor([prompt] * len(support)), support.unsqueeze(1)], 1)
    p2_given = transformers_probs(llm, follow, temperature, top_p, banned)
    p2 = (p1[support].unsqueeze(1) * p2_given).sum(0)
    assert chi_square_ok(first, p1) and chi_square_ok(second, p2)
    if scale == 0.0:
        assert stats.acceptance_rate == 1.0
    else:
        assert 0.0 < stats.acceptance_rate < 1.0


def test_generate_speculative_through_the_cli(cli, toy_files, tmp_path):
    """A trained LLM-to-SLM draft (and an SLM-alone draft with --verifier) through `generate --speculative`: the
    predictions are the LLM's own greedy predictions, and the acceptance statistics are in the manifest."""
    import json

    import pyarrow.parquet as pq

    common = ["--batch-size", "8", "--micro-batch-size", "8", "--max-steps", "3", "--quiet"]
    cli("train", toy_files["train"], "--llm", "tiny-llama", "--slm", "tiny-gpt2", "--out", tmp_path / "draft", *common)
    cli("train", toy_files["train"], "--slm", "tiny-gpt2", "--out", tmp_path / "alone", *common)
    decode = ["--max-new-tokens", "12", "--batch-size", "3", "--quiet"]
    cli("generate", toy_files["dev"], "--model", "tiny-llama", "--num-beams", "1", "--out", tmp_path / "llm", *decode)
    cli("generate", toy_files["dev"], "--model", tmp_path / "draft" / "final", "--speculative", "--gamma", "3",
        "--out", tmp_path / "sd", *decode)
    cli("generate", toy_files["dev"], "--model", tmp_path / "alone" / "final", "--speculative", "--verifier",
        "tiny-llama", "--out", tmp_path / "sd-alone", *decode)
    expected = pq.read_table(tmp_path / "llm" / "predictions.parquet")["prediction"].to_pylist()
    for run in ("sd", "sd-alone"):
        assert pq.read_table(tmp_path / run / "predictions.parquet")["prediction"].to_pylist() == expected
        stats = json.loads((tmp_path / run / "manifest.json").read_text())["speculative"]
        assert stats["llm_calls"] > 0 and 0 <= stats["acceptance_rate"] <= 1 and stats["tokens_per_llm_call"] >= 1
    result = cli("generate", toy_files["dev"], "--model", tmp_path / "alone" / "final", "--speculative", "--out",
                 tmp_path / "x", code=2)
    assert "--verifier" in result.output
    result = cli("generate", toy_files["dev"], "--model", tmp_path / "draft" / "final", "--speculative",
                 "--num-beams", "4", "--out", tmp_path / "y", code=2)
    assert "draws one sequence" in result.output
    result = cli("generate", toy_files["dev"], "--model", "tiny-llama", "--speculative", "--out", tmp_path / "z",
                 code=2)
    assert "needs a checkpoint" in result.output


def test_bench_speculative_rows(cli, toy_files, tmp_path):
    import json

    cli("train", toy_files["train"], "--llm", "tiny-llama", "--slm", "tiny-gpt2", "--out", tmp_path / "draft",
        "--batch-size", "8", "--micro-batch-size", "8", "--max-steps", "2", "--quiet")
    cli("bench", "--llm", "tiny-llama", "--speculative", f"sd={tmp_path / 'draft' / 'final'}", "--gamma", "3",
        "--prompts", toy_files["dev"], "--prompt-length", "4", "--new-tokens", "6", "--repeats", "2",
        "--batch-size", "2", "--no-flops", "--out", tmp_path / "bench", "--quiet")
    rows = {r["label"]: r for r in json.loads((tmp_path / "bench" / "bench.json").read_text())["rows"]}
    assert set(rows) == {"LLM", "sd"}
    assert rows["LLM"]["acceptance_rate"] is None
    assert 0 <= rows["sd"]["acceptance_rate"] <= 1 and rows["sd"]["tokens_per_llm_call"] >= 1
    assert rows["sd"]["role"] == "speculative" and rows["sd"]["speedup_vs_llm"] > 0
    result = cli("bench", "--speculative", f"sd={tmp_path / 'draft' / 'final'}", "--out", tmp_path / "b2", code=2)
    assert "--llm" in result.output


def test_verifier_at_another_layer_gives_the_draft_the_same_features():
    """A draft on layer-1 features checked by the same LLM loaded for its last layer: the verifier's prompt pass
    supplies layer 1 (no second LLM pass), and drafting is exactly as with the draft's own LLM."""
    llm1 = FrozenLLM("tiny-llama", layer=1)
    draft = draft_for(llm1, "tiny-llama", 0.05)
    last = llm1.at_layer(-1)
    assert last.model is llm1.model and last.layer == llm1.n_layers and llm1.layer == 1
    ids, mask = batch(llm1)
    runs = [speculative_generate(draft, verifier, ids, mask, gamma=3, max_new_tokens=12) for verifier in (llm1, last)]
    calls = []
    hook = llm1.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        speculative_generate(draft, last, ids, mask, gamma=3, max_new_tokens=12)
    finally:
        hook.remove()
    assert runs[0][0] == runs[1][0]
    assert runs[0][1].as_counts() == runs[1][1].as_counts() and runs[0][1].accepted > 0
    assert len(calls) == runs[1][1].rounds + 1  # the prompt once, then one pass per round: no extra feature pass
