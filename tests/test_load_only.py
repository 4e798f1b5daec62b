"""Issue 17, part 2: load only what is needed. With stored features `train` and `generate` read no LLM weights (the
LLM's identity comes from its weight files' sha256 and the features' manifest); the vocabulary adapter reads the
embedding tensor alone; a T5 LLM used for features loads its encoder alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import error_line

from llm2slm_cli import fingerprints
from llm2slm_cli import loading as M
from llm2slm_cli.llm2slm import FrozenLLM


def save_preset(spec: str, directory: Path) -> Path:
    """A preset as a plain transformers directory (weights in model.safetensors, its tokenizer beside them)."""
    M.load_model(spec).save_pretrained(str(directory))
    M.load_tokenizer(spec).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("llms")
    return {name: save_preset(name, d / name) for name in ("tiny-t5-large", "tiny-bert")}


@pytest.fixture
def llm_loads(monkeypatch) -> list[str]:
    """The specs of every LLM model load (M.load_model with role LLM)."""
    calls: list[str] = []
    real = M.load_model

    def counting(spec, **kw):
        if kw.get("role") == "LLM":
            calls.append(spec)
        return real(spec, **kw)

    monkeypatch.setattr(M, "load_model", counting)
    return calls


def force_full(monkeypatch) -> None:
    """The behaviour before this change: every FrozenLLM loads its whole model at once."""
    real = FrozenLLM.__init__
    monkeypatch.setattr(FrozenLLM, "__init__", lambda self, *a, **k: real(self, *a, **{**k, "weights": "full"}))


def test_t5_llm_encodes_with_its_encoder_alone(llm_dirs):
    spec = str(llm_dirs["tiny-t5-large"])
    whole, encoder = FrozenLLM(spec), FrozenLLM(spec, weights="encoder")
    assert type(encoder.model).__name__ == "T5EncoderModel"
    assert not any(k.startswith(("decoder.", "lm_head.")) for k in encoder.model.state_dict())
    assert sum(p.numel() for p in encoder.model.parameters()) < sum(p.numel() for p in whole.model.parameters()) / 2
    ids = torch.tensor([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]])
    mask = (torch.arange(5) < torch.tensor([[5], [3]])).long()
    assert torch.equal(encoder.encode(ids, mask), whole.encode(ids, mask))
    assert encoder.identity() == whole.identity()
    # a preset is drawn whole from its seed: its encoder is that model's, the decoder dropped
    preset_encoder = FrozenLLM("tiny-t5-large", weights="encoder")
    assert type(preset_encoder.model).__name__ == "T5EncoderModel"
    assert torch.equal(preset_encoder.encode(ids, mask), FrozenLLM("tiny-t5-large").encode(ids, mask))


def test_encode_stage_loads_the_encoder_and_writes_the_same_features(cli, toy_files, llm_dirs, tmp_path, monkeypatch,
                                                                      llm_loads):
    spec = llm_dirs["tiny-t5-large"]
    cli("encode", toy_files["train"], "--model", spec, "--out", tmp_path / "new", "--quiet")
    assert llm_loads == [str(spec)]
    force_full(monkeypatch)
    cli("encode", toy_files["train"], "--model", spec, "--out", tmp_path / "old", "--quiet")
    shard = "features-00000.safetensors"
    assert (tmp_path / "new" / shard).read_bytes() == (tmp_path / "old" / shard).read_bytes()


def test_lazy_llm_reads_nothing_but_the_embedding_rows(llm_dirs, llm_loads):
    spec = str(llm_dirs["tiny-bert"])
    lazy = FrozenLLM(spec, weights="lazy")
    identity = lazy.identity()
    rows = lazy.input_embedding_weight()
    assert not lazy.loaded and llm_loads == []
    whole = FrozenLLM(spec)
    assert torch.equal(rows, whole.input_embedding_weight()) and rows.dtype == torch.float32
    assert identity == whole.identity()
    ids, mask = torch.tensor([[2, 40, 41, 3]]), torch.ones(1, 4, dtype=torch.long)
    assert torch.equal(lazy.encode(ids, mask), whole.encode(ids, mask)) and lazy.loaded  # loaded when it encodes


def same_weights(a: Path, b: Path) -> bool:
    """Bitwise the same tensors under the same names (safetensors' header lists shared tensors in no fixed order)."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _train(cli, toy_files, llm: str | Path, feats: Path, out: Path, *extra) -> Path:
    cli("train", toy_files["train"], "--llm", llm, "--slm", "tiny-t5", "--features", feats, "--out", out,
        "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "3", "--device", "cpu", "--quiet", *extra)
    return out / "final"


@pytest.mark.parametrize("llm", ["tiny-t5-large", "tiny-bert"])  # same vocabulary as the SLM; the adapter
def test_train_with_stored_features_loads_no_llm_weights(cli, toy_files, llm_dirs, tmp_path, monkeypatch, llm,
                                                          llm_loads):
    spec = llm_dirs[llm]
    cli("encode", toy_files["train"], "--model", spec, "--out", tmp_path / "feats", "--quiet")
    llm_loads.clear()
    new = _train(cli, toy_files, spec, tmp_path / "feats", tmp_path / "new")
    assert llm_loads == [], "train loaded the LLM's weights although every feature is stored"
    config = json.loads((new / "llm2slm.json").read_text())
    assert config["vocab_adapter"] == (llm == "tiny-bert")
    force_full(monkeypatch)  # the weights as training with the whole LLM in memory gives them
    old = _train(cli, toy_files, spec, tmp_path / "feats", tmp_path / "old")
    assert llm_loads, "the comparison run loads the LLM"
    assert same_weights(new, old)


def test_generate_from_stored_features_of_a_checkpoint_loads_no_llm_weights(cli, toy_files, llm_dirs, tmp_path,
                                                                             llm_loads, monkeypatch):
    spec = llm_dirs["tiny-t5-large"]
    cli("encode", toy_files["dev"], "--model", spec, "--out", tmp_path / "dev-feats", "--quiet")
    cli("encode", toy_files["train"], "--model", spec, "--out", tmp_path / "feats", "--quiet")
    final = _train(cli, toy_files, spec, tmp_path / "feats", tmp_path / "run")
    args = ["generate", toy_files["dev"], "--model", final, "--num-beams", "2", "--max-new-tokens", "6", "--quiet"]
    llm_loads.clear()
    cli(*args, "--features", tmp_path / "dev-feats", "--out", tmp_path / "stored")
    assert llm_loads == []
    real = FrozenLLM.encode  # the features as stored: float16
    monkeypatch.setattr(FrozenLLM, "encode", lambda self, *a: real(self, *a).half().float())
    cli(*args, "--out", tmp_path / "on-the-fly")
    assert llm_loads == [str(spec)]  # on the fly: the LLM is loaded (its encoder alone)
    msg = error_line(cli, *args, "--features", tmp_path / "feats", "--out", tmp_path / "other")
    assert "has no features in" in msg, msg
    import pyarrow.parquet as pq

    a = pq.read_table(tmp_path / "on-the-fly" / "predictions.parquet").column("prediction").to_pylist()
    b = pq.read_table(tmp_path / "stored" / "predictions.parquet").column("prediction").to_pylist()
    assert a == b


def test_features_of_another_llm_are_refused_before_loading(cli, toy_files, llm_dirs, tmp_path, llm_loads):
    spec = llm_dirs["tiny-t5-large"]
    cli("encode", toy_files["train"], "--model", spec, "--out", tmp_path / "feats", "--quiet")
    llm_loads.clear()
    base = ["train", toy_files["train"], "--slm", "tiny-t5", "--features", tmp_path / "feats", "--max-steps", "1",
            "--device", "cpu", "--quiet"]
    msg = error_line(cli, *base, "--llm", "tiny-t5", "--out", tmp_path / "a")
    assert "were made with LLM" in msg or "was made with LLM" in msg, msg
    # the same name, other weights: the files' sha256 differ
    other = save_preset("tiny-t5-large", tmp_path / "changed")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    weights["shared.weight"][5] += 1.0
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    msg = error_line(cli, *base, "--llm", other, "--out", tmp_path / "b")
    assert "fingerprint" in msg, msg
    assert llm_loads == [] and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_features_of_older_versions_are_checked_by_their_tensor_fingerprint(cli, toy_files, tmp_path, llm_loads):
    """Manifests written before this change record the hash of the loaded tensors: they are still accepted (the LLM
    is loaded to hash it, as before) and a wrong one still refused."""
    feats = tmp_path / "feats"
    cli("encode", toy_files["train"], "--model", "tiny-t5-large", "--out", feats, "--quiet")
    manifest = json.loads((feats / "manifest.json").read_text())
    manifest["llm"].pop("fingerprint_kind")
    manifest["llm"]["fingerprint"] = fingerprints.state_fingerprint(M.load_model("tiny-t5-large"))
    (feats / "manifest.json").write_text(json.dumps(manifest))
    cli("train", toy_files["train"], "--llm", "tiny-t5-large", "--slm", "tiny-t5", "--features", feats, "--out",
        tmp_path / "ok", "--max-steps", "1", "--device", "cpu", "--quiet")
    manifest["llm"]["fingerprint"] = "0" * 64
    (feats / "manifest.json").write_text(json.dumps(manifest))
    msg = error_line(cli, "train", toy_files["train"], "--llm", "tiny-t5-large", "--slm", "tiny-t5", "--features",
                     feats, "--out", tmp_path / "refused", "--max-steps", "1", "--device", "cpu", "--quiet")
    assert "fingerprint 0000000000000000" in msg, msg
