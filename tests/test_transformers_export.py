"""An export loads in transformers alone (`trust_remote_code=True`, the model code copied into it) and generates
what llm2slm generates: a decoder-only SLM (with an LLM of its own family read at an inner layer, with another
family's LLM through the vocabulary adapter, and alone), an encoder-decoder SLM, trimmed vocabularies among them.
Each is loaded in a fresh Python process that never imports llm2slm_cli (tests/transformers_alone.py)."""

from __future__ import annotations

import json

import pytest
from transformers_alone import PROMPTS, random_checkpoint, run_alone

from llm2slm_cli import load

CASES = {  # name: (SLM, LLM, LLM layer, trimmed, LLMToSLM.build's options)
    "llama-layer2-trimmed": ("tiny-llama", "tiny-llama", 2, True, {}),
    "gpt2-adapter": ("tiny-gpt2", "tiny-t5-large", -1, False, {}),
    "t5-trimmed-standardized": ("tiny-t5", "tiny-t5-large", -1, True, {"feature_norm": "standardize"}),
    # the SLM's own tokenizer for its output (prompt ids never reach it), trimmed
    "gpt2-own-tokenizer-trimmed": ("tiny-gpt2", "tiny-t5-large", -1, True,
                                   {"tokenizer": "slm", "fusion": "replace"}),
    "gpt2-alone-trimmed": ("tiny-gpt2", None, -1, True, {}),  # an SLM trained alone: the same model code, no LLM
}

ALONE = """
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

for name, directory in ARGS["exports"].items():
    seq2seq = AutoConfig.from_pretrained(directory, trust_remote_code=True).slm_kind == "encoder-decoder"
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(directory,
                                                                                         trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    RESULT[name] = {"class": type(model).__name__}
    for side in ("left", "right"):
        tok.padding_side = side
        inputs = tok(ARGS["prompts"], return_tensors="pt", padding=True)
        out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=8)
        RESULT[name][side] = new_ids(model, inputs, out, seq2seq)
        if not seq2seq:  # a causal LM returns the prompt first, as given
            RESULT[name][side + " prompt"] = out[:, : inputs["input_ids"].shape[1]].tolist() == \\
                inputs["input_ids"].tolist()
    out = model.generate(**inputs, num_beams=2, length_penalty=0.6, early_stopping=True, max_new_tokens=8)
    RESULT[name]["beams"] = new_ids(model, inputs, out, seq2seq)

generator = pipeline("text-generation", model=ARGS["pipeline"], trust_remote_code=True)
RESULT["pipeline"] = [r[0]["generated_text"] for r in generator(ARGS["prompts"], do_sample=False, max_new_tokens=8,
                                                                 return_full_text=False)]
try:
    AutoModelForCausalLM.from_pretrained(ARGS["unbundled"], trust_remote_code=True)
    RESULT["refused"] = None
except ValueError as e:
    RESULT["refused"] = str(e)
model = AutoModelForCausalLM.from_pretrained(ARGS["unbundled"], trust_remote_code=True, llm_path=ARGS["llm_dir"])
tok = AutoTokenizer.from_pretrained(ARGS["unbundled"], trust_remote_code=True)
inputs = tok(ARGS["prompts"], return_tensors="pt", padding=True)
RESULT["llm_path"] = new_ids(model, inputs, model.generate(**inputs, do_sample=False, max_new_tokens=8), False)
"""


@pytest.fixture(scope="module")
def exported(cli, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-export")
    exports = {}
    for name, (slm, llm, layer, trim, build) in CASES.items():
        random_checkpoint(root / f"ck-{name}", slm, llm, layer=layer, trim=trim, **build)
        cli("export", root / f"ck-{name}", "--out", root / name, "--include-llm", "yes" if llm else "no", "--quiet")
        exports[name] = root / name
    cli("export", root / "ck-llama-layer2-trimmed", "--out", root / "unbundled", "--quiet")  # the preset LLM: by name
    cli("convert", "tiny-llama", "--out", root / "llm-dir", "--quiet")
    theirs = run_alone(ALONE, root / "alone", exports=exports, prompts=PROMPTS, pipeline=exports[
        "llama-layer2-trimmed"], unbundled=root / "unbundled", llm_dir=root / "llm-dir")
    return exports, theirs


def ours(directory, **options):
    return [c.token_ids for c in load(directory, device="cpu").complete(PROMPTS, max_new_tokens=8, **options)]


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_alone_generates_what_llm2slm_generates(exported, name):
    exports, theirs = exported
    greedy = ours(exports[name], num_beams=1)
    assert theirs[name]["left"] == theirs[name]["right"] == greedy  # either padding side
    assert theirs[name]["beams"] == ours(exports[name], num_beams=2)
    assert len({tuple(r) for r in greedy}) > 1 and max(map(len, greedy)) == 8  # the prompt matters
    slm, _, _, trim, _ = CASES[name]
    assert theirs[name]["class"] == ("LLMToSLMForConditionalGeneration" if slm == "tiny-t5" else
                                     "LLMToSLMForCausalLM")
    if slm != "tiny-t5":
        assert theirs[name]["left prompt"] and theirs[name]["right prompt"]
    if trim:  # only kept tokens come out, as tokenizer ids
        model = load(exports[name], device="cpu")
        kept = set(model.impl.slm_vocab.tolist())
        assert {i for row in greedy for i in row} <= kept and len(kept) < 260


def test_the_export_holds_transformers_files_and_names_no_local_path(exported):
    exports, _ = exported
    directory = exports["t5-trimmed-standardized"]
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "llm2slm" and config["auto_map"] == {
        "AutoConfig": "configuration_llm2slm.LLMToSLMConfig",
        "AutoModelForSeq2SeqLM": "modeling_llm2slm.LLMToSLMForConditionalGeneration"}
    assert config["llm"]["subfolder"] == "llm" and config["llm"]["name_or_path"] is None
    assert config["trim_vocab"]["full"] == 260 and config["slm_config"]["model_type"] == "t5"
    assert str(directory.parent) not in (directory / "config.json").read_text()
    source = (directory / "modeling_llm2slm.py").read_text() + (directory / "configuration_llm2slm.py").read_text()
    assert "llm2slm_cli" not in source.replace("llm2slm_cli.", "")  # it imports transformers and torch only
    assert "import llm2slm_cli" not in source and "from llm2slm_cli" not in source
    manifest = json.loads((directory / "manifest.json").read_text())
    assert {"config.json", "generation_config.json", "modeling_llm2slm.py", "tokenizer.json"} <= set(
        manifest["files"])


def test_pipeline_loads_a_decoder_only_export(exported):
    exports, theirs = exported
    texts = load(exports["llama-layer2-trimmed"], device="cpu").generate(PROMPTS, num_beams=1, max_new_tokens=8)
    assert [t.strip() for t in theirs["pipeline"]] == texts and any(texts)  # llm2slm strips responses


def test_an_llm_neither_bundled_nor_on_the_hub_is_asked_for(exported):
    """A preset LLM exported by name: transformers cannot build a preset, so loading says what to pass; given the
    LLM's directory (`llm2slm convert tiny-llama`), it generates what the bundled export generates."""
    exports, theirs = exported
    assert "llm_path=" in theirs["refused"] and "--include-llm yes" in theirs["refused"]
    assert theirs["llm_path"] == theirs["llama-layer2-trimmed"]["right"]


def test_a_peft_baseline_exports_without_transformers_files(cli, tmp_path):
    """Its LoRA layers are peft's: no config.json (transformers would load something else), and the card says so."""
    from llm2slm_cli import checkpoint
    from llm2slm_cli import loading as M
    from llm2slm_cli.llm2slm import LLMToSLM
    from llm2slm_cli.peft_baselines import peft_spec

    model = LLMToSLM.build("tiny-gpt2", None, peft=peft_spec("lora", M.load_config("tiny-gpt2")))
    checkpoint.save(model, tmp_path / "ck")
    cli("export", tmp_path / "ck", "--out", tmp_path / "x", "--quiet")
    assert not (tmp_path / "x" / "config.json").exists() and not (tmp_path / "x" / "modeling_llm2slm.py").exists()
    card = (tmp_path / "x" / "README.md").read_text()
    assert "transformers cannot load this model on its own: it is a PEFT baseline" in card
    assert load(tmp_path / "x", device="cpu").generate(["alpha"], num_beams=1, max_new_tokens=2) is not None
