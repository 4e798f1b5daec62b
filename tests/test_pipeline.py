"""encode -> train -> generate through the CLI: the files written, resume, and that conditioning works."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from llm2slm_cli.features import FeatureStore
from llm2slm_cli.llm2slm import FrozenLLM
from llm2slm_cli.runtime import tokenize_prompts

TEMPLATE = "shout: {src}"


def files(directory) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def chain(cli, toy_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("chain")
    cli("encode", "--model", "tiny-t5-large", toy_files["train"], "--template", TEMPLATE, "--out", d / "feats",
        "--shard-size", "6", "--batch-size", "4", "--quiet")
    cli("encode", "--model", "tiny-t5-large", toy_files["dev"], "--template", TEMPLATE, "--out", d / "dev_feats",
        "--quiet")
    cli("train", toy_files["train"], "--llm", "tiny-t5-large", "--slm", "tiny-gpt2", "--features", d / "feats",
        "--dev", toy_files["dev"], "--dev-features", d / "dev_feats", "--out", d / "run", "--batch-size", "8",
        "--micro-batch-size", "4", "--max-steps", "4", "--save-every", "2", "--eval-every", "2", "--quiet")
    cli("generate", toy_files["dev"], "--model", d / "run" / "final", "--out", d / "pred", "--num-beams", "2",
        "--max-new-tokens", "5", "--quiet")
    return d


def test_encode_writes_shards_index_and_manifest(chain, toy_files):
    feats = chain / "feats"
    assert files(feats) == {"features-00000.safetensors", "features-00001.safetensors", "features-00002.safetensors",
                            "index.parquet", "manifest.json"}
    manifest = json.loads((feats / "manifest.json").read_text())
    assert manifest["kind"] == "features" and manifest["schema_version"] == 1
    assert manifest["llm"]["name"] == "tiny-t5-large" and len(manifest["llm"]["fingerprint"]) == 64
    assert manifest["layer"] == 3 and manifest["feature_dtype"] == "float16" and manifest["template"] == TEMPLATE
    assert manifest["counts"]["examples"] == 16 and manifest["counts"]["truncated"] == 0
    assert manifest["input_sha256"] and manifest["timing"]["seconds"] > 0
    assert [s["examples"] for s in manifest["shards"]] == [6, 6, 4]
    index = pq.read_table(feats / "index.parquet")
    assert index.column_names == ["id", "shard", "offset", "length", "input_ids", "truncated"]
    assert index["id"].to_pylist() == [f"t{i}" for i in range(16)]  # input order

    # The stored features are the LLM's, in half precision, at every prompt's own rows.
    llm = FrozenLLM("tiny-t5-large")
    store = FeatureStore(feats)
    rows = [json.loads(line) for line in toy_files["train"].read_text().splitlines()]
    ids, _ = tokenize_prompts(llm.tokenizer, [TEMPLATE.format(**r) for r in rows], 512)
    for r, t in zip(rows, ids):
        assert store.input_ids(r["id"]).tolist() == t
        expected = llm.encode(torch.tensor([t]), torch.ones(1, len(t), dtype=torch.long))[0]
        got = store.features(r["id"])
        assert got.dtype == torch.float16 and got.shape == expected.shape
        torch.testing.assert_close(got.float(), expected, atol=2e-3, rtol=2e-3)
    assert sum(load_file(str(feats / f"features-0000{k}.safetensors"))["features"].shape[0] for k in range(3)) == \
        manifest["counts"]["tokens"]


def test_train_writes_checkpoints_log_and_manifest(chain):
    run = chain / "run"
    assert files(run) == {
        "manifest.json", "train_log.jsonl",
        "step-000002/llm2slm.json", "step-000002/slm_config.json", "step-000002/model.safetensors",
        "step-000002/manifest.json", "step-000002/optimizer.pt", "step-000002/rng_state-0.pt",
        "step-000002/trainer_state.json",
        "final/llm2slm.json", "final/slm_config.json", "final/model.safetensors", "final/manifest.json",
    } | {f"{d}/tokenizer/{f}" for d in ("step-000002", "final") for f in ("tokenizer.json", "tokenizer_config.json")}
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert "dev_loss" in log[1] and "dev_loss" in log[3] and "dev_loss" not in log[0]
    assert log[0]["lr"] == pytest.approx(1e-3 * 0.5 / 0.5 * 0 + 1e-3) or log[0]["lr"] > 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["kind"] == "training" and manifest["counts"]["train_examples"] == 16
    assert manifest["model"]["llm"]["name"] == "tiny-t5-large" and manifest["model"]["template"] == TEMPLATE
    assert manifest["result"]["dev_loss"] == log[-1]["dev_loss"]
    weights = load_file(str(run / "final" / "model.safetensors"))
    assert any(k.startswith("projector.") for k in weights) and not any("llm" in k for k in weights)


def test_generate_writes_predictions(chain, toy_files):
    table = pq.read_table(chain / "pred" / "predictions.parquet")
    assert table.column_names == ["id", "prompt", "prediction", "n_tokens", "reference"]
    assert table["id"].to_pylist() == [f"t{i}" for i in range(16, 24)]
    assert table["prompt"][0].as_py().startswith("shout: ")  # the checkpoint's template is applied
    assert max(table["n_tokens"].to_pylist()) <= 5
    manifest = json.loads((chain / "pred" / "manifest.json").read_text())
    assert manifest["kind"] == "predictions" and manifest["generation"]["num_beams"] == 2
    assert manifest["counts"]["examples"] == 8


def test_generate_with_a_plain_model_baseline(cli, toy_files, tmp_path):
    for spec in ("tiny-t5", "tiny-llama"):
        cli("generate", toy_files["dev"], "--model", spec, "--out", tmp_path / spec, "--num-beams", "1",
            "--max-new-tokens", "3", "--quiet")
        assert pq.read_table(tmp_path / spec / "predictions.parquet").num_rows == 8


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(cli, toy_files, tmp_path):
    common = [toy_files["train"], "--llm", "tiny-t5-large", "--slm", "tiny-gpt2", "--batch-size", "4",
              "--micro-batch-size", "2", "--max-steps", "6", "--dev", toy_files["dev"], "--eval-every", "3",
              "--quiet"]
    cli("train", *common, "--out", tmp_path / "straight")
    cli("train", *common, "--out", tmp_path / "broken", "--stop-after", "4")
    assert not (tmp_path / "broken" / "final").exists() and (tmp_path / "broken" / "step-000004").is_dir()
    cli("train", *common, "--out", tmp_path / "broken", code=2)  # refuses to clobber the interrupted run
    cli("train", *common, "--out", tmp_path / "broken", "--resume")
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "broken" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        return [(r["step"], r["loss"], r.get("dev_loss")) for r in
                map(json.loads, (tmp_path / run / "train_log.jsonl").read_text().splitlines())]

    assert losses("straight") == losses("broken")


@pytest.mark.slow
def test_llm_features_carry_what_the_slm_cannot_know(cli, kv_files, tmp_path):
    """The LLM (a tiny Llama trained on the whole key->letter table) knows the letters of the dev keys; the SLM's
    training data does not contain them. Conditioning works if the LLM-to-SLM model's dev loss is clearly below
    the same SLM trained alone, for a decoder-only and an encoder-decoder SLM."""
    cli("train", kv_files["all"], "--slm", "tiny-llama", "--out", tmp_path / "llm", "--batch-size", "24",
        "--micro-batch-size", "24", "--epochs", "100", "--lr", "5e-3", "--weight-decay", "0", "--quiet")
    llm = tmp_path / "llm" / "final"

    def dev_loss(name, *args):
        cli("train", kv_files["train"], *args, "--dev", kv_files["dev"], "--out", tmp_path / name, "--batch-size",
            "16", "--micro-batch-size", "16", "--quiet")
        return json.loads((tmp_path / name / "manifest.json").read_text())["result"]["dev_loss"]

    # decoder-only SLM, paper default fusion (add)
    alone = dev_loss("gpt2-alone", "--slm", "tiny-gpt2", "--epochs", "15", "--lr", "3e-3")
    fused = dev_loss("gpt2-llm", "--slm", "tiny-gpt2", "--llm", llm, "--epochs", "15", "--lr", "3e-3")
    assert fused < 0.6 * alone, (fused, alone)
    # encoder-decoder SLM; with 80 keys the T5 SLM memorises its own prompt embeddings under "add", so the
    # features are given alone ("replace"), which is the cleanest view of what they carry
    alone = dev_loss("t5-alone", "--slm", "tiny-t5", "--epochs", "30", "--lr", "3e-3")
    fused = dev_loss("t5-llm", "--slm", "tiny-t5", "--llm", llm, "--fusion", "replace", "--epochs", "30",
                     "--lr", "3e-3")
    assert fused < 0.6 * alone, (fused, alone)


def test_generate_first_line(cli, toy_files, tmp_path):
    """--first-line keeps a response's first line (a few-shot prompt's next example stays out); a plain model stops
    at the line break, and greedy decoding makes that the first line of the full response."""
    import pyarrow.parquet as pq

    from llm2slm_cli.generation import first_line

    assert first_line(" Hallo Welt\n\nEnglish: next one\nGerman:") == "Hallo Welt"
    assert first_line("\n\n") == ""
    args = ["generate", toy_files["dev"], "--model", "tiny-llama", "--max-new-tokens", "40", "--num-beams", "1",
            "--quiet"]
    cli(*args, "--out", tmp_path / "all")
    cli(*args, "--first-line", "--out", tmp_path / "first")
    full = pq.read_table(tmp_path / "all" / "predictions.parquet")["prediction"].to_pylist()
    first = pq.read_table(tmp_path / "first" / "predictions.parquet")["prediction"].to_pylist()
    assert first == [first_line(p) for p in full]
