"""The repetition penalty and the n-gram ban in our decoding loop (decoding.RepetitionControls), against transformers.

Our loop must give transformers' `generate(input_ids=...)` tokens for the same left-padded prompts (greedy, beam
search, seeded sampling), counting the prompt as generate does; an LLM-to-SLM model counts its SLM prompt's tokens
in the SLM's own ids (a trimmed vocabulary too), checked against a computation written out step by step. The
models are tiny presets with fresh weights, which fall into loops: the n-gram ban must really break them."""

from __future__ import annotations

import copy
import json

import pyarrow.parquet as pq
import pytest
import torch
from conftest import error_line, write_jsonl

from llm2slm_cli import load
from llm2slm_cli import loading as M
from llm2slm_cli.data import pad
from llm2slm_cli.decoding import RepetitionControls, Search, generate_plain, search_from
from llm2slm_cli.errors import UserError
from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM, _right_to_left, strip_generated

PROMPTS = ["alpha beta alpha beta", "a longer prompt, with more tokens", "gamma", "delta epsilon zeta"]
CONTROLS = [dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2),
            dict(repetition_penalty=1.3, no_repeat_ngram_size=2)]


def _name(settings: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in settings.items())


def _repeats(row: list[int], n: int = 2) -> bool:
    grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
    return len(grams) != len(set(grams))


def _repeats_after(prompt: list[int], row: list[int], n: int = 2) -> bool:
    """Whether a token of `row` completes an n-gram already in `prompt` + `row` before it (what the ban forbids;
    the prompt itself may repeat)."""
    seq = prompt + row
    return any(tuple(seq[i - n + 1:i + 1]) in {tuple(seq[j:j + n]) for j in range(i - n + 1)}
               for i in range(max(len(prompt), n - 1), len(seq)))


def _plain(spec: str):
    torch.manual_seed(1)
    model = M.load_model(spec, role="model").eval()
    tok = M.load_tokenizer(spec)
    g = model.generation_config
    g.eos_token_id, g.pad_token_id = tok.eos_token_id, tok.pad_token_id
    ids, mask = pad([tok(p).input_ids for p in PROMPTS], tok.pad_token_id)
    if not model.config.is_encoder_decoder:
        ids, mask = _right_to_left(ids, mask)
    return model, tok, ids, mask


def _ours_and_theirs(model, tok, ids, mask, settings, seed: int = 0):
    search = search_from(settings, model.generation_config, eos=tok.eos_token_id, pad=tok.pad_token_id,
                         device=ids.device)
    assert search is not None  # our loop takes these options
    torch.manual_seed(seed)
    ours = generate_plain(model, ids, mask, search)
    torch.manual_seed(seed)
    with torch.inference_mode():
        theirs = model.generate(input_ids=ids, attention_mask=mask, **settings)
    theirs = theirs[:, 1:] if model.config.is_encoder_decoder else theirs[:, ids.shape[1]:]
    return strip_generated(ours, tok.eos_token_id, tok.pad_token_id), \
        strip_generated(theirs, tok.eos_token_id, tok.pad_token_id)


# ------------------------------------------------------------------------------ our loop equals transformers'


@pytest.mark.parametrize("controls", CONTROLS, ids=_name)
@pytest.mark.parametrize("search", [dict(do_sample=False, num_beams=1), dict(do_sample=False, num_beams=4),
                                    dict(do_sample=True, num_beams=1, top_p=0.9, temperature=1.0)], ids=_name)
@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama", "tiny-t5"])
def test_our_loop_equals_transformers_generate(spec, search, controls, decode_calls):
    """Left-padded prompts of different lengths: the penalty skips the padding and the n-gram ban counts it, as
    generate reads its attention mask; an encoder-decoder counts its decoder's ids only. Sampling: transformers
    draws from torch's global generator, as our loop does without one, so the same seed gives the same tokens."""
    model, tok, ids, mask = _plain(spec)
    settings = dict(max_new_tokens=16, **search, **controls)
    ours, theirs = _ours_and_theirs(model, tok, ids, mask, settings, seed=3)
    assert len(decode_calls) == 1  # our loop ran (an option it did not know would have gone to generate)
    assert ours == theirs


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama", "tiny-t5"])
def test_the_controls_change_the_output(spec):
    """The equality above is not vacuous: the options change what both engines generate."""
    model, tok, ids, mask = _plain(spec)
    for beams in (1, 4):
        base = dict(max_new_tokens=16, do_sample=False, num_beams=beams)
        plain, _ = _ours_and_theirs(model, tok, ids, mask, base)
        both, _ = _ours_and_theirs(model, tok, ids, mask, {**base, **CONTROLS[2]})
        assert plain != both


def test_the_repetition_penalty_counts_the_prompt():
    """A decoder-only model's prompt tokens are penalised too (generate's input_ids hold the prompt): prompts that
    end in tiny-gpt2's own loop go on looping, unless the penalty, which only the prompt can trigger at the first
    new token, turns it away."""
    model, tok, ids, mask = _plain("tiny-gpt2")
    greedy = dict(do_sample=False, num_beams=1)
    looped, _ = _ours_and_theirs(model, tok, ids, mask, {**greedy, "max_new_tokens": 8})
    real = [[t for t, keep in zip(row, m) if keep] for row, m in zip(ids.tolist(), mask.tolist())]
    ids, mask = _right_to_left(*pad([r + loop for r, loop in zip(real, looped)], tok.pad_token_id))
    first, _ = _ours_and_theirs(model, tok, ids, mask, {**greedy, "max_new_tokens": 1})
    assert first == [loop[-1:] for loop in looped]  # it goes on with the token it was repeating
    strong, theirs = _ours_and_theirs(model, tok, ids, mask, {**greedy, "max_new_tokens": 1,
                                                             "repetition_penalty": 50.0})
    assert strong == theirs and all(a != b for a, b in zip(strong, first))


def test_our_loop_runs_not_transformers_generate(monkeypatch):
    """The plain model of `generate` and an LLM-to-SLM model decode with the controls in our loop."""
    from llm2slm_cli.generation import PlainModel

    def refuse(*args, **kwargs):
        raise AssertionError("transformers' generate was called")

    plain = PlainModel("tiny-gpt2")
    monkeypatch.setattr(plain.model, "generate", refuse)
    tok = plain.prompt_tokenizer
    ids, mask = pad([tok(p).input_ids for p in PROMPTS], tok.pad_token_id)
    out = plain.generate(ids, mask, do_sample=False, num_beams=1, max_new_tokens=12, **CONTROLS[2])
    assert not any(_repeats(row) for row in out)

    model = _llm2slm()
    monkeypatch.setattr(model.slm, "generate", refuse)
    ids, mask = _batch(model)
    for beams in (1, 3):
        model.generate(ids, mask, do_sample=False, num_beams=beams, max_new_tokens=8, **CONTROLS[2])


def test_without_the_controls_the_loop_does_no_extra_work(monkeypatch):
    """Neither option set: no controls are built, so each step is what it was."""
    from llm2slm_cli import decoding

    built = []
    real = decoding.RepetitionControls.__init__
    monkeypatch.setattr(decoding.RepetitionControls, "__init__", lambda self, *a, **k: built.append(1) or
                        real(self, *a, **k))
    model, tok, ids, mask = _plain("tiny-gpt2")
    for beams in (1, 3):
        _ours_and_theirs(model, tok, ids, mask, dict(do_sample=False, num_beams=beams, max_new_tokens=4))
    assert built == []
    _ours_and_theirs(model, tok, ids, mask, dict(do_sample=False, num_beams=1, max_new_tokens=4,
                                                 no_repeat_ngram_size=3))
    assert built == [1]


@pytest.mark.parametrize("beams", [1, 4])
def test_no_repeat_ngram_size_breaks_a_loop(beams):
    """tiny-gpt2 repeats itself without the ban; with no_repeat_ngram_size=2 no bigram of the prompt and the
    response appears twice (among those the response completes)."""
    model, tok, ids, mask = _plain("tiny-gpt2")
    base = dict(do_sample=False, num_beams=beams, max_new_tokens=24)
    looping, _ = _ours_and_theirs(model, tok, ids, mask, base)
    assert all(_repeats(row) for row in looping)  # the test can fail: without the ban, every row loops
    banned, _ = _ours_and_theirs(model, tok, ids, mask, {**base, "no_repeat_ngram_size": 2})
    for prompt, m, row in zip(ids.tolist(), mask.tolist(), banned):
        real = [t for t, keep in zip(prompt, m) if keep]
        assert len(row) > 2 and not _repeats_after(real, row)


def test_the_generation_config_can_set_them():
    """Set in the model's generation config, they are taken from there (as generate takes them), not refused."""
    model, tok, ids, mask = _plain("tiny-llama")
    g = model.generation_config
    g.repetition_penalty, g.no_repeat_ngram_size = 1.3, 2
    search = search_from({"max_new_tokens": 5}, g, eos=1, pad=0, device=None)
    assert search is not None and (search.repetition_penalty, search.no_repeat_ngram_size) == (1.3, 2)
    ours, theirs = _ours_and_theirs(model, tok, ids, mask, dict(do_sample=False, num_beams=2, max_new_tokens=12))
    assert ours == theirs
    assert search_from({"max_new_tokens": 5, "no_repeat_ngram_size": 0}, g, eos=1, pad=0,
                       device=None).no_repeat_ngram_size == 0  # the call's option wins


def test_prompt_ids_past_the_vocabulary_count_in_ngrams_and_are_never_banned():
    """Ids the scores have no column for (prompt tokens a trimmed SLM lacks) take part in n-grams as themselves:
    after [9, 3] comes 5, so 5 is banned after 9 but not after 8, and the ids past the vocabulary never fault."""
    vocab = 6
    search = Search(max_new_tokens=1, eos_token_id=None, pad_token_id=0, no_repeat_ngram_size=3,
                    repetition_penalty=2.0)
    prompt = torch.tensor([[9, 3, 5, 1, 9, 3], [9, 3, 5, 1, 8, 3]])
    scores = torch.ones(2, vocab)
    controls = RepetitionControls.of(search, prompt, torch.ones_like(prompt), scores)
    out = controls(prompt, scores)
    assert out.shape == (2, vocab)
    assert out[0, 5] == float("-inf") and out[1, 5] == 0.5  # banned after (9, 3); after (8, 3) only penalised
    assert out[:, 3].tolist() == [0.5, 0.5] and out[:, 2].tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------------------------ LLM-to-SLM


def _llm2slm(slm: str = "tiny-llama", llm: str | None = "tiny-llama") -> LLMToSLM:
    torch.manual_seed(0)
    return LLMToSLM.build(slm, FrozenLLM(llm) if llm else None).eval()


def _batch(model: LLMToSLM):
    tok = model.prompt_tokenizer
    return pad([tok(p).input_ids for p in PROMPTS], tok.pad_token_id)


def _trimmed(model: LLMToSLM, kept: set[int]) -> LLMToSLM:
    small = copy.deepcopy(model)
    small.__dict__["llm"] = model.llm
    tok = small.target_tokenizer
    small.trim_vocabulary(torch.tensor(sorted(kept)), tok.unk_token_id if tok.unk_token_id is not None
                          else small.config.pad_token_id)
    return small.eval()


def _kept(model: LLMToSLM, ids, mask) -> set[int]:
    """Every token the untrimmed model generates with or without the controls, and only some prompt tokens: the
    trimmed SLM lacks the rest of the prompt."""
    kept = {t for settings in ({}, CONTROLS[2]) for row in model.generate(
        ids, mask, do_sample=False, num_beams=1, max_new_tokens=16, **settings) for t in row}
    prompt = sorted({int(t) for t in ids[mask.bool()]} - kept)
    return kept | set(prompt[::2])


def _reference(model: LLMToSLM, ids, mask, n: int, penalty: float, ngram: int) -> list[list[int]]:
    """Greedy decoding written out: each step runs the SLM over the whole fused prompt and the tokens so far (no
    cache), widens its scores to the tokenizer's vocabulary (-inf for tokens a trimmed SLM lacks) and applies
    transformers' processors to tokenizer ids, the left-padded prompt then the new tokens, as generate would for
    that vocabulary."""
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    eos, padding = model.config.eos_token_id, model.config.pad_token_id
    with torch.inference_mode():
        p, pm = _right_to_left(model.prompt_embeddings(ids, mask), mask)
        left, _ = _right_to_left(ids.masked_fill(mask == 0, padding), mask)
        processors = LogitsProcessorList([
            RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=(pm != 0).int().argmax(1)),
            NoRepeatNGramLogitsProcessor(ngram)])
        trim = model.config.trim_vocab
        embed = model.slm.get_input_embeddings()
        new = ids[:, :0]
        done = torch.zeros(len(ids), dtype=torch.bool)
        for _ in range(n):
            x = torch.cat([p, embed(model.slm_ids(new))], 1)
            m = torch.cat([pm, torch.ones_like(new)], 1)
            logits = model.slm(inputs_embeds=x, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0),
                               use_cache=False).logits[:, -1].float()
            if trim is not None:
                wide = logits.new_full((len(ids), trim["full"]), float("-inf"))
                wide[:, model.slm_vocab] = logits
                logits = wide
            token = processors(torch.cat([left, new], 1), logits).argmax(-1).masked_fill(done, padding)
            new = torch.cat([new, token.unsqueeze(1)], 1)
            done |= token == eos
    return strip_generated(new, eos, padding)


def test_llm2slm_with_a_trimmed_vocabulary_counts_the_prompt_in_its_own_ids(decode_calls):
    """A trimmed LLM-to-SLM model: the penalty and the n-gram ban see the SLM prompt's tokens and the new ones,
    mapped into the SLM's ids; the output equals the written-out computation over tokenizer ids, and the loop the
    model falls into without the ban is broken."""
    model = _llm2slm()
    ids, mask = _batch(model)
    small = _trimmed(model, _kept(model, ids, mask))
    lacking = {int(t) for t in ids[mask.bool()]} - set(small.slm_vocab.tolist())
    assert lacking  # the prompts hold tokens the trimmed SLM does not have
    greedy = dict(do_sample=False, num_beams=1, max_new_tokens=16)
    looping = small.generate(ids, mask, **greedy)
    assert any(_repeats(row) for row in looping)
    decode_calls.clear()
    for controls in CONTROLS:
        got = small.generate(ids, mask, **greedy, **controls)
        assert got == _reference(small, ids, mask, 16, controls.get("repetition_penalty", 1.0),
                                 controls.get("no_repeat_ngram_size", 10**6)), controls
        if "no_repeat_ngram_size" in controls:
            for prompt, m, row in zip(ids.tolist(), mask.tolist(), got):
                real = [t for t, keep in zip(prompt, m) if keep]
                assert not _repeats_after(real, row)
    assert len(decode_calls) == len(CONTROLS)
    # the untrimmed model against the same computation
    assert model.generate(ids, mask, **greedy, **CONTROLS[2]) == _reference(model, ids, mask, 16, 1.3, 2)


@pytest.mark.parametrize("beams", [1, 3])
def test_a_trimmed_slm_alone_equals_transformers_on_its_widened_copy(beams):
    """An SLM trained alone, trimmed: our loop over its own ids gives what transformers' generate gives with the
    tokenizer's ids on the SLM widened back to the full vocabulary (plain_slm; lacking tokens never win)."""
    model = _llm2slm("tiny-gpt2", None)
    ids, mask = _batch(model)
    small = _trimmed(model, _kept(model, ids, mask))
    assert {int(t) for t in ids[mask.bool()]} - set(small.slm_vocab.tolist())
    settings = dict(do_sample=False, num_beams=beams, max_new_tokens=16, **CONTROLS[2])
    ours = small.generate(ids, mask, **settings)
    left, left_mask = _right_to_left(ids, mask)
    with torch.inference_mode():
        theirs = small.plain_slm().generate(input_ids=left, attention_mask=left_mask, **settings)[:, ids.shape[1]:]
    assert ours == strip_generated(theirs, small.config.eos_token_id, small.config.pad_token_id)


def test_the_repetition_prompt_of_an_llm2slm_model():
    """Kept prompt tokens in the SLM's ids, lacking ones past its head (equal tokens equal, different ones
    different), padding on the left as the pad id; an encoder-decoder SLM: its decoder start token."""
    model = _llm2slm()
    ids, mask = _batch(model)
    small = _trimmed(model, _kept(model, ids, mask))
    pad_id = int(small.slm_ids(torch.tensor(small.config.pad_token_id)))
    history, history_mask = small.repetition_prompt(ids, mask, pad=pad_id)
    left, left_mask = _right_to_left(ids, mask)
    assert torch.equal(history_mask, left_mask) and (history[left_mask == 0] == pad_id).all()
    vocab = len(small.slm_vocab)
    for h, t in zip(history[left_mask.bool()].tolist(), left[left_mask.bool()].tolist()):
        assert (small.slm_vocab[h] == t) if h < vocab else t not in set(small.slm_vocab.tolist())
    pairs = {(h, t) for h, t in zip(history[left_mask.bool()].tolist(), left[left_mask.bool()].tolist())}
    assert len({h for h, _ in pairs}) == len({t for _, t in pairs}) == len(pairs)  # one id per token
    assert any(h >= vocab for h, _ in pairs)

    t5 = _llm2slm("tiny-t5", "tiny-t5-large")
    ids, mask = _batch(t5)
    history, history_mask = t5.repetition_prompt(ids, mask, pad=0)
    assert history_mask is None and history.tolist() == [[t5.slm.generation_config.decoder_start_token_id]] * 4


def test_an_llm2slm_model_refuses_them_where_transformers_decodes():
    model = _llm2slm()
    ids, mask = _batch(model)
    with pytest.raises(UserError, match="repetition_penalty need this toolkit's decoding loop"):
        model.generate(ids, mask, engine="transformers", max_new_tokens=3, repetition_penalty=1.2)
    model.generate(ids, mask, engine="transformers", max_new_tokens=3, repetition_penalty=1.0)  # off: decodes


# ------------------------------------------------------------------------------------------ CLI, API, config

GEN = ["--model", "tiny-gpt2", "--num-beams", "1", "--max-new-tokens", "10", "--quiet"]


def test_generate_flags_reach_the_loop_and_the_manifest(cli, toy_files, tmp_path):
    base = tmp_path / "base"
    cli("generate", toy_files["dev"], *GEN, "--out", base)
    out = tmp_path / "controlled"
    cli("generate", toy_files["dev"], *GEN, "--repetition-penalty", "1.3", "--no-repeat-ngram-size", "2",
        "--out", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generation"]["repetition_penalty"] == 1.3 and manifest["generation"]["no_repeat_ngram_size"] == 2
    assert manifest["config"]["repetition_penalty"] == 1.3 and manifest["config"]["no_repeat_ngram_size"] == 2
    unset = json.loads((base / "manifest.json").read_text())["generation"]
    assert "repetition_penalty" not in unset and "no_repeat_ngram_size" not in unset  # off: as recorded before
    rows = pq.read_table(out / "predictions.parquet").to_pylist()
    assert [r["prediction"] for r in rows] != \
        [r["prediction"] for r in pq.read_table(base / "predictions.parquet").to_pylist()]
    # the Python API gives the same responses for the same options
    texts = [json.loads(line)["src"] for line in toy_files["dev"].read_text().splitlines()]
    plain = load("tiny-gpt2", device="cpu")
    assert plain.generate(texts, num_beams=1, max_new_tokens=10, repetition_penalty=1.3,
                          no_repeat_ngram_size=2) == [r["prediction"] for r in rows]


def test_generate_prompt_takes_them_too(cli, toy_files, tmp_path):
    """--prompt (stdout) decodes with them like an examples file."""
    src = json.loads(toy_files["dev"].read_text().splitlines()[0])["src"]
    d = write_jsonl(tmp_path / "one.jsonl", [{"id": "a", "src": src}])
    flags = [*GEN, "--repetition-penalty", "1.3", "--no-repeat-ngram-size", "2"]
    cli("generate", d, *flags, "--out", tmp_path / "o")
    expected = pq.read_table(tmp_path / "o" / "predictions.parquet").to_pylist()[0]["prediction"]
    assert cli("generate", "--prompt", src, *flags).stdout.strip() == expected


@pytest.mark.parametrize("option,value,message", [
    ("--repetition-penalty", "0", "--repetition-penalty must be positive"),
    ("--repetition-penalty", "-1.5", "--repetition-penalty must be positive"),
    ("--repetition-penalty", "nan", "--repetition-penalty must be a finite number"),
    ("--repetition-penalty", "inf", "--repetition-penalty must be a finite number"),
    ("--no-repeat-ngram-size", "-1", "--no-repeat-ngram-size must be 0 or more"),
])
def test_bad_values_are_one_line_and_exit_2(cli, option, value, message):
    msg = error_line(cli, "generate", "d.jsonl", "--model", "tiny-gpt2", "--out", "o", option, value)
    assert msg.startswith(message), msg


def test_speculative_decoding_refuses_them(cli):
    msg = error_line(cli, "generate", "d.jsonl", "--model", "tiny-gpt2", "--out", "o", "--speculative",
                     "--no-repeat-ngram-size", "3")
    assert "--speculative does not do --repetition-penalty or --no-repeat-ngram-size" in msg
    from llm2slm_cli.generation import refuse_repetition_controls

    with pytest.raises(UserError, match="speculative decoding does not do"):
        refuse_repetition_controls(1.1, 0)


def test_help_and_config_files(cli, toy_files, tmp_path):
    import yaml

    text = " ".join(cli("generate", "--help").output.split())
    assert "--repetition-penalty" in text and "--no-repeat-ngram-size" in text
    assert "Repetition penalty as transformers' generate applies it" in text
    assert "as transformers' generate does with no_repeat_ngram_size" in text
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(f"model: tiny-gpt2\ninputs: [{toy_files['dev']}]\nout: {tmp_path / 'o'}\n"
                   "repetition_penalty: 1.2\nno_repeat_ngram_size: 3\n")
    effective = yaml.safe_load(cli("generate", "--config", cfg, "--print-config").stdout)
    assert effective["repetition_penalty"] == 1.2 and effective["no_repeat_ngram_size"] == 3
    cfg.write_text(f"model: tiny-gpt2\ninputs: [{toy_files['dev']}]\nout: {tmp_path / 'o'}\n"
                   "no_repeat_ngram_size: 1.5\n")
    result = cli("generate", "--config", cfg, code=2)
    assert "option no-repeat-ngram-size takes a whole number, got 1.5" in result.output


@pytest.mark.parametrize("options, name", [
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"repetition_penalty": "1.2"}, "repetition_penalty"),
    ({"repetition_penalty": True}, "repetition_penalty"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
    ({"no_repeat_ngram_size": 1.5}, "no_repeat_ngram_size"),
    ({"no_repeat_ngram_size": True}, "no_repeat_ngram_size"),
])
def test_api_bad_values_name_the_argument(options, name):
    from llm2slm_cli.validation import InvalidArgument

    plain = load("tiny-gpt2", device="cpu")
    with pytest.raises(InvalidArgument) as e:
        plain.generate("a", max_new_tokens=2, **options)
    assert e.value.param == name


def test_api_speculative_refuses_them(trained_checkpoint):
    from llm2slm_cli.validation import InvalidArgument

    spec = load("tiny-llama", draft=trained_checkpoint, gamma=2, device="cpu")
    with pytest.raises(InvalidArgument, match="no_repeat_ngram_size"):
        spec.generate("a", max_new_tokens=2, no_repeat_ngram_size=2)
    assert len(spec.generate("a", max_new_tokens=2)) == 1
