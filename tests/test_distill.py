"""distill-labels: the LLM's outputs become targets that train reads; interrupted runs resume exactly."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from llm2slm_cli.config import DistillConfig
from llm2slm_cli.stages import distill


def _settings(toy_files, out, **kw):
    return DistillConfig(inputs=[toy_files["train"]], model="tiny-llama", out=out, num_beams=2,
                         max_new_tokens=4, shard_size=5, batch_size=3, template="upper: {src}", quiet=True, **kw)


def test_labels_are_the_llms_outputs_and_train_reads_them(cli, toy_files, tmp_path):
    distill.run(_settings(toy_files, tmp_path / "labels"))
    assert {p.name for p in (tmp_path / "labels").iterdir()} == {"examples.parquet", "manifest.json"}
    table = pq.read_table(tmp_path / "labels" / "examples.parquet")
    assert table.column_names == ["id", "prompt", "target", "reference"]
    rows = [json.loads(line) for line in toy_files["train"].read_text().splitlines()]
    assert table["id"].to_pylist() == [r["id"] for r in rows]
    assert table["reference"].to_pylist() == [r["tgt"] for r in rows]
    assert table["prompt"][0].as_py() == "upper: " + rows[0]["src"]
    manifest = json.loads((tmp_path / "labels" / "manifest.json").read_text())
    assert manifest["kind"] == "labels" and manifest["generation"]["num_beams"] == 2
    assert manifest["counts"]["examples"] == 16 and manifest["llm"]["name"] == "tiny-llama"

    # the same decoding through generate gives the same text: one code path for both stages
    cli("generate", toy_files["train"], "--model", "tiny-llama", "--template", "upper: {src}", "--num-beams", "2",
        "--max-new-tokens", "4", "--out", tmp_path / "pred", "--quiet")
    pred = pq.read_table(tmp_path / "pred" / "predictions.parquet")
    assert pred["prediction"].to_pylist() == table["target"].to_pylist()

    assert all(t.strip() for t in table["target"].to_pylist())  # the seeded preset never answers nothing here
    cli("train", tmp_path / "labels", "--slm", "tiny-gpt2", "--out", tmp_path / "run", "--batch-size", "8",
        "--micro-batch-size", "8", "--max-steps", "1", "--quiet")
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["counts"]["train_examples"] == 16
    # a labels directory made with one template refuses another
    result = cli("train", tmp_path / "labels", "--slm", "tiny-gpt2", "--template", "x {src}", "--out",
                 tmp_path / "run2", code=2)
    assert "made with template 'upper: {src}'" in result.output


def test_resume_after_a_crash_gives_the_same_labels(toy_files, tmp_path, crash_distill_on_shard):
    distill.run(_settings(toy_files, tmp_path / "straight"))
    disarm = crash_distill_on_shard(2)
    with pytest.raises(RuntimeError):
        distill.run(_settings(toy_files, tmp_path / "broken"))
    disarm()
    left = {p.name for p in (tmp_path / "broken").iterdir()}
    assert "manifest.json" not in left and {"examples-00000.parquet", "examples-00001.parquet"} <= left
    distill.run(_settings(toy_files, tmp_path / "broken", resume=True))
    assert pq.read_table(tmp_path / "broken" / "examples.parquet").equals(
        pq.read_table(tmp_path / "straight" / "examples.parquet"))
    assert {p.name for p in (tmp_path / "broken").iterdir()} == {"examples.parquet", "manifest.json"}


def test_resume_refuses_changed_options(toy_files, tmp_path, monkeypatch):
    monkeypatch.setattr(distill, "labels_table", lambda rows, *shard: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        distill.run(_settings(toy_files, tmp_path / "o"))
    monkeypatch.undo()
    from llm2slm_cli.errors import UserError

    with pytest.raises(UserError, match="cannot resume"):
        distill.run(DistillConfig(inputs=[toy_files["train"]], model="tiny-llama", out=tmp_path / "o", num_beams=1,
                                  shard_size=5, quiet=True, resume=True))
