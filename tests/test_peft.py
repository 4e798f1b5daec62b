"""PEFT baselines (paper Table 6): LoRA, prompt tuning and prefix tuning on the frozen SLM alone, through `peft`, in
the same model, trainer and generation as LLM-to-SLM; and the trainable-parameter report that matches them."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from accelerate.utils import set_seed
from conftest import write_jsonl

from llm2slm_cli import checkpoint
from llm2slm_cli import loading as M
from llm2slm_cli.data import pad
from llm2slm_cli.errors import UserError
from llm2slm_cli.llm2slm import LLMToSLM, parameter_counts
from llm2slm_cli.peft_baselines import peft_spec
from llm2slm_cli.runtime import tokenize_targets

PROMPTS = ["alpha beta", "a much longer prompt with many more tokens", "gamma"]
TARGETS = ["ALPHA", "LONGER TARGET TEXT", "G"]
SIZES = {"lora": {"lora_rank": 4}, "prompt": {"virtual_tokens": 5}, "prefix": {"virtual_tokens": 5,
                                                                               "prefix_hidden": 8}}
CASES = [(slm, method) for slm in ("tiny-gpt2", "tiny-llama", "tiny-t5") for method in ("lora", "prompt", "prefix")]



def build(slm: str, method: str) -> LLMToSLM:
    torch.manual_seed(0)
    model = LLMToSLM.build(slm, None, peft=peft_spec(method, M.load_config(slm), **SIZES[method])).eval()
    with torch.no_grad():  # fresh LoRA is a no-op (B = 0) and fresh virtual tokens are small: make them matter
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model


def batch(model: LLMToSLM):
    prompt_ids, prompt_mask = pad([model.prompt_tokenizer(p).input_ids for p in PROMPTS],
                                  model.prompt_tokenizer.pad_token_id)
    target_ids, target_mask = pad(tokenize_targets(model.target_tokenizer, TARGETS, 64), model.config.pad_token_id)
    return prompt_ids, prompt_mask, target_ids, target_mask


def rows(*tensors, i: int, n: int):
    return [t[i: i + 1, :n] for t in tensors]


def test_defaults_are_the_papers_table_8():
    gpt2, t5 = M.load_config("preset:gpt2"), M.load_config("preset:t5-small")
    assert peft_spec("prompt", gpt2)["num_virtual_tokens"] == 200
    prefix = peft_spec("prefix", gpt2)
    assert (prefix["num_virtual_tokens"], prefix["prefix_projection"], prefix["encoder_hidden_size"]) == (256, True, 64)
    lora = peft_spec("lora", gpt2)
    assert (lora["r"], lora["lora_alpha"], lora["lora_dropout"]) == (40, 64, 0.1)
    assert peft_spec("prompt", t5)["num_virtual_tokens"] == 1024
    prefix = peft_spec("prefix", t5)
    assert prefix["num_virtual_tokens"] == 1024 and not prefix["prefix_projection"]
    lora = peft_spec("lora", t5)
    assert (lora["r"], lora["lora_alpha"], lora["lora_dropout"]) == (24, 32, 0.1)
    # explicit sizes win; a Llama SLM takes GPT2's (the paper's decoder-only family)
    llama = peft_spec("prefix", M.load_config("tiny-llama"), virtual_tokens=7, prefix_hidden=0)
    assert (llama["num_virtual_tokens"], llama["prefix_projection"]) == (7, False)
    assert peft_spec("lora", M.load_config("tiny-llama"))["r"] == 40
    assert json.loads(json.dumps(lora)) == lora  # what llm2slm.json stores


@pytest.mark.parametrize("slm,method", CASES)
def test_only_the_adapter_trains(slm, method):
    model = build(slm, method)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    if method == "lora":
        assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    else:
        assert all(n.startswith("peft_prompt.") for n in trainable)
    counts = parameter_counts(model)
    assert counts["trainable_by_part"] == {"peft": sum(p.numel() for n, p in model.named_parameters()
                                                       if n in trainable)}
    assert not hasattr(model, "projector")


@pytest.mark.parametrize("slm,method", CASES)
def test_loss_covers_exactly_the_target_tokens(slm, method):
    model = build(slm, method)
    prompt_ids, prompt_mask, target_ids, target_mask = batch(model)
    with torch.no_grad():
        loss, tokens = model(prompt_ids, prompt_mask, target_ids, target_mask)
        assert int(tokens) == sum(len(t) for t in tokenize_targets(model.target_tokenizer, TARGETS, 64))
        # the same sum one example at a time: neither padding nor virtual tokens carry loss
        alone = 0.0
        for i in range(len(PROMPTS)):
            n, t = int(prompt_mask[i].sum()), int(target_mask[i].sum())
            alone += float(model(*rows(prompt_ids, prompt_mask, i=i, n=n),
                                 *rows(target_ids, target_mask, i=i, n=t))[0])
        assert float(loss) == pytest.approx(alone, rel=1e-5)
        # and the adapter is what the SLM sees: changing it changes the loss
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))  # not a constant shift, which the first layer norm would undo
        assert float(model(prompt_ids, prompt_mask, target_ids, target_mask)[0]) != pytest.approx(float(loss))


@pytest.mark.parametrize("slm,method", CASES)
def test_generation_is_padding_independent_and_continues_what_training_scores(slm, method, decode_calls):
    model = build(slm, method)
    prompt_ids, prompt_mask, _, _ = batch(model)
    for beams in (1, 3):
        kw = dict(max_new_tokens=6, min_new_tokens=3, num_beams=beams, do_sample=False,
                  suppress_tokens=[model.config.pad_token_id])
        together = model.generate(prompt_ids, prompt_mask, **kw)
        alone = []
        for i in range(len(PROMPTS)):
            n = int(prompt_mask[i].sum())
            alone += model.generate(*rows(prompt_ids, prompt_mask, i=i, n=n), **kw)
        assert together == alone and all(len(t) >= 3 for t in together)
    # our decoding loop, except for prefix tuning (its virtual keys and values go through transformers' generate)
    assert len(decode_calls) == (0 if method == "prefix" else 2 * (1 + len(PROMPTS)))
    # Greedy tokens are the argmax of the training forward over them (teacher forcing): the virtual tokens, masks
    # and positions are the same in training and in generation.
    pad_id = model.config.pad_token_id
    greedy = model.generate(prompt_ids, prompt_mask, max_new_tokens=5, num_beams=1, do_sample=False,
                            suppress_tokens=[pad_id])
    assert sum(map(len, greedy)) > 0
    target_ids, target_mask = pad([g + [model.config.eos_token_id] for g in greedy], model.config.pad_token_id)
    seen: list[torch.Tensor] = []
    hook = model.slm.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(prompt_ids, prompt_mask, target_ids, target_mask)
    hook.remove()
    logits = seen[0] if model.config.slm_kind == "encoder-decoder" else seen[0][:, :-1]
    logits[..., pad_id] = float("-inf")  # what suppress_tokens does in generation
    for i, g in enumerate(greedy):
        assert logits[i, : len(g)].argmax(-1).tolist() == g


@pytest.mark.parametrize("slm,method", CASES)
def test_save_and_reload_rewraps_and_generates_the_same(tmp_path, slm, method, decode_calls):
    model = build(slm, method)
    prompt_ids, prompt_mask, _, _ = batch(model)
    kw = dict(max_new_tokens=8, min_new_tokens=4, num_beams=2, suppress_tokens=[model.config.pad_token_id])
    before = model.generate(prompt_ids, prompt_mask, **kw)
    checkpoint.save(model, tmp_path / "ckpt")
    recorded = json.loads((tmp_path / "ckpt" / "llm2slm.json").read_text())["peft"]
    assert recorded["peft_type"] == {"lora": "LORA", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}[method]
    again = checkpoint.load(tmp_path / "ckpt")
    assert again.config == model.config
    assert again.generate(prompt_ids, prompt_mask, **kw) == before
    assert len(decode_calls) == (0 if method == "prefix" else 2)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="PEFT baseline"):  # no plain model without its adapter
        M.resolve(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("slm,method", [("tiny-gpt2", "lora"), ("tiny-gpt2", "prompt"), ("tiny-t5", "prefix")])
def test_training_changes_only_the_adapter(cli, toy_files, tmp_path, slm, method):
    sizes = {"lora": ["--peft-lora-rank", "4"], "prompt": ["--peft-virtual-tokens", "6"],
             "prefix": ["--peft-virtual-tokens", "6", "--peft-prefix-hidden", "8"]}[method]
    run = tmp_path / "run"
    cli("train", toy_files["train"], "--slm", slm, "--peft", method, *sizes, "--out", run, "--batch-size", "4",
        "--micro-batch-size", "2", "--max-steps", "3", "--lr", "1e-2", "--quiet")
    trained = checkpoint.load(run / "final")
    # the SLM's own weights: bitwise those it started from
    fresh = M.load_model(slm).state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in trained.slm.state_dict().items() if ".lora_" not in k}
    assert base.keys() == fresh.keys() and all(torch.equal(base[k], fresh[k]) for k in fresh)
    # the adapter: every tensor moved from where the same seed starts it
    set_seed(0)
    start = LLMToSLM.build(slm, None, peft=trained.config.peft)
    adapter = {n for n, p in start.named_parameters() if p.requires_grad}
    after, before = dict(trained.named_parameters()), dict(start.named_parameters())
    assert adapter and all(not torch.equal(after[n], before[n]) for n in adapter)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["counts"]["trainable_parameters"] == sum(before[n].numel() for n in adapter)
    assert manifest["model"]["peft"] == trained.config.peft
    # the same evaluation path as every other model
    cli("generate", toy_files["dev"], "--model", run / "final", "--out", tmp_path / "pred", "--num-beams", "2",
        "--max-new-tokens", "4", "--quiet")
    assert pq.read_table(tmp_path / "pred" / "predictions.parquet").num_rows == 8


def count(cli, *args) -> dict:
    return json.loads(cli("train", *args, "--count-parameters", "--json").output)


def test_count_parameters_matches_the_formulas_and_writes_nothing(cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"src": "a", "tgt": "b"}])
    out = tmp_path / "never"
    # LoRA r=4 on tiny-gpt2's c_attn (64 -> 192) in both blocks: r * (in + out) each
    lora = count(cli, data, "--slm", "tiny-gpt2", "--out", out, "--peft", "lora", "--peft-lora-rank", "4")
    assert lora["trainable_parameters"] == 2 * 4 * (64 + 3 * 64)
    assert lora["trainable_by_part"] == {"peft": lora["trainable_parameters"]}
    assert lora["parameters"] == sum(p.numel() for p in M.load_model("tiny-gpt2").parameters()) + 2 * 4 * 256
    # projector-only LLM-to-SLM: Linear(d_l, d_s) and Linear(d_s, d_s), nothing else
    d_l, d_s = 96, 64  # tiny-t5-large -> tiny-t5 (same vocabulary: no adapter)
    frozen = count(cli, data, "--slm", "tiny-t5", "--llm", "tiny-t5-large", "--freeze-slm", "--out", out)
    assert frozen["trainable_parameters"] == d_l * d_s + d_s + d_s * d_s + d_s
    assert frozen["trainable_by_part"] == {"projector": d_l * d_s + d_s + d_s * d_s + d_s}
    # prompt tuning: virtual tokens x d; full fine-tuning: everything
    assert count(cli, data, "--slm", "tiny-gpt2", "--out", out, "--peft", "prompt", "--peft-virtual-tokens",
                 "10")["trainable_parameters"] == 10 * 64
    full = count(cli, data, "--slm", "tiny-gpt2", "--out", out)
    assert full["trainable_parameters"] == full["parameters"]
    assert not out.exists()
    text = cli("train", data, "--slm", "tiny-gpt2", "--out", out, "--peft", "lora", "--peft-lora-rank", "4",
               "--count-parameters").output
    assert "trainable parameters" in text and "2,048" in text and not out.exists()


def _error(cli, *args) -> str:
    result = cli(*args, code=2)
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_user_mistakes(cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"src": "a", "tgt": "b"}])
    common = [data, "--slm", "tiny-gpt2", "--out", tmp_path / "o"]
    assert "leave out --llm" in _error(cli, "train", *common, "--peft", "lora", "--llm", "tiny-t5")
    assert "applies to --peft lora" in _error(cli, "train", *common, "--peft", "prompt", "--peft-lora-rank", "4")
    assert "applies to --peft prompt or prefix" in _error(cli, "train", *common, "--peft-virtual-tokens", "4")
    assert "--peft already freezes" in _error(cli, "train", *common, "--peft", "lora", "--freeze-slm")
    assert "not found in the base model" in _error(cli, "train", *common, "--peft", "lora", "--peft-lora-targets",
                                                   "nope", "--count-parameters")
    assert "--json applies to --count-parameters" in _error(cli, "train", *common, "--json")
