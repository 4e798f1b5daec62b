"""Our decoding loop (decoding.decode) against transformers' generate on the same models and settings.

Greedy and beam search must give exactly transformers' tokens (beam search: same candidates, length penalty and
stopping rules, including early stopping and finished hypotheses); sampling must follow the seed, respect the
nucleus and never emit a suppressed token. Models are tiny presets with fresh weights: they emit the end token at
random places, which exercises the bookkeeping of rows that finish early."""

from __future__ import annotations

import pytest
import torch

from llm2slm_cli import loading as M
from llm2slm_cli.data import pad
from llm2slm_cli.decoding import Search, decode, generate_plain, search_from, start
from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM, _right_to_left, strip_generated

PROMPTS = ["alpha beta", "a longer prompt, with more tokens", "gamma", "delta epsilon zeta"]
SETTINGS = [
    dict(do_sample=False, num_beams=1, max_new_tokens=20),
    dict(do_sample=False, num_beams=1, max_new_tokens=15, min_new_tokens=15),
    dict(do_sample=False, num_beams=4, max_new_tokens=16),
    dict(do_sample=False, num_beams=4, max_new_tokens=16, length_penalty=0.6, early_stopping=True),
    dict(do_sample=False, num_beams=3, max_new_tokens=12, min_new_tokens=12),
    dict(do_sample=False, num_beams=2, max_new_tokens=10, length_penalty=2.0, early_stopping="never"),
]


def _model(slm: str, llm: str | None) -> LLMToSLM:
    torch.manual_seed(0)
    model = LLMToSLM.build(slm, FrozenLLM(llm) if llm else None).eval()
    _ends_sometimes(model.slm, model.slm.generation_config.eos_token_id)
    return model


def _ends_sometimes(model, eos: int) -> None:
    """Fresh weights almost never pick the end token; this head makes it the winner (by 0.5) wherever the head's
    input points along a fixed direction, so rows end at different, data-dependent steps in every engine alike (a
    tie within rounding noise is as unlikely as an argmax tie)."""

    def hook(module, args, out):
        hidden = args[0].float()
        direction = torch.linspace(-1, 1, hidden.shape[-1], device=hidden.device).unsqueeze(-1)
        fire = hidden @ direction > 0.3 * hidden.norm(dim=-1, keepdim=True)
        end = torch.where(fire, out.max(-1, keepdim=True).values + 0.5, out[..., eos:eos + 1])
        return torch.cat([out[..., :eos], end, out[..., eos + 1:]], -1)

    model.get_output_embeddings().register_forward_hook(hook)


def _batch(model: LLMToSLM):
    tok = model.prompt_tokenizer
    return pad([tok(p).input_ids for p in PROMPTS], tok.pad_token_id)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("slm,llm", [("tiny-gpt2", None), ("tiny-t5", "tiny-t5-large"), ("tiny-llama", "tiny-llama")])
def test_llm2slm_decoding_equals_transformers_generate(slm, llm, settings, decode_calls):
    model = _model(slm, llm)
    ids, mask = _batch(model)
    ours = model.generate_ids(ids, mask, **settings)
    assert len(decode_calls) == 1  # ours is our loop (options it does not know would go to generate silently)
    theirs = model.generate_ids(ids, mask, engine="transformers", **settings)
    eos, padding = model.config.eos_token_id, model.config.pad_token_id
    assert strip_generated(ours, eos, padding) == strip_generated(theirs, eos, padding)
    assert ours.shape[1] <= settings["max_new_tokens"]
    if settings.get("min_new_tokens"):
        assert ours.shape == (len(PROMPTS), settings["min_new_tokens"])
        assert not (ours == eos).any()


@pytest.mark.parametrize("slm,llm", [("tiny-gpt2", None), ("tiny-t5", "tiny-t5-large"), ("tiny-llama", "tiny-llama")])
def test_rows_finish_at_different_steps(slm, llm):
    """The settings above must really make rows end early (else they test nothing about finished rows)."""
    model = _model(slm, llm)
    ids, mask = _batch(model)
    seen = []
    for settings in (SETTINGS[0], SETTINGS[2]):
        out = strip_generated(model.generate_ids(ids, mask, **settings), model.config.eos_token_id,
                              model.config.pad_token_id)
        seen.append([len(row) for row in out])
    # some batch has rows of different lengths, and some row ends after its first token and before the limit
    assert any(len(set(lengths)) > 1 for lengths in seen), seen
    assert any(0 < n < 16 for lengths in seen for n in lengths), seen


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-t5", "tiny-llama"])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_plain_model_decoding_equals_transformers_generate(spec, num_beams, decode_calls):
    torch.manual_seed(1)
    model = M.load_model(spec, role="model").eval()
    tok = M.load_tokenizer(spec)
    _ends_sometimes(model, tok.eos_token_id)
    ids, mask = pad([tok(p).input_ids for p in PROMPTS], tok.pad_token_id)
    encoder_decoder = model.config.is_encoder_decoder
    if not encoder_decoder:
        ids, mask = _right_to_left(ids, mask)
    settings = dict(do_sample=False, num_beams=num_beams, max_new_tokens=14, length_penalty=0.6,
                    early_stopping=True)
    g = model.generation_config
    g.eos_token_id, g.pad_token_id = tok.eos_token_id, tok.pad_token_id
    search = search_from(settings, g, eos=tok.eos_token_id, pad=tok.pad_token_id, device=ids.device)
    ours = generate_plain(model, ids, mask, search)
    assert len(decode_calls) == 1
    with torch.inference_mode():
        theirs = model.generate(input_ids=ids, attention_mask=mask, **settings)
    theirs = theirs[:, 1:] if encoder_decoder else theirs[:, ids.shape[1]:]
    assert strip_generated(ours, tok.eos_token_id, tok.pad_token_id) == \
        strip_generated(theirs, tok.eos_token_id, tok.pad_token_id)


def test_sampling_follows_the_seed_and_the_nucleus(decode_calls):
    model = _model("tiny-llama", "tiny-llama")
    ids, mask = _batch(model)
    sample = dict(do_sample=True, temperature=1.0, top_p=0.9, num_beams=1, max_new_tokens=12)
    torch.manual_seed(5)
    a = model.generate_ids(ids, mask, **sample)
    torch.manual_seed(5)
    b = model.generate_ids(ids, mask, **sample)
    torch.manual_seed(6)
    c = model.generate_ids(ids, mask, **sample)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a nucleus too small for a second token is greedy decoding
    torch.manual_seed(7)
    tiny = model.generate_ids(ids, mask, **{**sample, "top_p": 1e-6})
    greedy = model.generate_ids(ids, mask, do_sample=False, num_beams=1, max_new_tokens=12)
    eos, padding = model.config.eos_token_id, model.config.pad_token_id
    assert strip_generated(tiny, eos, padding) == strip_generated(greedy, eos, padding)
    assert len(decode_calls) == 5


def test_suppressed_and_early_end_tokens_are_never_emitted():
    torch.manual_seed(0)
    model = M.load_model("tiny-gpt2", role="model").eval()
    ids = torch.randint(10, 200, (3, 9))
    mask = torch.ones_like(ids)
    logits_first = None
    for do_sample in (False, True):
        search = Search(max_new_tokens=30, eos_token_id=1, pad_token_id=0, min_new_tokens=30, do_sample=do_sample,
                        suppress=(5, 6, 7))
        step, logits_first = start(model, mask, search, input_ids=ids)
        out = decode(step, logits_first, search)
        assert out.shape == (3, 30)
        assert not torch.isin(out, torch.tensor([1, 5, 6, 7])).any()


def test_options_decode_does_not_know_fall_back_to_transformers():
    model = _model("tiny-gpt2", None)
    g = model.slm.generation_config
    assert search_from({"max_new_tokens": 5, "stop_strings": ["\n"]}, g, eos=1, pad=0, device=None) is None
    assert search_from({"max_new_tokens": 5}, g, eos=1, pad=0, device=None) is not None
    g.bad_words_ids = [[5]]  # a generation config asking for what decode does not do
    assert search_from({"max_new_tokens": 5}, g, eos=1, pad=0, device=None) is None
    # and the model still generates, through transformers
    ids, mask = _batch(model)
    assert len(model.generate(ids, mask, max_new_tokens=5, do_sample=False, num_beams=1)) == len(PROMPTS)


def test_beam_search_prefills_each_prompt_once():
    """One prefill per prompt, then the cache is repeated to the beams: the prefill sees the batch, not beams x it."""
    model = _model("tiny-llama", None)
    ids, mask = _batch(model)
    widths: list[int] = []
    hook = model.slm.register_forward_pre_hook(lambda m, args, kwargs: widths.append(
        (kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]).shape[0]),
        with_kwargs=True)
    try:
        model.generate_ids(ids, mask, do_sample=False, num_beams=4, max_new_tokens=6, min_new_tokens=6)
    finally:
        hook.remove()
    assert widths[0] == len(PROMPTS) and set(widths[1:]) == {4 * len(PROMPTS)}


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-t5"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.95)])
def test_sampling_draws_from_transformers_distribution(spec, temperature, top_p, monkeypatch):
    """The distribution our loop samples the first token from is the one transformers' generate samples from for
    the same model and options: its generation config leaves top_k unset (None), which generate reads as 50."""
    import llm2slm_cli.decoding as D

    model = M.load_model(spec, role="model").eval()
    tok = M.load_tokenizer(spec)
    g = model.generation_config
    g.eos_token_id, g.pad_token_id = tok.eos_token_id, tok.pad_token_id
    assert g.top_k is None
    ids, mask = pad([tok(p).input_ids for p in PROMPTS], tok.pad_token_id)
    if not model.config.is_encoder_decoder:
        ids, mask = _right_to_left(ids, mask)
    settings = dict(do_sample=True, temperature=temperature, top_p=top_p, num_beams=1, max_new_tokens=1)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True,
                             **settings)
    theirs = torch.softmax(out.scores[0].float(), -1)
    seen = []
    process = D._process
    monkeypatch.setattr(D, "_process", lambda *a, **k: seen.append(process(*a, **k)) or seen[-1])
    search = search_from(settings, g, eos=tok.eos_token_id, pad=tok.pad_token_id, device=ids.device)
    assert search is not None and search.top_k == 50
    generate_plain(model, ids, mask, search)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], theirs, atol=1e-6, rtol=1e-4)
    assert set((theirs > 0).sum(-1).tolist()) <= set(range(1, 51))  # top-k did cut: at most 50 tokens each


def test_sampling_options_name_top_k():
    model = M.load_model("tiny-llama", role="model")
    g = model.generation_config
    sample = dict(do_sample=True, max_new_tokens=3)
    assert search_from(sample, g, eos=1, pad=0, device=None).top_k == 50  # transformers' default
    assert search_from({**sample, "top_k": 0}, g, eos=1, pad=0, device=None).top_k == 0  # asked: off
    g.top_k = 7
    assert search_from(sample, g, eos=1, pad=0, device=None).top_k == 7  # the model's own
