"""The model card `export` writes (model_card.py): metadata that huggingface_hub reads back, a license and base
models only where they are known, datasets from hub inputs, eval results named alike from any directory, how to
load it that works, and no local path anywhere.

`ModelCard.validate()` is not called: it posts the card to the Hub's validation endpoint, and tests run offline. The
card is checked the way huggingface_hub reads it instead: `ModelCard(text)` parses the YAML into ModelCardData and
the model-index into EvalResults (a malformed one raises), and the YAML is what ModelCardData writes."""

from __future__ import annotations

import json
import re
import shutil
from email.message import Message
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from llm2slm_cli import model_card

LOCAL_PATH = re.compile(r"(?<![\w.:/~])/(?:[\w.-]+/)+[\w.-]*")  # an absolute path; not a URL's or a hub id's slash


def assert_no_local_path(text: str) -> None:
    assert "/tmp" not in text and str(Path.home()) not in text and "~/" not in text
    assert not LOCAL_PATH.search(text), LOCAL_PATH.search(text)


def read_card(text: str):
    """The card as huggingface_hub reads it, and its YAML as it stands in the file."""
    card = ModelCard(text)
    front = yaml.safe_load(text.split("---")[1])
    assert front == card.data.to_dict()
    return card, front


def test_an_exported_card_reads_back_and_names_no_local_path(cli, trained_checkpoint, toy_files, tmp_path,
                                                             monkeypatch):
    """Predictions and eval made with relative paths in one directory, export run from another: the model-index names
    the evaluation data by its file's stem (not the predictions directory, not a path), with sacrebleu's signatures."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(toy_files["dev"], work / "test.jsonl")
    monkeypatch.chdir(work)
    cli("generate", "test.jsonl", "--model", trained_checkpoint, "--out", "pred-llm2slm", "--num-beams", 1,
        "--max-new-tokens", 4, "--quiet")
    cli("eval", "pred-llm2slm", "--out", "scored", "--metrics", "bleu,chrf", "--quiet")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cli("export", trained_checkpoint, "--out", tmp_path / "exported", "--eval", work / "scored", "--quiet")
    text = (tmp_path / "exported" / "README.md").read_text()
    card, front = read_card(text)
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.tags == ["llm2slm", "llm-to-slm", "custom_code"]
    assert data.license is None and data.base_model is None and data.datasets is None  # presets: nothing to name
    metrics = json.loads((work / "scored" / "metrics.json").read_text())["metrics"]
    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == {"bleu", "chrf"} and {r.dataset_name for r in results.values()} == {"test"}
    assert results["bleu"].metric_config == metrics["bleu"]["signature"]
    assert results["chrf"].metric_value == round(metrics["chrf"]["score"], 2)
    assert front["model-index"][0]["name"] == "exported"
    assert_no_local_path(text)
    for section in ("## Intended use", "## Limitations", "## Training", "## Metrics", "## How to load"):
        assert section in text
    assert "Measured on `test`" in text and "repeat a word n-gram" in text and "arxiv.org/abs/2402.16844" in text
    assert "AutoModelForCausalLM.from_pretrained(MODEL, trust_remote_code=True)" in text
    assert "pip install llm2slm" not in text and "pip install -e ." in text


def _config(slm: str, llm: str | None, **kw):
    from llm2slm_cli.llm2slm import ModelConfig

    identity = None if llm is None else {"name": llm, "kind": "encoder-decoder", "layer": 24, "dtype": "bfloat16",
                                         "d_model": 1024, "fingerprint": "ab" * 32}
    kind = "encoder-decoder" if "t5" in slm else "decoder-only"
    return ModelConfig(slm=slm, slm_kind=kind, llm=identity, decoder_start_token_id=0 if kind != "decoder-only"
                       else None, **kw)


CHECKPOINT = {"config": {"inputs": ["hf:cnn_dailymail:3.0.0:train"], "batch_size": 8, "max_steps": 100, "lr": 1e-4},
              "step": 100, "counts": {"train_examples": 1000}}


def test_hub_base_models_give_license_base_model_and_datasets():
    text = model_card.render("flan-pair", _config("google/flan-t5-small", "google/flan-t5-large"), CHECKPOINT,
                             None, None, bundled=False, unsupported=None)
    card, front = read_card(text)
    assert front["license"] == "apache-2.0" and front["datasets"] == ["cnn_dailymail"]
    assert front["base_model"] == ["google/flan-t5-large", "google/flan-t5-small"]
    assert front["pipeline_tag"] == "text2text-generation" and "model-index" not in front
    assert "AutoModelForSeq2SeqLM.from_pretrained(MODEL, trust_remote_code=True)" in text
    assert "Quality was not measured" in text and "`hf:cnn_dailymail:3.0.0:train`" in text
    assert "1,000 examples" in text and "step 100" in text and "lr 0.0001" in text
    assert_no_local_path(text)


def test_a_license_is_never_guessed():
    """Base models under different licenses, or one not in the table: no `license` in the metadata."""
    mixed = read_card(model_card.render("m", _config("gpt2", "google/gemma-3-270m"), CHECKPOINT, None, None,
                                        bundled=False, unsupported=None))[1]
    assert "license" not in mixed and mixed["base_model"] == ["google/gemma-3-270m", "gpt2"]
    assert mixed["language"] == ["en"]  # the SLM writes the output: GPT-2's English
    unknown = read_card(model_card.render("u", _config("someone/some-model", None), CHECKPOINT, None, None,
                                          bundled=False, unsupported=None))[1]
    assert "license" not in unknown and unknown["base_model"] == ["someone/some-model"] and "language" not in unknown
    assert "model_name" not in unknown  # a name goes with eval results (model-index) only
    assert [model_card.known_model(m)[0] for m in ("t5-small", "google/gemma-3-270m", "Qwen/Qwen2.5-3B",
                                                   "Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.2-1B",
                                                   "gpt2-xl", "gpt2-xxl", "tiny-llama")] == \
        ["apache-2.0", "gemma", None, "apache-2.0", "llama3.2", "mit", None, None]


def test_a_local_model_is_named_by_the_hub_id_its_config_names_or_not_at_all(tmp_path):
    named, unnamed = tmp_path / "ft-flan", tmp_path / "mine"
    for directory, origin in ((named, "google/flan-t5-small"), (unnamed, str(tmp_path / "somewhere"))):
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"model_type": "t5", "_name_or_path": origin}))
    assert model_card.hub_model(str(named)) == "google/flan-t5-small" and model_card.hub_model(str(unnamed)) is None
    assert model_card.hub_model("tiny-t5") is None and model_card.hub_model("preset:t5-large") is None
    text = model_card.render("local", _config(str(named), str(unnamed)), CHECKPOINT, None, None, bundled=True,
                             unsupported=None)
    card, front = read_card(text)
    assert front["base_model"] == ["google/flan-t5-small"]
    assert "license" not in front  # the LLM's license is not known
    assert "a local model (its config names `google/flan-t5-small`)" in text and "`llm/`" in text
    assert_no_local_path(text)


def test_the_install_line_names_the_repository_only_when_the_package_does(monkeypatch):
    from importlib import metadata

    def with_urls(*urls):
        message = Message()
        for url in urls:
            message["Project-URL"] = url
        return lambda name: message

    monkeypatch.setattr(metadata, "metadata", with_urls("Repository, https://example.org/llm2slm"))
    assert model_card.install_line() == 'pip install "git+https://example.org/llm2slm"'
    monkeypatch.setattr(metadata, "metadata", with_urls())
    assert model_card.install_line().startswith("pip install -e .")

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "metadata", missing)
    assert model_card.install_line().startswith("pip install -e .")


@pytest.mark.parametrize("spec, expected", [("hf:cnn_dailymail:3.0.0:train", "cnn_dailymail"),
                                            ("data/wmt14.de-en.jsonl", "wmt14.de-en")])
def test_eval_data_is_named_by_hub_id_or_file_stem(spec, expected):
    metrics = {"predictions": {"dir": "does-not-matter", "inputs": [spec]}}
    assert model_card.eval_dataset(metrics)["name"] == expected
